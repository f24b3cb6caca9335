"""Pixel size from the spot lattice, on real Space Ranger, ST v1 and Visium HD positions.

References are computed from the raw files (scale factors JSON, Loupe's slide template, the spot detector's
alignment table), never with the operator's helpers. The store forms are tested in
``tests/workflows/test_pixel_size.py``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hest_zarr
from hest_zarr.converters import read_visium
from hest_zarr.converters.st_v1 import read_st_v1
from hest_zarr.elements import get_record
from hest_zarr.elements.lattice import fit_lattice
from hest_zarr.errors import InputError
from hest_zarr.ops.pixel_size import (
    PixelSizeDisagreementWarning,
    check_pixel_size,
    fit_pixel_size,
    square_lattice_um,
    visium_lattice_um,
)
from tests.conftest import shared

POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def space_ranger_positions(spatial: Path) -> tuple[pd.DataFrame, dict]:
    """Positions (either file format) and scale factors of a Space Ranger ``spatial/`` folder, read with pandas."""
    new, old = spatial / "tissue_positions.csv", spatial / "tissue_positions_list.csv"
    positions = pd.read_csv(new) if new.exists() else pd.read_csv(old, header=None, names=POSITION_COLUMNS)
    factors = json.loads((spatial / "scalefactors_json.json").read_text())
    return positions, factors


def lattice_estimate(positions: pd.DataFrame) -> float:
    centres = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    return fit_pixel_size(centres, visium_lattice_um(positions["array_row"], positions["array_col"])).pixel_size_um


def template_fiducial_diameter_um() -> float:
    """Diameter of a fiducial in Loupe's 6.5 mm slide template: its ``dia`` (image px) over the template's scale."""
    template = json.loads(shared("hest", "spot_templates", "template65.json").read_text())
    px_per_um = np.hypot(*np.array(template["transform"])[:2, :2].T)[0]
    return template["fiducial"][0]["dia"] / px_per_um


@pytest.mark.parametrize(
    ("folder", "n_spots"),
    [(("scanpy", "visium_data", "1.0.0", "spatial"), 4992), (("SFE", "visium_v2_sample01", "outs", "spatial"), 12)],
)
def test_lattice_agrees_with_spot_diameter_fullres(folder: tuple[str, ...], n_spots: int) -> None:
    positions, factors = space_ranger_positions(shared(*folder))
    assert len(positions) == n_spots
    estimate = lattice_estimate(positions)
    from_diameter = 65.0 / factors["spot_diameter_fullres"]
    assert abs(estimate / from_diameter - 1) < 0.001  # measured: 1e-7 (scanpy), 6e-4 (SFE, integer pixels)
    assert factors["fiducial_diameter_fullres"] * estimate == pytest.approx(template_fiducial_diameter_um(), rel=1e-3)


def test_cytassist_spot_diameter_spans_70_um(perik_visium: Path) -> None:
    """Space Ranger 3.0 CytAssist: the lattice and the fiducial agree; spot_diameter_fullres is 70 um, not 65."""
    positions, factors = space_ranger_positions(perik_visium / "spatial")
    estimate = lattice_estimate(positions)
    assert factors["fiducial_diameter_fullres"] * estimate == pytest.approx(template_fiducial_diameter_um(), rel=1e-4)
    assert factors["spot_diameter_fullres"] * estimate == pytest.approx(70.0, rel=1e-4)
    assert estimate / (65.0 / factors["spot_diameter_fullres"]) - 1 == pytest.approx(70 / 65 - 1, abs=1e-4)


def test_displaced_spots_are_outliers(perik_visium: Path) -> None:
    """Real perik positions, 25 of them moved by 15-40 px (synthetic displacement): trimmed, estimate unchanged."""
    positions, _ = space_ranger_positions(perik_visium / "spatial")
    centres = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    lattice = visium_lattice_um(positions["array_row"], positions["array_col"])
    clean = fit_pixel_size(centres, lattice)
    rng = np.random.default_rng(7)
    moved = rng.choice(len(centres), 25, replace=False)
    angles = rng.uniform(0, 2 * np.pi, 25)
    centres[moved] += rng.uniform(15, 40, (25, 1)) * np.c_[np.cos(angles), np.sin(angles)]
    robust = fit_pixel_size(centres, lattice)
    assert robust.n_outliers == 25
    assert robust.pixel_size_um == pytest.approx(clean.pixel_size_um, rel=1e-9)
    assert robust.uncertainty_um < 1e-9  # the inliers are Space Ranger's exact lattice
    plain = fit_lattice(lattice, centres, "plain least squares").pixel_size_um
    assert abs(plain / clean.pixel_size_um - 1) > 1e-5  # untrimmed, the displaced spots bias it


def test_lattice_positions() -> None:
    assert visium_lattice_um([0, 1, 77], [0, 1, 127]).tolist() == [[0.0, 0.0], [50.0, 87.0], [6350.0, 6699.0]]
    assert visium_lattice_um([100], [0])[0, 1] == 8650.0  # 11 mm capture area: rows 86.5 um apart
    assert square_lattice_um([2], [3], 100.0).tolist() == [[300.0, 200.0]]
    assert math.isclose(
        fit_pixel_size(
            square_lattice_um([0, 0, 1], [0, 1, 0], 2.0) * 4, square_lattice_um([0, 0, 1], [0, 1, 0], 2.0)
        ).pixel_size_um,
        0.25,
    )


def test_bad_input() -> None:
    with pytest.raises(InputError, match=r"spots: spot centres \(3, 2\) and lattice positions \(2, 2\)"):
        fit_pixel_size(np.zeros((3, 2)), np.zeros((2, 2)))
    with pytest.raises(InputError, match="not spanning a plane"):
        fit_pixel_size(np.c_[np.arange(5.0), np.arange(5.0)], np.c_[np.arange(5.0), np.arange(5.0)])


# ----------------------------------------------------------------------------------------------- sample operator
def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_check_pixel_size_of_a_converter_output() -> None:
    """ST v1 MOB1 as read (no store): the estimate, and an update that records it without touching any element."""
    folder = shared("STUtility_ST_v1")
    sample = read_st_v1(folder / "MOB1.tsv", alignment=folder / "alignment_table_MOB1.tsv")
    report = check_pixel_size(sample)
    assert report.estimate.lattice == "ST 2k array, 100 um per array unit"
    assert 4.3 < report.estimate.pixel_size_um < 4.5 and not report.flagged
    assert abs(report.differences["store"]) < 1e-3
    update = report.update
    assert dict(update.elements) == {} and not update.replace
    assert update.metadata_updates == {"pixel_size_um_estimated": report.estimate.pixel_size_um}
    spots = update.provenance["spots"]
    assert spots.converter == "st_v1" and spots.parameters["pixel_size_check"] == report.summary()
    assert "pixel_size_check" not in get_record(sample).elements["spots"].provenance.parameters  # left as it was


def test_check_pixel_size_of_an_opened_store_writes_nothing(scanpy_visium: Path, tmp_path: Path) -> None:
    root = tmp_path / "scanpy.zarr"
    hest_zarr.write(read_visium(scanpy_visium), root)
    files = _files(root)
    sdata = hest_zarr.open(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PixelSizeDisagreementWarning)
        report = check_pixel_size(sdata)
    assert report.estimate.n_spots == 100 and abs(report.differences["store"]) < 1e-4  # the h5 subset
    assert _files(root) == files
    del sdata.shapes["spots"]
    with pytest.raises(InputError, match=r"^sample: no spots element"):
        check_pixel_size(sdata)
    with pytest.raises(InputError, match=r"^scanpy: no spots element"):
        check_pixel_size(sdata, where="scanpy")
