"""The store: round trips on real Visium data, codecs, atomic writes, remote (moto S3) reads, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import spatialdata
import zarr
from PIL import Image
from spatialdata import SpatialData
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity, Scale
from xarray import DataTree

import hest_zarr
from hest_zarr import store
from hest_zarr.converters import read_visium
from hest_zarr.errors import (
    IncompleteStoreError,
    NotAStoreError,
    RemoteUnreachableError,
    SchemaVersionError,
    StoreNotFoundError,
)
from hest_zarr.schemas import ElementRecord, Provenance, SampleMetadata, StoreRecord
from hest_zarr.store import _write
from hest_zarr.store._raster import pyramid_shapes, write_image_element
from tests.conftest import free_port, shared


def he_sample(pixel_size_um: float = 0.5) -> tuple[SpatialData, np.ndarray]:
    """A sample holding only the real 1000x1000 H&E tile of tiatoolbox as ``he``."""
    pixels = np.asarray(Image.open(shared("tiatoolbox", "target_image.png")).convert("RGB")).transpose(2, 0, 1)
    image = Image2DModel.parse(
        pixels,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={"global": Identity(), "um": Scale([pixel_size_um] * 2, axes=("x", "y"))},
    )
    sdata = SpatialData(images={"he": image})
    record = StoreRecord(
        metadata=SampleMetadata(id="tile", st_technology="Visium"),
        pixel_size_um=pixel_size_um,
        elements={"he": ElementRecord(kind="images", provenance=Provenance(converter="test"))},
    )
    hest_zarr.set_record(sdata, record)
    return sdata, pixels


def level0(sdata: SpatialData) -> np.ndarray:
    image = sdata["he"]
    return (image["scale0"]["image"] if isinstance(image, DataTree) else image).values


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dataset", ["scanpy_visium", "perik_visium"])
def test_visium_round_trip_equals_space_ranger(dataset: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    outs = request.getfixturevalue(dataset)
    url = hest_zarr.write(read_visium(outs, sample_id=dataset), tmp_path / "s.zarr")

    for sdata in (hest_zarr.open(url), spatialdata.read_zarr(url)):
        reference = sc.read_10x_h5(outs / "filtered_feature_bc_matrix.h5")
        table = sdata["spot_expression"]
        assert list(table.obs_names) == list(reference.obs_names)
        assert list(table.var["gene_ids"]) == list(reference.var["gene_ids"])
        assert table.X.dtype == np.int32
        assert (table.X != reference.X.astype(np.int32)).nnz == 0
        assert table.X.sum() == int(reference.X.sum())

        positions_file = next((outs / "spatial").glob("tissue_positions*.csv"))
        header = 0 if positions_file.name == "tissue_positions.csv" else None
        positions = pd.read_csv(positions_file, header=header, index_col=0)
        positions.columns = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
        positions = positions.loc[reference.obs_names]
        spots = sdata["spots"].loc[reference.obs_names]
        np.testing.assert_array_equal(spots.geometry.x.to_numpy(), positions["pxl_col_in_fullres"].to_numpy())
        np.testing.assert_array_equal(spots.geometry.y.to_numpy(), positions["pxl_row_in_fullres"].to_numpy())
        np.testing.assert_array_equal(table.obs["array_row"].to_numpy(), positions["array_row"].to_numpy())
        factors = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())
        record = hest_zarr.get_record(sdata)
        # the spot lattice's pixel size: fiducial_diameter_fullres spans the slide layouts' 105 um fiducial on both
        # (65 um / spot_diameter_fullres would be 7.7 % low on perik); spots are 55 um capture spots
        assert record.pixel_size_um == pytest.approx(105.0 / factors["fiducial_diameter_fullres"], rel=1e-3)
        np.testing.assert_allclose(spots["radius"] * 2 * record.pixel_size_um, 55.0)
    assert hest_zarr.validate(url) == []


def test_lowres_image_lands_in_fullres_frame(perik_visium: Path, tmp_path: Path) -> None:
    """The CytAssist lowres image (scale 0.2) is stored as ``he`` scaled to full-resolution pixels."""
    url = hest_zarr.write(read_visium(perik_visium), tmp_path / "p.zarr")
    sdata = spatialdata.read_zarr(url)
    lowres = np.asarray(Image.open(perik_visium / "spatial" / "tissue_lowres_image.png").convert("RGB"))
    np.testing.assert_array_equal(level0(sdata), lowres.transpose(2, 0, 1))
    to_global = spatialdata.transformations.get_transformation(sdata["he"], "global")
    matrix = to_global.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    np.testing.assert_allclose(np.diag(matrix)[:2], 1 / 0.2)


# ------------------------------------------------------------------------------------------ codecs and pyramid
def test_zstd_is_lossless_and_jpeg_is_close_and_smaller(tmp_path: Path) -> None:
    sdata, pixels = he_sample()
    lossless = hest_zarr.write(sdata, tmp_path / "zstd.zarr", chunk_size=256)
    lossy = hest_zarr.write(sdata, tmp_path / "jpeg.zarr", image_codec="jpeg", jpeg_quality=90, chunk_size=256)

    np.testing.assert_array_equal(level0(spatialdata.read_zarr(lossless)), pixels)
    decoded = level0(spatialdata.read_zarr(lossy)).astype(np.int16)
    error = np.abs(decoded - pixels)
    assert error.mean() < 3.0  # quality 90 on a real H&E tile
    assert np.percentile(error, 99) < 20

    array_meta = json.loads((Path(lossy) / "images" / "he" / "s0" / "zarr.json").read_text())
    assert [c["name"] for c in array_meta["codecs"]] == ["transpose", "numcodecs.imagecodecs_jpeg", "crc32c"]
    lossless_meta = json.loads((Path(lossless) / "images" / "he" / "s0" / "zarr.json").read_text())
    assert [c["name"] for c in lossless_meta["codecs"]] == ["bytes", "zstd", "crc32c"]
    assert array_meta["codecs"][1]["configuration"]["level"] == 90
    assert array_meta["chunk_grid"]["configuration"]["chunk_shape"] == [3, 256, 256]

    def size(url: str) -> int:
        return sum(p.stat().st_size for p in Path(url, "images").rglob("*") if p.is_file())

    assert size(lossy) < size(lossless) / 2


def test_pyramid_levels_are_2x2_means_of_the_level_above(tmp_path: Path) -> None:
    _, pixels = he_sample()
    image = Image2DModel.parse(pixels, dims=("c", "y", "x"), transformations={"global": Identity()})
    root = zarr.open_group(tmp_path / "p.zarr", mode="w")
    group = write_image_element(root.create_group("images"), "he", image, chunk_size=128, min_side=300)
    assert [group[f"s{k}"].shape for k in range(3)] == [(3, 1000, 1000), (3, 500, 500), (3, 250, 250)]
    expected = np.round(pixels.reshape(3, 500, 2, 500, 2).astype(np.float32).mean(axis=(2, 4))).astype(np.uint8)
    np.testing.assert_array_equal(group["s1"][:], expected)
    assert pyramid_shapes(60001, 40000)[-1] == (1875, 1250)


# ------------------------------------------------------------------------------------------ atomic writes
def crash_on_second_element(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make ``write`` raise while writing its second element; return the element names it started."""
    calls: list[str] = []
    original = _write._write_element

    def fail_after_first(*args, **kwargs):
        calls.append(args[3])
        if len(calls) > 1:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(_write, "_write_element", fail_after_first)
    return calls


def test_failed_local_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scanpy_visium: Path
) -> None:
    sdata = read_visium(scanpy_visium)
    calls = crash_on_second_element(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        hest_zarr.write(sdata, tmp_path / "s.zarr")
    assert calls == ["he", "spots"]  # the crash hits the second element
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StoreNotFoundError):
        hest_zarr.open(tmp_path / "s.zarr")


def test_overwrite_replaces_and_refuses_without_flag(tmp_path: Path, scanpy_visium: Path, perik_visium: Path) -> None:
    url = hest_zarr.write(read_visium(scanpy_visium), tmp_path / "s.zarr")
    with pytest.raises(hest_zarr.errors.HestZarrError, match="already exists"):
        hest_zarr.write(read_visium(perik_visium), url)
    hest_zarr.write(read_visium(perik_visium), url, overwrite=True)
    assert hest_zarr.open(url)["spot_expression"].n_obs == 2898
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    data = tmp_path / "my_data"
    data.mkdir()
    (data / "notes.txt").write_text("keep me")
    with pytest.raises(hest_zarr.errors.HestZarrError, match="is not a zarr store"):
        hest_zarr.write(read_visium(scanpy_visium), data, overwrite=True)
    assert (data / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------ remote (moto S3)
def test_s3_write_and_lazy_window_read_fetches_only_overlapping_chunks(s3_server, s3_bucket: str) -> None:
    sdata, pixels = he_sample()
    url = f"{s3_bucket}/tile.zarr"
    hest_zarr.write(sdata, url, chunk_size=256, storage_options=s3_server.storage_options)

    s3_server.reset()
    remote = hest_zarr.open(url, storage_options=s3_server.storage_options)
    chunk_pattern = re.compile(r"/images/he/s0/c/\d+/\d+/\d+$")
    assert not [path for _, path in s3_server.requests if chunk_pattern.search(path)], "open fetched pixel data"

    s3_server.reset()
    window = remote["he"].data[:, 300:556, 300:556].compute()  # overlaps chunks (1,1), (1,2), (2,1), (2,2)
    np.testing.assert_array_equal(window, pixels[:, 300:556, 300:556])
    fetched = sorted(
        {
            path.split("/images/he/s0/")[1]
            for method, path in s3_server.requests
            if chunk_pattern.search(path) and method == "GET"
        }
    )
    assert fetched == ["c/0/1/1", "c/0/1/2", "c/0/2/1", "c/0/2/2"]
    total_chunks = 4 * 4
    assert len(fetched) < total_chunks


def test_s3_round_trip_of_real_visium(s3_server, s3_bucket: str, perik_visium: Path) -> None:
    url = f"{s3_bucket}/perik.zarr"
    hest_zarr.write(read_visium(perik_visium), url, storage_options=s3_server.storage_options)
    remote = hest_zarr.open(url, storage_options=s3_server.storage_options)
    reference = sc.read_10x_h5(perik_visium / "filtered_feature_bc_matrix.h5")
    assert (remote["spot_expression"].X != reference.X.astype(np.int32)).nnz == 0
    assert remote["spots"].shape[0] == 2898
    assert remote["spot_expression"].uns["spatialdata_attrs"]["region"] == "spots"
    assert hest_zarr.validate(url, storage_options=s3_server.storage_options) == []
    assert (
        hest_zarr.info(url, storage_options=s3_server.storage_options)["elements"]["spot_expression"]["n_vars"] == 19465
    )


def test_s3_write_interrupted_midway_is_not_accepted(
    s3_server, s3_bucket: str, scanpy_visium: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sdata = read_visium(scanpy_visium)
    url = f"{s3_bucket}/s.zarr"

    # 1. crash while writing the elements: nothing reaches the bucket
    original = _write._write_element
    calls = crash_on_second_element(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        hest_zarr.write(sdata, url, storage_options=s3_server.storage_options)
    assert calls == ["he", "spots"]
    with pytest.raises(StoreNotFoundError):
        hest_zarr.open(url, storage_options=s3_server.storage_options)
    monkeypatch.setattr(_write, "_write_element", original)

    # 2. crash during the upload, after the element files and before the root metadata
    import s3fs

    original_put_file = s3fs.S3FileSystem._put_file
    uploaded = []

    async def refuse_root(self, lpath, rpath, *args, **kwargs):
        if rpath.endswith("s.zarr/zarr.json"):
            raise ConnectionResetError("simulated network loss")
        uploaded.append(rpath)
        return await original_put_file(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", refuse_root)
    s3fs.S3FileSystem.clear_instance_cache()  # cached instances bound the unpatched method
    with pytest.raises(RemoteUnreachableError, match="simulated network loss"):
        hest_zarr.write(sdata, url, storage_options=s3_server.storage_options)
    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", original_put_file)
    s3fs.S3FileSystem.clear_instance_cache()  # the instance made above keeps the patched method
    assert any(path.endswith("tables/spot_expression/X/data/c/0") for path in uploaded)
    with pytest.raises(IncompleteStoreError, match=r"incomplete store: the write that made it did not finish"):
        hest_zarr.open(url, storage_options=s3_server.storage_options)
    # nothing complete was there: the next write replaces it, without overwrite, and says so
    with pytest.warns(UserWarning, match="removed the incomplete store an interrupted write had left"):
        hest_zarr.write(sdata, url, storage_options=s3_server.storage_options)
    assert hest_zarr.validate(url, storage_options=s3_server.storage_options) == []


# ------------------------------------------------------------------------------------------ bad input
def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match=re.escape(str(tmp_path / "nope.zarr"))):
        hest_zarr.open(tmp_path / "nope.zarr")


def test_non_store_directory(tmp_path: Path, scanpy_visium: Path) -> None:
    with pytest.raises(NotAStoreError, match="not a zarr store"):
        hest_zarr.open(scanpy_visium)
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(NotAStoreError, match="not a hest-zarr sample store"):
        hest_zarr.open(tmp_path / "plain.zarr")


def test_wrong_schema_version(tmp_path: Path, scanpy_visium: Path) -> None:
    url = hest_zarr.write(read_visium(scanpy_visium), tmp_path / "s.zarr")
    meta_path = Path(url) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["hest_zarr"]["schema_version"] = "99.0.0"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SchemaVersionError, match=r"schema version '99.0.0' is not supported"):
        hest_zarr.open(url)


def test_corrupt_chunk_is_reported_with_its_key(tmp_path: Path) -> None:
    sdata, _ = he_sample()
    url = hest_zarr.write(sdata, tmp_path / "t.zarr", chunk_size=256)
    chunk = Path(url) / "images" / "he" / "s0" / "c" / "0" / "2" / "1"
    size = chunk.stat().st_size
    chunk.write_bytes(b"this is not zstd data")
    # a chunk of another size is found by listing alone (--quick), and reported once
    expected = [f"he: images/he/s0/c/0/2/1: 21 bytes, the manifest records {size}"]
    assert [str(p) for p in hest_zarr.validate(url, check_data=False)] == expected
    assert [str(p) for p in hest_zarr.validate(url)] == expected
    # bytes changed in place (same size) need the full check, which reads every object
    other = Path(url) / "images" / "he" / "s0" / "c" / "0" / "1" / "1"
    garbled = bytearray(other.read_bytes())
    garbled[len(garbled) // 2] ^= 0xFF
    other.write_bytes(bytes(garbled))
    assert [str(p) for p in hest_zarr.validate(url, check_data=False)] == expected
    assert [str(p) for p in hest_zarr.validate(url)] == [
        *expected,
        "he: images/he/s0/c/0/1/1: fails its crc32c checksum (its bytes changed)",
    ]


def test_unreachable_urls_give_a_clear_error() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(RemoteUnreachableError, match=f"http://127.0.0.1:{port}/s.zarr: cannot reach the server"):
        hest_zarr.open(f"http://127.0.0.1:{port}/s.zarr")
    options = {
        "key": "k",
        "secret": "s",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
    }
    with pytest.raises(RemoteUnreachableError, match=re.escape("s3://bucket/s.zarr: cannot reach the server")):
        hest_zarr.open("s3://bucket/s.zarr", storage_options=options)


def test_validate_reports_every_problem_with_element_and_field(tmp_path: Path, perik_visium: Path) -> None:
    url = hest_zarr.write(read_visium(perik_visium), tmp_path / "p.zarr")
    meta_path = Path(url) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    record = meta["attributes"]["hest_zarr"]
    record["metadata"]["species"] = "Danio rerio"
    del record["elements"]["spots"]
    meta_path.write_text(json.dumps(meta))
    problems = {(p.element, p.field) for p in hest_zarr.validate(url, check_data=False)}
    assert problems == {("record", "metadata.species"), ("spots", "provenance")}


def test_https_style_store_opens_lazily_over_http(http_root, perik_visium: Path) -> None:
    """A store on static HTTP hosting (Range requests, no listing needed) opens with consolidated metadata."""
    folder, base = http_root
    hest_zarr.write(read_visium(perik_visium), folder / "perik.zarr", chunk_size=256)
    remote = hest_zarr.open(f"{base}/perik.zarr")
    local = spatialdata.read_zarr(folder / "perik.zarr")
    np.testing.assert_array_equal(remote["he"].data[:, 250:300, 250:300].compute(), level0(local)[:, 250:300, 250:300])
    assert (remote["spot_expression"].X != local["spot_expression"].X).nnz == 0
    assert remote["spots"].geometry.equals(local["spots"].geometry)


def test_points_round_trip_through_s3_keep_every_transcript(s3_server, s3_bucket: str) -> None:
    """Real Xenium molecules as a points element (micrometres, scaled to pixels) survive S3 unchanged."""
    from spatialdata.models import PointsModel

    transcripts = pd.read_parquet(shared("SFE", "xenium", "transcripts.parquet"))
    transcripts["feature_name"] = transcripts["feature_name"].astype("category")
    pixel_size = 0.2125
    points = PointsModel.parse(
        transcripts[["x_location", "y_location", "feature_name", "qv", "cell_id"]],
        coordinates={"x": "x_location", "y": "y_location"},
        feature_key="feature_name",
        transformations={"global": Scale([1 / pixel_size] * 2, axes=("x", "y")), "um": Identity()},
    )
    sdata = SpatialData(points={"transcripts": points})
    hest_zarr.set_record(
        sdata,
        StoreRecord(
            metadata=SampleMetadata(id="xenium-crop", st_technology="Xenium"),
            pixel_size_um=pixel_size,
            elements={"transcripts": ElementRecord(kind="points", provenance=Provenance(converter="test"))},
        ),
    )
    url = f"{s3_bucket}/xenium.zarr"
    hest_zarr.write(sdata, url, storage_options=s3_server.storage_options)
    remote = hest_zarr.open(url, storage_options=s3_server.storage_options)["transcripts"].compute()
    assert len(remote) == len(transcripts) == 5260
    np.testing.assert_array_equal(remote["x"].to_numpy(), transcripts["x_location"].to_numpy())
    assert (remote["feature_name"].astype(str).to_numpy() == transcripts["feature_name"].astype(str).to_numpy()).all()
    assert hest_zarr.validate(url, storage_options=s3_server.storage_options) == []


# ------------------------------------------------------------------------------------------ adding elements
def tissue_box(sdata: SpatialData) -> SpatialData:
    """A one-polygon ``tissue`` element in the frame of the sample's spots (test geometry, not a segmentation)."""
    import geopandas
    from shapely import box
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    transformations = get_transformation(sdata["spots"], get_all=True)
    return ShapesModel.parse(geopandas.GeoDataFrame(geometry=[box(0, 0, 100, 50)]), transformations=transformations)


@pytest.mark.parametrize("remote", [False, True])
def test_add_elements_adds_replaces_and_updates_the_record(
    remote: bool, tmp_path: Path, scanpy_visium: Path, request: pytest.FixtureRequest
) -> None:
    sdata = read_visium(scanpy_visium)
    options = None
    url: str | Path = tmp_path / "s.zarr"
    if remote:
        s3_server = request.getfixturevalue("s3_server")
        url, options = f"{request.getfixturevalue('s3_bucket')}/s.zarr", s3_server.storage_options
    hest_zarr.write(sdata, url, storage_options=options)
    tissue = tissue_box(sdata)
    made = Provenance(converter="test", method="box")
    update = {"pixel_size_um_estimated": 3.0}
    store.add_elements(url, {"tissue": tissue}, {"tissue": made}, metadata_updates=update, storage_options=options)
    reopened = hest_zarr.open(url, storage_options=options)
    assert reopened["tissue"].geometry[0].bounds == (0.0, 0.0, 100.0, 50.0)
    record = hest_zarr.get_record(reopened)
    assert record.elements["tissue"].provenance.method == "box"
    assert record.metadata.pixel_size_um_estimated == 3.0
    assert record.metadata.id == hest_zarr.get_record(sdata).metadata.id  # the other fields are kept
    assert hest_zarr.validate(url, storage_options=options) == []

    with pytest.raises(hest_zarr.errors.HestZarrError, match="already holds 'tissue'"):
        store.add_elements(url, {"tissue": tissue}, {"tissue": made}, storage_options=options)
    table = reopened["spot_expression"]
    table.obs["in_tissue"] = 0
    store.add_elements(
        url, {"spot_expression": table}, {"spot_expression": made}, replace=True, storage_options=options
    )
    again = hest_zarr.open(url, storage_options=options)
    assert (again["spot_expression"].obs["in_tissue"] == 0).all()
    assert (again["spot_expression"].X != sdata["spot_expression"].X).nnz == 0
    assert hest_zarr.validate(url, storage_options=options) == []


def test_add_elements_refuses_unknown_names_and_missing_provenance(tmp_path: Path, scanpy_visium: Path) -> None:
    sdata = read_visium(scanpy_visium)
    url = hest_zarr.write(sdata, tmp_path / "s.zarr")
    tissue = tissue_box(sdata)
    with pytest.raises(hest_zarr.errors.HestZarrError, match="no provenance"):
        store.add_elements(url, {"tissue": tissue}, {})
    with pytest.raises(hest_zarr.errors.HestZarrError, match="'mystery' must be a layout name"):
        store.add_elements(url, {"mystery": tissue}, {"mystery": Provenance(converter="test")})
    assert "tissue" not in hest_zarr.open(url).shapes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    with pytest.raises(hest_zarr.errors.HestZarrError, match="provenance for 'tissue', which is neither given"):
        store.add_elements(url, {}, {"tissue": Provenance(converter="test")})
    # provenance alone: the record changes, the element's files are not rewritten
    files = {p: p.stat().st_mtime_ns for p in (Path(url) / "shapes" / "spots").rglob("*") if p.is_file()}
    store.add_elements(url, {}, {"spots": Provenance(converter="recheck", method="by hand")})
    assert hest_zarr.get_record(hest_zarr.open(url)).elements["spots"].provenance.converter == "recheck"
    assert {p: p.stat().st_mtime_ns for p in files} == files
