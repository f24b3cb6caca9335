"""The Xenium morphology image (``dapi``) and the H&E (``he``) placed on Xenium by its alignment."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import shapely
from geopandas import GeoDataFrame
from spatialdata.models import Image2DModel
from spatialdata_io._constants._constants import XeniumKeys
from xarray import DataArray

from hest_zarr.converters._xenium_alignment import XeniumAlignment, XeniumFrame
from hest_zarr.converters._xenium_inputs import DEFAULT_PIXEL_SIZE_UM
from hest_zarr.converters.slides import RGB_CHANNELS, he_element, slide_image
from hest_zarr.elements import frame_transformations
from hest_zarr.errors import InputError

DAPI_CHANNEL = XeniumKeys.MORPHOLOGY_FOCUS_CHANNEL_0.value
#: Chunk side (pixels) of the lazy morphology image and label rasters.
MORPHOLOGY_CHUNK_PX = 1024


# --------------------------------------------------------------------------------------------- morphology image
def read_morphology(path: str | Path, *, frame: XeniumFrame | None = None) -> DataArray:
    """Read the DAPI morphology image lazily as the ``dapi`` element (``c = ["DAPI"]``, the file's dtype).

    A z-stack (``morphology.ome.tif``) is projected by its maximum; of several channels (XOA >= 2 focus images)
    the first, DAPI, is kept. Pixels are read through tifffile's zarr view when computed.

    Raises
    ------
    InputError
        Missing or unreadable TIFF.

    Examples
    --------
    >>> read_morphology("xenium/morphology_focus.ome.tif").shape  # doctest: +SKIP
    (1, 237, 237)

    """
    import tifffile
    import zarr

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such morphology image")
    frame = frame if frame is not None else XeniumFrame.morphology(DEFAULT_PIXEL_SIZE_UM)
    try:
        with tifffile.TiffFile(path) as tif:
            axes = tif.series[0].axes
        stored = zarr.open(tifffile.imread(path, aszarr=True, series=0, level=0), mode="r")
    except (OSError, ValueError, KeyError, IndexError, tifffile.TiffFileError) as err:
        raise InputError(f"{path}: not a readable TIFF image ({type(err).__name__}: {err})") from err
    pixels = da.from_zarr(stored)
    if "Y" not in axes or "X" not in axes:
        raise InputError(f"{path}: expected an image with Y and X axes, found axes {axes!r}")
    for axis in reversed(range(len(axes))):
        if axes[axis] == "Z":
            pixels = pixels.max(axis=axis)
        elif axes[axis] not in "YX":
            pixels = da.take(pixels, 0, axis=axis)
    pixels = pixels.rechunk((MORPHOLOGY_CHUNK_PX, MORPHOLOGY_CHUNK_PX))[None]
    return Image2DModel.parse(
        pixels, dims=("c", "y", "x"), c_coords=[DAPI_CHANNEL], transformations=frame.morphology_transformations()
    )


def warn_unless_image_covers(
    path: Path, dapi: DataArray, cells_um: GeoDataFrame, pixel_size_um: float, *, stacklevel: int = 2
) -> bool:
    """Warn when the morphology image does not span the cells (a cropped or downscaled export).

    Returns whether it spans them; ``stacklevel`` is passed to :func:`warnings.warn` (2: the caller of this function).
    """
    width_um, height_um = dapi.shape[2] * pixel_size_um, dapi.shape[1] * pixel_size_um
    min_x, min_y, max_x, max_y = cells_um.total_bounds
    covers = min_x >= 0 and min_y >= 0 and max_x <= width_um and max_y <= height_um
    if not covers:
        warnings.warn(
            f"{path}: the image spans x 0-{width_um:.1f}, y 0-{height_um:.1f} um at {pixel_size_um} um/px but the "
            f"cells span x {min_x:.1f}-{max_x:.1f}, y {min_y:.1f}-{max_y:.1f} um; stored as is (a cropped or "
            "downscaled image?)",
            UserWarning,
            stacklevel=stacklevel,
        )
    return bool(covers)


# --------------------------------------------------------------------------------------------- H&E
def he_image_element(
    he_image: str | Path | np.ndarray | da.Array, pixel_size_um: float
) -> tuple[DataArray, dict[str, Any]]:
    """Return the ``he`` element in its own pixels (= ``global``) and the metadata it measures."""
    if isinstance(he_image, str | Path):
        slide = slide_image(he_image)
        measured = slide.metadata()
        return he_element(slide, pixel_size_um=pixel_size_um), measured
    pixels = da.asarray(he_image)
    if pixels.ndim != 3 or pixels.shape[0] != 3 or pixels.dtype != np.uint8:
        raise InputError(f"he_image array: expected (3, y, x) uint8 RGB, found {pixels.shape} {pixels.dtype}")
    he = Image2DModel.parse(
        pixels, dims=("c", "y", "x"), c_coords=list(RGB_CHANNELS), transformations=frame_transformations(pixel_size_um)
    )
    return he, {"fullres_px_height": int(pixels.shape[1]), "fullres_px_width": int(pixels.shape[2])}


def cells_on_he(alignment: XeniumAlignment, frame: XeniumFrame, cells_um: GeoDataFrame, he: DataArray) -> int:
    """Count the cells whose centre falls on the H&E; refuse an alignment that puts none there."""
    centres = frame.to_global(shapely.get_coordinates(shapely.centroid(cells_um.geometry.values)))
    height, width = he.shape[1], he.shape[2]
    inside = (centres[:, 0] >= 0) & (centres[:, 0] < width) & (centres[:, 1] >= 0) & (centres[:, 1] < height)
    if len(centres) and not inside.any():
        raise InputError(
            f"{alignment.source}: the alignment places all {len(centres)} cells outside the H&E image ({width} x "
            f"{height} px; cell centres at x {centres[:, 0].min():.0f}-{centres[:, 0].max():.0f}, y "
            f"{centres[:, 1].min():.0f}-{centres[:, 1].max():.0f} px). Expected a matrix from H&E pixels to Xenium "
            "pixels (Xenium Explorer's export); is it inverted, or for another image?"
        )
    return int(inside.sum())
