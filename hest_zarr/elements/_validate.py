"""What a valid sample is, checked in memory: element names and kinds, transformations, record, tables.

:func:`validate_sample` is the one definition; the store's ``validate`` runs it on what it opened and then
checks the stored data itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError
from spatialdata import SpatialData
from spatialdata.transformations import get_transformation

from hest_zarr.schemas import (
    REQUIRED_COORDINATE_SYSTEMS,
    CoordinateSystems,
    Keys,
    StoreRecord,
    annotated_region,
    expected_kind,
)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store: the element (or ``record``), the field and what is wrong."""

    element: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.element}: {self.field}: {self.message}"


def validate_sample(sdata: SpatialData) -> list[Problem]:
    """Check a sample against the store layout and its record; return every problem found (none: valid).

    Examples
    --------
    >>> validate_sample(sample)  # doctest: +SKIP
    []

    """
    problems: list[Problem] = []
    raw_record = sdata.attrs.get(Keys.ROOT_ATTRS, {})
    try:
        record = StoreRecord.model_validate(raw_record)
    except ValidationError as err:
        for error in err.errors():
            problems.append(Problem("record", ".".join(str(p) for p in error["loc"]), error["msg"]))
        record = None
    present = {name: kind for kind, name, _ in sdata.gen_elements()}
    for name, kind in present.items():
        wanted = expected_kind(name)
        if wanted is None:
            problems.append(Problem(name, "name", "not an element name of the store layout"))
        elif wanted != kind:
            problems.append(Problem(name, "kind", f"expected {wanted}, found {kind}"))
        if kind != "tables":
            problems.extend(_check_transformations(sdata, name, record))
    recorded = raw_record.get("elements", {}) if isinstance(raw_record, dict) else {}
    for name in sorted(set(present) - set(recorded)):
        problems.append(Problem(name, "provenance", "element has no record in the root attributes"))
    for name in sorted(set(recorded) - set(present)):
        problems.append(Problem(name, "presence", "recorded in the root attributes but missing from the store"))
    for name, entry in recorded.items():
        if name in present and isinstance(entry, dict) and entry.get("kind") != present[name]:
            problems.append(Problem(name, "kind", f"record says {entry.get('kind')}, store holds {present[name]}"))
    for name, table in sdata.tables.items():
        problems.extend(_check_table(sdata, name, table))
    for name, shapes in sdata.shapes.items():
        problems.extend(_check_shapes(name, shapes))
    return problems


def _check_shapes(name: str, shapes: Any) -> list[Problem]:
    """Every geometry has finite coordinates, and circles a finite positive radius."""
    problems = []
    if len(shapes):
        bounds = shapes.geometry.bounds.to_numpy()
        bad = ~np.isfinite(bounds).all(axis=1) | shapes.geometry.is_empty.to_numpy()
        if bad.any():
            first = shapes.index[bad][0]
            problems.append(
                Problem(name, "geometry", f"{int(bad.sum())} shapes without finite coordinates (e.g. {first!r})")
            )
        if "radius" in shapes.columns:
            radius = shapes["radius"].to_numpy(dtype=float)
            bad = ~(np.isfinite(radius) & (radius > 0))
            if bad.any():
                first = shapes.index[bad][0]
                problems.append(
                    Problem(name, "radius", f"{int(bad.sum())} radii not finite and positive (e.g. {first!r})")
                )
    return problems


def _check_transformations(sdata: SpatialData, name: str, record: StoreRecord | None) -> list[Problem]:
    transformations = get_transformation(sdata[name], get_all=True)
    problems = [
        Problem(name, "coordinate_systems", f"no transformation to '{system}'")
        for system in REQUIRED_COORDINATE_SYSTEMS
        if system not in transformations
    ]
    if problems or record is None or record.pixel_size_um is None:
        return problems
    xy = ("x", "y")
    to_global = transformations[CoordinateSystems.GLOBAL].to_affine_matrix(input_axes=xy, output_axes=xy)
    to_um = transformations[CoordinateSystems.UM].to_affine_matrix(input_axes=xy, output_axes=xy)
    scale = np.diag([record.pixel_size_um, record.pixel_size_um, 1.0])
    if not np.allclose(to_um, scale @ to_global, rtol=1e-9, atol=1e-9):
        problems.append(
            Problem(name, "coordinate_systems", f"'um' is not 'global' scaled by pixel_size_um={record.pixel_size_um}")
        )
    return problems


def _check_table(sdata: SpatialData, name: str, table: Any) -> list[Problem]:
    from spatialdata.models import TableModel

    problems = []
    attrs = table.uns.get(TableModel.ATTRS_KEY, {})
    region = annotated_region(name)
    if region is not None:
        if attrs.get("region") != region:
            problems.append(Problem(name, "region", f"must annotate '{region}', annotates {attrs.get('region')!r}"))
        elif region not in sdata.shapes:
            problems.append(Problem(name, "region", f"annotates '{region}', which the store does not hold"))
        else:
            ids = table.obs[attrs["instance_key"]]
            unknown = ~ids.isin(sdata.shapes[region].index)
            if unknown.any():
                problems.append(Problem(name, "instance_key", f"{int(unknown.sum())} rows name no '{region}' shape"))
        if not np.issubdtype(table.X.dtype, np.integer):
            problems.append(Problem(name, "X", f"raw counts must be integers, found {table.X.dtype}"))
    return problems
