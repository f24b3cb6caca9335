"""Pool Xenium transcripts into square pseudo-spots, and Visium HD bins into larger bins.

Xenium pseudo-spots (the HEST-1k paper pools Xenium molecules into 55 um squares, so that Xenium samples can be used
like Visium ones):

- The grid. Square ``j, i`` (column, row) covers ``[ox + j s, ox + (j + 1) s) x [oy + i s, oy + (i + 1) s)`` in the
  transcripts' own micrometres, ``s = size_um`` and ``(ox, oy) = origin_um``; a molecule goes to
  ``j = floor((x - ox) / s)``, ``i = floor((y - oy) / s)``, computed in float64 whatever the file's float type (a
  molecule on an edge goes to the square of higher index). The default origin is ``(0, 0)``: the corner of the
  Xenium morphology image, so the grid does not move with the crop of molecules at hand and two runs of the same
  size share their squares. Squares are named ``x{j}_y{i}``; the table keeps ``j, i`` as ``array_col, array_row``.
  Only squares holding at least one kept molecule are written.
- Which molecules. ``qv >= 20`` by default: Xenium Onboard Analysis counts only molecules of Q-Score 20 or more in
  its cell-feature matrix, so pseudo-spots and cells count the same molecules (``min_qv=None`` keeps every one).
  Control probes and codewords (``BLANK_``, ``NegControl``...) are counted and flagged in ``var['is_control']``, as
  in ``cell_expression`` (``include_controls=False`` drops them).
- Streaming. Molecules are read with pyarrow, one parquet batch at a time (``batch_rows``, default one Xenium row
  group), only the ``x, y, gene, qv`` columns, the gene column as its dictionary codes (strings are never built per
  molecule), from local files or any fsspec URL; the next batch is read in a background thread while the current
  one is counted.
- Counting. Each kept molecule gets a grid row, column and gene code. While the squares seen so far and the genes fit
  a dense int32 block of at most 256 MiB (``DENSE_BUDGET_CELLS``: e.g. 55 um squares over 20 x 20 mm with 500 genes)
  they are counted into it, one ``np.add.at`` per batch. Beyond it (small squares, or thousands of genes over a whole
  slide) the counts move to sorted uint64 keys (row | column | gene) with int32 counts: keys are buffered and, every
  8 million, sorted (numpy's vectorised sort), run-length counted and merged into the accumulated keys piece by
  piece (a stable sort of two sorted runs is one linear merge). Memory is the block, or the distinct (square, gene)
  pairs, plus one buffer, whatever the number of molecules. Counts beyond int32 are refused, never wrapped.

Visium HD bins: a larger bin is the ``k x k`` block of smaller bins with ``array_row // k, array_col // k`` (``k =
to_bin_um / from_bin_um``, an integer), as Space Ranger forms its 8 and 16 um bins from the 2 um ones; counts are
summed, ``in_tissue`` is true when any pooled bin is, the bin's centre is the mean of the pooled centres corrected to
the block's centre by the least-squares map from array to pixel coordinates (so a block with missing bins is not
pulled toward the bins present), and its id is Space Ranger's ``s_008um_00012_00034-1``.

Why not ``spatialdata.aggregate``: it joins every molecule with the squares in geopandas, in memory. Measured by
``benchmarks/pool_transcripts.py`` on 2 shared cores: 0.11 million molecules a second and 8.4 GiB at 20 million, out
of memory (16 GiB) at 50 million; the HEST-Library's approach (the whole table in pandas, then a groupby) 0.86 million
a second and 8.6 GiB at 50 million; this module 9.3 million a second and 0.71 GiB at 50 million.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from anndata import AnnData
from geopandas import GeoDataFrame
from scipy import sparse
from spatialdata.transformations import BaseTransformation, get_transformation

import hest_zarr
from hest_zarr.converters.xenium import is_control_feature
from hest_zarr.elements import CoordinateSystems, Elements, Keys, expression_table, integer_counts, square_spots
from hest_zarr.elements.lattice import spans_plane
from hest_zarr.errors import InputError
from hest_zarr.schemas import Provenance, StoreRecord, expected_kind
from hest_zarr.store import StorageOptions, _locate, _open_zarr_group, _read_root_attributes

DEFAULT_SIZE_UM = 55.0
#: Xenium Onboard Analysis counts molecules of Q-Score >= 20 in its cell-feature matrix.
DEFAULT_MIN_QV = 20.0
#: Rows per parquet batch: one Xenium row group.
DEFAULT_BATCH_ROWS = 1 << 20
#: Molecule keys buffered before they are sorted, counted and merged (8 bytes each).
BUFFER_KEYS = 1 << 23
#: Keys merged at a time when a sorted run joins the counts (bounds the merge's temporaries).
MERGE_PIECE_KEYS = 1 << 20
#: Cells (int32) of the dense square x gene block before counts move to sorted keys: 256 MiB.
DENSE_BUDGET_CELLS = 1 << 26
CONVERTER = "ops.pool"

# A molecule's key: row (22 bits) | column (22 bits) | gene (20 bits), grid indices offset by 2**21.
_GENE_BITS = 20
_AXIS_BITS = 22
_AXIS_OFFSET = 1 << (_AXIS_BITS - 1)
_GENE_MASK = np.uint64((1 << _GENE_BITS) - 1)
_AXIS_MASK = np.uint64((1 << _AXIS_BITS) - 1)
_INT32_MAX = np.iinfo(np.int32).max


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

    """

    counts: sparse.csr_matrix
    grid: np.ndarray
    genes: np.ndarray
    is_control: np.ndarray
    size_um: float
    origin_um: tuple[float, float]
    n_read: int
    n_kept: int

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


@dataclass(frozen=True)
class PoolSummary:
    """What a pooling call wrote into a store."""

    url: str
    spots: str
    table: str
    n_spots: int
    n_genes: int
    total_counts: int


# --------------------------------------------------------------------------------------------- counting
@dataclass(frozen=True)
class _Binned:
    """One batch on the grid.

    Each molecule's grid row, column and gene code, which to count, and the bounds of rows and columns (over every
    molecule of the batch, counted or not).
    """

    rows: np.ndarray
    cols: np.ndarray
    genes: np.ndarray
    keep: np.ndarray | None
    low: tuple[int, int]
    high: tuple[int, int]

    @property
    def n_kept(self) -> int:
        return len(self.rows) if self.keep is None else int(np.count_nonzero(self.keep))


class _DenseBlock:
    """Counts in a dense ``rows x columns x gene slots`` int32 block over the squares seen so far (grown as needed)."""

    def __init__(self) -> None:
        self.budget_cells = DENSE_BUDGET_CELLS
        self.counts = np.zeros((0, 0, 0), dtype=np.int32)
        self.corner = np.zeros(2, dtype=np.int64)  # grid row and column of the block's first cell
        self._ones = np.ones(0, dtype=np.int32)

    def fits(self, binned: _Binned, n_genes: int) -> bool:
        """Grow the block to cover a batch's squares and the genes; ``False`` when that would pass the budget."""
        n_rows, n_cols, n_slots = self.counts.shape
        corner, size = self.corner, np.array([n_rows, n_cols])
        low, high = np.array(binned.low), np.array(binned.high)
        if n_rows and (low >= corner).all() and (high < corner + size).all() and n_genes <= n_slots:
            return True
        if n_rows:  # cover the squares already counted too
            low, high = np.minimum(low, corner), np.maximum(high, corner + size - 1)
        span = high - low + 1
        # once grown, leave room to grow into on the axes that grew (molecules come sorted by field of view)
        margin = np.where(span > size, span // 4, 0) if n_rows else np.zeros(2, dtype=np.int64)
        slots = max(n_genes, n_slots)
        slot_margin = n_genes // 4 if n_slots and n_genes > n_slots else 0
        for pad in (1, 0):  # with the margins when the budget allows them
            shape = (*(span + 2 * pad * margin).tolist(), slots + pad * slot_margin)
            if np.prod(shape, dtype=np.float64) <= self.budget_cells:
                break
        else:
            return False
        new_corner = low - pad * margin
        grown = np.zeros(shape, dtype=np.int32)
        if n_rows:
            top, left = (corner - new_corner).tolist()
            grown[top : top + n_rows, left : left + n_cols, :n_slots] = self.counts
        self.counts, self.corner = grown, new_corner
        return True

    def add(self, binned: _Binned) -> None:
        """Count a batch that :meth:`fits` accepted."""
        _, n_cols, n_slots = self.counts.shape
        flat = binned.rows - self.corner[0]
        flat *= n_cols
        flat += binned.cols
        flat -= self.corner[1]
        flat *= n_slots
        flat += binned.genes
        if binned.keep is not None:
            flat = flat[binned.keep]
        if len(self._ones) < len(flat):
            self._ones = np.ones(len(flat), dtype=np.int32)
        np.add.at(self.counts.reshape(-1), flat, self._ones[: len(flat)])  # int32 ones: numpy's fast path

    def _slabs(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield, a few block rows at a time, the non-empty squares' grid rows and columns and their counts."""
        n_rows, n_cols, n_slots = self.counts.shape
        step = max(1, MERGE_PIECE_KEYS // max(1, n_cols * n_slots))
        for start in range(0, n_rows, step):
            block = self.counts[start : start + step].reshape(-1, n_slots)
            filled = np.flatnonzero(block.any(axis=1))
            yield filled // n_cols + start + self.corner[0], filled % n_cols + self.corner[1], block[filled]

    def to_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the counts as sorted keys and int32 counts."""
        keys, counts = [np.empty(0, dtype=np.uint64)], [np.empty(0, dtype=np.int32)]
        for rows, cols, block in self._slabs():  # ascending keys, slab after slab
            square, slot = np.nonzero(block)
            keys.append(_keys(rows[square], cols[square], slot))
            counts.append(block[square, slot])
        return np.concatenate(keys), np.concatenate(counts)

    def to_csr(self, gene_order: np.ndarray) -> tuple[np.ndarray, sparse.csr_matrix]:
        """Return the non-empty squares' grid ``(column, row)`` and counts, columns the gene codes of ``gene_order``."""
        grid, data, indices, row_lengths = [np.empty((0, 2), dtype=np.int64)], [], [], []
        for rows, cols, block in self._slabs():
            block = block[:, gene_order]
            square, column = np.nonzero(block)
            grid.append(np.column_stack([cols, rows]))
            data.append(block[square, column])
            indices.append(column.astype(np.int32))
            row_lengths.append(np.bincount(square, minlength=len(block)))
        indptr = np.concatenate([[0], np.cumsum(np.concatenate(row_lengths or [[]]))]).astype(np.int64)
        matrix = sparse.csr_matrix(
            (np.concatenate(data or [[]]).astype(np.int32), np.concatenate(indices or [[]]).astype(np.int32), indptr),
            shape=(len(indptr) - 1, len(gene_order)),
        )
        return np.concatenate(grid), matrix


class _KeyCounter:
    """Counts of uint64 keys (row, column, gene), kept as sorted distinct ``keys`` and their int32 ``counts``.

    Raw keys are buffered and, every ``BUFFER_KEYS``, sorted, counted and merged in.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self._buffer = np.empty(BUFFER_KEYS, dtype=np.uint64)
        self._filled = 0
        self.keys = np.empty(0, dtype=np.uint64)
        self.counts = np.empty(0, dtype=np.int32)

    def add(self, keys: np.ndarray) -> None:
        start = 0
        while start < len(keys):
            taken = min(len(keys) - start, len(self._buffer) - self._filled)
            self._buffer[self._filled : self._filled + taken] = keys[start : start + taken]
            self._filled += taken
            start += taken
            if self._filled == len(self._buffer):
                self.flush()

    def flush(self) -> None:
        """Sort and count the buffered keys, and merge them into ``keys, counts``."""
        if not self._filled:
            return
        run = self._buffer[: self._filled]
        run.sort()
        self._filled = 0
        self.keys, self.counts = _merge(self.keys, self.counts, *_collapse(run), self.source)

    def to_csr(self, gene_order: np.ndarray, n_codes: int) -> tuple[np.ndarray, sparse.csr_matrix]:
        """Return the non-empty squares' grid ``(column, row)`` and counts, columns the gene codes of ``gene_order``."""
        self.flush()
        keys, counts = self.keys, self.counts
        squares = keys >> np.uint64(_GENE_BITS)
        starts = np.flatnonzero(np.concatenate([[True], squares[1:] != squares[:-1]])) if len(keys) else []
        square_keys = squares[starts]
        del squares
        grid = np.column_stack(
            [
                (square_keys & _AXIS_MASK).astype(np.int64) - _AXIS_OFFSET,
                (square_keys >> np.uint64(_AXIS_BITS)).astype(np.int64) - _AXIS_OFFSET,
            ]
        )
        column_of_code = np.full(n_codes, -1, dtype=np.int32)  # codes left out are never counted
        column_of_code[gene_order] = np.arange(len(gene_order), dtype=np.int32)
        indices = column_of_code[(keys & _GENE_MASK).astype(np.int64)]
        indptr = np.append(np.asarray(starts, dtype=np.int64), len(keys))
        matrix = sparse.csr_matrix((counts, indices, indptr), shape=(len(square_keys), len(gene_order)))
        matrix.sort_indices()
        return grid.reshape(-1, 2), matrix


def _collapse(sorted_keys: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Collapse equal neighbours of sorted keys: the distinct keys and their summed counts (default: one each)."""
    if not len(sorted_keys):
        return sorted_keys.copy(), np.empty(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
    if counts is None:
        return sorted_keys[starts], np.diff(np.append(starts, len(sorted_keys)))
    return sorted_keys[starts], np.add.reduceat(counts, starts, dtype=np.int64)


def _merge(
    keys_a: np.ndarray,
    counts_a: np.ndarray,
    keys_b: np.ndarray,
    counts_b: np.ndarray,
    source: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two sorted runs of distinct keys, summing the counts of equal keys, into int32 counts.

    Piece by piece over key ranges (split at quantiles of the longer run), so that temporaries stay small and in
    cache; within a piece a stable sort of the two sorted runs (timsort: one linear merge) orders the keys.
    """
    total = len(keys_a) + len(keys_b)
    merged_keys = np.empty(total, dtype=np.uint64)
    merged_counts = np.empty(total, dtype=np.int32)
    n_pieces = max(1, -(-total // MERGE_PIECE_KEYS))
    larger = keys_a if len(keys_a) >= len(keys_b) else keys_b
    splits = larger[np.linspace(0, len(larger), n_pieces + 1)[1:-1].astype(np.int64)]
    bounds_a = np.concatenate([[0], np.searchsorted(keys_a, splits), [len(keys_a)]])
    bounds_b = np.concatenate([[0], np.searchsorted(keys_b, splits), [len(keys_b)]])
    filled = 0
    for piece in range(n_pieces):
        part_a = slice(bounds_a[piece], bounds_a[piece + 1])
        part_b = slice(bounds_b[piece], bounds_b[piece + 1])
        keys = np.concatenate([keys_a[part_a], keys_b[part_b]])
        counts = np.concatenate([counts_a[part_a], counts_b[part_b]], dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        keys, counts = _collapse(keys[order], counts[order])
        if len(counts) and counts.max() > _INT32_MAX:
            raise InputError(f"{source}: a square holds more than {_INT32_MAX} molecules of one gene (int32 counts)")
        merged_keys[filled : filled + len(keys)] = keys
        merged_counts[filled : filled + len(keys)] = counts
        filled += len(keys)
    return merged_keys[:filled], merged_counts[:filled]


def _keys(rows: np.ndarray, cols: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """Pack grid rows, columns (int64, within ``+-2**21``) and gene codes into sortable uint64 keys."""
    keys = (rows + _AXIS_OFFSET).astype(np.uint64)
    keys <<= np.uint64(_AXIS_BITS)
    keys |= (cols + _AXIS_OFFSET).astype(np.uint64)
    keys <<= np.uint64(_GENE_BITS)
    keys |= genes.astype(np.uint64)
    return keys


class _SquareGeneCounter:
    """Molecule counts per (square, gene): a dense block while it fits ``DENSE_BUDGET_CELLS``, then sorted keys.

    The dense block is the fast path (one ``np.add.at`` per batch) for the usual case, a few hundred genes and squares
    of tens of micrometres; a grid too large for it (small squares, thousands of genes, a whole slide) moves its
    counts into the sparse key counter, whose memory is the number of distinct (square, gene) pairs.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.dense: _DenseBlock | None = _DenseBlock()
        self.sparse: _KeyCounter | None = None
        self.total = 0

    def add(self, binned: _Binned, n_genes: int) -> None:
        self.total += binned.n_kept
        if self.dense is not None:
            # int32 cells cannot overflow while the total stays within int32
            if self.total <= _INT32_MAX and self.dense.fits(binned, n_genes):
                self.dense.add(binned)
                return
            self.sparse = _KeyCounter(self.source)
            self.sparse.keys, self.sparse.counts = self.dense.to_keys()
            self.dense = None
        assert self.sparse is not None
        keys = _keys(binned.rows, binned.cols, binned.genes)
        self.sparse.add(keys if binned.keep is None else keys[binned.keep])

    def to_csr(self, gene_order: np.ndarray, n_codes: int) -> tuple[np.ndarray, sparse.csr_matrix]:
        """Return the non-empty squares' grid ``(column, row)`` and counts, columns the gene codes of ``gene_order``."""
        if self.dense is not None:
            return self.dense.to_csr(gene_order)
        assert self.sparse is not None
        return self.sparse.to_csr(gene_order, n_codes)


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
        if len(self.codes) > int(_GENE_MASK) + 1:
            raise InputError(f"{source}: more than {int(_GENE_MASK) + 1} distinct genes")
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
    if not (low >= -_AXIS_OFFSET and high < _AXIS_OFFSET):
        bad = int((~np.isfinite(index)).sum())
        if bad:
            raise InputError(f"{source}: {bad} molecule(s) with a missing or infinite {axis} coordinate")
        raise InputError(
            f"{source}: {axis} spans {low:.0f}..{high:.0f} squares of {size_um} um from the origin; at most "
            f"{_AXIS_OFFSET} each way (a larger square, or an origin nearer the molecules)"
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
) -> _Binned:
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
    return _Binned(rows, cols, codes[indices], keep, (low_row, low_col), (high_row, high_col))


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

    The core of :func:`pool_transcripts`, without a store: feed it the batches of any transcript table.

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
    counter = _SquareGeneCounter(source)
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
    return _pooled_counts(counter, genes, size_um=size_um, origin_um=origin_um, n_read=n_read)


def _check_grid(size_um: float, origin_um: Sequence[float], min_qv: float | None, source: str) -> tuple[float, float]:
    if not (np.isfinite(size_um) and size_um > 0):
        raise InputError(f"{source}: the square side must be a positive number of micrometres, got {size_um}")
    if len(origin_um) != 2 or not np.all(np.isfinite(origin_um)):
        raise InputError(f"{source}: the grid origin must be two finite coordinates (x, y) in um, got {origin_um}")
    if min_qv is not None and not np.isfinite(min_qv):
        raise InputError(f"{source}: min_qv must be a finite number or None, got {min_qv}")
    return float(origin_um[0]), float(origin_um[1])


def _pooled_counts(
    counter: _SquareGeneCounter,
    genes: _GeneIndex,
    *,
    size_um: float,
    origin_um: tuple[float, float],
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
    )


# --------------------------------------------------------------------------------------------- parquet input
T = TypeVar("T")


def _prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Yield from ``items`` while a background thread fetches the next ``depth`` (pyarrow releases the GIL)."""
    slots: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(("done", None))
        except BaseException as err:  # handed to the consumer, which re-raises it
            slots.put(("error", err))

    thread = threading.Thread(target=produce, daemon=True, name="hest-zarr-parquet-prefetch")
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)


def transcript_columns(names: Sequence[str], source: str) -> TranscriptColumns:
    """Pick the column names of a transcript table: a store's ``x, y, gene`` or Xenium's ``x_location, ...``."""
    for candidate in (STORE_COLUMNS, XENIUM_COLUMNS):
        if {candidate.x, candidate.y, candidate.gene} <= set(names):
            return candidate
    raise InputError(
        f"{source}: not a transcript table (expected columns x, y, gene or x_location, y_location, feature_name); "
        f"found {list(names)}"
    )


def pool_parquet(
    path: str | Path,
    *,
    size_um: float = DEFAULT_SIZE_UM,
    origin_um: tuple[float, float] = (0.0, 0.0),
    min_qv: float | None = DEFAULT_MIN_QV,
    include_controls: bool = True,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    storage_options: StorageOptions = None,
) -> PooledCounts:
    """Pool a transcript parquet file (or folder of parts), local or remote, into squares: streamed by batch.

    Parameters are those of :func:`pool_transcript_batches`; ``batch_rows`` is the number of rows read at a time.

    Examples
    --------
    >>> pooled = pool_parquet("xenium/transcripts.parquet", size_um=55.0)  # doctest: +SKIP
    >>> pooled.counts.sum() == pooled.n_kept  # doctest: +SKIP
    True

    """
    if batch_rows < 1:
        raise InputError(f"{path}: batch_rows must be at least 1, got {batch_rows}")
    files, filesystem = parquet_files(path, storage_options)
    try:
        schema = pq.ParquetFile(files[0], filesystem=filesystem).schema_arrow
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"{files[0]}: not a readable parquet file ({err})") from err
    columns = transcript_columns(schema.names, str(path))
    if min_qv is not None and columns.qv not in schema.names:
        raise InputError(f"{path}: no '{columns.qv}' column to filter on; pass min_qv=None to count every molecule")
    needed = [columns.x, columns.y, columns.gene] + ([columns.qv] if min_qv is not None else [])
    batches = iter_parquet_batches(files, filesystem, needed, dictionary_columns=[columns.gene], batch_rows=batch_rows)
    return pool_transcript_batches(
        _prefetch(batches),
        size_um=size_um,
        origin_um=origin_um,
        min_qv=min_qv,
        include_controls=include_controls,
        columns=columns,
        source=str(path),
    )


# --------------------------------------------------------------------------------------------- elements
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
        The counts, from :func:`pool_transcript_batches` or :func:`pool_parquet`.
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
    >>> pooled = pool_parquet("xenium/transcripts.parquet")  # doctest: +SKIP
    >>> spots, table = pseudo_spot_elements(pooled, pixel_size_um=0.2125)  # doctest: +SKIP

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


def _element_names(suffix: str | None, url: str) -> tuple[str, str]:
    if suffix is None:
        return Elements.SPOTS, Elements.SPOT_EXPRESSION
    spots, table = f"{Elements.SPOTS}_{suffix}", f"{Elements.SPOT_EXPRESSION}_{suffix}"
    if not suffix or not suffix.replace("_", "").isalnum() or expected_kind(spots) != "shapes":
        raise InputError(f"{url}: suffix {suffix!r} is not a valid element name suffix (letters, digits, '_')")
    return spots, table


def _store_record(url: str, storage_options: StorageOptions) -> StoreRecord:
    location = _locate(url, storage_options)
    return StoreRecord.model_validate(_read_root_attributes(location)[Keys.ROOT_ATTRS])


def _refuse_existing(url: str, record: StoreRecord, names: Sequence[str], replace: bool) -> None:
    present = [name for name in names if name in record.elements]
    if present and not replace:
        raise InputError(f"{url}: already holds {present} (pass replace=True, or --replace, to replace them)")


def pool_transcripts(
    url: str | Path,
    size_um: float = DEFAULT_SIZE_UM,
    *,
    origin_um: tuple[float, float] = (0.0, 0.0),
    min_qv: float | None = DEFAULT_MIN_QV,
    include_controls: bool = True,
    suffix: str | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    replace: bool = False,
    storage_options: StorageOptions = None,
) -> PoolSummary:
    """Pool a Xenium store's molecules into square pseudo-spots and add them to the store.

    The ``transcripts`` points are streamed from the store's parquet parts (local or remote) by batch; see the module
    docstring for the grid, the molecules counted and the memory used.

    Parameters
    ----------
    url
        Store path or fsspec URL; the store must hold ``transcripts``.
    size_um
        Side of the squares in micrometres (55 as in the HEST-1k paper).
    origin_um
        Corner ``(x, y)`` of square ``x0_y0`` in the molecules' micrometres.
    min_qv
        Count only molecules with ``qv >= min_qv`` (``None``: all).
    include_controls
        Count control probes and codewords too (flagged in ``var['is_control']``).
    suffix
        Write ``spots_<suffix>`` and ``spot_expression_<suffix>`` instead of ``spots`` and ``spot_expression``.
    batch_rows
        Molecules read at a time.
    replace
        Replace existing elements of those names.
    storage_options
        fsspec options for a remote URL.

    Returns
    -------
    The names written, and the numbers of squares, genes and molecules counted.

    Raises
    ------
    InputError
        A store without ``transcripts``, elements already present (without ``replace``), a bad size, origin or
        suffix, or a malformed transcript table.

    Examples
    --------
    >>> pool_transcripts("xenium.zarr", 55.0).n_spots  # doctest: +SKIP
    73

    """
    url = str(url)
    spots_name, table_name = _element_names(suffix, url)
    record = _store_record(url, storage_options)
    transcripts = record.elements.get(Elements.TRANSCRIPTS)
    if transcripts is None or transcripts.kind != "points":
        raise InputError(
            f"{url}: no '{Elements.TRANSCRIPTS}' points element to pool (pseudo-spots are made from Xenium molecules; "
            f"Visium HD bins are pooled by pool_bins, --to-bin-um); the store holds {sorted(record.elements)}"
        )
    if record.pixel_size_um is None:
        raise InputError(f"{url}: the store records no pixel size ('global' -> 'um'), needed to place the squares")
    _refuse_existing(url, record, (spots_name, table_name), replace)
    location = _locate(url, storage_options)
    group = _open_zarr_group(location)[f"points/{Elements.TRANSCRIPTS}"]
    to_global = _points_to_global(group.attrs.asdict(), url)
    parquet = location.join("points", Elements.TRANSCRIPTS, "points.parquet")
    pooled = pool_parquet(
        parquet if location.is_local else f"{url.rstrip('/')}/points/{Elements.TRANSCRIPTS}/points.parquet",
        size_um=size_um,
        origin_um=origin_um,
        min_qv=min_qv,
        include_controls=include_controls,
        batch_rows=batch_rows,
        storage_options=storage_options,
    )
    if not pooled.n_kept:
        raise InputError(
            f"{url}: no molecule passes the filters (min_qv={min_qv}, include_controls={include_controls})"
        )
    shapes, table = pseudo_spot_elements(
        pooled, pixel_size_um=record.pixel_size_um, to_global=to_global, region=spots_name
    )
    parameters = {
        "size_um": pooled.size_um,
        "origin_um": list(pooled.origin_um),
        "min_qv": min_qv,
        "include_controls": include_controls,
        "n_transcripts_read": pooled.n_read,
        "n_transcripts_kept": pooled.n_kept,
        "spot_id": "x{column}_y{row}: column = floor((x - origin_x) / size_um), row likewise in y",
    }
    provenance = {
        name: Provenance(
            converter=CONVERTER,
            inputs=[f"{url.rstrip('/')}/points/{Elements.TRANSCRIPTS}"],
            method="pseudo-spots",
            parameters=parameters,
        )
        for name in (spots_name, table_name)
    }
    hest_zarr.store.add_elements(
        url,
        {spots_name: shapes, table_name: table},
        provenance,
        replace=replace,
        storage_options=storage_options,
    )
    return PoolSummary(url, spots_name, table_name, len(shapes), int(table.n_vars), pooled.n_kept)


def _points_to_global(attributes: dict[str, Any], url: str) -> BaseTransformation:
    from spatialdata._io._utils import _get_transformations_from_ngff_dict

    transformations = _get_transformations_from_ngff_dict(attributes.get("coordinateTransformations", []))
    if CoordinateSystems.GLOBAL not in transformations:
        raise InputError(f"{url}: '{Elements.TRANSCRIPTS}' has no transformation to '{CoordinateSystems.GLOBAL}'")
    return transformations[CoordinateSystems.GLOBAL]


# --------------------------------------------------------------------------------------------- Visium HD bins
def bin_suffix(bin_um: int) -> str:
    """Return the element suffix of a Visium HD bin size, as Space Ranger names its folders.

    Examples
    --------
    >>> bin_suffix(8)
    'square_008um'

    """
    return f"square_{bin_um:03d}um"


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


def pool_bins(
    url: str | Path,
    from_bin_um: int = 2,
    to_bin_um: int = 8,
    *,
    replace: bool = False,
    storage_options: StorageOptions = None,
) -> PoolSummary:
    """Pool a Visium HD store's bins into larger bins and add them to the store.

    ``spots_square_<from>um`` and ``spot_expression_square_<from>um`` become ``spots_square_<to>um`` and
    ``spot_expression_square_<to>um``: blocks of ``k x k`` bins, ``k = to_bin_um / from_bin_um`` (see the module
    docstring). The source table is read whole (as :func:`hest_zarr.open` reads tables).

    Parameters
    ----------
    url
        Store path or fsspec URL of a Visium HD store.
    from_bin_um, to_bin_um
        Bin sizes in micrometres; ``to_bin_um`` must be a multiple of ``from_bin_um``.
    replace
        Replace existing elements of the target names.
    storage_options
        fsspec options for a remote URL.

    Returns
    -------
    The names written, and the numbers of bins, genes and molecules.

    Raises
    ------
    InputError
        A target size that is not a larger multiple of the source size, a store without the source bins, targets
        already present (without ``replace``).

    Examples
    --------
    >>> pool_bins("hd.zarr", 2, 16).spots  # doctest: +SKIP
    'spots_square_016um'

    """
    url = str(url)
    if not (isinstance(from_bin_um, int | np.integer) and isinstance(to_bin_um, int | np.integer)):
        raise InputError(f"{url}: bin sizes are whole micrometres, got {from_bin_um!r} and {to_bin_um!r}")
    if from_bin_um < 1 or to_bin_um <= from_bin_um or to_bin_um % from_bin_um:
        raise InputError(
            f"{url}: cannot pool {from_bin_um} um bins into {to_bin_um} um bins: the target must be a larger multiple "
            f"of the source (e.g. 2 -> 8 or 16 um)"
        )
    record = _store_record(url, storage_options)
    source_spots, source_table = (
        f"{base}_{bin_suffix(from_bin_um)}" for base in (Elements.SPOTS, Elements.SPOT_EXPRESSION)
    )
    target_spots, target_table = (
        f"{base}_{bin_suffix(to_bin_um)}" for base in (Elements.SPOTS, Elements.SPOT_EXPRESSION)
    )
    if source_spots not in record.elements or source_table not in record.elements:
        found = sorted(name for name in record.elements if name.startswith(f"{Elements.SPOTS}_square_"))
        raise InputError(
            f"{url}: no {from_bin_um} um bins to pool (expected {source_spots} and {source_table}); Visium HD bins "
            f"found: {found or 'none'}"
        )
    _refuse_existing(url, record, (target_spots, target_table), replace)
    if record.pixel_size_um is None:
        raise InputError(f"{url}: the store records no pixel size ('global' -> 'um')")
    sdata = hest_zarr.open(url, storage_options)
    factor = to_bin_um // from_bin_um
    shapes, table, fit = pool_bin_elements(
        sdata.shapes[source_spots],
        sdata.tables[source_table],
        factor,
        to_bin_um=to_bin_um,
        pixel_size_um=record.pixel_size_um,
        region=target_spots,
        source=f"{url}: {source_table}",
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
            inputs=[f"{url.rstrip('/')}/shapes/{source_spots}", f"{url.rstrip('/')}/tables/{source_table}"],
            method="bin-pooling",
            parameters=parameters,
        )
        for name in (target_spots, target_table)
    }
    hest_zarr.store.add_elements(
        url, {target_spots: shapes, target_table: table}, provenance, replace=replace, storage_options=storage_options
    )
    total = int(table.X.sum(dtype=np.int64)) if table.n_obs else 0
    return PoolSummary(url, target_spots, target_table, table.n_obs, table.n_vars, total)
