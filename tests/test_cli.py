"""The hest-zarr command line: info, validate, convert and demo, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

import hest_zarr
from hest_zarr.cli import app
from hest_zarr.workflows.demo import demo_sample_path

runner = CliRunner()


def test_convert_then_info_json(perik_visium: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.zarr"
    result = runner.invoke(
        app,
        ["convert", str(perik_visium), str(out), "--technology", "visium", "--sample-id", "perik", "--codec", "jpeg"],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["schema_version"] == "1.0.0"
    assert summary["metadata"]["id"] == "perik"
    assert summary["elements"]["spot_expression"] == {
        "kind": "tables",
        "name": "spot_expression",
        "n_obs": 2898,
        "n_vars": 19465,
        "region": "spots",
    }
    assert summary["elements"]["spots"]["n_rows"] == 2898
    assert summary["elements"]["spots"]["coordinate_systems"] == ["global", "um"]
    assert summary["elements"]["he"]["shape"] == [3, 600, 600]


def test_validate_exit_codes_and_one_line_errors(scanpy_visium: Path, perik_visium: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    assert runner.invoke(app, ["convert", str(perik_visium), str(out)]).exit_code == 0
    assert runner.invoke(app, ["validate", str(out)]).exit_code == 0
    (out / "images" / "he" / "s0" / "c" / "0" / "0" / "0").write_bytes(b"garbage")
    result = runner.invoke(app, ["validate", str(out)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "he: images/he/s0/c/0/0/0: 7 bytes, the manifest records" in lines[0], result.stderr
    for args, message in (
        (["info", str(tmp_path / "missing.zarr")], "no such store"),
        (["info", str(scanpy_visium)], "not a zarr store"),
        (["validate", str(tmp_path / "missing.zarr")], "no such store"),
        (["convert", str(tmp_path), str(tmp_path / "x.zarr")], "unknown folder layout"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        assert "Traceback" not in result.output + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr


def test_demo_converts_and_patches_the_bundled_sample(tmp_path: Path) -> None:
    import pandas as pd

    from hest_zarr.store import open_patches

    result = runner.invoke(app, ["demo", str(tmp_path / "demo.zarr")])
    assert result.exit_code == 0, result.output
    assert "spot_expression" in result.stdout and "1934 obs x 1000 vars" in result.stdout
    assert "wrote 1934 patches 26 x 26 px (114 um at 4.385 um/px)" in result.stdout
    table = hest_zarr.open(tmp_path / "demo.zarr")["spot_expression"]
    reference = pd.read_csv(demo_sample_path() / "MOB1.tsv.gz", sep="\t", index_col=0)
    assert int(table.X.sum()) == int(reference.to_numpy().sum())
    patches = open_patches(tmp_path / "demo.zarr.patches.zarr")
    assert patches.img.shape == (1934, 26, 26, 3) and sorted(patches.barcode) == sorted(table.obs["spot_id"])


def test_wrong_schema_version_and_unreachable_url_are_one_line(scanpy_visium: Path, tmp_path: Path) -> None:
    from tests.conftest import free_port

    out = tmp_path / "s.zarr"
    assert runner.invoke(app, ["convert", str(scanpy_visium), str(out)]).exit_code == 0
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["hest_zarr"]["schema_version"] = "0.1.0"
    (out / "zarr.json").write_text(json.dumps(meta))
    port = free_port()
    for args, message in (
        (["info", str(out)], "schema version '0.1.0' is not supported"),
        (["validate", str(out)], "schema version '0.1.0' is not supported"),
        (["info", f"http://127.0.0.1:{port}/s.zarr"], "cannot reach the server"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and str(args[1]) in lines[0], result.stderr


def test_convert_detects_each_technology(tmp_path: Path) -> None:
    """`convert` without --technology picks the converter from the files of each real source."""
    import hest_zarr
    from hest_zarr.converters import detect_technology
    from tests.conftest import shared

    sources = {
        "xenium": (shared("SFE", "xenium"), []),
        "visium-hd": (shared("VisiumIO_visiumhd"), []),
        "st": (
            shared("STUtility_ST_v1", "MOB1.tsv"),
            ["--alignment", str(shared("STUtility_ST_v1", "alignment_table_MOB1.tsv"))],
        ),
    }
    for technology, (source, extra) in sources.items():
        assert detect_technology(source) == technology
        out = tmp_path / f"{technology}.zarr"
        result = runner.invoke(app, ["convert", str(source), str(out), *extra])
        assert result.exit_code == 0, result.output
        assert hest_zarr.validate(out) == []
        expected_technology = {"xenium": "Xenium", "visium-hd": "Visium HD", "st": "Spatial Transcriptomics"}
        assert hest_zarr.get_record(hest_zarr.open(out)).metadata.st_technology == expected_technology[technology]
