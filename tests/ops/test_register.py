"""H&E <-> DAPI registration on the real Xenium morphology image (SFE crop, 237 x 237 px), arrays and samples in memory.

No paired real H&E exists in the shared data: the moving image is a pseudo-H&E made from the real DAPI
(:func:`simulate_he_from_dapi`: inverted into haematoxylin purple on eosin pink, textured, noisy) and warped by a
random affine with a fixed seed, so the true transformation is known. The URL form is tested in
``tests/workflows/test_register.py``, which reuses the helpers here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from spatialdata.transformations import get_transformation

import hest_zarr
from hest_zarr.converters.xenium import read_xenium
from hest_zarr.errors import HestZarrError, InputError
from hest_zarr.ops.register import register_he_to_dapi, register_sample, simulate_he_from_dapi
from hest_zarr.store import read_record
from tests.conftest import shared

MAX_ERROR_PX = 2.0
#: Synthetic experiment.xenium pixel size: with it the SFE crop's cells (1000-1400 um) fall on its 237 px image.
TEST_PIXEL_SIZE_UM = 6.0


@pytest.fixture(scope="module")
def dapi() -> np.ndarray:
    return tifffile.imread(shared("SFE", "xenium", "morphology_focus.ome.tif"))


def max_error_px(found: np.ndarray, truth: np.ndarray, shape: tuple[int, int]) -> float:
    """Largest distance (DAPI px) between where the found and the true affine put the H&E points that land on a
    9 x 9 grid over the DAPI image, corners included.
    """
    height, width = shape
    gy, gx = np.meshgrid(np.linspace(0, height, 9), np.linspace(0, width, 9), indexing="ij")
    dapi_points = np.c_[gx.ravel(), gy.ravel(), np.ones(gx.size)]
    he_points = dapi_points @ np.linalg.inv(truth).T
    return float(np.hypot(*((he_points @ found.T) - dapi_points)[:, :2].T).max())


@pytest.mark.parametrize(("seed", "coarse_max_side"), [(0, 512), (1, 512), (2, 512), (3, 128)])
def test_recovers_a_random_affine(dapi: np.ndarray, seed: int, coarse_max_side: int) -> None:
    he, truth = simulate_he_from_dapi(dapi, seed)
    result = register_he_to_dapi(he, dapi, coarse_max_side=coarse_max_side)
    assert max_error_px(result.affine, truth, dapi.shape) <= MAX_ERROR_PX  # measured 0.15-0.33 px
    assert result.residual_px < 0.5
    assert result.n_inliers >= 40
    if coarse_max_side == 128:  # the match ran on halved images, the refinement at full resolution
        assert result.parameters["coarse_halvings"]["dapi"] == 1
        assert result.parameters["fine_halvings"] == {"he": 0, "dapi": 0}


def test_unrelated_images_fail_clearly(dapi: np.ndarray) -> None:
    tile = np.asarray(Image.open(shared("tiatoolbox", "target_image.png")).convert("RGB"))[:300, :300]
    with pytest.raises(HestZarrError, match=r"registration failed: .*SIFT matches"):
        register_he_to_dapi(tile, dapi)
    with pytest.raises(InputError, match=r"one-channel \(y, x\) DAPI"):
        register_he_to_dapi(tile, np.stack([dapi, dapi]))
    with pytest.raises(InputError, match="uniform"):
        register_he_to_dapi(tile, np.zeros_like(dapi))


def xenium_folder(tmp_path: Path) -> Path:
    """The SFE crop (symlinks) with an experiment.xenium: the real XOA 1.0.2 manifest with its pixel size set to
    6 um (synthetic) so that the crop's cells lie on its downscaled morphology image.
    """
    source = shared("SFE", "xenium")
    folder = tmp_path / "xenium"
    folder.mkdir()
    for path in source.iterdir():
        os.symlink(path, folder / path.name)
    manifest = shared("spatialdata-io_experiment_xenium", "xenium-1.0.2", "experiment.xenium")
    experiment = json.loads(manifest.read_text())
    experiment["pixel_size"] = TEST_PIXEL_SIZE_UM
    (folder / "experiment.xenium").write_text(json.dumps(experiment))
    return folder


def affine_of(element, name: str = "global") -> np.ndarray:
    return get_transformation(element, name).to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))


def misaligned_store(dapi: np.ndarray, tmp_path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """A Xenium store of the SFE crop whose H&E (pseudo, seed 4) an alignment file places 15 px off.

    Returns its URL, the true H&E px -> DAPI px affine and the file's wrong one.
    """
    he, truth = simulate_he_from_dapi(dapi, 4)
    wrong = truth.copy()
    wrong[:2, 2] += [12.0, -9.0]
    np.savetxt(tmp_path / "he_alignment.csv", wrong, delimiter=",")
    sample = read_xenium(
        xenium_folder(tmp_path), he_image=np.moveaxis(he, -1, 0).copy(), alignment=tmp_path / "he_alignment.csv"
    )
    return hest_zarr.write(sample, tmp_path / "xenium.zarr"), truth, wrong


def test_register_an_opened_store_in_memory(dapi: np.ndarray, tmp_path: Path) -> None:
    url, truth, wrong = misaligned_store(dapi, tmp_path)
    sdata = hest_zarr.open(url)
    placed = {name: affine_of(sdata[name]) for name in ("dapi", "cells", "nuclei", "transcripts")}

    kept = register_sample(sdata)
    assert kept.method == "kept: xenium_explorer_matrix" and kept.update is None
    np.testing.assert_allclose(kept.affine, wrong, atol=1e-9)

    found = register_sample(sdata, force=True)
    assert max_error_px(found.affine, truth, dapi.shape) <= MAX_ERROR_PX
    assert found.residual_px < 0.5 and found.n_inliers >= 40
    update = found.update
    assert update is not None and update.replace
    assert sorted(update.elements) == sorted(update.provenance) == ["cells", "dapi", "nuclei", "transcripts"]
    um_to_dapi = np.diag([1 / TEST_PIXEL_SIZE_UM, 1 / TEST_PIXEL_SIZE_UM, 1.0])
    for name in ("cells", "nuclei", "transcripts"):
        np.testing.assert_allclose(
            affine_of(update.elements[name]), np.linalg.inv(found.affine) @ um_to_dapi, atol=1e-9
        )
    assert max_error_px(np.linalg.inv(affine_of(update.elements["dapi"])), truth, dapi.shape) <= MAX_ERROR_PX
    provenance = update.provenance["transcripts"]
    assert provenance.method.startswith("ops.register: sift-ransac")
    assert provenance.parameters["registration"]["replaced_method"] == "xenium_explorer_matrix"
    assert provenance.estimated_error_um == pytest.approx(found.residual_px * TEST_PIXEL_SIZE_UM, rel=1e-6)
    assert provenance.inputs == read_record(url).elements["transcripts"].provenance.inputs  # the converter's files
    # neither the opened sample nor the store moved
    for name, matrix in placed.items():
        np.testing.assert_allclose(affine_of(sdata[name]), matrix, atol=1e-12)
        np.testing.assert_allclose(affine_of(hest_zarr.open(url)[name]), matrix, atol=1e-12)
    assert read_record(url).elements["dapi"].provenance.method == "xenium_explorer_matrix"


def test_sample_without_dapi(perik_visium: Path) -> None:
    sample = hest_zarr.converters.read_visium(perik_visium)
    with pytest.raises(InputError, match=r"perik: no \['dapi'\] image\(s\) to register \(found images \['he'\]\)"):
        register_sample(sample, source="perik")
