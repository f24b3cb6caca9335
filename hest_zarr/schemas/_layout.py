"""The store layout: which elements a sample store may hold, and the record kept in its root attributes.

The record (``StoreRecord``) lives in the root group's attributes under ``hest_zarr`` and carries the
schema version, the sample metadata, the pixel size behind the ``um`` coordinate system and the
provenance of every element. Readers dispatch on ``schema_version`` (as spatialdata does on its
format versions); a version this package does not know is refused with a clear error
(``hest_zarr.store._read``).

This module says which names the layout knows and what kind each must be (:func:`expected_kind`,
:func:`annotated_region`); :func:`hest_zarr.elements.validate_sample` checks a whole sample against it.
"""

from __future__ import annotations

import datetime as dt
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hest_zarr.schemas._metadata import SampleMetadata
from hest_zarr.schemas._names import CoordinateSystems, Elements

try:
    HEST_ZARR_VERSION = version("hest-zarr")
except PackageNotFoundError:  # running from a source tree that was not installed
    HEST_ZARR_VERSION = "0.0.0+unknown"

SCHEMA_VERSION = "1.0.0"
#: Versions this package reads. A new version adds its model here and a migration in ``store._read``.
SUPPORTED_SCHEMA_VERSIONS: tuple[str, ...] = (SCHEMA_VERSION,)

ElementKind = Literal["images", "labels", "points", "shapes", "tables"]

#: Element name -> the kind it must have. Tables named ``embeddings_<encoder>`` are allowed too.
ELEMENT_KINDS: dict[str, ElementKind] = {
    Elements.HE: "images",
    Elements.DAPI: "images",
    Elements.SPOTS: "shapes",
    Elements.TISSUE: "shapes",
    Elements.NUCLEI: "shapes",
    Elements.CELLS: "shapes",
    Elements.TRANSCRIPTS: "points",
    Elements.SPOT_EXPRESSION: "tables",
    Elements.CELL_EXPRESSION: "tables",
    # Xenium (converters/_xenium_labels.py, _xenium_matrix.py): label rasters of cells.zarr.zip, their label -> cell
    # id table, and the protein intensities of Xenium Protein (floats, annotating cells: hence not in TABLE_REGIONS,
    # whose tables hold counts)
    "nucleus_labels": "labels",
    "cell_labels": "labels",
    "label_cell_ids": "tables",
    "cell_protein": "tables",
}
#: Table name -> the shapes element it annotates.
TABLE_REGIONS: dict[str, str] = {
    Elements.SPOT_EXPRESSION: Elements.SPOTS,
    Elements.CELL_EXPRESSION: Elements.CELLS,
}
REQUIRED_COORDINATE_SYSTEMS: tuple[str, ...] = (CoordinateSystems.GLOBAL, CoordinateSystems.UM)


def _base_name(name: str) -> str:
    """``spots_square_008um`` -> ``spots``: several spot sets (Visium HD bin sizes) share a base name."""
    for base in (Elements.SPOT_EXPRESSION, Elements.SPOTS):
        if name.startswith(base + "_"):
            return base
    return name


def expected_kind(name: str) -> ElementKind | None:
    """Return the kind an element of this name must have, or ``None`` for a name the layout does not know.

    Examples
    --------
    >>> expected_kind("spots_square_008um"), expected_kind("embeddings_uni"), expected_kind("foo")
    ('shapes', 'tables', None)

    """
    if name.startswith(Elements.EMBEDDINGS_PREFIX):
        return "tables"
    return ELEMENT_KINDS.get(_base_name(name))


def annotated_region(table_name: str) -> str | None:
    """Return the shapes element an expression table must annotate (``None`` for other tables).

    Examples
    --------
    >>> annotated_region("spot_expression"), annotated_region("spot_expression_square_008um")
    ('spots', 'spots_square_008um')

    """
    base = _base_name(table_name)
    if base not in TABLE_REGIONS:
        return None
    return TABLE_REGIONS[base] + table_name.removeprefix(base)


class Provenance(BaseModel):
    """Where an element came from."""

    model_config = ConfigDict(extra="forbid")

    converter: str = Field(description="Module or operator that produced the element, e.g. 'visium'.")
    inputs: list[str] = Field(default_factory=list, description="Input files or URLs it was read from.")
    method: str | None = Field(None, description="Method used (alignment detector, segmentation model, ...).")
    parameters: dict[str, Any] = Field(default_factory=dict, description="Parameters of the method.")
    estimated_error_um: float | None = Field(
        None, ge=0, description="Estimated positional error in micrometres.", json_schema_extra={"unit": "um"}
    )
    created: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))
    hest_zarr_version: str | None = Field(HEST_ZARR_VERSION, description="hest-zarr version that wrote the element.")


class ElementRecord(BaseModel):
    """What the root record says about one element."""

    model_config = ConfigDict(extra="forbid")

    kind: ElementKind
    provenance: Provenance


class StoreRecord(BaseModel):
    """The ``hest_zarr`` record in a sample store's root attributes.

    Examples
    --------
    >>> meta = SampleMetadata(id="V1", st_technology="Visium")
    >>> StoreRecord(metadata=meta, pixel_size_um=0.5).schema_version
    '1.0.0'

    """

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal["1.0.0"] = SCHEMA_VERSION
    metadata: SampleMetadata
    pixel_size_um: float | None = Field(
        None,
        gt=0,
        description="Micrometres per full-resolution pixel: the scale from 'global' to 'um'.",
        json_schema_extra={"unit": "um"},
    )
    coordinate_systems: list[str] = Field(default_factory=lambda: list(REQUIRED_COORDINATE_SYSTEMS))
    elements: dict[str, ElementRecord] = Field(default_factory=dict)
