"""Pool Visium HD bins into larger bins (blocks of ``k x k`` bins, as Space Ranger forms its 8 and 16 um bins).

The rule (sums, ``in_tissue``, centres, ids) is in :mod:`hest_zarr.ops.pool`. Operators on elements
(:func:`pool_bin_elements`) and on a SpatialData object (:func:`pool_sample_bins`);
:func:`hest_zarr.workflows.pool.pool_bins` runs them on a store.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from geopandas import GeoDataFrame
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.transformations import get_transformation

from hest_zarr.elements import (
    CoordinateSystems,
    Elements,
    ElementUpdate,
    Keys,
    expression_table,
    get_record,
    integer_counts,
    square_spots,
)
from hest_zarr.elements.lattice import spans_plane
from hest_zarr.errors import InputError
from hest_zarr.ops.pool._transcripts import CONVERTER
from hest_zarr.schemas import Provenance


def bin_suffix(bin_um: int) -> str:
    """Return the element suffix of a Visium HD bin size, as Space Ranger names its folders.

    Examples
    --------
    >>> bin_suffix(8)
    'square_008um'

    """
    return f"square_{bin_um:03d}um"


def bin_element_names(bin_um: int) -> tuple[str, str]:
    """Return the names of the squares and the table of a Visium HD bin size.

    Examples
    --------
    >>> bin_element_names(8)
    ('spots_square_008um', 'spot_expression_square_008um')

    """
    suffix = bin_suffix(bin_um)
    return f"{Elements.SPOTS}_{suffix}", f"{Elements.SPOT_EXPRESSION}_{suffix}"


def check_bin_sizes(from_bin_um: int, to_bin_um: int, source: str = "bins") -> int:
    """Return how many bins of ``from_bin_um`` make a side of one bin of ``to_bin_um``.

    Raises
    ------
    InputError
        Sizes that are not whole micrometres, or a target that is not a larger multiple of the source.

    Examples
    --------
    >>> check_bin_sizes(2, 16)
    8

    """
    if not (isinstance(from_bin_um, int | np.integer) and isinstance(to_bin_um, int | np.integer)):
        raise InputError(f"{source}: bin sizes are whole micrometres, got {from_bin_um!r} and {to_bin_um!r}")
    if from_bin_um < 1 or to_bin_um <= from_bin_um or to_bin_um % from_bin_um:
        raise InputError(
            f"{source}: cannot pool {from_bin_um} um bins into {to_bin_um} um bins: the target must be a larger "
            f"multiple of the source (e.g. 2 -> 8 or 16 um)"
        )
    return int(to_bin_um // from_bin_um)


def pool_bin_elements(
    shapes: GeoDataFrame,
    table: AnnData,
    factor: int,
    *,
    to_bin_um: int,
    pixel_size_um: float,
    region: str,
    source: str = "bins",
) -> tuple[GeoDataFrame, AnnData, dict[str, Any]]:
    """Pool Visium HD bins into bins ``factor`` times larger (blocks of ``factor x factor`` bins).

    Parameters
    ----------
    shapes
        The small bins' squares (``global`` pixels), indexed by barcode.
    table
        Their counts, with ``array_row``, ``array_col`` (and ``in_tissue``) in ``obs``, ``spot_id`` the barcode.
    factor
        Bins per side of a block.
    to_bin_um
        Size of the new bins in micrometres (for their ids; their side is ``factor`` small bins' sides).
    pixel_size_um
        Micrometres per ``global`` pixel (the ``um`` transformation of the new squares).
    region
        Name of the new shapes element.
    source
        Name of the input for error messages.

    Returns
    -------
    The new squares, their table (summed int32 counts, ``array_row``, ``array_col``, ``in_tissue``, and
    ``n_bins`` pooled), and the parameters of the array-to-pixel fit.

    Raises
    ------
    InputError
        Missing ``array_row``/``array_col``, bins without a square, or summed counts beyond int32.

    Examples
    --------
    >>> spots, counts, fit = pool_bin_elements(  # doctest: +SKIP
    ...     squares, table, 4, to_bin_um=8, pixel_size_um=0.27, region="spots_square_008um"
    ... )

    """
    missing = [key for key in (Keys.ARRAY_ROW, Keys.ARRAY_COL) if key not in table.obs]
    if missing:
        raise InputError(f"{source}: the table has no {missing} in obs (needed to pool bins); found {list(table.obs)}")
    ids = table.obs[Keys.SPOT_ID].astype(str) if Keys.SPOT_ID in table.obs else table.obs_names.astype(str)
    absent = pd.Index(ids).difference(shapes.index.astype(str))
    if len(absent):
        raise InputError(f"{source}: {len(absent)} bins of the table have no square (e.g. {absent[0]!r})")
    array = table.obs[[Keys.ARRAY_COL, Keys.ARRAY_ROW]].to_numpy(dtype=np.int64)
    if (array < 0).any():
        raise InputError(f"{source}: negative array_row/array_col")
    bounds = shapes.loc[np.asarray(ids)].geometry.bounds.to_numpy(dtype=np.float64)
    centres = np.column_stack([(bounds[:, 0] + bounds[:, 2]) / 2, (bounds[:, 1] + bounds[:, 3]) / 2])
    side = float(np.median(bounds[:, 2] - bounds[:, 0])) if len(bounds) else 0.0
    linear, fit = _array_to_pixels(array, centres, side)

    block = array // factor
    n_cols = int(block[:, 0].max()) + 1 if len(block) else 0
    codes, pooled = np.unique(block[:, 1] * n_cols + block[:, 0], return_inverse=True)
    membership = sparse.csr_matrix(
        (np.ones(len(pooled), dtype=np.int64), (pooled, np.arange(len(pooled)))), shape=(len(codes), len(pooled))
    )
    # integers checked before summing (a float table is refused, not truncated); the sums by expression_table
    counts = membership @ integer_counts(table.X, source).astype(np.int64)
    n_bins = np.asarray(membership.sum(axis=1)).ravel()
    block_rows, block_cols = codes // max(n_cols, 1), codes % max(n_cols, 1)
    # the centre of a block: the mean of its bins' centres, moved to where the block's array centre maps
    mean_centres = (membership @ centres) / n_bins[:, None]
    mean_array = (membership @ array.astype(np.float64)) / n_bins[:, None]
    block_centre_array = np.column_stack([block_cols, block_rows]) * factor + (factor - 1) / 2
    new_centres = mean_centres + (block_centre_array - mean_array) @ linear.T
    new_ids = [f"s_{to_bin_um:03d}um_{row:05d}_{col:05d}-1" for row, col in zip(block_rows, block_cols, strict=True)]
    obs_columns: dict[str, Any] = {
        Keys.ARRAY_ROW: block_rows.astype(np.int32),
        Keys.ARRAY_COL: block_cols.astype(np.int32),
    }
    if Keys.IN_TISSUE in table.obs:
        in_tissue = table.obs[Keys.IN_TISSUE].to_numpy(dtype=np.int64)
        obs_columns[Keys.IN_TISSUE] = (membership @ in_tissue > 0).astype(np.int32)
    obs_columns["n_bins"] = n_bins.astype(np.int32)
    to_global = get_transformation(shapes, CoordinateSystems.GLOBAL)
    new_shapes = square_spots(new_centres, side * factor, new_ids, pixel_size_um, to_global)
    new_table = expression_table(counts, new_ids, table.var, region=region, obs_columns=obs_columns, source=source)
    return new_shapes, new_table, fit


def _array_to_pixels(array: np.ndarray, centres: np.ndarray, side: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Least-squares linear part of the map from ``(array_col, array_row)`` to bin centres, with its residual.

    Fewer than three bins, or bins on one line, cannot fix it: then one array step is taken as one bin side along x
    (columns) and y (rows).
    """
    if spans_plane(array):
        design = np.column_stack([array.astype(np.float64), np.ones(len(array))])
        solution, *_ = np.linalg.lstsq(design, centres, rcond=None)
        residuals = centres - design @ solution
        rms = float(np.sqrt(np.mean(np.sum(residuals**2, axis=1))))
        return solution[:2].T, {"array_to_pixel": "least_squares", "rms_residual_px": rms}
    return np.diag([side, side]), {"array_to_pixel": "one bin side per array step (too few bins to fit)"}


def pool_sample_bins(
    sdata: SpatialData,
    from_bin_um: int = 2,
    to_bin_um: int = 8,
    *,
    replace: bool = False,
    source: str = "sample",
) -> ElementUpdate:
    """Pool a Visium HD sample's bins into larger bins: the squares and table of the new size, with provenance.

    ``spots_square_<from>um`` and ``spot_expression_square_<from>um`` become ``spots_square_<to>um`` and
    ``spot_expression_square_<to>um`` (see :func:`pool_bin_elements`).

    Parameters
    ----------
    sdata
        A Visium HD sample carrying its record (e.g. :func:`hest_zarr.open` of a store).
    from_bin_um, to_bin_um
        Bin sizes in micrometres; ``to_bin_um`` must be a multiple of ``from_bin_um``.
    replace
        Whether the update replaces elements of the target names.
    source
        Name of the sample for error messages.

    Returns
    -------
    The two new elements and their provenance (``inputs``: the store-relative source shapes and table).

    Raises
    ------
    InputError
        A target size that is not a larger multiple of the source size, a sample without the source bins or
        without a pixel size.

    Examples
    --------
    >>> update = pool_sample_bins(hest_zarr.open("hd.zarr"), 2, 16)  # doctest: +SKIP
    >>> sorted(update.elements)  # doctest: +SKIP
    ['spot_expression_square_016um', 'spots_square_016um']

    """
    factor = check_bin_sizes(from_bin_um, to_bin_um, source)
    source_spots, source_table = bin_element_names(from_bin_um)
    target_spots, target_table = bin_element_names(to_bin_um)
    if source_spots not in sdata.shapes or source_table not in sdata.tables:
        found = sorted(name for name in sdata.shapes if name.startswith(f"{Elements.SPOTS}_square_"))
        raise InputError(
            f"{source}: no {from_bin_um} um bins to pool (expected {source_spots} and {source_table}); Visium HD "
            f"bins found: {found or 'none'}"
        )
    pixel_size_um = get_record(sdata).pixel_size_um
    if pixel_size_um is None:
        raise InputError(f"{source}: the sample records no pixel size ('global' -> 'um')")
    shapes, table, fit = pool_bin_elements(
        sdata.shapes[source_spots],
        sdata.tables[source_table],
        factor,
        to_bin_um=to_bin_um,
        pixel_size_um=pixel_size_um,
        region=target_spots,
        source=f"{source}: {source_table}",
    )
    parameters = {
        "from_bin_um": from_bin_um,
        "to_bin_um": to_bin_um,
        "factor": factor,
        "n_bins_read": sdata.tables[source_table].n_obs,
        **fit,
    }
    provenance = {
        name: Provenance(
            converter=CONVERTER,
            inputs=[f"shapes/{source_spots}", f"tables/{source_table}"],
            method="bin-pooling",
            parameters=parameters,
        )
        for name in (target_spots, target_table)
    }
    return ElementUpdate({target_spots: shapes, target_table: table}, provenance, replace=replace)
