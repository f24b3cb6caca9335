"""HEST-1k patch files (``patches/<id>.h5``) to and from patch stores, and the files this refuses.

The patch store is cut from real pixels: 32 px crops of the bundled MOB1 H&E around the spot detector's spot
positions (``hest_zarr/data/st_v1_mob1``), written with :func:`hest_zarr.store.write_patch_store`.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hest_zarr.converters.hest_patches import HEST_PATCH_PIXEL_SIZE_UM, export_hest_h5, import_hest_h5, read_hest_h5
from hest_zarr.errors import HestZarrError, InputError
from hest_zarr.store import open_patches, write_patch_store
from hest_zarr.workflows.demo import demo_sample_path

SIDE = 32


@pytest.fixture
def mob1_patch_store(tmp_path: Path) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """A patch store of 32 px crops of MOB1 around its first 100 detected spots; returns it and what it holds."""
    folder = demo_sample_path()
    pixels = np.asarray(Image.open(folder / "MOB1.jpg").convert("RGB"))
    spots = pd.read_csv(folder / "alignment_table_MOB1.tsv.gz", sep="\t").iloc[:100]
    ids = np.array([f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)])
    coords = np.floor(spots[["pixel_x", "pixel_y"]].to_numpy() - SIDE / 2 + 0.5).astype(np.int64)
    assert (coords >= 0).all() and (coords + SIDE <= pixels.shape[0]).all()
    images = np.stack([pixels[y : y + SIDE, x : x + SIDE] for x, y in coords])
    attributes = {"size_px": SIDE, "pixel_size_um": 4.3855, "level": 0, "source": "MOB1.jpg"}
    batches = ((ids[i : i + 40], coords[i : i + 40], images[i : i + 40]) for i in range(0, len(ids), 40))
    url = write_patch_store(tmp_path / "mob1_patches.zarr", len(ids), SIDE, batches, attributes=attributes)
    return url, ids, coords, images


def test_patch_store_round_trips_through_hest_h5(mob1_patch_store, tmp_path: Path) -> None:
    url, ids, coords, images = mob1_patch_store
    h5_path = export_hest_h5(url, tmp_path / "MOB1.h5")
    assert h5_path == tmp_path / "MOB1.h5" and [p.name for p in tmp_path.iterdir() if p.suffix == ".partial"] == []
    with h5py.File(h5_path) as h5:
        assert h5["img"].shape == (100, SIDE, SIDE, 3) and h5["barcode"].shape == (100, 1)
        assert h5["barcode"][0, 0] == ids[0].encode()  # bytes, (N, 1), as HEST writes them
        assert (h5["coords"].attrs["patch_size"], h5["coords"].attrs["patch_level"]) == (SIDE, 0)
        assert h5["coords"].attrs["pixel_size_um"] == pytest.approx(4.3855)
    read_images, read_coords, barcodes = read_hest_h5(h5_path)
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_coords, coords)
    assert list(barcodes) == list(ids) and read_coords.dtype == np.int64

    again = open_patches(import_hest_h5(h5_path, tmp_path / "imported.zarr"))
    np.testing.assert_array_equal(again.img[:], images)
    np.testing.assert_array_equal(again.coords, coords)
    assert list(again.barcode) == list(ids)
    assert (again.attributes["size_px"], again.attributes["pixel_size_um"]) == (SIDE, HEST_PATCH_PIXEL_SIZE_UM)
    images_again, coords_again, _ = read_hest_h5(export_hest_h5(again, tmp_path / "again.h5"))  # and back out
    np.testing.assert_array_equal(images_again, images)
    np.testing.assert_array_equal(coords_again, coords)
    with pytest.raises(HestZarrError, match="already exists"):
        import_hest_h5(h5_path, tmp_path / "imported.zarr")


def test_export_needs_the_target_folder(mob1_patch_store, tmp_path: Path) -> None:
    url, *_ = mob1_patch_store
    with pytest.raises(InputError, match=r"the folder .*absent does not exist"):
        export_hest_h5(url, tmp_path / "absent" / "MOB1.h5")


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
