"""Register a Xenium store's H&E to its DAPI: open -> :func:`hest_zarr.ops.register.register_sample` -> write."""

from __future__ import annotations

from pathlib import Path

from hest_zarr.ops.register import COARSE_MAX_SIDE, FINE_MAX_SIDE, Registration, register_sample
from hest_zarr.store import StorageOptions, apply_update
from hest_zarr.store import open as open_store


def register(
    url: str | Path,
    *,
    force: bool = False,
    coarse_max_side: int = COARSE_MAX_SIDE,
    fine_max_side: int = FINE_MAX_SIDE,
    seed: int = 0,
    storage_options: StorageOptions = None,
) -> Registration:
    """Register a Xenium store's H&E to its DAPI image and re-place the Xenium elements on the H&E.

    A store whose alignment came from a file (Xenium Explorer matrix or keypoints, see the provenance of ``dapi``)
    keeps it unless ``force``: the returned registration is then that alignment and nothing is written. Otherwise
    every element the Xenium converter placed (``dapi``, ``transcripts``, ``cells``, ``nuclei``, label rasters) is
    rewritten with its transformation corrected and its provenance naming the registration and its residual
    (``estimated_error_um``); see :func:`hest_zarr.ops.register.register_sample`.

    Parameters
    ----------
    url
        Store path or URL holding ``he`` and ``dapi``.
    force
        Register even when an alignment file placed the H&E.
    coarse_max_side, fine_max_side, seed
        See :func:`hest_zarr.ops.register.register_he_to_dapi`.
    storage_options
        fsspec options for a remote URL.

    Returns
    -------
    The registration, H&E level-0 pixels -> DAPI level-0 pixels.

    Raises
    ------
    InputError
        The store lacks ``he`` or ``dapi``.
    HestZarrError
        The registration failed (too few matches).

    Examples
    --------
    >>> register("xenium.zarr").method  # an alignment file placed the H&E  # doctest: +SKIP
    'kept: xenium_explorer_matrix'
    >>> register("xenium.zarr", force=True).method  # doctest: +SKIP
    'sift-ransac coarse + phase-correlation windows refined'

    """
    result = register_sample(
        open_store(url, storage_options),
        force=force,
        coarse_max_side=coarse_max_side,
        fine_max_side=fine_max_side,
        seed=seed,
        source=str(url),
    )
    if result.update is not None:
        apply_update(url, result.update, storage_options=storage_options)
    return result
