"""Patch a sample store into a patch store: open -> plan and cut (the one patch reader) -> commit."""

from __future__ import annotations

from pathlib import Path

from hest_zarr.elements import Elements
from hest_zarr.errors import redact
from hest_zarr.ops.patch import DEFAULT_PIXEL_SIZE_UM, DEFAULT_SIZE_PX
from hest_zarr.schemas import HEST_ZARR_VERSION
from hest_zarr.store import PatchCodec, StorageOptions, check_target, output_storage_options, write_patch_store
from hest_zarr.stream import extract_patches


def write_patches(
    url: str | Path,
    out: str | Path,
    *,
    element: str = Elements.SPOTS,
    image: str = Elements.HE,
    size_px: int = DEFAULT_SIZE_PX,
    pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM,
    in_tissue_only: bool = False,
    codec: PatchCodec = "zstd",
    overwrite: bool = False,
    workers: int | None = None,
    storage_options: StorageOptions = None,
    out_storage_options: StorageOptions = None,
    progress: bool = True,
) -> str:
    """Cut every patch of a sample and write them to a patch store (zarr), atomically.

    The patch store holds ``img`` (N x H x W x 3 uint8, one patch per chunk), ``barcode`` (the ids) and
    ``coords`` (top-left, level-0 pixels, ``x, y``), in band order; its attributes record the level, the
    pixel sizes, the source store and element. :func:`hest_zarr.converters.hest_patches.export_hest_h5`
    turns it into HEST's ``.h5`` layout.

    Parameters
    ----------
    url
        The sample store (local path or fsspec URL).
    out
        The patch store to write (refused when it exists, unless ``overwrite``).
    element, image, size_px, pixel_size_um, in_tissue_only
        Which patches: see :func:`hest_zarr.ops.patch.plan_patches`.
    codec
        Codec of the patch images.
    overwrite
        Replace an existing patch store (never the sample itself, a sample store or anything but a patch store).
    workers
        Concurrent chunk reads (default :func:`hest_zarr.store.chunk_workers`).
    storage_options, out_storage_options
        fsspec options of the sample store and of the patch store (default: the sample's, when both URLs use the
        same protocol; see :func:`hest_zarr.store.output_storage_options`).
    progress
        Show a progress bar.

    Returns
    -------
    The patch store's URL.

    Examples
    --------
    >>> write_patches("sample.zarr", "sample_patches.zarr")  # doctest: +SKIP

    """
    out_options = output_storage_options(out, url, storage_options, out_storage_options)
    # refuse before the work, not after it: an existing target, the input itself, anything but a patch store
    check_target(out, overwrite, out_options, kind="patches", inputs=[url], input_storage_options=storage_options)
    plan, batches = extract_patches(
        url,
        element=element,
        image=image,
        size_px=size_px,
        pixel_size_um=pixel_size_um,
        in_tissue_only=in_tissue_only,
        workers=workers,
        storage_options=storage_options,
    )
    attributes = {
        "source": redact(str(url)),
        "element": element,
        "image": image,
        "size_px": size_px,
        "pixel_size_um": pixel_size_um,
        "level": plan.level,
        "level_pixel_size_um": plan.level_pixel_size_um,
        "window_px_at_level": plan.window,
        "resampling": "none" if plan.window == size_px else ("area" if plan.window > size_px else "bilinear"),
        "coords": "top-left corner (x, y) in level-0 pixels of the image",
        "hest_zarr_version": HEST_ZARR_VERSION,
    }
    return write_patch_store(
        out,
        len(plan),
        size_px,
        ((batch.ids, batch.coords, batch.images) for batch in batches),
        attributes=attributes,
        codec=codec,
        overwrite=overwrite,
        storage_options=out_options,
        inputs=[url],
        input_storage_options=storage_options,
        progress=progress,
    )
