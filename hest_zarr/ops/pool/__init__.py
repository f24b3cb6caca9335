"""Pool Xenium transcripts into square pseudo-spots, and Visium HD bins into larger bins: operators, no store.

The operators take arrow record batches, elements or a SpatialData object and return counts, elements or an
:class:`~hest_zarr.elements.ElementUpdate`; :mod:`hest_zarr.workflows.pool` (``pool_transcripts``, ``pool_bins``,
``pool_parquet``) runs them on a store or a parquet file. One module per concern: ``_transcripts`` (batches to
:class:`PooledCounts` to pseudo-spot elements), ``_counting`` (the streaming square x gene counter), ``_bins``
(Visium HD).

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
- Streaming. The workflows read molecules with pyarrow, one parquet batch at a time (``batch_rows``, default one
  Xenium row group), only the ``x, y, gene, qv`` columns, the gene column as its dictionary codes (strings are never
  built per molecule), from local files or any fsspec URL; the next batch is read in a background thread while
  :func:`pool_transcript_batches` counts the current one.
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
a second and 8.6 GiB at 50 million; this package (through ``pool_parquet``) 9.3 million a second and 0.71 GiB at 50
million.
"""

from __future__ import annotations

from hest_zarr.ops.pool._bins import (
    bin_element_names,
    bin_suffix,
    check_bin_sizes,
    pool_bin_elements,
    pool_sample_bins,
)
from hest_zarr.ops.pool._transcripts import (
    CONVERTER,
    DEFAULT_MIN_QV,
    DEFAULT_SIZE_UM,
    STORE_COLUMNS,
    XENIUM_COLUMNS,
    PooledCounts,
    TranscriptColumns,
    pool_transcript_batches,
    pseudo_spot_elements,
    pseudo_spot_names,
    pseudo_spot_update,
    transcript_columns,
)

__all__ = [
    "CONVERTER",
    "DEFAULT_MIN_QV",
    "DEFAULT_SIZE_UM",
    "STORE_COLUMNS",
    "XENIUM_COLUMNS",
    "PooledCounts",
    "TranscriptColumns",
    "bin_element_names",
    "bin_suffix",
    "check_bin_sizes",
    "pool_bin_elements",
    "pool_sample_bins",
    "pool_transcript_batches",
    "pseudo_spot_elements",
    "pseudo_spot_names",
    "pseudo_spot_update",
    "transcript_columns",
]
