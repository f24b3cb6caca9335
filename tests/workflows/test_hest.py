"""HEST-1k export by URL: ``export_hest(url, root, patches=...)`` on the real perik Visium sample.

The files match the converter's export of the opened store, and the patch file holds the one patch reader's cuts.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

import hest_zarr
from hest_zarr.converters import read_visium
from hest_zarr.converters.hest import export_hest as export_sample
from hest_zarr.converters.hest_patches import import_hest_h5, read_hest_h5
from hest_zarr.store import open_patches
from hest_zarr.stream import extract_patches
from hest_zarr.workflows.hest import export_hest


@pytest.fixture
def perik_store(perik_visium: Path, tmp_path: Path) -> str:
    return hest_zarr.write(read_visium(perik_visium, sample_id="PERIK"), tmp_path / "perik.zarr")


def test_export_by_url_writes_what_the_converter_writes(perik_store: str, tmp_path: Path) -> None:
    written = export_hest(perik_store, tmp_path / "by_url", jpeg_quality=None)
    expected = export_sample(hest_zarr.open(perik_store), tmp_path / "converter", jpeg_quality=None)
    assert sorted(written) == sorted(expected) == ["metadata", "st", "wsi"]
    assert written["st"] == tmp_path / "by_url" / "st" / "PERIK.h5ad"
    pd.testing.assert_frame_equal(anndata.read_h5ad(written["st"]).obs, anndata.read_h5ad(expected["st"]).obs)
    assert json.loads(written["metadata"].read_text()) == json.loads(expected["metadata"].read_text())
    assert written["wsi"].read_bytes() == expected["wsi"].read_bytes()


def test_patches_export_to_hest_h5_and_import_as_a_patch_store(perik_store: str, tmp_path: Path) -> None:
    lowres_um = hest_zarr.get_record(hest_zarr.open(perik_store)).pixel_size_um / 0.2
    written = export_hest(perik_store, tmp_path / "hest", patches=True, patch_size_px=12, patch_pixel_size_um=lowres_um)
    assert written["patches"] == tmp_path / "hest" / "patches" / "PERIK.h5"
    images, coords, barcodes = read_hest_h5(written["patches"])
    assert images.shape == (2898, 12, 12, 3) and len(set(barcodes)) == 2898
    _, batches = extract_patches(perik_store, size_px=12, pixel_size_um=lowres_um)
    direct = {spot: pixels for batch in batches for spot, pixels in zip(batch.ids, batch.images, strict=True)}
    for spot, pixels in zip(barcodes, images, strict=True):
        np.testing.assert_array_equal(pixels, direct[spot])
    imported = open_patches(import_hest_h5(written["patches"], tmp_path / "PERIK_patches.zarr"))
    assert list(imported.barcode) == list(barcodes)
    np.testing.assert_array_equal(imported.coords, coords)
    assert sorted(p.name for p in (tmp_path / "hest" / "patches").iterdir()) == ["PERIK.h5"]  # no temporary store
