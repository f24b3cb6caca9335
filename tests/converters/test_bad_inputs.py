"""Bad inputs a new user meets (issue 12, item 7), each on a damaged copy of real data: one clear line naming the file.

Every case copies a real sample into ``tmp_path`` and damages the copy: a zero or non-numeric spot diameter, a
truncated or garbled tiled deflate TIFF (written here from a crop of a real H&E), a count table or positions file cut
mid-line, duplicated barcode rows, an ST v1 folder given instead of its table, wrong or missing S3 credentials and
unknown storage options.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hest_zarr.converters import detect_technology, read_sample, read_visium
from hest_zarr.converters.legacy import read_legacy
from hest_zarr.converters.st_v1 import find_st_inputs, read_st_v1
from hest_zarr.converters.visium_hd import read_visium_hd
from hest_zarr.errors import AccessDeniedError, HestZarrError, InputError
from hest_zarr.workflows.demo import demo_sample_path
from tests.conftest import S3Server, shared

#: Total UMIs of MOB1 (the bundled ST v1 section), as counted with pandas in the issue and below.
MOB1_TOTAL_COUNTS = 1_586_645


def writable_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


@pytest.fixture
def scanpy_copy(scanpy_visium: Path, tmp_path: Path) -> Path:
    return writable_copy(scanpy_visium, tmp_path / "scanpy")


@pytest.fixture
def perik_copy(perik_visium: Path, tmp_path: Path) -> Path:
    return writable_copy(perik_visium, tmp_path / "perik")


@pytest.fixture
def mob1_folder(tmp_path: Path) -> Path:
    return writable_copy(demo_sample_path(), tmp_path / "st_v1_mob1")


# --------------------------------------------------------------------------------------------- scale factors
@pytest.mark.parametrize("value", [0, "abc", -89.4, None, float("inf")])
def test_spot_diameter_that_is_not_a_positive_number(scanpy_copy: Path, value: object) -> None:
    path = scanpy_copy / "spatial" / "scalefactors_json.json"
    factors = json.loads(path.read_text())
    assert factors["spot_diameter_fullres"] == pytest.approx(89.4275, rel=1e-5)  # the real value, replaced below
    factors["spot_diameter_fullres"] = value
    path.write_text(json.dumps(factors))
    message = f"{path}: 'spot_diameter_fullres' is {value!r}; expected a positive number"
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        read_visium(scanpy_copy)


def test_a_zero_hires_scale_factor_is_named_too(scanpy_copy: Path) -> None:
    path = scanpy_copy / "spatial" / "scalefactors_json.json"
    factors = json.loads(path.read_text())
    factors["tissue_hires_scalef"] = 0
    path.write_text(json.dumps(factors))
    with pytest.raises(InputError, match=re.escape(f"{path}: 'tissue_hires_scalef' is 0; expected a positive number")):
        read_visium(scanpy_copy)


# --------------------------------------------------------------------------------------------- damaged TIFF
@pytest.fixture
def tiled_deflate_tiff(perik_visium: Path, tmp_path: Path) -> Path:
    """A 1024 x 1024 crop of perik's real H&E, written here as a tiled (256 px) deflate TIFF."""
    import tifffile

    with Image.open(perik_visium / "spatial" / "detected_tissue_image.jpg") as image:
        crop = np.asarray(image.convert("RGB"))[:1024, :1024]
    path = tmp_path / "he.tif"
    tifffile.imwrite(path, crop, tile=(256, 256), compression="zlib", photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE and len(page.dataoffsets) == 16
    return path


def test_truncated_tiled_deflate_tiff(scanpy_copy: Path, tiled_deflate_tiff: Path) -> None:
    size = tiled_deflate_tiff.stat().st_size
    tiled_deflate_tiff.write_bytes(tiled_deflate_tiff.read_bytes()[: size // 2])
    message = (
        f"{tiled_deflate_tiff}: truncated: its image data run to byte {size:,} but the file has {size // 2:,} bytes"
    )
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        read_visium(scanpy_copy, image=tiled_deflate_tiff)


def test_garbled_tile_of_a_deflate_tiff(scanpy_copy: Path, tiled_deflate_tiff: Path) -> None:
    import tifffile

    data = bytearray(tiled_deflate_tiff.read_bytes())
    with tifffile.TiffFile(tiled_deflate_tiff) as tif:
        offset = tif.pages[0].dataoffsets[1]
    data[offset : offset + 400] = bytes(400)  # zero the start of the second tile's deflate stream
    tiled_deflate_tiff.write_bytes(bytes(data))
    with pytest.raises(
        InputError,
        match=f"^{re.escape(str(tiled_deflate_tiff))}: cannot decode the image: the file is truncated or corrupt "
        r"\(DeflateError: ",
    ):
        read_visium(scanpy_copy, image=tiled_deflate_tiff)


# --------------------------------------------------------------------------------------------- ST v1 folders
def test_st_folder_takes_its_table_alignment_and_image(mob1_folder: Path) -> None:
    assert [p.name if p else None for p in find_st_inputs(mob1_folder)] == [
        "MOB1.tsv.gz",
        "alignment_table_MOB1.tsv.gz",
        "MOB1.jpg",
    ]
    assert detect_technology(mob1_folder) == "st"
    assert detect_technology(mob1_folder / "MOB1.tsv.gz") == "st"  # gzipped: read through gzip, not as bytes
    expected = pd.read_csv(mob1_folder / "MOB1.tsv.gz", sep="\t", index_col=0)
    assert int(expected.to_numpy().sum()) == MOB1_TOTAL_COUNTS
    for technology in ("st", "auto"):
        sdata = read_sample(mob1_folder, technology=technology)
        table = sdata["spot_expression"]
        assert table.shape == (1934, 1000) and int(table.X.sum()) == MOB1_TOTAL_COUNTS
        assert sdata["he"].shape == (3, 1905, 1905)  # MOB1.jpg, placed by the alignment table
        assert int(table.obs["position_fitted"].sum()) == 11  # spots the detector did not report
    reference = read_st_v1(
        mob1_folder / "MOB1.tsv.gz",
        alignment=mob1_folder / "alignment_table_MOB1.tsv.gz",
        image=mob1_folder / "MOB1.jpg",
    )
    assert sdata["spots"].geometry.equals(reference["spots"].geometry)


def test_st_folder_with_several_tables_or_none() -> None:
    folder = shared("STUtility_ST_v1")
    message = f"{folder}: 3 ST v1 count tables (BC1.csv, MOB1.tsv, MOB2.tsv); pass the one to convert"
    with pytest.raises(InputError, match=f"^{re.escape(message)}"):
        read_sample(folder, technology="st")
    spatial = shared("perik_visium_cytassist_mouse_placenta", "spatial")
    with pytest.raises(
        InputError,
        match=f"^{re.escape(str(spatial))}: no ST v1 count table in this folder .* found aligned_fiducials.jpg, "
        "detected_tissue_image.jpg, scalefactors_json.json, tissue_lowres_image.png, tissue_positions.csv$",
    ):
        read_sample(spatial, technology="st")


# --------------------------------------------------------------------------------------------- truncated tables
def test_st_count_table_cut_mid_line(tmp_path: Path) -> None:
    text = shared("STUtility_ST_v1", "MOB1.tsv").read_text()
    cut = text[:2_000_000]
    fields_first_row, fields_last = len(text.splitlines()[1].split("\t")), len(cut.splitlines()[-1].split("\t"))
    assert (fields_first_row, fields_last) == (1001, 921)
    path = tmp_path / "MOB1.tsv"
    path.write_text(cut)
    message = f"{path}: truncated: its last line has 921 fields where its first row has 1001"
    with pytest.raises(InputError, match=f"^{re.escape(message)}"):
        read_st_v1(path)
    path.write_text(cut[: cut.rindex("\t") + 1])  # cut right after a tab: as many fields, the last one empty
    with pytest.raises(InputError, match=re.escape(f"{path}: truncated: its last line has")):
        read_st_v1(path)


def test_gzipped_st_table_cut_short(mob1_folder: Path) -> None:
    path = mob1_folder / "MOB1.tsv.gz"
    path.write_bytes(path.read_bytes()[:200_000])
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}: truncated: the compressed file ends early"):
        read_st_v1(path)


def test_visium_positions_cut_mid_line(perik_copy: Path) -> None:
    path = perik_copy / "spatial" / "tissue_positions.csv"
    text = path.read_text()
    path.write_text(text[: text.rindex(",") - 3])  # inside the last row's pxl_row_in_fullres
    with pytest.raises(
        InputError, match=f"^{re.escape(str(path))}: truncated: its last line has 5 fields where its first row has 6"
    ):
        read_visium(perik_copy)


# --------------------------------------------------------------------------------------------- duplicated barcodes
def test_visium_positions_with_repeated_barcode_rows(perik_copy: Path) -> None:
    path = perik_copy / "spatial" / "tissue_positions.csv"
    lines = path.read_text().splitlines(keepends=True)
    in_tissue = [line for line in lines[1:] if line.split(",")[1] == "1"][:7]
    path.write_text("".join(lines + in_tissue))
    names = [line.split(",")[0] for line in in_tissue]
    shown = ", ".join(f"{name!r} (2 rows)" for name in names[:5])
    message = f"{path}: 7 barcodes appear on several rows: {shown}, ...; each barcode must have one row"
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        read_visium(perik_copy)


def test_visium_hd_positions_with_a_repeated_barcode(tmp_path: Path) -> None:
    root = writable_copy(shared("VisiumIO_visiumhd"), tmp_path / "hd")
    path = root / "binned_outputs" / "square_002um" / "spatial" / "tissue_positions.parquet"
    positions = pd.read_parquet(path)
    assert len(positions) == 10
    pd.concat([positions, positions.iloc[[3]]], ignore_index=True).to_parquet(path)
    barcode = positions["barcode"].iloc[3]
    message = f"{path}: 1 barcode appears on several rows: {barcode!r} (2 rows); each barcode must have one row"
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        read_visium_hd(root)


def test_st_count_table_with_a_repeated_spot(tmp_path: Path) -> None:
    lines = shared("STUtility_ST_v1", "MOB1.tsv").read_text().splitlines(keepends=True)
    path = tmp_path / "MOB1.tsv"
    path.write_text("".join([*lines[:10], lines[5], *lines[10:]]))
    spot = lines[5].split("\t")[0]
    message = f"{path}: 1 spot id appears on several rows: {spot!r} (2 rows); each spot id must have one row"
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        read_st_v1(path)


def test_legacy_coordinates_and_counts_with_repeated_spots(tmp_path: Path) -> None:
    h5 = shared("scanpy", "visium_data", "1.0.0", "filtered_feature_bc_matrix.h5")
    lines = shared("squidpy", "spatial", "tissue_positions_list.csv").read_text().splitlines(keepends=True)
    path = tmp_path / "tissue_positions_list.csv"
    path.write_text("".join([*lines, lines[0], lines[1], lines[0]]))
    shown = f"{lines[0].split(',')[0]!r} (3 rows), {lines[1].split(',')[0]!r} (2 rows)"
    message = f"{path}: 2 spot ids appear on several rows: {shown}; each spot id must have one row"
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        read_legacy(h5, path)


def test_mex_counts_with_a_repeated_barcode(perik_copy: Path) -> None:
    mex = perik_copy / "filtered_feature_bc_matrix"
    (perik_copy / "filtered_feature_bc_matrix.h5").unlink()  # so that the MEX directory is read
    with gzip.open(mex / "barcodes.tsv.gz", "rt") as handle:
        barcodes = handle.read().splitlines()
    assert len(barcodes) == 2898
    barcodes[10] = barcodes[3]  # a barcode repeated in place of another: same length as the matrix
    with gzip.open(mex / "barcodes.tsv.gz", "wt") as handle:
        handle.write("\n".join(barcodes) + "\n")
    message = f"{mex}: 1 barcode appears on several rows: {barcodes[3]!r} (2 rows); each barcode must have one row"
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        read_visium(perik_copy)


# --------------------------------------------------------------------------------------------- S3 access
@pytest.fixture
def iam_enforced(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Make the in-process moto server check signatures and IAM (it accepts any key by default): no key is known."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    yield s3_bucket


def test_wrong_s3_credentials_are_access_denied(
    iam_enforced: str, s3_server: S3Server, scanpy_visium: Path, tmp_path: Path
) -> None:
    from hest_zarr.store import info, write

    url = f"{iam_enforced}/s.zarr"
    options = {
        "key": "AKIAWRONGKEY",
        "secret": "wrong-secret-9f3a",
        "client_kwargs": {"endpoint_url": s3_server.endpoint},
    }
    expected = f"{url}: access denied (403 Forbidden; check the credentials in --storage-options or the environment)"
    with pytest.raises(AccessDeniedError, match=f"^{re.escape(expected)}$"):
        info(url, options)
    # the write refuses before any upload (s3fs's exists() answers False on a 403: the write names the bucket)
    with pytest.raises(HestZarrError, match=f"^{re.escape(url)}: ") as raised:
        write(read_visium(scanpy_visium), url, storage_options=options)
    assert "wrong-secret-9f3a" not in str(raised.value) and "AKIAWRONG" not in str(raised.value)


def test_missing_s3_credentials(s3_bucket: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    from hest_zarr.store import info

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = {"client_kwargs": {"endpoint_url": s3_server.endpoint}, "skip_instance_cache": True}
    with pytest.raises(
        AccessDeniedError,
        match=f"^{re.escape(s3_bucket)}/s.zarr: no credentials found \\(give key and secret in --storage-options, "
        r"set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or pass \{\"anon\": true\} for a public bucket; "
        r"NoCredentialsError\)$",
    ):
        info(f"{s3_bucket}/s.zarr", options)


@pytest.mark.parametrize(
    ("code", "text"),
    [
        ("InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."),
        ("SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided."),
        ("AccessDenied", "Access Denied"),
    ],
)
def test_botocore_client_errors_of_denied_access(code: str, text: str) -> None:
    """The errors S3 itself sends, as real botocore exceptions (moto answers a HEAD with a bare 403)."""
    from botocore.exceptions import ClientError

    from hest_zarr.store._location import network_errors

    with pytest.raises(AccessDeniedError) as raised, network_errors("s3://b/x.zarr"):
        raise ClientError({"Error": {"Code": code, "Message": text}}, "ListObjectsV2")
    expected = (
        f"s3://b/x.zarr: access denied ({code} {text}; check the credentials in --storage-options or the environment)"
    )
    assert str(raised.value) == expected
    with pytest.raises(ValueError, match="not ours"), network_errors("s3://b/x.zarr"):  # others pass through
        raise ValueError("not ours")


def test_local_permission_error_says_permission_denied(tmp_path: Path) -> None:
    from hest_zarr.store._location import network_errors

    with pytest.raises(AccessDeniedError, match=re.escape(f"{tmp_path}: permission denied ([Errno 13] denied")):
        with network_errors(str(tmp_path)):
            raise PermissionError(13, "denied", str(tmp_path))


# --------------------------------------------------------------------------------------------- storage options
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bogus": 1}, "storage option 'bogus' is not understood by s3fs (S3FileSystem): it takes anon, "),
        (
            {"endpoint": "http://127.0.0.1:9000"},
            "storage option 'endpoint' is not understood by s3fs (S3FileSystem): did you mean 'endpoint_url'? it takes",
        ),
        (
            {"client_kwargs": {"endpoint": "http://127.0.0.1:9000"}},
            "storage option client_kwargs['endpoint'] is not understood by s3fs (S3FileSystem): did you mean "
            "'endpoint_url'? it takes api_version, aws_access_key_id,",
        ),
    ],
)
def test_unknown_storage_option(options: dict, message: str) -> None:
    from hest_zarr.store import info

    with pytest.raises(HestZarrError, match=f"^{re.escape('s3://b/x.zarr: ' + message)}"):
        info("s3://b/x.zarr", options)


def test_known_storage_options_pass(s3_bucket: str, s3_server: S3Server, scanpy_visium: Path) -> None:
    from hest_zarr.store import info, write

    options = {**s3_server.storage_options, "use_listings_cache": False, "config_kwargs": {"connect_timeout": 5}}
    url = write(read_visium(scanpy_visium), f"{s3_bucket}/s.zarr", storage_options=options)
    assert info(url, options)["elements"]["spot_expression"]["n_obs"] == 100
    with pytest.raises(HestZarrError, match=re.escape("storage option 'bogus' is not understood by fsspec")):
        info("https://127.0.0.1:1/s.zarr", {"bogus": 1})
