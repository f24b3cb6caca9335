"""The align workflows on real Visium data: a store's spots restored and written back, an image file aligned.

Positions are checked against Space Ranger's ``tissue_positions.csv`` of the perik CytAssist sample, in micrometres
at the store's pixel size (the Visium converter's lattice fit, 4.678 um per full-resolution pixel).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

import hest_zarr
from hest_zarr.cli import app
from hest_zarr.converters import read_sample
from hest_zarr.errors import AlignmentError, InputError
from hest_zarr.ops.tissue import f1_score
from hest_zarr.schemas import Provenance
from hest_zarr.store import add_elements, get_record, validate
from hest_zarr.workflows.align import align, align_image_file


def test_align_a_store_with_shifted_spots(perik_visium: Path, tmp_path: Path) -> None:
    """Spots moved 40 px right and 25 px up before writing; ``hest-zarr align`` restores them.

    Measured: median 1.5 um, max 3.9 um from Space Ranger's positions; in_tissue F1 0.99 against Space Ranger's.
    """
    truth = pd.read_csv(perik_visium / "spatial" / "tissue_positions.csv")
    sdata = read_sample(perik_visium)
    spots = sdata.shapes["spots"]
    spots.geometry = spots.geometry.translate(40.0, -25.0)
    url = hest_zarr.write(sdata, tmp_path / "perik.zarr")
    table_inputs = get_record(sdata).elements["spot_expression"].provenance.inputs

    result = CliRunner().invoke(app, ["align", url])
    assert result.exit_code == 0, result.output
    assert "6.5mm slide" in result.stdout
    aligned = hest_zarr.open(url)
    record = get_record(aligned)
    new_spots = aligned.shapes["spots"]
    assert len(new_spots) == 2898 and new_spots.index.equals(spots.index)
    reference = truth.set_index("barcode").loc[new_spots.index]
    dx = new_spots.geometry.x.to_numpy() - reference["pxl_col_in_fullres"].to_numpy()
    dy = new_spots.geometry.y.to_numpy() - reference["pxl_row_in_fullres"].to_numpy()
    errors = np.hypot(dx, dy) * record.pixel_size_um
    assert np.median(errors) < 5.0 and errors.max() < 8.0
    np.testing.assert_allclose(new_spots["radius"], spots["radius"])

    obs = aligned.tables["spot_expression"].obs
    assert obs["in_tissue_original"].sum() == 2898  # the filtered matrix holds the in-tissue spots only
    assert f1_score(obs["in_tissue"] == 1, obs["in_tissue_original"] == 1) > 0.97
    provenance = record.elements["spots"].provenance
    assert provenance.converter == "ops.align" and provenance.method in ("classical", "yolo")
    assert provenance.parameters["attempts"]["classical"] == "ok"  # yolo: "ok" or why it is unavailable
    assert provenance.parameters["slide"] == "6.5mm" and len(provenance.parameters["corners_used"]) >= 3
    assert provenance.inputs == [f"{url}/he/scale{provenance.parameters['level']}"]  # anchored under the store
    assert 0 < provenance.estimated_error_um < 15
    assert provenance.parameters["um_per_global_px"] == pytest.approx(record.pixel_size_um, rel=0.005)
    assert record.elements["spot_expression"].provenance.inputs == table_inputs  # the table's source files
    assert validate(url) == []


def test_align_returns_what_it_wrote(perik_visium: Path, tmp_path: Path) -> None:
    url = hest_zarr.write(read_sample(perik_visium), tmp_path / "perik.zarr")
    result = align(url, detector="classical")
    record = get_record(hest_zarr.open(url))
    assert result.update.provenance["spots"] == record.elements["spots"].provenance
    assert record.elements["spots"].provenance.estimated_error_um == pytest.approx(result.fit.residual_um)


def test_align_keeps_the_flags_of_a_grey_image(perik_visium: Path, tmp_path: Path) -> None:
    """Tissue is found by its stain: on a grey copy of perik's image the table's own in_tissue flags stay."""
    sdata = read_sample(perik_visium)
    he = sdata.images["he"]
    sdata.images["he"] = he.copy(data=np.repeat(he.data.mean(axis=0, keepdims=True).astype(np.uint8), 3, axis=0))
    obs = sdata.tables["spot_expression"].obs
    flags = np.where(np.arange(len(obs)) % 4 == 0, 0, 1).astype(np.int32)
    obs["in_tissue"] = flags
    url = hest_zarr.write(sdata, tmp_path / "grey.zarr")
    align(url, detector="classical")
    aligned = hest_zarr.open(url)
    np.testing.assert_array_equal(aligned.tables["spot_expression"].obs["in_tissue"].to_numpy(), flags)
    parameters = get_record(aligned).elements["spots"].provenance.parameters
    assert parameters["in_tissue_from"] == "kept: a grey image shows no stain"


def test_align_refuses_a_store_whose_image_shows_no_frame(scanpy_visium: Path, tmp_path: Path) -> None:
    """The scanpy Space Ranger 1.0 sample ships an all-black placeholder as its hires image."""
    url = hest_zarr.write(read_sample(scanpy_visium), tmp_path / "scanpy.zarr")
    with pytest.raises(AlignmentError, match="no lattice of fiducial dots found"):
        align(url, detector="classical")
    with pytest.raises(InputError, match="replace=True"):
        align(url, replace=False)
    assert get_record(hest_zarr.open(url)).elements["spots"].provenance.converter == "visium"  # left as it was


def test_align_refuses_tables_that_do_not_match_their_spots(scanpy_visium: Path, tmp_path: Path) -> None:
    """A table row naming no spot, or a table without array positions, is refused before the image is read."""
    url = hest_zarr.write(read_sample(scanpy_visium), tmp_path / "scanpy.zarr")
    table = hest_zarr.open(url)["spot_expression"]
    renamed = table.copy()
    renamed.obs["spot_id"] = renamed.obs["spot_id"].astype(str).replace({renamed.obs["spot_id"].iloc[0]: "NOT-A-SPOT"})
    add_elements(url, {"spot_expression": renamed}, {"spot_expression": Provenance(converter="test")}, replace=True)
    with pytest.raises(InputError, match=r"scanpy.zarr: 1 spot ids of 'spot_expression' are not in 'spots' \(e.g. "):
        align(url)
    no_rows = table.copy()
    del no_rows.obs["array_row"]
    add_elements(url, {"spot_expression": no_rows}, {"spot_expression": Provenance(converter="test")}, replace=True)
    with pytest.raises(InputError, match=r"'spot_expression' has no \['array_row'\] column"):
        align(url)
    unplaced = table.copy()
    unplaced.obs["array_row"] = unplaced.obs["array_row"].astype(float)
    unplaced.obs.loc[unplaced.obs.index[0], "array_row"] = np.nan
    add_elements(url, {"spot_expression": unplaced}, {"spot_expression": Provenance(converter="test")}, replace=True)
    with pytest.raises(InputError, match=r"array_row/array_col that are not whole numbers"):
        align(url)


def test_align_image_file(perik_visium: Path, tmp_path: Path) -> None:
    result = align_image_file(perik_visium / "spatial" / "tissue_lowres_image.png", detector="classical")
    assert result.slide == "6.5mm" and len(result.spots) == 4992 and result.update is None
    assert 22.9 < result.fit.um_per_px < 23.9  # 4.678 um/px / 0.2
    blank = tmp_path / "blank.png"
    Image.new("RGB", (400, 300), (236, 236, 236)).save(blank)
    with pytest.raises(AlignmentError, match=rf"cannot align {blank} to a Visium slide layout"):
        align_image_file(blank)


def test_cli_align_image(perik_visium: Path, tmp_path: Path) -> None:
    spatial = perik_visium / "spatial"
    runner = CliRunner()
    out = tmp_path / "spots.csv"
    result = runner.invoke(
        app, ["align-image", str(spatial / "tissue_lowres_image.png"), "--out", str(out), "--detector", "classical"]
    )
    assert result.exit_code == 0, result.output
    written = pd.read_csv(out)
    assert list(written.columns) == ["array_row", "array_col", "pxl_row", "pxl_col", "in_tissue"]
    assert len(written) == 4992
    assert written.loc[0, ["array_row", "array_col"]].tolist() == [0, 0]

    blank = tmp_path / "blank.png"
    Image.new("RGB", (400, 300), (236, 236, 236)).save(blank)
    result = runner.invoke(app, ["align-image", str(blank), "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot align" in lines[0] and "no lattice of fiducial dots" in lines[0]
    assert not (tmp_path / "x.csv").exists()
    no_folder = runner.invoke(
        app, ["align-image", str(spatial / "tissue_lowres_image.png"), "--out", str(tmp_path / "absent" / "x.csv")]
    )
    assert no_folder.exit_code == 1 and "absent does not exist" in no_folder.stderr
