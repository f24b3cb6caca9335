"""Counting molecules per (square, gene): a dense block while it fits, then sorted uint64 keys merged run by run.

The machinery behind :func:`hest_zarr.ops.pool.pool_transcript_batches` (see :mod:`hest_zarr.ops.pool` for the
design and its measured speed). A batch arrives as :class:`Binned` (grid row, column and gene code per molecule);
:class:`SquareGeneCounter` counts it into a :class:`_DenseBlock` while the squares seen so far and the genes fit
``DENSE_BUDGET_CELLS``, then moves the counts to a :class:`_KeyCounter` of sorted distinct keys
(row | column | gene), merged piece by piece (:func:`_merge`). Counts beyond int32 are refused, never wrapped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from hest_zarr.errors import InputError

#: Molecule keys buffered before they are sorted, counted and merged (8 bytes each).
BUFFER_KEYS = 1 << 23
#: Keys merged at a time when a sorted run joins the counts (bounds the merge's temporaries).
MERGE_PIECE_KEYS = 1 << 20
#: Cells (int32) of the dense square x gene block before counts move to sorted keys: 256 MiB.
DENSE_BUDGET_CELLS = 1 << 26

# A molecule's key: row (22 bits) | column (22 bits) | gene (20 bits), grid indices offset by 2**21.
_GENE_BITS = 20
_AXIS_BITS = 22
#: Grid indices must lie in ``[-AXIS_OFFSET, AXIS_OFFSET)`` on each axis.
AXIS_OFFSET = 1 << (_AXIS_BITS - 1)
_GENE_MASK = np.uint64((1 << _GENE_BITS) - 1)
_AXIS_MASK = np.uint64((1 << _AXIS_BITS) - 1)
#: Distinct gene codes a key can hold.
MAX_GENES = int(_GENE_MASK) + 1
_INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True)
class Binned:
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

    def fits(self, binned: Binned, n_genes: int) -> bool:
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

    def add(self, binned: Binned) -> None:
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
                (square_keys & _AXIS_MASK).astype(np.int64) - AXIS_OFFSET,
                (square_keys >> np.uint64(_AXIS_BITS)).astype(np.int64) - AXIS_OFFSET,
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
    keys = (rows + AXIS_OFFSET).astype(np.uint64)
    keys <<= np.uint64(_AXIS_BITS)
    keys |= (cols + AXIS_OFFSET).astype(np.uint64)
    keys <<= np.uint64(_GENE_BITS)
    keys |= genes.astype(np.uint64)
    return keys


class SquareGeneCounter:
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

    def add(self, binned: Binned, n_genes: int) -> None:
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
