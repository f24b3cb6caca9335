"""The tissue workflow on real stores: Visium (perik CytAssist, local and in S3) and ST v1 (MOB1, MOB2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
from spatialdata.transformations import Identity, get_transformation
from typer.testing import CliRunner

import hest_zarr
from hest_zarr.cli import app
from hest_zarr.converters import read_visium
from hest_zarr.converters.st_v1 import read_st_v1
from hest_zarr.errors import InputError
from hest_zarr.workflows.tissue import tissue
from tests.conftest import shared

LOWRES_SCALEF = 0.2  # perik scalefactors_json.json: tissue_lowres_scalef


def test_store_operator_on_perik(perik_visium: Path, tmp_path: Path) -> None:
    url = hest_zarr.write(read_visium(perik_visium), tmp_path / "perik.zarr")
    opened = hest_zarr.open(url)
    before = opened["spot_expression"].copy()
    table_inputs = hest_zarr.get_record(opened).elements["spot_expression"].provenance.inputs
    result = tissue(url)
    sdata = hest_zarr.open(url)
    polygons = sdata["tissue"]
    assert isinstance(get_transformation(polygons, "global"), Identity)
    assert result.level == 0 and result.mask.shape == (600, 600)
    # the polygons are in full-resolution pixels: the lowres mask scaled by 1 / tissue_lowres_scalef
    # global has pixel centres at integers: lowres pixel j is centred on (j + 0.5) / scalef - 0.5
    yy, xx = (np.mgrid[:600, :600] + 0.5) / LOWRES_SCALEF - 0.5
    inside = np.zeros((600, 600), bool)
    for polygon in polygons.geometry:
        inside |= shapely.contains_xy(polygon, xx, yy)
    assert (inside == result.mask).mean() > 0.995  # simplified by 0.5 lowres px
    table = sdata["spot_expression"]
    assert (table.obs["in_tissue_original"] == 1).all()  # the filtered matrix holds in-tissue spots only
    assert int(table.obs["in_tissue"].sum()) == result.in_tissue["spot_expression"]
    assert result.agreement_f1["spot_expression"] >= 0.95  # measured 0.992
    for column in ("spot_id", "array_row", "array_col"):
        assert (table.obs[column].to_numpy() == before.obs[column].to_numpy()).all()
    assert (table.X != before.X).nnz == 0
    provenance = hest_zarr.get_record(sdata).elements
    assert provenance["tissue"].provenance.method == "threshold"
    assert provenance["tissue"].provenance.inputs == [f"{url}/he/scale0"]  # anchored under the store
    assert provenance["spot_expression"].provenance.converter == "visium"
    assert provenance["spot_expression"].provenance.inputs == table_inputs  # its source files
    assert provenance["spot_expression"].provenance.parameters["in_tissue"]["source"] == "ops.tissue"
    assert result.update.provenance["tissue"] == provenance["tissue"].provenance  # the result says what was written
    assert hest_zarr.validate(url) == []
    with pytest.raises(InputError, match="already holds 'tissue'"):
        tissue(url)
    tissue(url, replace=True)
    assert (hest_zarr.open(url)["spot_expression"].obs["in_tissue_original"] == 1).all()


def test_store_operator_on_s3(s3_server, s3_bucket: str, perik_visium: Path) -> None:
    """The same segmentation on a store in object storage (moto's S3 server on loopback)."""
    url = f"{s3_bucket}/perik.zarr"
    options = s3_server.storage_options
    hest_zarr.write(read_visium(perik_visium), url, storage_options=options)
    result = tissue(url, storage_options=options)
    remote = hest_zarr.open(url, storage_options=options)
    assert len(remote["tissue"]) == len(result.polygons) == 2
    assert int(remote["spot_expression"].obs["in_tissue"].sum()) == result.in_tissue["spot_expression"] == 2850
    assert hest_zarr.validate(url, storage_options=options) == []


@pytest.mark.parametrize("section", ["MOB1", "MOB2"])
def test_store_operator_agrees_with_st_spot_detector(section: str, tmp_path: Path) -> None:
    folder = shared("STUtility_ST_v1")
    sample = read_st_v1(
        folder / f"{section}.tsv", alignment=folder / f"alignment_table_{section}.tsv", image=folder / f"{section}.jpg"
    )
    result = tissue(hest_zarr.write(sample, tmp_path / f"{section}.zarr"))
    assert result.agreement_f1["spot_expression"] >= 0.95  # measured 0.981 (MOB1), 0.984 (MOB2)
    assert len(result.polygons) == 1


def test_blank_image_is_refused(scanpy_visium: Path, tmp_path: Path) -> None:
    url = hest_zarr.write(read_visium(scanpy_visium), tmp_path / "scanpy.zarr")  # its hires PNG is all black
    with pytest.raises(InputError, match=r"scanpy.zarr: no tissue found on 'he' level 0"):
        tissue(url)


def test_cli(perik_visium: Path, tmp_path: Path) -> None:
    url = hest_zarr.write(read_visium(perik_visium), tmp_path / "perik.zarr")
    result = CliRunner().invoke(app, ["tissue", url])
    assert result.exit_code == 0, result.output
    output = " ".join(result.stdout.split())  # rich wraps long lines
    assert "2 tissue polygon(s) from 'he' level 0" in output
    assert "spot_expression: 2850 spots in tissue, F1 0.992 against the previous in_tissue" in output
    result = CliRunner().invoke(app, ["tissue", url, "--method", "deeplab", "--replace"])
    assert result.exit_code == 1
    assert "error: method='deeplab' needs weights" in result.stderr
