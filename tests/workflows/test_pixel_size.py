"""The pixel-size workflow on real stores: Space Ranger (perik, scanpy), ST v1 (MOB1, MOB2) and Visium HD.

The Visium converter's pixel size is the lattice fit, so a store that disagrees is built with the legacy converter
from perik's real files and the pixel size 65 um / ``spot_diameter_fullres`` (the Visium converter's value before it
fitted the lattice).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

import hest_zarr
from hest_zarr.cli import app
from hest_zarr.converters import read_visium, read_xenium
from hest_zarr.converters.legacy import read_legacy
from hest_zarr.converters.st_v1 import read_st_v1
from hest_zarr.converters.visium_hd import read_visium_hd
from hest_zarr.errors import InputError
from hest_zarr.ops.pixel_size import PixelSizeDisagreementWarning
from hest_zarr.workflows.pixel_size import estimate_pixel_size
from tests.conftest import shared


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


def test_a_store_without_spots_is_refused_by_name(tmp_path: Path) -> None:
    sfe = shared("SFE", "xenium")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the crop's downscaled image: the converter's business
        sample = read_xenium(sfe)
    url = hest_zarr.write(sample, tmp_path / "xenium.zarr")
    with pytest.raises(InputError, match=r"xenium.zarr: .*no spots element"):
        estimate_pixel_size(url)


def test_cli(perik_visium: Path, tmp_path: Path) -> None:
    url = perik_store_at_spot_diameter_pixel_size(perik_visium, tmp_path)
    result = CliRunner().invoke(app, ["pixel-size", url])
    assert result.exit_code == 0, result.output
    output = " ".join(result.stdout.split())
    assert "4.67762 +/- " in output and "from 2898 'spots'" in output
    assert "store: 4.34350 um/px (+7.69%)" in output
    assert "DISAGREEMENT over 5%" in output
