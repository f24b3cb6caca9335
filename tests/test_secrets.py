"""Secrets planted in URLs and storage options never reach a message, a written file or the printed output.

Real sample (the bundled MOB1 section) served over HTTP on loopback and stored on moto's S3 server on loopback;
moto accepts any key, so the planted key and secret are real credentials of the request.
"""

from __future__ import annotations

import json
from pathlib import Path

import s3fs
from typer.testing import CliRunner

import hest_zarr
from hest_zarr.cli import app
from hest_zarr.converters.st_v1 import read_st_v1
from hest_zarr.errors import redact
from hest_zarr.workflows.demo import demo_sample_path

SECRETS = ("pl4ntedPassw0rd", "PLANTEDSIGNATURE", "AKIAPLANTEDKEY00", "pl4nted/SecretKey+")
runner = CliRunner()


def _mob1():
    folder = demo_sample_path()
    return read_st_v1(
        folder / "MOB1.tsv.gz",
        alignment=folder / "alignment_table_MOB1.tsv.gz",
        image=folder / "MOB1.jpg",
        sample_id="MOB1",
    )


def _leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def _files_leak(folder: Path) -> list[str]:
    return [
        f"{path}: {secret}"
        for path in folder.rglob("*")
        if path.is_file()
        for secret in _leaks(path.read_bytes().decode("latin-1"))
    ]


def test_redact_hides_userinfo_and_query_credentials() -> None:
    url = "https://me:pl4ntedPassw0rd@host/a.zarr?X-Amz-Credential=AKIAPLANTEDKEY00&X-Amz-Signature=PLANTEDSIGNATURE"
    assert redact(url) == "https://***@host/a.zarr?X-Amz-Credential=***&X-Amz-Signature=***"
    assert redact("s3://bucket/a.zarr") == "s3://bucket/a.zarr"


def test_http_credentials_stay_out_of_messages_outputs_and_patch_stores(tmp_path, http_root) -> None:
    folder, base = http_root
    hest_zarr.write(_mob1(), folder / "mob1.zarr", chunk_size=256)
    secret_url = base.replace("http://", "http://reader:pl4ntedPassw0rd@") + "/mob1.zarr"
    info = runner.invoke(app, ["info", secret_url, "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["elements"]["spot_expression"]["n_obs"] == 1934
    out = tmp_path / "out"
    out.mkdir()
    patched = runner.invoke(app, ["patch", secret_url, str(out / "p.zarr"), "--size", "26", "--pixel-size", "4.3"])
    assert patched.exit_code == 0, patched.output
    assert hest_zarr.store.open_patches(out / "p.zarr").attributes["source"].startswith("http://***@127.0.0.1")
    missing = runner.invoke(app, ["info", secret_url.replace("mob1", "missing")])
    assert missing.exit_code == 1 and "***@127.0.0.1" in missing.output
    presigned = f"{base}/missing.zarr?X-Amz-Signature=PLANTEDSIGNATURE&X-Amz-Credential=AKIAPLANTEDKEY00"
    refused = runner.invoke(app, ["validate", presigned])
    assert refused.exit_code == 1 and "X-Amz-Signature=***" in refused.output
    assert _leaks(info.output + patched.output + missing.output + refused.output) == []
    assert _files_leak(out) == []


def test_storage_option_secrets_are_never_written_or_printed(tmp_path, s3_server, s3_bucket) -> None:
    options = {
        "key": "AKIAPLANTEDKEY00",
        "secret": "pl4nted/SecretKey+",
        "client_kwargs": {"endpoint_url": s3_server.endpoint},
    }
    url = f"{s3_bucket}/mob1.zarr"
    folder = demo_sample_path()
    converted = runner.invoke(
        app,
        [
            *("convert", str(folder / "MOB1.tsv.gz"), url, "--technology", "st", "--image", str(folder / "MOB1.jpg")),
            *("--alignment", str(folder / "alignment_table_MOB1.tsv.gz"), "--sample-id", "MOB1"),
            *("--storage-options", json.dumps(options)),
        ],
    )
    assert converted.exit_code == 0, converted.output
    tissue = runner.invoke(app, ["tissue", url, "--storage-options", json.dumps(options)])
    assert tissue.exit_code == 0, tissue.output
    patch_args = ["patch", url, f"{s3_bucket}/p.zarr", "--size", "26", "--pixel-size", "4.3"]
    patched = runner.invoke(app, [*patch_args, "--storage-options", json.dumps(options)])
    assert patched.exit_code == 0, patched.output  # the output took the input's options (same endpoint)
    fs = s3fs.S3FileSystem(**options)
    fs.invalidate_cache()
    local = tmp_path / "bucket"
    fs.get(s3_bucket.removeprefix("s3://"), str(local), recursive=True)
    assert (local / "mob1.zarr" / "zarr.json").exists() and (local / "p.zarr" / "zarr.json").exists()
    assert _files_leak(local) == []
    assert _leaks(converted.output + tissue.output + patched.output) == []
