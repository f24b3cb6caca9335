"""The store layer: the only code that knows paths, URLs, fsspec, zarr groups, chunk keys and commits.

A sample store is a zarr v3 group that ``spatialdata.read_zarr`` opens unchanged, whose root attributes carry
a ``hest_zarr`` record (:class:`~hest_zarr.schemas.StoreRecord`). Everything above this package (converters,
operators, streaming, the benchmark, workflows) reaches stores through the functions exported here.

- **Reading** (:func:`open`). Local stores are read with spatialdata itself. Remote stores (``s3://``,
  ``gs://``, ``https://``, any fsspec URL) are read here, on zarr's ``FsspecStore``: spatialdata 0.7's
  ``read_zarr`` resolves remote element paths as local ones and fails. Images stay dask-backed and fetch only
  the chunks a computation touches; shapes, points and tables load as spatialdata loads them (GeoParquet, dask
  Parquet, AnnData). :func:`read_record` reads the record alone.
- **Chunks** (:func:`open_levels`, :class:`ChunkReader`). The pyramid levels of an image as zarr arrays, and a
  thread-pooled reader that fetches chunk objects directly (one concurrent batch per band remotely) and decodes
  our two codec chains in one C call each.
- **Points** (:func:`points_parquet`, :func:`parquet_files`, :func:`iter_parquet_batches`). A points element's
  parquet parts streamed by row group, without dask.
- **Writing** (:func:`write`, :func:`add_elements`, :func:`write_patch_store`). Everything is staged on local
  disk, sealed with a manifest (``_manifest``: every object's size and crc32c, every array's chunks, every
  table's counts) and committed by one path (``_commit``): one ``rename`` for a local store; a journaled move or
  copy for added elements and replaced remote stores, which :func:`repair` finishes after an interruption.
- **Integrity.** Every array chunk ends with zarr v3's ``crc32c`` codec. :func:`open` checks the store's objects
  against its manifest by listing and its tables' counts after reading; :class:`ChunkReader` verifies each chunk's
  checksum and refuses a missing chunk the manifest lists.
- **Checking** (:func:`validate`, :func:`info`). :func:`hest_zarr.elements.validate_sample` on what was opened,
  the manifest (presence by listing; with ``check_data`` every object's crc32c), then every chunk decoded.
- **Patch stores** (:func:`write_patch_store`, :func:`open_patches`): HEST's ``patches/<id>.h5`` layout in zarr.
"""

from __future__ import annotations

from hest_zarr.elements import get_record, set_record
from hest_zarr.store._chunks import (
    REMOTE_PREFETCH_BANDS,
    REMOTE_WORKERS,
    ChunkKey,
    ChunkReader,
    LevelArray,
    chunk_workers,
    open_levels,
)
from hest_zarr.store._commit import check_target, repair
from hest_zarr.store._location import StorageOptions, output_storage_options
from hest_zarr.store._patches import PatchBatches, PatchCodec, Patches, open_patches, write_patch_store
from hest_zarr.store._points import DEFAULT_BATCH_ROWS, iter_parquet_batches, parquet_files, points_parquet, read_record
from hest_zarr.store._raster import DEFAULT_CHUNK_SIZE, PYRAMID_MIN_SIDE, image_from_levels, pyramid_shapes
from hest_zarr.store._read import open  # noqa: A004
from hest_zarr.store._validate import info, validate
from hest_zarr.store._write import add_elements, apply_update, write
from hest_zarr.store.codecs import DEFAULT_JPEG_QUALITY, ImageCodec

__all__ = [
    "DEFAULT_BATCH_ROWS",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_JPEG_QUALITY",
    "PYRAMID_MIN_SIDE",
    "REMOTE_PREFETCH_BANDS",
    "REMOTE_WORKERS",
    "ChunkKey",
    "ChunkReader",
    "ImageCodec",
    "LevelArray",
    "PatchBatches",
    "PatchCodec",
    "Patches",
    "StorageOptions",
    "add_elements",
    "apply_update",
    "check_target",
    "chunk_workers",
    "get_record",
    "image_from_levels",
    "info",
    "iter_parquet_batches",
    "open",
    "open_levels",
    "open_patches",
    "output_storage_options",
    "parquet_files",
    "points_parquet",
    "pyramid_shapes",
    "read_record",
    "repair",
    "set_record",
    "validate",
    "write",
    "write_patch_store",
]
