"""Patch stores by URL: ``write_patches`` (open -> plan and cut -> commit) and the ``patch`` command.

The sample store is the real CMU-1 slide of ``tests/ops/test_patch.py``; patches are checked against direct crops.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hest_zarr.cli import app
from hest_zarr.converters.hest_patches import read_hest_h5
from hest_zarr.errors import HestZarrError
from hest_zarr.store import open_patches
from hest_zarr.workflows.patch import write_patches
from tests.ops.test_patch import direct_crop, spot_grid, write_svs_store


@pytest.fixture(scope="module")
def svs_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    return write_svs_store(tmp_path_factory.mktemp("workflow_patch"))


def test_write_patches_commits_a_patch_store_of_direct_crops(svs_store, tmp_path: Path) -> None:
    url, level0, _ = svs_store
    out = write_patches(url, tmp_path / "patches.zarr", progress=False)
    patches = open_patches(out)
    ids, _ = spot_grid()
    assert len(patches) == len(ids) and patches.img.shape == (len(ids), 224, 224, 3)
    assert sorted(patches.barcode) == sorted(ids)
    attributes = patches.attributes
    assert (attributes["level"], attributes["window_px_at_level"], attributes["resampling"]) == (0, 224, "none")
    assert (attributes["source"], attributes["element"], attributes["image"]) == (str(url), "spots", "he")
    assert (attributes["size_px"], attributes["pixel_size_um"]) == (224, 0.5)
    for index in (0, 5, len(ids) - 1):
        x0, y0 = (int(value) for value in patches.coords[index])
        np.testing.assert_array_equal(patches.img[index], direct_crop(level0, x0, y0, 224))
    with pytest.raises(HestZarrError, match="already exists"):
        write_patches(url, out, progress=False)


def test_write_patches_records_the_level_and_resampling(svs_store, tmp_path: Path) -> None:
    url, _, level1 = svs_store
    out = write_patches(url, tmp_path / "level1.zarr", size_px=112, pixel_size_um=1.0, codec="jpeg", progress=False)
    patches = open_patches(out)
    attributes = patches.attributes
    assert (attributes["level"], attributes["window_px_at_level"], attributes["resampling"]) == (1, 112, "none")
    assert attributes["level_pixel_size_um"] == pytest.approx(0.998)
    x0, y0 = (int(value) // 2 for value in patches.coords[0])  # coords are level-0 pixels
    crop = direct_crop(level1, x0, y0, 112).astype(int)
    assert np.abs(patches.img[0].astype(int) - crop).mean() < 3  # JPEG at quality 90
    area = open_patches(write_patches(url, tmp_path / "area.zarr", pixel_size_um=0.75, progress=False))
    assert (area.attributes["window_px_at_level"], area.attributes["resampling"]) == (337, "area")


def test_patch_command_writes_the_store_and_the_h5(svs_store, tmp_path: Path) -> None:
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


def test_the_patch_workflow_needs_no_torch() -> None:
    """The ``patch`` command runs on the core install: its workflow must not import torch (the ``ml`` extra)."""
    code = "import hest_zarr.workflows.patch, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
