"""Check a store's pixel size against its spot lattice: open -> the operator -> record the estimate.

The operator is :func:`hest_zarr.ops.pixel_size.check_pixel_size`; this layer opens the store and writes the
record-only update it returns.
"""

from __future__ import annotations

from pathlib import Path

from hest_zarr.ops.pixel_size import DISAGREEMENT_TOLERANCE, PixelSizeReport, check_pixel_size
from hest_zarr.store import StorageOptions, apply_update
from hest_zarr.store import open as open_store


def estimate_pixel_size(
    url: str | Path,
    *,
    spots: str | None = None,
    tolerance: float = DISAGREEMENT_TOLERANCE,
    write: bool = True,
    storage_options: StorageOptions = None,
) -> PixelSizeReport:
    """Estimate a store's pixel size from its spot lattice, compare it with the known values, and record it.

    Parameters
    ----------
    url
        Store path or URL.
    spots
        Spots element to fit (default: ``spots``, else the spot set with the fewest spots).
    tolerance
        Relative disagreement above which the result is flagged (default 5 %).
    write
        Record the result: ``pixel_size_um_estimated`` (and the magnification bucket it implies) in the metadata,
        the comparison in the spots element's provenance (``parameters['pixel_size_check']``); no element's data
        is rewritten.
    storage_options
        fsspec options for a remote URL.

    Returns
    -------
    The estimate and its comparison with the embedded and the store's pixel sizes
    (:func:`~hest_zarr.ops.pixel_size.check_pixel_size`).

    Warns
    -----
    PixelSizeDisagreementWarning
        The estimate differs from a reference by more than ``tolerance``.

    Raises
    ------
    InputError
        No spots, no table with ``array_row``/``array_col`` for them, or a technology without a spot lattice; the
        message names the store.

    Examples
    --------
    >>> report = estimate_pixel_size("perik.zarr")  # doctest: +SKIP
    >>> round(report.estimate.pixel_size_um, 4), report.flagged  # doctest: +SKIP
    (4.6776, True)

    """
    sdata = open_store(url, storage_options)
    report = check_pixel_size(sdata, spots=spots, tolerance=tolerance, where=str(url))
    if write:
        apply_update(url, report.update, storage_options=storage_options)
    return report
