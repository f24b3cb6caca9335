"""Export a sample store to the HEST-1k layout, with HEST's patch files when asked."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hest_zarr.converters.hest import export_hest as export_sample
from hest_zarr.converters.hest import hest_paths
from hest_zarr.converters.hest_patches import export_hest_h5
from hest_zarr.store import StorageOptions
from hest_zarr.store import open as open_store
from hest_zarr.workflows.patch import write_patches


def export_hest(
    url: str | Path,
    root: str | Path,
    *,
    sample_id: str | None = None,
    storage_options: StorageOptions = None,
    jpeg_quality: int | None = 90,
    patches: bool = False,
    patch_size_px: int = 224,
    patch_pixel_size_um: float = 0.5,
) -> dict[str, Path]:
    """Export a sample store to the HEST-1k layout (:func:`hest_zarr.converters.hest.export_hest`).

    Parameters
    ----------
    url
        The store.
    root
        Output folder (created).
    sample_id
        File name stem (default: the store's sample id).
    storage_options
        fsspec options for a remote store.
    jpeg_quality
        JPEG quality of the WSI tiles, or ``None`` for lossless.
    patches
        Also cut a patch around every spot into ``patches/ID.h5`` (HEST's ``img``, ``coords``, ``barcode``).
    patch_size_px, patch_pixel_size_um
        The patches' side and resolution (HEST: 224 px at 0.5 um/px).

    Returns
    -------
    The files written, by kind.

    Examples
    --------
    >>> export_hest("TENX95.zarr", "hest_data", patches=True)["patches"]  # doctest: +SKIP
    PosixPath('hest_data/patches/TENX95.h5')

    """
    sdata = open_store(url, storage_options)
    written = export_sample(sdata, root, sample_id=sample_id, jpeg_quality=jpeg_quality)
    if patches:
        path = hest_paths(root, written["metadata"].stem)["patches"]
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="hest-zarr-patches-") as tmp:
            patch_store = write_patches(
                url,
                Path(tmp) / "patches.zarr",
                size_px=patch_size_px,
                pixel_size_um=patch_pixel_size_um,
                storage_options=storage_options,
                progress=False,
            )
            written["patches"] = export_hest_h5(patch_store, path)
    return written
