"""The metadata and store-record models, against the real HEST-1k metadata CSV."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from hest_zarr.errors import InputError
from hest_zarr.schemas import (
    SampleMetadata,
    json_schemas,
    magnification_from_pixel_size,
    read_hest_metadata_csv,
)
from tests.conftest import shared

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hest_csv() -> Path:
    return shared("hest", "HEST_v1_1_0.csv")


def test_every_row_of_the_hest_csv_parses(hest_csv: Path) -> None:
    samples, notes = read_hest_metadata_csv(hest_csv)
    raw = pd.read_csv(hest_csv, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    assert len(samples) == len(raw) == 1229
    assert [s.id for s in samples] == list(raw["id"])  # the BOM does not eat the first column
    assert Counter(s.st_technology for s in samples) == {
        "Visium": 602,
        "Spatial Transcriptomics": 552,
        "Xenium": 65,
        "Visium HD": 10,
    }
    by_reason = Counter((n.column, n.reason) for n in notes)
    whitespace_patients = int((raw["patient"].str.strip().eq("") & raw["patient"].ne("")).sum())
    assert by_reason[("patient", "whitespace-only value read as missing")] == whitespace_patients > 0
    assert by_reason[("preservation_method", "synonym mapped to the allowed value")] == int(
        (raw["preservation_method"] == "PFA").sum()
    )
    mojibake = [n for n in notes if n.reason.startswith("Mac Roman")]
    assert mojibake and all("Œº" in n.raw and "μ" in n.value and "Œ" not in n.value for n in mojibake if "Œº" in n.raw)


def test_types_units_and_normalised_values(hest_csv: Path) -> None:
    samples = {s.id: s for s in read_hest_metadata_csv(hest_csv)[0]}
    raw = pd.read_csv(hest_csv, encoding="utf-8-sig").set_index("id")
    tenx95 = samples["TENX95"]
    assert tenx95.pixel_size_um_estimated == pytest.approx(raw.loc["TENX95", "pixel_size_um_estimated"])
    assert tenx95.fullres_px_width == raw.loc["TENX95", "fullres_px_width"]
    assert samples["NCBI680"].organ is None  # the one row without an organ is kept
    assert all(s.patient is None or s.patient.strip() == s.patient != "" for s in samples.values())
    dates = [s.data_publication_date for s in samples.values() if s.data_publication_date]
    assert min(dates).year >= 2016 and max(dates).year <= 2024
    schema = SampleMetadata.model_json_schema()
    assert schema["properties"]["pixel_size_um_estimated"]["unit"] == "um"
    assert set(schema["properties"]["st_technology"]["enum"]) == {
        "Visium",
        "Visium HD",
        "Xenium",
        "Spatial Transcriptomics",
    }


def test_magnification_buckets_agree_with_every_row(hest_csv: Path) -> None:
    raw = pd.read_csv(hest_csv, encoding="utf-8-sig")
    computed = raw["pixel_size_um_estimated"].map(magnification_from_pixel_size)
    assert (computed == raw["magnification"]).all()
    assert magnification_from_pixel_size(0.4999) == "40x"
    assert magnification_from_pixel_size(0.5) == "20x"
    assert magnification_from_pixel_size(1.0) == "10x"
    with pytest.raises(ValueError, match="positive"):
        magnification_from_pixel_size(0)


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="st_technology"):
        SampleMetadata(id="x", st_technology="Slide-seq")
    with pytest.raises(ValidationError, match="disagrees"):
        SampleMetadata(id="x", st_technology="Visium", pixel_size_um_estimated=0.25, magnification="20x")
    with pytest.raises(ValidationError, match="unrecognised date"):
        SampleMetadata(id="x", st_technology="Visium", data_publication_date="sometime")


def test_a_bad_csv_names_file_line_and_column(tmp_path: Path, hest_csv: Path) -> None:
    frame = pd.read_csv(hest_csv, encoding="utf-8-sig", dtype=str, keep_default_na=False).head(3)
    frame.loc[1, "species"] = "Danio rerio"
    bad = tmp_path / "bad.csv"
    frame.to_csv(bad, index=False)
    with pytest.raises(InputError, match=r"bad.csv, line 3 \(id '.+'\), column species"):
        read_hest_metadata_csv(bad)
    frame.drop(columns=["organ"]).to_csv(bad, index=False)
    with pytest.raises(InputError, match=r"missing column\(s\) \['organ'\]"):
        read_hest_metadata_csv(bad)
    with pytest.raises(InputError, match="no such file"):
        read_hest_metadata_csv(tmp_path / "missing.csv")


def test_checked_in_json_schemas_match_the_code() -> None:
    for name, text in json_schemas().items():
        on_disk = (REPO / "schemas" / name).read_text()
        assert on_disk == text, f"schemas/{name} is stale: run `hest-zarr export-schemas schemas`"
    record_schema = json.loads(json_schemas()["store_record.schema.json"])
    assert record_schema["properties"]["schema_version"]["const"] == "1.0.0"
    assert record_schema["x-schema-version"] == "1.0.0"
