"""Align Visium images and stores to their slide layout: read -> :mod:`hest_zarr.ops.align` -> write.

:func:`align` opens a store, aligns its H&E (:func:`~hest_zarr.ops.align.align_sample`) and writes the new spot
positions and ``in_tissue`` flags back; :func:`align_image_file` reads an image file lazily and aligns it
(:func:`~hest_zarr.ops.align.align_image`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import dask.array as da

from hest_zarr.converters.slides import slide_image
from hest_zarr.elements import Elements
from hest_zarr.errors import InputError
from hest_zarr.ops.align import AlignmentResult, Detector, align_image, align_sample
from hest_zarr.ops.visium_layout import SlideName
from hest_zarr.store import StorageOptions, apply_update
from hest_zarr.store import open as open_store


def align(
    url: str | Path,
    *,
    slide: SlideName | Literal["auto"] = "auto",
    detector: Detector = "auto",
    level: int | None = None,
    replace: bool = True,
    storage_options: StorageOptions = None,
) -> AlignmentResult:
    """Align a Visium store's H&E to its slide layout and write the new spot positions and ``in_tissue`` flags.

    Reads one pyramid level of ``he`` (default: the finest with at most 4096 pixels a side), aligns it
    (:func:`~hest_zarr.ops.align.align_sample`) and replaces the ``spots`` shapes (same index, radius kept) and the
    ``spot_expression`` table (``in_tissue`` from the image, the previous flags kept once as ``in_tissue_original``,
    ``tissue_fraction`` added). The spots' provenance records the detector, the slide, the corners, the frame dots,
    the residual (``estimated_error_um``), the level read (``<url>/he/scale<level>``) and the affine um -> ``global``.

    Parameters
    ----------
    url
        Store path or URL of a Visium sample (``he`` image, ``spots`` and ``spot_expression`` with array
        coordinates).
    slide, detector
        As :func:`~hest_zarr.ops.align.align_image`.
    level
        Pyramid level of ``he`` to align.
    replace
        Replace the existing ``spots`` and ``spot_expression`` (must be ``True``: the store keeps one set of spot
        positions).
    storage_options
        fsspec options for a remote URL.

    Returns
    -------
    The alignment (spots in the level's pixels; the store holds them in ``global``); its ``update`` is what was
    written.

    Raises
    ------
    AlignmentError
        When the image cannot be aligned.
    InputError
        A store without ``he``, ``spots`` or a ``spot_expression`` table with ``array_row``/``array_col``, spots of
        array positions the layout lacks, or ``replace=False``.

    Examples
    --------
    >>> result = align("perik.zarr")  # doctest: +SKIP
    >>> result.detector, round(result.fit.residual_um, 1)  # doctest: +SKIP
    ('classical', 6.9)

    """
    if not replace:
        raise InputError(
            f"{url}: align replaces '{Elements.SPOTS}' and '{Elements.SPOT_EXPRESSION}'; pass replace=True"
        )
    sdata = open_store(url, storage_options)
    result = align_sample(sdata, slide=slide, detector=detector, level=level, where=str(url))
    written = apply_update(url, result.update, storage_options=storage_options)
    return dataclasses.replace(result, update=written)


def align_image_file(
    path: str | Path,
    slide: SlideName | Literal["auto"] = "auto",
    detector: Detector = "auto",
) -> AlignmentResult:
    """Align a Visium image file (PNG, JPEG, TIFF or any slide format) to its slide layout.

    The file is opened lazily (:func:`hest_zarr.converters.slides.slide_image`): a large TIFF is reduced block by
    block to at most 4096 pixels a side before it is aligned (:func:`~hest_zarr.ops.align.align_image`); the spot
    positions are in the file's full-resolution pixels.

    Parameters
    ----------
    path
        The image, with the fiducial frame visible.
    slide, detector
        As :func:`~hest_zarr.ops.align.align_image`.

    Returns
    -------
    The fit, the detector used and one row per spot of the slide (``array_row``, ``array_col``, ``pxl_row``,
    ``pxl_col``, ``in_tissue``, ``tissue_fraction``).

    Raises
    ------
    AlignmentError
        When no detector aligns the image (the message names the file).
    InputError
        A missing or unreadable image, or an unknown ``slide`` or ``detector``.

    Examples
    --------
    >>> result = align_image_file("spatial/tissue_lowres_image.png")  # doctest: +SKIP
    >>> result.detector, result.slide, len(result.spots), int(result.spots["in_tissue"].sum())  # doctest: +SKIP
    ('classical', '6.5mm', 4992, 2956)

    """
    pixels = da.moveaxis(slide_image(path).data, 0, -1)  # (c, y, x) -> (y, x, c), still lazy
    return align_image(pixels, slide=slide, detector=detector, where=str(path))
