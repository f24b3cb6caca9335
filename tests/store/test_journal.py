"""Journaled commits: an interrupted replace or add_elements leaves the old store, the new one, or `repair`."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

import hest_zarr
from hest_zarr import store
from hest_zarr.cli import app
from hest_zarr.errors import IncompleteStoreError
from hest_zarr.schemas import Provenance
from hest_zarr.store import _commit
from tests.store.test_store import tissue_box


@pytest.fixture(scope="module")
def visium():
    from hest_zarr.converters import read_visium
    from tests.conftest import shared

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_visium(shared("scanpy", "visium_data", "1.0.0"))


def _cut(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt(f"simulated kill in {name}")

    monkeypatch.setattr(_commit, name, interrupted)


def test_interrupted_local_add_elements_is_finished_by_repair(tmp_path: Path, visium, monkeypatch) -> None:
    url = hest_zarr.write(visium, tmp_path / "s.zarr")
    made = {"tissue": Provenance(converter="test", method="box")}
    _cut(monkeypatch, "_move_in_local")  # killed after the journal, before anything moved in
    with pytest.raises(KeyboardInterrupt):
        store.add_elements(url, {"tissue": tissue_box(visium)}, made)
    monkeypatch.undo()
    with pytest.raises(IncompleteStoreError, match=rf"finish it with `hest-zarr repair {url}`"):
        hest_zarr.open(url)
    result = CliRunner().invoke(app, ["repair", str(url)])
    assert result.exit_code == 0, result.output
    assert "finished the interrupted write" in " ".join(result.output.split())
    reopened = hest_zarr.open(url)
    assert reopened["tissue"].geometry[0].bounds == (0.0, 0.0, 100.0, 50.0)
    assert len(reopened["spots"]) == len(visium["spots"])  # the untouched elements are all there
    assert hest_zarr.validate(url) == []
    assert " ".join(CliRunner().invoke(app, ["repair", str(url)]).output.split()).endswith(
        "no interrupted write to finish"
    )


def test_remote_overwrite_cut_during_upload_keeps_the_old_store(visium, s3_server, s3_bucket, monkeypatch) -> None:
    options = s3_server.storage_options
    url = f"{s3_bucket}/s.zarr"
    hest_zarr.write(visium, url, storage_options=options)
    counts = hest_zarr.open(url, storage_options=options)["spot_expression"].X.sum()
    _cut(monkeypatch, "_put")
    with pytest.raises(KeyboardInterrupt):
        hest_zarr.write(visium, url, overwrite=True, image_codec="jpeg", storage_options=options)
    monkeypatch.undo()
    assert hest_zarr.open(url, storage_options=options)["spot_expression"].X.sum() == counts
    assert hest_zarr.validate(url, storage_options=options) == []


def test_remote_overwrite_cut_while_moving_in_is_finished_by_repair(visium, s3_server, s3_bucket, monkeypatch) -> None:
    import json

    import s3fs

    options = s3_server.storage_options
    url = f"{s3_bucket}/s.zarr"
    hest_zarr.write(visium, url, storage_options=options)
    _cut(monkeypatch, "_copy_in_remote")  # the old root is already gone, nothing copied yet
    with pytest.raises(KeyboardInterrupt):
        hest_zarr.write(visium, url, overwrite=True, image_codec="jpeg", storage_options=options)
    monkeypatch.undo()
    with pytest.raises(IncompleteStoreError, match=r"hest-zarr repair s3://"):
        hest_zarr.open(url, storage_options=options)
    assert store.repair(url, storage_options=options) is True
    assert hest_zarr.validate(url, storage_options=options) == []
    fs = s3fs.S3FileSystem(**options)
    fs.invalidate_cache()
    codecs = json.loads(fs.cat_file(f"{url}/images/he/s0/zarr.json"))["codecs"]
    assert [codec["name"] for codec in codecs][1] == "numcodecs.imagecodecs_jpeg"  # the new store, complete
    assert not fs.glob(f"{s3_bucket}/.s.zarr.*.partial")
