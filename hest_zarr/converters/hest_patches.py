"""HEST-1k patch files (``patches/<id>.h5``: ``img``, ``coords``, ``barcode``) to and from patch stores."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hest_zarr.elements import Elements
from hest_zarr.errors import InputError
from hest_zarr.schemas import HEST_ZARR_VERSION
from hest_zarr.store import PatchCodec, Patches, StorageOptions, open_patches, write_patch_store

#: HEST-1k's patches: 224 px at 0.5 um/px.
HEST_PATCH_PIXEL_SIZE_UM = 0.5


def export_hest_h5(
    patches: str | Path | Patches, h5_path: str | Path, *, storage_options: StorageOptions = None
) -> Path:
    """Write a patch store in HEST's ``patches/<id>.h5`` layout: ``img`` (N, H, W, 3), ``coords`` (N, 2), ``barcode``.

    ``barcode`` is ``(N, 1)`` bytes as HEST writes it; ``coords`` carry the patch size and level as attributes.
    The file is written beside its target and renamed into place, so a failed export leaves no partial file.

    Examples
    --------
    >>> export_hest_h5("TENX95_patches.zarr", "hest_data/patches/TENX95.h5")  # doctest: +SKIP
    PosixPath('hest_data/patches/TENX95.h5')

    """
    store = patches if isinstance(patches, Patches) else open_patches(patches, storage_options)
    h5_path = Path(h5_path)
    if not h5_path.parent.is_dir():
        raise InputError(f"{h5_path}: the folder {h5_path.parent} does not exist")
    partial = h5_path.with_name(f".{h5_path.name}.partial")
    try:
        with h5py.File(partial, "w") as h5:
            images = h5.create_dataset("img", shape=store.img.shape, dtype=np.uint8, chunks=(1, *store.img.shape[1:]))
            step = 256
            for start in range(0, len(store), step):
                images[start : start + step] = store.img[start : start + step]
            coords = h5.create_dataset("coords", data=store.coords)
            coords.attrs["patch_size"] = store.attributes["size_px"]
            coords.attrs["pixel_size_um"] = store.attributes["pixel_size_um"]
            coords.attrs["patch_level"] = store.attributes.get("level", 0)
            h5.create_dataset("barcode", data=np.asarray(store.barcode, dtype=bytes)[:, None])
        partial.replace(h5_path)
    finally:
        partial.unlink(missing_ok=True)
    return h5_path


@contextlib.contextmanager
def _hest_h5(h5_path: Path) -> Iterator[tuple[Any, Any, np.ndarray]]:
    """Open and check a HEST patch file: yields the ``img`` and ``coords`` datasets and the barcodes."""
    if not h5_path.is_file():
        raise InputError(f"{h5_path}: no such patch file")
    try:
        h5 = h5py.File(h5_path, "r")
    except OSError as err:
        raise InputError(f"{h5_path}: cannot be read as HDF5 ({err})") from err
    with h5:
        missing = [name for name in ("img", "coords", "barcode") if name not in h5]
        if missing:
            raise InputError(f"{h5_path}: not a HEST patch file (missing datasets {missing})")
        images, coords = h5["img"], h5["coords"]
        barcodes = np.array([b.decode() if isinstance(b, bytes) else str(b) for b in h5["barcode"][:].reshape(-1)])
        if not (len(images) == len(coords) == len(barcodes)) or images.ndim != 4 or images.shape[1] != images.shape[2]:
            raise InputError(
                f"{h5_path}: img {images.shape}, coords {coords.shape} and barcode {barcodes.shape} do not line up "
                "as N square patches"
            )
        if images.shape[3] != 3 or images.dtype != np.uint8 or len(images) == 0:
            raise InputError(f"{h5_path}: img is {images.dtype} {images.shape}; expected N >= 1 RGB uint8 patches")
        yield images, coords, barcodes


def read_hest_h5(h5_path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a HEST ``patches/<id>.h5``: ``(img (N, H, W, 3) uint8, coords (N, 2) int64, barcode (N,) str)``.

    Examples
    --------
    >>> images, coords, barcodes = read_hest_h5("hest_data/patches/TENX95.h5")  # doctest: +SKIP
    >>> images.shape  # doctest: +SKIP
    (4992, 224, 224, 3)

    """
    with _hest_h5(Path(h5_path)) as (images, coords, barcodes):
        return images[:], coords[:].astype(np.int64), barcodes


def import_hest_h5(
    h5_path: str | Path,
    out: str | Path,
    *,
    pixel_size_um: float = HEST_PATCH_PIXEL_SIZE_UM,
    codec: PatchCodec = "zstd",
    overwrite: bool = False,
    storage_options: StorageOptions = None,
) -> str:
    """Turn a HEST ``patches/<id>.h5`` into a patch store (HEST's patches are 224 px at 0.5 um/px), 256 at a time.

    Examples
    --------
    >>> import_hest_h5("hest_data/patches/TENX95.h5", "TENX95_patches.zarr")  # doctest: +SKIP

    """
    with _hest_h5(Path(h5_path)) as (images, coords, barcodes):
        attributes = {
            "source": str(h5_path),
            "element": Elements.SPOTS,
            "image": Elements.HE,
            "size_px": int(images.shape[1]),
            "pixel_size_um": pixel_size_um,
            "level": int(coords.attrs.get("patch_level", 0)),
            "coords": "top-left corner (x, y) in level-0 pixels of the image",
            "hest_zarr_version": HEST_ZARR_VERSION,
        }
        step = 256  # patches read from the file at a time
        batches = (
            (barcodes[i : i + step], coords[i : i + step].astype(np.int64), images[i : i + step])
            for i in range(0, len(barcodes), step)
        )
        return write_patch_store(
            out,
            len(barcodes),
            int(images.shape[1]),
            batches,
            attributes=attributes,
            codec=codec,
            overwrite=overwrite,
            storage_options=storage_options,
        )
