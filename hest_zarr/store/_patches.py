"""Patch stores: ``img`` (N x H x W x 3 uint8, one patch per chunk), ``barcode`` and ``coords``, committed atomically.

The layout mirrors HEST's ``patches/<id>.h5``; the attributes (``hest_zarr_patches``) record how the patches
were cut (level, pixel sizes, resampling) and from which store and element. Every chunk carries a crc32c and the
store a manifest (``store._manifest``): a missing chunk is an error when the store is opened.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from tqdm.auto import tqdm

from hest_zarr.errors import InputError
from hest_zarr.store._commit import PATCH_ATTRIBUTES, commit_store, prepare_target, staging_directory
from hest_zarr.store._location import StorageOptions, locate, network_errors, open_zarr_group
from hest_zarr.store._manifest import build_manifest, presence_problems, raise_problems, read_manifest, seal_store
from hest_zarr.store.codecs import CHECKSUM, TABLE_COMPRESSORS, ImagecodecsJpeg

PatchCodec = Literal["zstd", "jpeg"]
#: Batches of ``(ids, top-left coords, (n, H, W, 3) pixels)``, in the order they are written.
PatchBatches = Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]


def write_patch_store(
    out: str | Path,
    n: int,
    size_px: int,
    batches: PatchBatches,
    *,
    attributes: dict[str, Any],
    codec: PatchCodec = "zstd",
    overwrite: bool = False,
    storage_options: StorageOptions = None,
    progress: bool = False,
    inputs: Sequence[str | Path] = (),
    input_storage_options: StorageOptions = None,
) -> str:
    """Write ``n`` patches of ``size_px`` to a new patch store, staged then committed; return its URL.

    Refuses an existing target unless ``overwrite``, and never replaces one of the write's ``inputs`` (read with
    ``input_storage_options``) or anything but a patch store (see :func:`~hest_zarr.store.check_target`).

    Examples
    --------
    >>> write_patch_store("p.zarr", 1, 4, [(np.array(["a"]), np.zeros((1, 2), int), np.zeros((1, 4, 4, 3), "u1"))],
    ...                   attributes={"size_px": 4})  # doctest: +SKIP

    """
    target, exists = prepare_target(
        out, overwrite, storage_options, kind="patches", inputs=inputs, input_storage_options=input_storage_options
    )
    with staging_directory(target) as staging:
        _write_patch_group(staging, n, size_px, batches, codec, attributes, progress)
        commit_store(staging, target, replace=exists)
    return target.url


def _write_patch_group(
    staging: Path,
    n: int,
    size: int,
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    codec: PatchCodec,
    attributes: dict[str, Any],
    progress: bool,
) -> None:
    group = zarr.open_group(str(staging), mode="w", zarr_format=3)
    if codec == "jpeg":
        serializer: Any = ImagecodecsJpeg(level=90)
        compressors: Any = [CHECKSUM]
    else:
        serializer, compressors = "auto", TABLE_COMPRESSORS
    images = group.create_array(
        "img",
        shape=(n, size, size, 3),
        chunks=(1, size, size, 3),
        dtype=np.uint8,
        serializer=serializer,
        compressors=compressors,
        config={"write_empty_chunks": True},
    )
    barcodes, coords = [], []
    written = 0
    with tqdm(total=n, desc="patches", unit="patch", disable=not progress) as bar:
        for ids, top_left, pixels in batches:
            images[written : written + len(ids)] = pixels
            written += len(ids)
            barcodes.append(ids)
            coords.append(top_left)
            bar.update(len(ids))
    group.create_array("barcode", data=np.concatenate(barcodes).astype(str), compressors=TABLE_COMPRESSORS)
    group.create_array("coords", data=np.concatenate(coords).astype(np.int64), compressors=TABLE_COMPRESSORS)
    group.attrs.update({PATCH_ATTRIBUTES: attributes})
    seal_store(staging, build_manifest(staging, {}), consolidate=False)


@dataclass
class Patches:
    """A patch store opened lazily: ``img`` is the zarr array, ``barcode``/``coords`` are loaded."""

    img: zarr.Array
    barcode: np.ndarray
    coords: np.ndarray
    attributes: dict[str, Any]

    def __len__(self) -> int:
        return len(self.barcode)


def open_patches(url: str | Path, storage_options: StorageOptions = None) -> Patches:
    """Open a patch store written by :func:`write_patch_store`."""
    location = locate(url, storage_options)
    with network_errors(location.url):
        if not location.fs.exists(location.join("zarr.json")):
            raise InputError(f"{location.url}: not a patch store (no zarr.json)")
        root = open_zarr_group(location)
        if PATCH_ATTRIBUTES not in root.attrs:
            raise InputError(f"{location.url}: a zarr group but not a hest-zarr patch store")
        missing = sorted({"img", "barcode", "coords"} - set(root.keys()))
        if missing:
            raise InputError(f"{location.url}: a patch store without its {missing} array(s)")
        manifest = read_manifest(location, root.attrs.asdict())
        if manifest is not None:
            raise_problems(location.url, presence_problems(location, manifest))
        return Patches(root["img"], root["barcode"][:], root["coords"][:], dict(root.attrs[PATCH_ATTRIBUTES]))
