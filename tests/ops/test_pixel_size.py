"""Pixel size from the spot lattice, on real Space Ranger, ST v1 and Visium HD positions.

References are computed from the raw files (scale factors JSON, Loupe's slide template, the spot detector's
alignment table), never with the operator's helpers. The Visium converter's pixel size is this lattice fit, so a
store that disagrees is built with the legacy converter from perik's real files and the pixel size
65 um / ``spot_diameter_fullres`` (the Visium converter's value before it fitted the lattice).
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
from hest_zarr.elements.lattice import fit_lattice
from hest_zarr.converters import read_visium
from hest_zarr.converters.legacy import read_legacy
from hest_zarr.converters.st_v1 import read_st_v1
from hest_zarr.converters.visium_hd import read_visium_hd
from hest_zarr.errors import InputError
from hest_zarr.ops.pixel_size import (
    PixelSizeDisagreementWarning,
    estimate_pixel_size,
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


def perik_store_at_spot_diameter_pixel_size(perik: Path, tmp_path: Path) -> str:
    """Perik's real counts and positions as a store whose pixel size is 65 um / spot_diameter_fullres (7.7 % low)."""
    factors = json.loads((perik / "spatial" / "scalefactors_json.json").read_text())
    sample = read_legacy(
        perik / "filtered_feature_bc_matrix.h5",
        perik / "spatial" / "tissue_positions.csv",
        pixel_size_um=65.0 / factors["spot_diameter_fullres"],
    )
    return hest_zarr.write(sample, tmp_path / "perik.zarr")


def test_perik_visium_store_agrees(perik_visium: Path, tmp_path: Path) -> None:
    """The Visium converter's pixel size is the lattice's: 105 um / fiducial_diameter_fullres, not 65 / spot's."""
    with pytest.warns(PixelSizeDisagreementWarning, match="spot_diameter_fullres spans 70.0 um"):  # the converter's
        url = hest_zarr.write(read_visium(perik_visium), tmp_path / "perik.zarr")
    factors = json.loads((perik_visium / "spatial" / "scalefactors_json.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", PixelSizeDisagreementWarning)
        report = estimate_pixel_size(url)
    assert not report.flagged
    assert report.references == {"store": pytest.approx(105.0 / factors["fiducial_diameter_fullres"], rel=1e-9)}
    assert abs(report.differences["store"]) < 1e-9  # the converter fitted all 4,992 spots, this fit the 2,898 stored
    assert report.estimate.n_spots == 2898
    check = hest_zarr.get_record(hest_zarr.open(url)).elements["spots"].provenance.parameters["pixel_size_check"]
    assert check["disagreement"] is False


def test_perik_store_is_flagged_and_recorded(perik_visium: Path, tmp_path: Path) -> None:
    url = perik_store_at_spot_diameter_pixel_size(perik_visium, tmp_path)
    factors = json.loads((perik_visium / "spatial" / "scalefactors_json.json").read_text())
    with pytest.warns(PixelSizeDisagreementWarning, match=r"4\.678 um/px, which disagrees with store 4\.344 um/px"):
        report = estimate_pixel_size(url)
    assert report.flagged
    assert report.references == {"store": pytest.approx(65.0 / factors["spot_diameter_fullres"])}
    assert report.estimate.n_spots == 2898 and report.estimate.n_outliers == 0
    record = hest_zarr.get_record(hest_zarr.open(url))
    assert record.metadata.pixel_size_um_estimated == pytest.approx(105.0 / factors["fiducial_diameter_fullres"])
    assert record.pixel_size_um == pytest.approx(65.0 / factors["spot_diameter_fullres"])  # the store keeps its own
    check = record.elements["spots"].provenance.parameters["pixel_size_check"]
    assert check["disagreement"] is True
    assert check["difference_vs_store"] == pytest.approx(70 / 65 - 1, abs=1e-4)
    assert record.elements["spots"].provenance.converter == "legacy"
    assert hest_zarr.validate(url) == []


def test_scanpy_store_agrees_and_write_false_leaves_it(scanpy_visium: Path, tmp_path: Path) -> None:
    url = hest_zarr.write(read_visium(scanpy_visium), tmp_path / "scanpy.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PixelSizeDisagreementWarning)
        report = estimate_pixel_size(url, write=False)
    assert not report.flagged
    assert report.estimate.n_spots == 100  # the h5 subset
    assert abs(report.differences["store"]) < 1e-4
    record = hest_zarr.get_record(hest_zarr.open(url))
    assert "pixel_size_check" not in record.elements["spots"].provenance.parameters


def test_st_v1_mob_sections_agree(tmp_path: Path) -> None:
    """Both MOB sections were imaged alike: their lattice estimates agree within 1 % (measured 0.014 %)."""
    folder = shared("STUtility_ST_v1")
    estimates = []
    for section in ("MOB1", "MOB2"):
        sample = read_st_v1(folder / f"{section}.tsv", alignment=folder / f"alignment_table_{section}.tsv")
        report = estimate_pixel_size(hest_zarr.write(sample, tmp_path / f"{section}.zarr"))
        assert report.estimate.lattice == "ST 2k array, 100 um per array unit"
        assert not report.flagged
        # the converter fits the detector's adjusted positions (new_x, new_y); the store's ids agree within 0.1 %
        assert abs(report.differences["store"]) < 1e-3
        estimates.append(report.estimate.pixel_size_um)
    assert abs(estimates[0] / estimates[1] - 1) < 0.01
    assert 4.3 < estimates[0] < 4.5


def test_visium_hd_bins_agree_with_microns_per_pixel(tmp_path: Path) -> None:
    root = shared("VisiumIO_visiumhd")
    factors = json.loads((root / "binned_outputs" / "square_002um" / "spatial" / "scalefactors_json.json").read_text())
    report = estimate_pixel_size(hest_zarr.write(read_visium_hd(root), tmp_path / "hd.zarr"))
    assert report.spots == "spots_square_002um"
    assert report.estimate.lattice == "Visium HD square bins, 2 um pitch"
    assert report.estimate.n_spots == 10
    assert report.estimate.pixel_size_um == pytest.approx(factors["microns_per_pixel"], rel=1e-3)


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


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"spots: spot centres \(3, 2\) and lattice positions \(2, 2\)"):
        fit_pixel_size(np.zeros((3, 2)), np.zeros((2, 2)))
    with pytest.raises(InputError, match="not spanning a plane"):
        fit_pixel_size(np.c_[np.arange(5.0), np.arange(5.0)], np.c_[np.arange(5.0), np.arange(5.0)])
    sfe = shared("SFE", "xenium")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the crop's downscaled image: the converter's business
        sample = hest_zarr.converters.read_xenium(sfe)
    url = hest_zarr.write(sample, tmp_path / "xenium.zarr")
    with pytest.raises(InputError, match=r"xenium.zarr: .*no spots element"):
        estimate_pixel_size(url)


def test_cli(perik_visium: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hest_zarr.cli import app

    url = perik_store_at_spot_diameter_pixel_size(perik_visium, tmp_path)
    result = CliRunner().invoke(app, ["pixel-size", url])
    assert result.exit_code == 0, result.output
    output = " ".join(result.stdout.split())
    assert "4.67762 +/- " in output and "from 2898 'spots'" in output
    assert "store: 4.34350 um/px (+7.69%)" in output
    assert "DISAGREEMENT over 5%" in output
