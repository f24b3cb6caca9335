"""Pool a store's molecules or Visium HD bins, or a transcript parquet file: read -> :mod:`hest_zarr.ops.pool` -> write.

- :func:`pool_transcripts`: a Xenium store's ``transcripts`` parquet parts are streamed (local or remote) by record
  batch into :func:`~hest_zarr.ops.pool.pool_transcript_batches` while a background thread reads the next batch;
  :func:`~hest_zarr.ops.pool.pseudo_spot_update` makes the squares and their table, which are added to the store.
- :func:`pool_bins`: a Visium HD store is opened and :func:`~hest_zarr.ops.pool.pool_sample_bins` pools its bins.
- :func:`pool_parquet`: the counts of any transcript parquet file or folder of parts (no store).

Existing target elements are refused (without ``replace``) from the store's record, before any molecule is read.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hest_zarr.elements import CoordinateSystems, Elements
from hest_zarr.errors import InputError
from hest_zarr.ops.pool import (
    DEFAULT_MIN_QV,
    DEFAULT_SIZE_UM,
    PooledCounts,
    bin_element_names,
    check_bin_sizes,
    pool_sample_bins,
    pool_transcript_batches,
    pseudo_spot_names,
    pseudo_spot_update,
    transcript_columns,
)
from hest_zarr.schemas import StoreRecord
from hest_zarr.store import (
    DEFAULT_BATCH_ROWS,
    StorageOptions,
    apply_update,
    iter_parquet_batches,
    parquet_files,
    points_parquet,
    read_record,
)
from hest_zarr.store import open as open_store


@dataclass(frozen=True)
class PoolSummary:
    """What a pooling call wrote into a store."""

    url: str
    spots: str
    table: str
    n_spots: int
    n_genes: int
    total_counts: int


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


def _pool_files(
    files: Sequence[str],
    filesystem: pafs.FileSystem,
    source: str,
    *,
    size_um: float,
    origin_um: tuple[float, float],
    min_qv: float | None,
    include_controls: bool,
    batch_rows: int,
) -> PooledCounts:
    """Stream the transcript columns of parquet files into :func:`~hest_zarr.ops.pool.pool_transcript_batches`."""
    if batch_rows < 1:
        raise InputError(f"{source}: batch_rows must be at least 1, got {batch_rows}")
    try:
        schema = pq.ParquetFile(files[0], filesystem=filesystem).schema_arrow
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"{files[0]}: not a readable parquet file ({err})") from err
    columns = transcript_columns(schema.names, source)
    if min_qv is not None and columns.qv not in schema.names:
        raise InputError(f"{source}: no '{columns.qv}' column to filter on; pass min_qv=None to count every molecule")
    needed = [columns.x, columns.y, columns.gene] + ([columns.qv] if min_qv is not None else [])
    batches = iter_parquet_batches(files, filesystem, needed, dictionary_columns=[columns.gene], batch_rows=batch_rows)
    return pool_transcript_batches(
        _prefetch(batches),
        size_um=size_um,
        origin_um=origin_um,
        min_qv=min_qv,
        include_controls=include_controls,
        columns=columns,
        source=source,
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

    Parameters are those of :func:`~hest_zarr.ops.pool.pool_transcript_batches`; ``batch_rows`` is the number of rows
    read at a time, ``storage_options`` the fsspec options of a remote URL. The columns are a store's ``x, y, gene,
    qv`` or Xenium's ``x_location, y_location, feature_name, qv``.

    Examples
    --------
    >>> pooled = pool_parquet("xenium/transcripts.parquet", size_um=55.0)  # doctest: +SKIP
    >>> pooled.counts.sum() == pooled.n_kept  # doctest: +SKIP
    True

    """
    files, filesystem = parquet_files(path, storage_options)
    return _pool_files(
        files,
        filesystem,
        str(path),
        size_um=size_um,
        origin_um=origin_um,
        min_qv=min_qv,
        include_controls=include_controls,
        batch_rows=batch_rows,
    )


# --------------------------------------------------------------------------------------------- stores
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

    The ``transcripts`` points are streamed from the store's parquet parts (local or remote) by batch; see
    :mod:`hest_zarr.ops.pool` for the grid, the molecules counted and the memory used.

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
    spots_name, table_name = pseudo_spot_names(suffix, url)
    record = read_record(url, storage_options)
    transcripts = record.elements.get(Elements.TRANSCRIPTS)
    if transcripts is None or transcripts.kind != "points":
        raise InputError(
            f"{url}: no '{Elements.TRANSCRIPTS}' points element to pool (pseudo-spots are made from Xenium molecules; "
            f"Visium HD bins are pooled by pool_bins, --to-bin-um); the store holds {sorted(record.elements)}"
        )
    if record.pixel_size_um is None:
        raise InputError(f"{url}: the store records no pixel size ('global' -> 'um'), needed to place the squares")
    _refuse_existing(url, record, (spots_name, table_name), replace)
    files, filesystem, transformations = points_parquet(url, Elements.TRANSCRIPTS, storage_options)
    if CoordinateSystems.GLOBAL not in transformations:
        raise InputError(f"{url}: '{Elements.TRANSCRIPTS}' has no transformation to '{CoordinateSystems.GLOBAL}'")
    pooled = _pool_files(
        files,
        filesystem,
        f"{url.rstrip('/')}/points/{Elements.TRANSCRIPTS}/points.parquet",
        size_um=size_um,
        origin_um=origin_um,
        min_qv=min_qv,
        include_controls=include_controls,
        batch_rows=batch_rows,
    )
    update = pseudo_spot_update(
        pooled,
        pixel_size_um=record.pixel_size_um,
        to_global=transformations[CoordinateSystems.GLOBAL],
        suffix=suffix,
        replace=replace,
        source=url,
    )
    apply_update(url, update, storage_options=storage_options)
    table = update.elements[table_name]
    return PoolSummary(url, spots_name, table_name, len(update.elements[spots_name]), int(table.n_vars), pooled.n_kept)


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
    ``spot_expression_square_<to>um``: blocks of ``k x k`` bins, ``k = to_bin_um / from_bin_um`` (see
    :func:`hest_zarr.ops.pool.pool_sample_bins`). The source table is read whole (as :func:`hest_zarr.open` reads
    tables).

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
    check_bin_sizes(from_bin_um, to_bin_um, url)
    target_spots, target_table = bin_element_names(to_bin_um)
    _refuse_existing(url, read_record(url, storage_options), (target_spots, target_table), replace)
    update = pool_sample_bins(open_store(url, storage_options), from_bin_um, to_bin_um, replace=replace, source=url)
    apply_update(url, update, storage_options=storage_options)
    table = update.elements[target_table]
    total = int(table.X.sum(dtype=np.int64)) if table.n_obs else 0
    return PoolSummary(url, target_spots, target_table, table.n_obs, table.n_vars, total)
