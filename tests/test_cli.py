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


def test_bad_inputs_are_one_line_without_traceback(tmp_path: Path, scanpy_visium: Path) -> None:
    """Damaged copies of real data (issue 12, item 7) through the command line: one ``error:`` line, exit 1."""
    import shutil

    from tests.conftest import shared

    scanpy = tmp_path / "scanpy"
    shutil.copytree(scanpy_visium, scanpy)
    factors = scanpy / "spatial" / "scalefactors_json.json"
    factors.chmod(0o644)
    factors.write_text(json.dumps({**json.loads(factors.read_text()), "spot_diameter_fullres": 0}))
    text = shared("STUtility_ST_v1", "MOB1.tsv").read_text()
    (tmp_path / "MOB1.tsv").write_text(text[:2_000_000])
    for args, message in (
        (["convert", str(scanpy), "x.zarr"], f"{factors}: 'spot_diameter_fullres' is 0; expected a positive number"),
        (["convert", str(tmp_path / "MOB1.tsv"), "x.zarr"], "MOB1.tsv: truncated: its last line has 921 fields"),
        (
            ["convert", str(shared("STUtility_ST_v1")), "x.zarr", "--technology", "st"],
            "3 ST v1 count tables (BC1.csv, MOB1.tsv, MOB2.tsv); pass the one to convert",
        ),
        (
            ["info", "s3://b/x.zarr", "--storage-options", '{"bogus": 1}'],
            "s3://b/x.zarr: storage option 'bogus' is not understood by s3fs (S3FileSystem): it takes anon,",
        ),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_convert_takes_the_st_files_of_a_folder(tmp_path: Path) -> None:
    """`convert FOLDER --technology st` (and without it) uses the folder's table, alignment table and image."""
    import shutil

    folder = tmp_path / "st_v1_mob1"
    shutil.copytree(demo_sample_path(), folder)
    for extra in (["--technology", "st"], []):
        out = tmp_path / f"mob1{len(extra)}.zarr"
        result = runner.invoke(app, ["convert", str(folder), str(out), *extra])
        assert result.exit_code == 0, result.output
        summary = hest_zarr.info(out)
        assert summary["metadata"]["id"] == "MOB1" and summary["elements"]["he"]["shape"] == [3, 1905, 1905]
        table = hest_zarr.open(out)["spot_expression"]
        assert table.shape == (1934, 1000) and int(table.X.sum()) == 1_586_645


def test_wrong_s3_credentials_are_one_line(s3_bucket: str, s3_server, monkeypatch) -> None:
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks keys and IAM from now on
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    options = json.dumps(
        {"key": "AKIAWRONG", "secret": "s3cr3t-wrong", "client_kwargs": {"endpoint_url": s3_server.endpoint}}
    )
    result = runner.invoke(app, ["info", f"{s3_bucket}/s.zarr", "--storage-options", options])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {s3_bucket}/s.zarr: access denied (403 Forbidden; check the credentials in --storage-options or "
        "the environment)"
    ]
    assert "s3cr3t-wrong" not in result.output + result.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from hest_zarr.errors import StoreNotFoundError

    missing = str(tmp_path / "missing.zarr")
    result = runner.invoke(app, ["info", missing])
    assert result.exit_code == 1 and result.exception is not None and isinstance(result.exception, SystemExit)
    result = runner.invoke(app, ["--debug", "info", missing])
    assert isinstance(result.exception, StoreNotFoundError) and f"{missing}: no such store" in str(result.exception)
    assert result.exc_info is not None and result.exc_info[2] is not None  # the traceback, for the runner to show


def test_unexpected_errors_are_one_line_asking_for_a_report(monkeypatch, scanpy_visium: Path, tmp_path: Path) -> None:
    """A failure that is not one of ours (here a KeyError planted in the convert workflow) still prints one line."""
    import hest_zarr.workflows.convert

    def broken(*args, **kwargs):
        raise KeyError("https://me:pw@host/x.zarr has no 'obs'\nsecond line")

    monkeypatch.setattr(hest_zarr.workflows.convert, "convert", broken)
    result = runner.invoke(app, ["convert", str(scanpy_visium), str(tmp_path / "x.zarr")])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: KeyError: \"https://***@host/x.zarr has no 'obs'\\nsecond line\" (run with --debug for the traceback; "
        "please report it)"
    ]
    result = runner.invoke(app, ["--debug", "convert", str(scanpy_visium), str(tmp_path / "x.zarr")])
    assert isinstance(result.exception, KeyError)


def test_warnings_are_one_redacted_line(monkeypatch, perik_visium: Path, tmp_path: Path) -> None:
    import warnings

    import hest_zarr.store

    result = runner.invoke(app, ["convert", str(perik_visium), str(tmp_path / "p.zarr")])  # a real warning
    assert result.exit_code == 0, result.output
    positions = perik_visium / "spatial" / "tissue_positions.csv"
    assert result.stderr.strip().splitlines() == [
        f"warning: {positions}: the spot lattice gives 4.678 um/px, +7.7% against 65 um / spot_diameter_fullres "
        "(4.344 um/px): spot_diameter_fullres spans 70.0 um here; the lattice is used"
    ]

    real_info = hest_zarr.store.info

    def warns(url, storage_options=None):
        warnings.warn(f"{url}: [old] store without a manifest", UserWarning, stacklevel=2)
        return real_info(tmp_path / "p.zarr")

    monkeypatch.setattr(hest_zarr.store, "info", warns)
    secret_url = "https://me:pw@127.0.0.1:1/p.zarr?X-Amz-Signature=abc123&x=1"
    result = runner.invoke(app, ["info", secret_url])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [
        "warning: https://***@127.0.0.1:1/p.zarr?X-Amz-Signature=***&x=1: [old] store without a manifest"
    ]
    assert "pw@" not in result.output + result.stderr and "abc123" not in result.output + result.stderr
