"""The H&E of a spot-based sample, shared by the Visium, Visium HD, ST v1 and legacy-table converters.

:func:`he_image` reads a whole RGB image into memory (:func:`read_image`: the PNG/JPG/TIFF images Space Ranger and
the ST spot detector refer to), checks that it covers every spot centre (:func:`check_image_covers_spots`) and
places it in ``global`` (full-resolution pixels), scaled up when it is a downscaled copy such as Space Ranger's
hires image. Whole-slide images (pyramidal TIFF, SVS...) are read lazily by :mod:`.slides` instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity, Scale
from xarray import DataArray

from hest_zarr.converters.slides import check_tiff_complete
from hest_zarr.elements import frame_transformations
from hest_zarr.errors import InputError


def read_image(path: Path) -> np.ndarray:
    """Read an RGB image into ``c, y, x`` uint8 (Space Ranger PNG/JPG/TIFF images).

    Grey images are repeated on the three channels, an alpha channel is dropped and 16-bit values are scaled to 8.

    Raises
    ------
    InputError
        An unreadable, truncated or corrupt file, or one that is not a 2-D grey, RGB or RGBA image.

    Examples
    --------
    >>> read_image(Path("outs/spatial/tissue_hires_image.png")).shape  # doctest: +SKIP
    (3, 2000, 1921)

    """
    import tifffile
    from PIL import Image

    try:
        if path.suffix.lower() in (".tif", ".tiff", ".btf"):
            with tifffile.TiffFile(path) as tif:
                check_tiff_complete(path, tif.series[0].levels[0].pages)
                pixels = tif.asarray()
        else:
            with Image.open(path) as handle:
                pixels = np.asarray(handle.convert("RGB"))
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, tifffile.TiffFileError) as err:  # not an image, a malformed header
        raise InputError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err
    except Exception as err:  # imagecodecs' DeflateError, JpegError, LzwError... on damaged tiles or strips
        raise InputError(
            f"{path}: cannot decode the image: the file is truncated or corrupt ({type(err).__name__}: {err})"
        ) from err
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    if pixels.ndim != 3 or pixels.shape[-1] not in (3, 4):
        raise InputError(f"{path}: expected an RGB image, found shape {pixels.shape}")
    if pixels.dtype == np.uint16:
        pixels = (pixels // 257).astype(np.uint8)
    return np.moveaxis(pixels[..., :3].astype(np.uint8, copy=False), -1, 0)


def check_image_covers_spots(image_path: Path, fullres_shape: tuple[int, int], centres: np.ndarray) -> None:
    """Refuse an image whose full-resolution ``(height, width)`` leaves spot ``centres`` (x, y pixels) outside it.

    Raises
    ------
    InputError
        Some centres lie outside the image (or at negative coordinates): the message names the image, its size,
        how many spots and their largest coordinates.

    Examples
    --------
    >>> check_image_covers_spots(Path("he.png"), (100, 200), np.array([[150.0, 50.0]]))
    >>> check_image_covers_spots(Path("he.png"), (100, 200), np.array([[250.0, 50.0]]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    hest_zarr.errors.InputError: he.png: image covers 200 x 100 full-resolution px but 1 spots lie outside it ...

    """
    height, width = fullres_shape
    beyond = (centres[:, 0] > width) | (centres[:, 1] > height) | (centres < 0).any(axis=1)
    if beyond.any():
        raise InputError(
            f"{image_path}: image covers {width} x {height} full-resolution px but {int(beyond.sum())} spots lie "
            f"outside it (max x {centres[:, 0].max():.0f}, max y {centres[:, 1].max():.0f}); wrong image?"
        )


def he_image(
    image_path: Path, scale: float, pixel_size_um: float, centres: np.ndarray
) -> tuple[DataArray, dict[str, int]]:
    """Read the H&E of a sample, check it covers the spot ``centres`` (full-resolution px), place it in ``global``.

    Parameters
    ----------
    image_path
        The image file.
    scale
        Its pixels per full-resolution pixel (1.0 for a full-resolution image; Space Ranger's
        ``tissue_hires_scalef`` for its hires image).
    pixel_size_um
        Micrometres per full-resolution pixel.
    centres
        Spot centres ``(x, y)`` in full-resolution pixels.

    Returns
    -------
    The image element and the measured metadata (``fullres_px_*`` for a full-resolution image).

    Raises
    ------
    InputError
        No such file, an unreadable image, or spots outside it.

    Examples
    --------
    >>> element, measured = he_image(Path("slide.tif"), 1.0, 0.2738, centres)  # doctest: +SKIP
    >>> measured  # doctest: +SKIP
    {'fullres_px_height': 21943, 'fullres_px_width': 25421}

    """
    if not image_path.is_file():
        raise InputError(f"{image_path}: no such image file")
    pixels = read_image(image_path)
    fullres_shape = (round(pixels.shape[1] / scale), round(pixels.shape[2] / scale))
    check_image_covers_spots(image_path, fullres_shape, centres)
    to_global = Identity() if scale == 1.0 else Scale([1 / scale, 1 / scale], axes=("x", "y"))
    element = Image2DModel.parse(
        pixels,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations=frame_transformations(pixel_size_um, to_global),
    )
    measured = {"fullres_px_height": fullres_shape[0], "fullres_px_width": fullres_shape[1]} if scale == 1.0 else {}
    return element, measured
