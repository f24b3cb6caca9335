"""Segment a store's tissue: open -> :func:`~hest_zarr.ops.tissue.segment_sample` -> write ``tissue`` and the flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hest_zarr.elements import Elements, get_record
from hest_zarr.errors import InputError
from hest_zarr.ops.tissue import TissueResult, segment_sample
from hest_zarr.ops.tissue_mask import TissueMethod
from hest_zarr.store import StorageOptions, apply_update
from hest_zarr.store import open as open_store


def tissue(
    url: str | Path,
    *,
    method: TissueMethod = "threshold",
    weights: str | Path | None = None,
    level: int | None = None,
    replace: bool = False,
    storage_options: StorageOptions = None,
) -> TissueResult:
    """Segment a store's tissue, write the ``tissue`` polygons and the spots' ``in_tissue`` flags.

    Parameters
    ----------
    url
        Store path or URL; it must hold an ``he`` image.
    method
        ``"threshold"`` (no weights) or ``"deeplab"`` (needs ``weights``).
    weights
        DeepLabV3-ResNet50 state dict for ``method="deeplab"``.
    level
        Pyramid level of ``he`` to segment (default: the coarsest, at most 2048 px a side in stores written here).
        On Visium stores the threshold method removes dots of the 105 um fiducial size first.
    replace
        Replace an existing ``tissue`` element.
    storage_options
        fsspec options for a remote URL.

    Returns
    -------
    The polygons, the mask, the level and the per-table counts of spots in tissue (and the F1 against the flags
    they replace); its ``update`` is what was written (the ``tissue`` provenance reads ``<url>/he/scale<level>``).

    Raises
    ------
    InputError
        No ``he`` image, a level the pyramid lacks, a ``tissue`` element already there without ``replace``, a bad
        method or weights, or no tissue found (a blank or placeholder image).

    Examples
    --------
    >>> result = tissue("perik.zarr")  # doctest: +SKIP
    >>> result.in_tissue, result.agreement_f1  # doctest: +SKIP
    ({'spot_expression': 2850}, {'spot_expression': 0.992})

    """
    sdata = open_store(url, storage_options)
    if Elements.TISSUE in get_record(sdata).elements and not replace:
        raise InputError(f"{url}: already holds '{Elements.TISSUE}' (pass replace=True to replace it)")
    result = segment_sample(sdata, method=method, weights=weights, level=level, where=str(url))
    written = apply_update(url, result.update, storage_options=storage_options)
    return dataclasses.replace(result, update=written)
