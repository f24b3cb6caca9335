"""Xenium cells and nuclei as shapes in micrometres: boundary polygons, or circles drawn from the cell summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely
from geopandas import GeoDataFrame
from spatialdata.models import ShapesModel
from spatialdata_io._constants._constants import XeniumKeys

from hest_zarr.converters._xenium_alignment import XeniumFrame
from hest_zarr.converters._xenium_inputs import CELL_ID, DEFAULT_PIXEL_SIZE_UM, SOURCE, read_table, require_columns
from hest_zarr.errors import InputError

#: Provenance method of ``cells`` drawn from the cell summary (a bundle without cell boundaries).
CENTROID_CIRCLES = "centroid_circles"
CENTROID_CIRCLES_NOTE = (
    "no cell boundaries: each cell is a circle at its x_centroid, y_centroid (um) of the cell summary, of radius "
    "sqrt(cell_area / pi) (the circle of the cell's area)"
)


# --------------------------------------------------------------------------------------------- boundaries
def read_boundaries(path: str | Path, *, frame: XeniumFrame | None = None) -> GeoDataFrame:
    """Read Xenium cell or nucleus boundaries as polygons, one per cell (or nucleus), in micrometres.

    Parameters
    ----------
    path
        ``cell_boundaries`` or ``nucleus_boundaries`` (``.parquet`` or ``.csv.gz``): one row per vertex, the rows
        of one polygon contiguous.
    frame
        Where micrometres land in ``global`` (default: morphology pixels at 0.2125 um/px).

    Returns
    -------
    Polygons indexed by ``cell_id`` (``<cell_id>_<k>`` for the k-th nucleus of a multi-nucleate cell, the cell in
    a ``cell_id`` column), with ``source = "xenium"``; every polygon of the file, vertices as written.

    Raises
    ------
    InputError
        Unreadable file, missing columns, a polygon's rows not contiguous, or a polygon of fewer than 3 vertices.

    Examples
    --------
    >>> cells = read_boundaries("xenium/cell_boundaries.parquet")  # doctest: +SKIP
    >>> cells.loc["jcccmpde-1", "geometry"].area  # doctest: +SKIP

    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such boundaries file")
    frame = frame if frame is not None else XeniumFrame.morphology(DEFAULT_PIXEL_SIZE_UM)
    vertices = read_table(path)
    vertex_columns = [XeniumKeys.BOUNDARIES_VERTEX_X.value, XeniumKeys.BOUNDARIES_VERTEX_Y.value]
    require_columns(path, list(vertices.columns), (CELL_ID, *vertex_columns), "Xenium boundaries")
    group_column = "label_id" if "label_id" in vertices.columns else CELL_ID
    keys = vertices[group_column].to_numpy()
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.array([], dtype=int)
    if len(starts) != pd.unique(keys).size:
        raise InputError(
            f"{path}: the vertices of each polygon must be contiguous rows; {pd.unique(keys).size} {group_column}s "
            f"form {len(starts)} runs"
        )
    sizes = np.diff(np.r_[starts, len(keys)])
    if (sizes < 3).any():
        raise InputError(
            f"{path}: {int((sizes < 3).sum())} polygon(s) with fewer than 3 vertices "
            f"(e.g. {group_column} {keys[starts[sizes < 3][0]]!r})"
        )
    rings = shapely.linearrings(
        vertices[vertex_columns].to_numpy(dtype=np.float64), indices=np.repeat(np.arange(len(starts)), sizes)
    )
    cell_ids = pd.Index(vertices[CELL_ID].to_numpy()[starts].astype(str))
    columns: dict[str, Any] = {"source": pd.Categorical([SOURCE] * len(starts))}
    index = cell_ids
    if cell_ids.has_duplicates:
        columns[CELL_ID] = cell_ids.to_numpy()
        nucleus_number = pd.Series(cell_ids).groupby(cell_ids).cumcount().astype(str).to_numpy()
        index = pd.Index(cell_ids.to_numpy() + "_" + nucleus_number)
    polygons = GeoDataFrame(columns, geometry=shapely.polygons(rings), index=index.rename(CELL_ID))
    return ShapesModel.parse(polygons, transformations=frame.micrometre_transformations())


# --------------------------------------------------------------------------------------------- cell summary
def read_cells(path: str | Path) -> pd.DataFrame:
    """Read the cell summary (``cells.parquet`` or ``cells.csv.gz``) indexed by cell id.

    Columns as written (``x_centroid, y_centroid`` in um, ``transcript_counts``, ``cell_area``...); unnamed
    columns (row numbers that R writers add) are dropped.

    Raises
    ------
    InputError
        Unreadable file, no ``cell_id`` column, or repeated cell ids.

    Examples
    --------
    >>> read_cells("xenium/cells.parquet").loc["jcccmpde-1", "transcript_counts"]  # doctest: +SKIP
    198

    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such cell summary file")
    cells = read_table(path)
    require_columns(path, list(cells.columns), (CELL_ID,), "a Xenium cell summary")
    cells = cells.drop(columns=[c for c in cells.columns if str(c).startswith("Unnamed:")])
    index = pd.Index(cells.pop(CELL_ID).astype(str), name=CELL_ID)
    if index.has_duplicates:
        raise InputError(f"{path}: repeated cell id(s), e.g. {index[index.duplicated()][0]!r}")
    cells.index = index
    return cells


def centroid_circles(path: str | Path, cells: pd.DataFrame, *, frame: XeniumFrame | None = None) -> GeoDataFrame:
    """Return the ``cells`` element of a bundle without boundaries: circles at the cell summary's centroids.

    Each cell of ``cells`` (as :func:`read_cells` returns it, in its order) becomes a circle centred on
    ``x_centroid, y_centroid`` (micrometres) whose area is the cell's ``cell_area`` (um2): radius
    ``sqrt(cell_area / pi)``. The shape is an approximation; the centre is Xenium's own centroid.

    Raises
    ------
    InputError
        A missing centroid or area column, or a cell with a non-finite centroid or a non-positive area.

    Examples
    --------
    >>> cells = pd.DataFrame({"x_centroid": [10.0], "y_centroid": [4.0], "cell_area": [np.pi * 9]}, index=["a-1"])
    >>> circle = centroid_circles("cells.csv.gz", cells)
    >>> circle.geometry.x.tolist(), circle["radius"].tolist()
    ([10.0], [3.0])

    """
    path = Path(path)
    columns = (XeniumKeys.CELL_X.value, XeniumKeys.CELL_Y.value, XeniumKeys.CELL_AREA.value)
    require_columns(path, list(cells.columns), columns, "cell centroids and areas, to draw cells without boundaries")
    x, y, area = (pd.to_numeric(cells[column], errors="coerce").to_numpy(np.float64) for column in columns)
    unusable = ~(np.isfinite(x) & np.isfinite(y) & np.isfinite(area) & (area > 0))
    if unusable.any():
        raise InputError(
            f"{path}: {int(unusable.sum())} cell(s) without a finite centroid and a positive cell_area (e.g. "
            f"{cells.index[unusable][0]!r}); cells without boundaries are drawn from both"
        )
    frame = frame if frame is not None else XeniumFrame.morphology(DEFAULT_PIXEL_SIZE_UM)
    circles = GeoDataFrame(
        {"source": pd.Categorical([SOURCE] * len(cells)), "radius": np.sqrt(area / np.pi)},
        geometry=shapely.points(np.column_stack([x, y])),
        index=pd.Index(cells.index.astype(str), name=CELL_ID),
    )
    return ShapesModel.parse(circles, transformations=frame.micrometre_transformations())
