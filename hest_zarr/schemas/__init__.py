"""Versioned models of the sample metadata and of the store layout, the layout's names, and their JSON Schema export."""

from __future__ import annotations

import json
from pathlib import Path

from hest_zarr.schemas._layout import (
    ELEMENT_KINDS,
    HEST_ZARR_VERSION,
    REQUIRED_COORDINATE_SYSTEMS,
    SCHEMA_VERSION,
    SUPPORTED_SCHEMA_VERSIONS,
    TABLE_REGIONS,
    ElementKind,
    ElementRecord,
    Provenance,
    StoreRecord,
    annotated_region,
    expected_kind,
)
from hest_zarr.schemas._metadata import (
    Normalisation,
    SampleMetadata,
    magnification_from_pixel_size,
    metadata_by_id,
    read_hest_metadata_csv,
)
from hest_zarr.schemas._names import ELEMENT_GROUPS, CoordinateSystems, Elements, Keys

#: File name -> model, for the JSON Schema files checked in under ``schemas/``.
JSON_SCHEMA_FILES = {
    "sample_metadata.schema.json": SampleMetadata,
    "store_record.schema.json": StoreRecord,
}


def json_schemas() -> dict[str, str]:
    """Return the JSON Schema text of every model, keyed by file name."""
    texts = {}
    for name, model in JSON_SCHEMA_FILES.items():
        schema = model.model_json_schema()
        schema["$id"] = f"https://hest-zarr.invalid/schemas/{SCHEMA_VERSION}/{name}"
        schema["x-schema-version"] = SCHEMA_VERSION
        texts[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return texts


def export_json_schemas(directory: str | Path) -> list[Path]:
    """Write the JSON Schema files into ``directory`` and return their paths.

    Examples
    --------
    >>> export_json_schemas("schemas")  # doctest: +SKIP

    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in json_schemas().items():
        path = directory / name
        path.write_text(text)
        paths.append(path)
    return paths


__all__ = [
    "ELEMENT_GROUPS",
    "ELEMENT_KINDS",
    "HEST_ZARR_VERSION",
    "JSON_SCHEMA_FILES",
    "REQUIRED_COORDINATE_SYSTEMS",
    "SCHEMA_VERSION",
    "SUPPORTED_SCHEMA_VERSIONS",
    "TABLE_REGIONS",
    "CoordinateSystems",
    "ElementKind",
    "ElementRecord",
    "Elements",
    "Keys",
    "Normalisation",
    "Provenance",
    "SampleMetadata",
    "StoreRecord",
    "annotated_region",
    "expected_kind",
    "export_json_schemas",
    "json_schemas",
    "magnification_from_pixel_size",
    "metadata_by_id",
    "read_hest_metadata_csv",
]
