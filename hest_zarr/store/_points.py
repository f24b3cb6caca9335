"""Tabular parts of a store read in batches: parquet files of points elements (or any parquet URL), the record.

Pooling streams millions of molecules; ``dask.dataframe`` (what spatialdata reads points with) would build a
graph per partition and load whole row groups of every column. These readers stream the wanted columns of one
row group at a time through pyarrow, from the local disk or any fsspec URL.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from spatialdata.transformations import BaseTransformation

from hest_zarr.errors import InputError, NotAStoreError
from hest_zarr.schemas import Keys, StoreRecord
from hest_zarr.store._location import StorageOptions, locate, network_errors, open_zarr_group
from hest_zarr.store._read import read_root_attributes

#: Rows read at a time by default.
DEFAULT_BATCH_ROWS = 1 << 20


def read_record(url: str | Path, storage_options: StorageOptions = None) -> StoreRecord:
    """Read a store's ``hest_zarr`` record without opening its elements (one small read).

    Examples
    --------
    >>> read_record("sample.zarr").pixel_size_um  # doctest: +SKIP
    0.2125

    """
    return StoreRecord.model_validate(read_root_attributes(locate(url, storage_options))[Keys.ROOT_ATTRS])


def points_parquet(
    url: str | Path, name: str, storage_options: StorageOptions = None
) -> tuple[list[str], pafs.FileSystem, dict[str, BaseTransformation]]:
    """Return the parquet parts of a store's points element, their filesystem and the element's transformations.

    Examples
    --------
    >>> files, filesystem, transformations = points_parquet("xenium.zarr", "transcripts")  # doctest: +SKIP

    """
    from spatialdata._io._utils import _get_transformations_from_ngff_dict

    location = locate(url, storage_options)
    with network_errors(location.url):
        root = open_zarr_group(location)
        if "points" not in root or name not in root["points"]:
            raise NotAStoreError(f"{location.url}: no points element '{name}'")
        attributes = root["points"][name].attrs.asdict()
    transformations = _get_transformations_from_ngff_dict(attributes.get("coordinateTransformations", []))
    parquet = f"{location.url.rstrip('/')}/points/{name}/points.parquet"
    files, filesystem = parquet_files(
        location.join("points", name, "points.parquet") if location.is_local else parquet, storage_options
    )
    return files, filesystem, transformations


def _arrow_filesystem(fs: Any) -> pafs.FileSystem:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols or "local" in protocols:
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def parquet_files(path: str | Path, storage_options: StorageOptions = None) -> tuple[list[str], pafs.FileSystem]:
    """Return the parquet files at a path or URL (one file, or every ``*.parquet`` in a folder) and their filesystem.

    Raises
    ------
    InputError
        Nothing there, or a folder without parquet files.

    Examples
    --------
    >>> files, _ = parquet_files("TENX95.zarr/points/transcripts/points.parquet")  # doctest: +SKIP
    >>> files  # doctest: +SKIP
    ['TENX95.zarr/points/transcripts/points.parquet/part.0.parquet']

    """
    location = locate(path, storage_options)
    fs = location.fs
    if fs.isfile(location.path):
        files = [location.path]
    elif fs.isdir(location.path):
        files = sorted(p for p in fs.find(location.path) if p.endswith(".parquet"))
        if not files:
            raise InputError(f"{location.url}: a folder without parquet files")
    else:
        raise InputError(f"{location.url}: no such parquet file or folder")
    return files, _arrow_filesystem(fs)


def iter_parquet_batches(
    files: Sequence[str],
    filesystem: pafs.FileSystem,
    columns: Sequence[str],
    *,
    dictionary_columns: Sequence[str] = (),
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Iterator[pa.RecordBatch]:
    """Yield record batches of ``columns`` from parquet files, ``dictionary_columns`` as dictionary codes.

    Raises
    ------
    InputError
        An unreadable file, or one without the columns.

    Examples
    --------
    >>> files, fs = parquet_files("xenium/transcripts.parquet")  # doctest: +SKIP
    >>> next(iter_parquet_batches(files, fs, ["x_location"], batch_rows=1000)).num_rows  # doctest: +SKIP
    1000

    """
    for path in files:
        try:
            # pre_buffer (pyarrow's default) would read every row group of the columns up front: O(file) memory.
            reader = pq.ParquetFile(
                path, filesystem=filesystem, read_dictionary=list(dictionary_columns), pre_buffer=False
            )
        except (OSError, pa.ArrowException) as err:
            raise InputError(f"{path}: not a readable parquet file ({err})") from err
        missing = [name for name in columns if name not in reader.schema_arrow.names]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}; found {reader.schema_arrow.names}")
        try:
            yield from reader.iter_batches(batch_size=batch_rows, columns=list(columns))
        except (OSError, pa.ArrowException) as err:
            raise InputError(f"{path}: cannot read its row groups ({err})") from err
