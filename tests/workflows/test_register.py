"""The registration workflow: a Xenium store's H&E registered to its DAPI and its Xenium elements rewritten.

The store is the real SFE Xenium crop with a pseudo-H&E (see ``tests/ops/test_register.py``, whose helpers and
fixture these tests reuse).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import hest_zarr
from hest_zarr.errors import InputError
from hest_zarr.schemas import HEST_ZARR_VERSION
from hest_zarr.workflows.register import register
from tests.ops import test_register as operator_tests
from tests.ops.test_register import MAX_ERROR_PX, TEST_PIXEL_SIZE_UM, affine_of, max_error_px, misaligned_store

# the operator tests' fixture: the real morphology image
dapi = operator_tests.dapi


def test_store_keeps_a_file_alignment_and_fixes_a_wrong_one(dapi: np.ndarray, tmp_path: Path) -> None:
    url, truth, wrong = misaligned_store(dapi, tmp_path)  # the alignment file is 15 px off

    kept = register(url)
    assert kept.method == "kept: xenium_explorer_matrix"
    np.testing.assert_allclose(kept.affine, wrong, atol=1e-9)

    found = register(url, force=True)
    assert max_error_px(found.affine, truth, dapi.shape) <= MAX_ERROR_PX
    sdata = hest_zarr.open(url)
    # the DAPI now lands on the H&E by the true affine; molecules and cells follow it
    assert max_error_px(np.linalg.inv(affine_of(sdata["dapi"])), truth, dapi.shape) <= MAX_ERROR_PX
    um_to_dapi = np.diag([1 / TEST_PIXEL_SIZE_UM, 1 / TEST_PIXEL_SIZE_UM, 1.0])
    for name in ("cells", "nuclei", "transcripts"):
        np.testing.assert_allclose(affine_of(sdata[name]), np.linalg.inv(found.affine) @ um_to_dapi, atol=1e-9)
    assert np.allclose(affine_of(sdata["he"]), np.eye(3))
    record = hest_zarr.get_record(sdata)
    provenance = record.elements["transcripts"].provenance
    assert provenance.method.startswith("ops.register: sift-ransac")
    assert provenance.parameters["registration"]["replaced_method"] == "xenium_explorer_matrix"
    assert provenance.hest_zarr_version == HEST_ZARR_VERSION
    he_pixel_um = record.pixel_size_um
    assert provenance.estimated_error_um == pytest.approx(found.residual_px * TEST_PIXEL_SIZE_UM, rel=1e-6)
    assert np.allclose(
        affine_of(sdata["transcripts"], "um"), np.diag([he_pixel_um, he_pixel_um, 1]) @ affine_of(sdata["transcripts"])
    )
    assert hest_zarr.validate(url) == []


def test_store_without_dapi(perik_visium: Path, tmp_path: Path) -> None:
    url = hest_zarr.write(hest_zarr.converters.read_visium(perik_visium), tmp_path / "perik.zarr")
    with pytest.raises(InputError, match=r"perik.zarr: no \['dapi'\] image"):
        register(url)
