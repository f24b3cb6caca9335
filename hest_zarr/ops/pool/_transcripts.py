"""Pool a stream of transcript record batches into square pseudo-spots, and turn the counts into sample elements.

Operators on arrow record batches and on :class:`PooledCounts`: no file or store is opened here
(:mod:`hest_zarr.workflows.pool` streams a store's or a file's parquet parts into them). The grid, the molecules
counted and the memory used are described in :mod:`hest_zarr.ops.pool`; the counting itself is
:class:`~hest_zarr.ops.pool._counting.SquareGeneCounter`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from anndata import AnnData
from geopandas import GeoDataFrame
from scipy import sparse
from spatialdata.transformations import BaseTransformation

from hest_zarr.elements import (
    Elements,
    ElementUpdate,
    Keys,
    expected_kind,
    expression_table,
    is_control_feature,
    square_spots,
)
from hest_zarr.errors import InputError
from hest_zarr.ops.pool._counting import AXIS_OFFSET, MAX_GENES, Binned, SquareGeneCounter
from hest_zarr.schemas import Provenance

DEFAULT_SIZE_UM = 55.0
#: Xenium Onboard Analysis counts molecules of Q-Score >= 20 in its cell-feature matrix.
DEFAULT_MIN_QV = 20.0
#: The ``converter`` of the provenance of pooled elements.
CONVERTER = "ops.pool"


@dataclass(frozen=True)
class TranscriptColumns:
    """Column names of a transcript table: coordinates in micrometres, gene name, quality value."""

    x: str
    y: str
    gene: str
    qv: str


#: ``transcripts.parquet`` as Xenium Onboard Analysis writes it.
XENIUM_COLUMNS = TranscriptColumns(x="x_location", y="y_location", gene="feature_name", qv="qv")
#: The ``transcripts`` points element of a store (see :func:`hest_zarr.converters.xenium.read_transcripts`).
STORE_COLUMNS = TranscriptColumns(x="x", y="y", gene="gene", qv="qv")


@dataclass(frozen=True)
class PooledCounts:
    """Molecule counts per square and gene.

    Attributes
    ----------
    counts
        Squares x genes, int32 CSR, rows in the order of ``grid``.
    grid
        ``(n, 2)`` int64: column ``j`` and row ``i`` of each square (``x`` and ``y`` grid indices).
    genes
        Gene names, sorted; the columns of ``counts``.
    is_control
        Whether each gene is a control probe or codeword.
    size_um, origin_um
        Square side and grid origin, in the transcripts' micrometres.
    n_read, n_kept
        Molecules read, and counted (the sum of ``counts``).
    min_qv, include_controls
        The filters the molecules were counted with.

    """

    counts: sparse.csr_matrix
    grid: np.ndarray
    genes: np.ndarray
    is_control: np.ndarray
    size_um: float
    origin_um: tuple[float, float]
    n_read: int
    n_kept: int
    min_qv: float | None
    include_controls: bool

    def ids(self) -> np.ndarray:
        """Square ids, ``x{column}_y{row}``.

        Examples
        --------
        >>> pooled = pool_transcript_batches([], size_um=10.0)
        >>> pooled.ids().tolist(), pooled.counts.shape
        ([], (0, 0))

        """
        columns = self.grid[:, 0].astype(str).astype(object)
        rows = self.grid[:, 1].astype(str).astype(object)
        return np.asarray("x" + columns + "_y" + rows, dtype=str)

    def centres_um(self) -> np.ndarray:
        """Square centres ``(x, y)`` in the transcripts' micrometres."""
        return (self.grid + 0.5) * self.size_um + np.asarray(self.origin_um, dtype=np.float64)


class _GeneIndex:
    """Gene names to codes, in order of first appearance, across batches whose dictionaries may differ."""

    def __init__(self, include_controls: bool) -> None:
        self.include_controls = include_controls
        self.codes: dict[str, int] = {}

    def lookup(self, dictionary: pa.Array, source: str) -> tuple[np.ndarray, np.ndarray]:
        """Return, for each dictionary entry, its code and whether to count it."""
        names = pd.Index(dictionary.to_pylist())
        if names.hasnans:
            raise InputError(f"{source}: a gene name is missing (null in the gene column's dictionary)")
        names = names.astype(str)
        counted = np.ones(len(names), dtype=bool) if self.include_controls else ~is_control_feature(names)
        codes = np.asarray([self.codes.setdefault(name, len(self.codes)) for name in names], dtype=np.int64)
        if len(self.codes) > MAX_GENES:
            raise InputError(f"{source}: more than {MAX_GENES} distinct genes")
        return codes, counted


def _float_values(batch: pa.RecordBatch, name: str, source: str) -> np.ndarray:
    column = batch.column(name)
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        raise InputError(f"{source}: column {name!r} holds {column.type}, expected numbers")
    return column.to_numpy(zero_copy_only=False)


def _grid_index(
    values: np.ndarray, origin: float, size_um: float, axis: str, source: str
) -> tuple[np.ndarray, int, int]:
    """Return ``floor((values - origin) / size)`` as int64 and its bounds, refusing NaN or more than ``2**21``."""
    index = np.subtract(values, origin, dtype=np.float64)
    index /= size_um
    np.floor(index, out=index)
    if not len(index):
        return index.astype(np.int64), 0, 0
    low, high = index.min(), index.max()
    if not (low >= -AXIS_OFFSET and high < AXIS_OFFSET):
        bad = int((~np.isfinite(index)).sum())
        if bad:
            raise InputError(f"{source}: {bad} molecule(s) with a missing or infinite {axis} coordinate")
        raise InputError(
            f"{source}: {axis} spans {low:.0f}..{high:.0f} squares of {size_um} um from the origin; at most "
            f"{AXIS_OFFSET} each way (a larger square, or an origin nearer the molecules)"
        )
    return index.astype(np.int64), int(low), int(high)


def _bin_batch(
    batch: pa.RecordBatch,
    genes: _GeneIndex,
    *,
    size_um: float,
    origin_um: tuple[float, float],
    min_qv: float | None,
    columns: TranscriptColumns,
    source: str,
) -> Binned:
    """Place a batch's molecules on the grid and pick those to count."""
    gene_column = batch.column(columns.gene)
    if not pa.types.is_dictionary(gene_column.type):
        gene_column = pc.dictionary_encode(gene_column)
    if gene_column.null_count:
        raise InputError(f"{source}: {gene_column.null_count} molecule(s) without a gene name")
    codes, counted = genes.lookup(gene_column.dictionary, source)
    indices = gene_column.indices.to_numpy()
    keep = counted[indices] if not counted.all() else None
    if min_qv is not None:
        passed = _float_values(batch, columns.qv, source) >= min_qv
        keep = passed if keep is None else keep & passed
    rows, low_row, high_row = _grid_index(_float_values(batch, columns.y, source), origin_um[1], size_um, "y", source)
    cols, low_col, high_col = _grid_index(_float_values(batch, columns.x, source), origin_um[0], size_um, "x", source)
    return Binned(rows, cols, codes[indices], keep, (low_row, low_col), (high_row, high_col))


def pool_transcript_batches(
    batches: Iterable[pa.RecordBatch],
    *,
    size_um: float = DEFAULT_SIZE_UM,
    origin_um: tuple[float, float] = (0.0, 0.0),
    min_qv: float | None = DEFAULT_MIN_QV,
    include_controls: bool = True,
    columns: TranscriptColumns = XENIUM_COLUMNS,
    source: str = "transcripts",
) -> PooledCounts:
    """Count molecules per square and gene over a stream of arrow record batches.

    The core of :func:`hest_zarr.workflows.pool.pool_transcripts`, without a store: feed it the batches of any
    transcript table (:func:`hest_zarr.workflows.pool.pool_parquet` streams them from a parquet file).

    Parameters
    ----------
    batches
        Record batches holding ``columns`` (the gene column dictionary-encoded or plain strings).
    size_um
        Side of the squares, in the coordinates' unit (micrometres).
    origin_um
        Corner ``(x, y)`` of square ``x0_y0``.
    min_qv
        Count only molecules with ``qv >= min_qv`` (``None``: every molecule, no ``qv`` column needed).
    include_controls
        Count control probes and codewords too (flagged in ``is_control``).
    columns
        Names of the coordinate, gene and quality columns.
    source
        Name of the input for error messages.

    Returns
    -------
    Counts per square (rows sorted by grid row, then column) and gene (sorted by name).

    Raises
    ------
    InputError
        Bad ``size_um``/``origin_um``/``min_qv``, missing columns, molecules without coordinates or gene, squares
        beyond 2**21 from the origin, a count above the int32 range.

    Examples
    --------
    >>> batch = pa.record_batch(
    ...     {"x_location": [1.0, 2.0, 60.0], "y_location": [1.0, 3.0, 1.0], "feature_name": ["A", "A", "B"],
    ...      "qv": [40.0, 40.0, 10.0]}
    ... )
    >>> pooled = pool_transcript_batches([batch], size_um=55.0)
    >>> pooled.ids().tolist(), pooled.genes.tolist(), pooled.counts.toarray().tolist(), pooled.n_kept
    (['x0_y0'], ['A', 'B'], [[2, 0]], 2)

    """
    origin_um = _check_grid(size_um, origin_um, min_qv, source)
    genes = _GeneIndex(include_controls)
    counter = SquareGeneCounter(source)
    n_read = 0
    needed = [columns.x, columns.y, columns.gene] + ([columns.qv] if min_qv is not None else [])
    for batch in batches:
        missing = [name for name in needed if name not in batch.schema.names]
        if missing:
            hint = "; without a quality column, pass min_qv=None" if missing == [columns.qv] else ""
            raise InputError(f"{source}: missing column(s) {missing}; found {batch.schema.names}{hint}")
        n_read += batch.num_rows
        binned = _bin_batch(
            batch, genes, size_um=size_um, origin_um=origin_um, min_qv=min_qv, columns=columns, source=source
        )
        counter.add(binned, len(genes.codes))
    return _pooled_counts(counter, genes, size_um=size_um, origin_um=origin_um, min_qv=min_qv, n_read=n_read)


def _check_grid(size_um: float, origin_um: Sequence[float], min_qv: float | None, source: str) -> tuple[float, float]:
    if not (np.isfinite(size_um) and size_um > 0):
        raise InputError(f"{source}: the square side must be a positive number of micrometres, got {size_um}")
    if len(origin_um) != 2 or not np.all(np.isfinite(origin_um)):
        raise InputError(f"{source}: the grid origin must be two finite coordinates (x, y) in um, got {origin_um}")
    if min_qv is not None and not np.isfinite(min_qv):
        raise InputError(f"{source}: min_qv must be a finite number or None, got {min_qv}")
    return float(origin_um[0]), float(origin_um[1])


def _pooled_counts(
    counter: SquareGeneCounter,
    genes: _GeneIndex,
    *,
    size_um: float,
    origin_um: tuple[float, float],
    min_qv: float | None,
    n_read: int,
) -> PooledCounts:
    names = np.asarray(list(genes.codes), dtype=str)
    is_control = is_control_feature(pd.Index(names)) if len(names) else np.zeros(0, dtype=bool)
    kept_codes = np.flatnonzero(np.ones(len(names), dtype=bool) if genes.include_controls else ~is_control)
    kept_codes = kept_codes[np.argsort(names[kept_codes], kind="stable")]
    grid, matrix = counter.to_csr(kept_codes, len(names))
    return PooledCounts(
        counts=matrix,
        grid=grid,
        genes=names[kept_codes],
        is_control=is_control[kept_codes],
        size_um=float(size_um),
        origin_um=origin_um,
        n_read=n_read,
        n_kept=counter.total,
        min_qv=min_qv,
        include_controls=genes.include_controls,
    )


def transcript_columns(names: Sequence[str], source: str) -> TranscriptColumns:
    """Pick the column names of a transcript table: a store's ``x, y, gene`` or Xenium's ``x_location, ...``."""
    for candidate in (STORE_COLUMNS, XENIUM_COLUMNS):
        if {candidate.x, candidate.y, candidate.gene} <= set(names):
            return candidate
    raise InputError(
        f"{source}: not a transcript table (expected columns x, y, gene or x_location, y_location, feature_name); "
        f"found {list(names)}"
    )


def pseudo_spot_elements(
    pooled: PooledCounts,
    *,
    pixel_size_um: float,
    to_global: BaseTransformation | None = None,
    region: str = Elements.SPOTS,
) -> tuple[GeoDataFrame, AnnData]:
    """Return the squares (shapes) and their counts (table annotating them) of pooled molecules.

    Parameters
    ----------
    pooled
        The counts, from :func:`pool_transcript_batches`.
    pixel_size_um
        Micrometres per ``global`` pixel (the store's).
    to_global
        From the molecules' micrometres to ``global`` (the ``transcripts`` element's transformation).
    region
        Name of the shapes element.

    Returns
    -------
    Squares of side ``size_um`` in the molecules' micrometres, indexed ``x{column}_y{row}``; the table (raw int32
    counts, ``var['is_control']``, ``obs`` with ``spot_id``, ``region``, ``array_row``, ``array_col``).

    Examples
    --------
    >>> batch = pa.record_batch({"x_location": [1.0, 70.0], "y_location": [1.0, 1.0], "feature_name": ["A", "B"]})
    >>> pooled = pool_transcript_batches([batch], size_um=55.0, min_qv=None)
    >>> spots, table = pseudo_spot_elements(pooled, pixel_size_um=0.2125)
    >>> list(spots.index), table.X.toarray().tolist()
    (['x0_y0', 'x1_y0'], [[1, 0], [0, 1]])

    """
    ids = pooled.ids()
    shapes = square_spots(pooled.centres_um(), pooled.size_um, ids, pixel_size_um, to_global)
    var = pd.DataFrame({"is_control": pooled.is_control}, index=pd.Index(pooled.genes, name=None))
    table = expression_table(
        pooled.counts,
        ids,
        var,
        region=region,
        obs_columns={Keys.ARRAY_ROW: pooled.grid[:, 1], Keys.ARRAY_COL: pooled.grid[:, 0]},
        source=f"pseudo-spots of {pooled.size_um} um",
    )
    return shapes, table


def pseudo_spot_names(suffix: str | None = None, source: str = "pseudo-spots") -> tuple[str, str]:
    """Return the names of the pseudo-spots' shapes and table: ``spots`` and ``spot_expression``, or with a suffix.

    Raises
    ------
    InputError
        A suffix that makes no valid element name (letters, digits and ``_`` only).

    Examples
    --------
    >>> pseudo_spot_names("square_020um")
    ('spots_square_020um', 'spot_expression_square_020um')

    """
    if suffix is None:
        return Elements.SPOTS, Elements.SPOT_EXPRESSION
    spots, table = f"{Elements.SPOTS}_{suffix}", f"{Elements.SPOT_EXPRESSION}_{suffix}"
    if not suffix or not suffix.replace("_", "").isalnum() or expected_kind(spots) != "shapes":
        raise InputError(f"{source}: suffix {suffix!r} is not a valid element name suffix (letters, digits, '_')")
    return spots, table


def pseudo_spot_update(
    pooled: PooledCounts,
    *,
    pixel_size_um: float,
    to_global: BaseTransformation | None = None,
    suffix: str | None = None,
    replace: bool = False,
    source: str = Elements.TRANSCRIPTS,
) -> ElementUpdate:
    """Return a sample's pseudo-spots (shapes and table) pooled from its ``transcripts``, with their provenance.

    Parameters
    ----------
    pooled
        The counts of the sample's ``transcripts`` points, from :func:`pool_transcript_batches`.
    pixel_size_um
        Micrometres per ``global`` pixel (the sample's).
    to_global
        From the molecules' micrometres to ``global`` (the ``transcripts`` element's transformation).
    suffix
        Name the elements ``spots_<suffix>`` and ``spot_expression_<suffix>`` (see :func:`pseudo_spot_names`).
    replace
        Whether the update replaces elements of the same names.
    source
        Name of the input for error messages.

    Returns
    -------
    The two elements (see :func:`pseudo_spot_elements`) and their provenance, whose ``inputs`` is the store-relative
    ``points/transcripts``.

    Raises
    ------
    InputError
        No molecule was counted, or a bad suffix.

    Examples
    --------
    >>> batch = pa.record_batch({"x": [1.0, 2.0], "y": [1.0, 3.0], "gene": ["A", "B"], "qv": [30.0, 10.0]})
    >>> pooled = pool_transcript_batches([batch], columns=STORE_COLUMNS)
    >>> update = pseudo_spot_update(pooled, pixel_size_um=0.2125)
    >>> sorted(update.elements), update.provenance["spots"].parameters["n_transcripts_kept"]
    (['spot_expression', 'spots'], 1)

    """
    spots_name, table_name = pseudo_spot_names(suffix, source)
    if not pooled.n_kept:
        raise InputError(
            f"{source}: no molecule passes the filters (min_qv={pooled.min_qv}, "
            f"include_controls={pooled.include_controls})"
        )
    shapes, table = pseudo_spot_elements(pooled, pixel_size_um=pixel_size_um, to_global=to_global, region=spots_name)
    parameters = {
        "size_um": pooled.size_um,
        "origin_um": list(pooled.origin_um),
        "min_qv": pooled.min_qv,
        "include_controls": pooled.include_controls,
        "n_transcripts_read": pooled.n_read,
        "n_transcripts_kept": pooled.n_kept,
        "spot_id": "x{column}_y{row}: column = floor((x - origin_x) / size_um), row likewise in y",
    }
    provenance = {
        name: Provenance(
            converter=CONVERTER,
            inputs=[f"points/{Elements.TRANSCRIPTS}"],
            method="pseudo-spots",
            parameters=parameters,
        )
        for name in (spots_name, table_name)
    }
    return ElementUpdate({spots_name: shapes, table_name: table}, provenance, replace=replace)
