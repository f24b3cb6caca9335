"""Element builders: transformations, spots, expression tables, the sample and its record.

Converters and operators build their elements here. Every converter returns a *sample*: a SpatialData
object whose elements follow the store layout (``docs/design.md``) and whose attributes carry a
:class:`~hest_zarr.schemas.StoreRecord`. These helpers keep the conventions in one place: ``global`` =
full-resolution H&E pixels, ``um`` = ``global`` scaled by the pixel size, spot ids as the shapes index and as
the table's instance key, raw integer counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from geopandas import GeoDataFrame
from scipy import sparse
from shapely import box
from spatialdata import SpatialData
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import BaseTransformation, Identity, Scale
from spatialdata.transformations import Sequence as SequenceTransform

from hest_zarr.elements._records import set_record
from hest_zarr.errors import InputError
from hest_zarr.schemas import (
    CoordinateSystems,
    ElementRecord,
    Elements,
    Keys,
    Provenance,
    SampleMetadata,
    StoreRecord,
    magnification_from_pixel_size,
)


def frame_transformations(
    pixel_size_um: float, to_global: BaseTransformation | None = None
) -> dict[str, BaseTransformation]:
    """Return the transformations of an element whose own coordinates map to ``global`` by ``to_global``.

    Parameters
    ----------
    pixel_size_um
        Micrometres per full-resolution (``global``) pixel.
    to_global
        From the element's coordinates to ``global`` pixels (default: identity, the element is in ``global``).

    Examples
    --------
    >>> sorted(frame_transformations(0.5))
    ['global', 'um']

    """
    to_global = to_global if to_global is not None else Identity()
    to_um = Scale([pixel_size_um, pixel_size_um], axes=("x", "y"))
    if isinstance(to_global, Identity):
        return {CoordinateSystems.GLOBAL: to_global, CoordinateSystems.UM: to_um}
    return {CoordinateSystems.GLOBAL: to_global, CoordinateSystems.UM: SequenceTransform([to_global, to_um])}


def _spot_index(ids: Sequence[str]) -> pd.Index:
    index = pd.Index(np.asarray(ids, dtype=str), name=Keys.SPOT_ID)
    if index.has_duplicates:
        raise InputError(f"spot ids are not unique (e.g. {index[index.duplicated()][0]!r})")
    return index


def _check_spots(centres_xy: np.ndarray, sizes: np.ndarray, ids: pd.Index, source: str) -> None:
    """Refuse spots whose centre or size is not a finite number (a NaN would become a patch at -2**63)."""
    bad = ~(np.isfinite(centres_xy).all(axis=1) & np.isfinite(sizes) & (sizes > 0))
    if bad.any():
        raise InputError(
            f"{source}: {int(bad.sum())} of {len(ids)} spots have a non-finite position or a size that is not a "
            f"positive number (e.g. spot {ids[bad][0]!r} at {centres_xy[bad][0].tolist()}, size {sizes[bad][0]})"
        )


def circle_spots(
    centres_xy: np.ndarray,
    radius_px: float | np.ndarray,
    ids: Sequence[str],
    pixel_size_um: float,
    to_global: BaseTransformation | None = None,
    *,
    source: str = "spots",
) -> GeoDataFrame:
    """Spots as circles (Visium, ST v1): centres ``(x, y)`` in the element's pixels, ids as the index.

    Raises
    ------
    InputError
        Duplicated ids, or a centre or radius that is not finite (``source`` names the file in the message).

    """
    centres_xy = np.asarray(centres_xy, dtype=np.float64).reshape(-1, 2)
    radius = np.broadcast_to(np.asarray(radius_px, dtype=np.float64), (len(centres_xy),)).copy()
    index = _spot_index(ids)
    _check_spots(centres_xy, radius, index, source)
    return ShapesModel.parse(
        centres_xy,
        geometry=0,
        radius=radius,
        index=index,
        transformations=frame_transformations(pixel_size_um, to_global),
    )


def square_spots(
    centres_xy: np.ndarray,
    side_px: float,
    ids: Sequence[str],
    pixel_size_um: float,
    to_global: BaseTransformation | None = None,
    *,
    source: str = "spots",
) -> GeoDataFrame:
    """Spots as axis-aligned squares (Visium HD bins, Xenium pseudo-spots), ids as the index (checks as circles)."""
    centres_xy = np.asarray(centres_xy, dtype=np.float64).reshape(-1, 2)
    index = _spot_index(ids)
    _check_spots(centres_xy, np.full(len(centres_xy), float(side_px)), index, source)
    half = side_px / 2
    geometry = box(centres_xy[:, 0] - half, centres_xy[:, 1] - half, centres_xy[:, 0] + half, centres_xy[:, 1] + half)
    frame = GeoDataFrame(geometry=geometry, index=index)
    return ShapesModel.parse(frame, transformations=frame_transformations(pixel_size_um, to_global))


def integer_counts(matrix: Any, source: str) -> sparse.csr_matrix:
    """Return counts as int32 CSR, refusing non-integer or negative values (``source`` names the file)."""
    matrix = sparse.csr_matrix(matrix)
    if matrix.nnz:
        data = matrix.data
        if not np.array_equal(data, np.round(data)):
            raise InputError(f"{source}: counts are not integers (expected raw counts)")
        if data.min() < 0:
            raise InputError(f"{source}: negative counts")
        if data.max() > np.iinfo(np.int32).max:
            raise InputError(f"{source}: counts exceed int32")
    return matrix.astype(np.int32)


def expression_table(
    counts: Any,
    ids: Sequence[str],
    var: pd.DataFrame,
    *,
    region: str = Elements.SPOTS,
    obs_columns: Mapping[str, Any] | None = None,
    source: str = "counts",
) -> AnnData:
    """Build an expression table (raw integer counts) annotating the shapes element ``region`` by spot id.

    Parameters
    ----------
    counts
        Spots x genes matrix (dense or sparse), rows in the order of ``ids``.
    ids
        Spot ids, equal to the index of the annotated shapes.
    var
        Gene annotations; its index becomes ``var_names`` (made unique).
    region
        Name of the annotated shapes element.
    obs_columns
        Extra per-spot columns (``array_row``, ``in_tissue``...).
    source
        File name for error messages.

    """
    ids = np.asarray(ids, dtype=str)
    obs = pd.DataFrame(index=pd.Index(ids))
    obs[Keys.SPOT_ID] = ids
    obs[Keys.REGION] = pd.Categorical([region] * len(ids))
    for column, values in (obs_columns or {}).items():
        obs[column] = np.asarray(values)
    table = AnnData(X=integer_counts(counts, source), obs=obs, var=var.copy())
    table.var_names = table.var_names.astype(str)
    table.var_names_make_unique()
    return TableModel.parse(table, region=region, region_key=Keys.REGION, instance_key=Keys.SPOT_ID)


def build_sample(
    *,
    converter: str,
    metadata: Mapping[str, Any],
    pixel_size_um: float | None,
    inputs: Mapping[str, Sequence[str]],
    known_metadata: SampleMetadata | None = None,
    images: Mapping[str, Any] | None = None,
    shapes: Mapping[str, Any] | None = None,
    points: Mapping[str, Any] | None = None,
    tables: Mapping[str, Any] | None = None,
    parameters: Mapping[str, Mapping[str, Any]] | None = None,
    methods: Mapping[str, str] | None = None,
    estimated_errors_um: Mapping[str, float] | None = None,
) -> SpatialData:
    """Assemble a sample and its record.

    Parameters
    ----------
    converter
        Converter name recorded in every element's provenance (``"visium"``, ``"xenium"``...).
    metadata
        Values the converter measured (``id`` and ``st_technology`` at least); ``None`` values are dropped.
        ``magnification`` is filled from ``pixel_size_um_estimated`` when absent.
    pixel_size_um
        Micrometres per ``global`` pixel.
    inputs
        Element name -> the input files it was read from.
    known_metadata
        Metadata known beforehand (e.g. a HEST-1k CSV row); its values win over measured ones.
    images, shapes, points, tables
        The elements.
    parameters, methods, estimated_errors_um
        Per-element provenance details (``estimated_errors_um``: positional error in micrometres).

    """
    elements = {
        "images": dict(images or {}),
        "shapes": dict(shapes or {}),
        "points": dict(points or {}),
        "tables": dict(tables or {}),
    }
    records: dict[str, ElementRecord] = {}
    for kind, group in elements.items():
        for name in group:
            records[name] = ElementRecord(
                kind=kind,
                provenance=Provenance(
                    converter=converter,
                    inputs=[str(p) for p in inputs.get(name, ())],
                    method=(methods or {}).get(name),
                    parameters=dict((parameters or {}).get(name, {})),
                    estimated_error_um=(estimated_errors_um or {}).get(name),
                ),
            )
    measured = {key: value for key, value in metadata.items() if value is not None}
    estimated = measured.get("pixel_size_um_estimated")
    if estimated is not None and "magnification" not in measured:
        measured["magnification"] = magnification_from_pixel_size(estimated)
    known = known_metadata.model_dump(exclude_none=True) if known_metadata is not None else {}
    record = StoreRecord(
        metadata=SampleMetadata(**{**measured, **known}), pixel_size_um=pixel_size_um, elements=records
    )
    sdata = SpatialData(**elements)
    set_record(sdata, record)
    return sdata


def spot_sample(
    spots: GeoDataFrame, table: AnnData, *, method: str, estimated_error_um: float | None = None, **sample: Any
) -> SpatialData:
    """Assemble a sample of one spot set and its expression table (Visium, ST v1, legacy tables).

    Parameters
    ----------
    spots, table
        The ``spots`` shapes and the ``spot_expression`` table annotating them.
    method
        How the spots were placed (recorded in the spots' provenance).
    estimated_error_um
        The placement's positional error in micrometres, when known.
    **sample
        :func:`build_sample`'s other arguments (``converter``, ``metadata``, ``pixel_size_um``, ``inputs``...).

    """
    return build_sample(
        shapes={Elements.SPOTS: spots},
        tables={Elements.SPOT_EXPRESSION: table},
        methods={Elements.SPOTS: method},
        estimated_errors_um=None if estimated_error_um is None else {Elements.SPOTS: estimated_error_um},
        **sample,
    )
