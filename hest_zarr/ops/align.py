"""Visium spot positions from the fiducial frame: detect the frame's corners, fit the slide layout, flag the spots.

:func:`align_image` runs a detector (``"classical"``: :func:`hest_zarr.ops.fiducials.find_frame`; ``"yolo"``:
:func:`hest_zarr.ops.fiducials_yolo.detect_corners_yolo`, if ultralytics and its weights are installed; ``"auto"``:
both, keeping the fit with the smaller residual), fits the grid (:func:`hest_zarr.ops.spot_grid.fit_spot_grid`, the
method and its checks) and flags the spots on tissue (the saturation threshold of
:func:`hest_zarr.ops.tissue_mask.threshold_tissue_mask`, spots at least half covered). :func:`align_sample` does it on
a Visium sample (a SpatialData object: nothing read from or written to a store) and returns its new spots and
table; :func:`hest_zarr.workflows.align.align` writes them back to a store.

Pixel coordinates put pixel centres at integers (``pxl_row``, ``pxl_col`` as Space Ranger's
``pxl_row_in_fullres``, ``pxl_col_in_fullres``, in pixels of the aligned image).

Measured against Space Ranger's positions of the real perik CytAssist sample (``benchmarks/align_fiducials.py``,
errors at 4.678 um per full-resolution pixel): classical detector, median / max spot error 3.1 / 4.1 um on the
600 px lowres image (23.4 um/px), 2.8 / 3.8 um on Space Ranger's ``aligned_fiducials.jpg`` at the hires scale
(7.0 um/px), 2.7 / 3.8 um at full resolution; in_tissue F1 0.974 on the lowres image. On
``detected_tissue_image.jpg`` (two corners under tissue) the classical detector refuses, and the YOLO corners with
the classical frame dots give 3.5 / 7.6 um.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from typing import Literal

import cv2
import dask.array as da
import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData

from hest_zarr.elements import Elements, ElementUpdate, Keys, circle_spots, get_record, image_levels, level_to_global
from hest_zarr.errors import AlignmentError, InputError
from hest_zarr.ops.fiducials import CornerDetection, FrameDetection, find_frame
from hest_zarr.ops.spot_grid import GridFit, fit_spot_grid
from hest_zarr.ops.tissue import IN_TISSUE_FRACTION, ORIGINAL_IN_TISSUE, TISSUE_FRACTION, spot_tissue_fraction
from hest_zarr.ops.tissue_mask import threshold_tissue_mask
from hest_zarr.ops.visium_layout import CORNER_NAMES, SlideName, resolve_slides, visium_layout
from hest_zarr.schemas import Provenance

Detector = Literal["auto", "classical", "yolo"]
DETECTORS: tuple[str, ...] = ("classical", "yolo")
#: Diameter of a Visium capture spot (for the in-tissue flag).
SPOT_DIAMETER_UM = 55.0
SPOT_COLUMNS = [Keys.ARRAY_ROW, Keys.ARRAY_COL, "pxl_row", "pxl_col"]
#: Larger images are reduced by an integer factor (block means) to at most this many pixels a side to be aligned.
ALIGN_MAX_SIDE = 4096
#: The tissue mask is computed on the image reduced to at most this many pixels a side.
TISSUE_MAX_SIDE = 1024
#: Longest side (pixels) of the pyramid level :func:`align_sample` aligns by default.
STORE_LEVEL_MAX_SIDE = 4096
#: Largest channel spread (0-255) of an image taken as grey: no stain to find tissue by.
GREY_SPREAD = 2


@dataclass(frozen=True)
class AlignmentResult:
    """A Visium image aligned to its slide layout.

    Attributes
    ----------
    fit
        The grid fit of the detector used.
    detector
        ``"classical"`` or ``"yolo"``.
    corners
        The corner detections of that detector.
    spots
        :attr:`~hest_zarr.ops.spot_grid.GridFit.spots` plus ``in_tissue`` (0/1) and ``tissue_fraction``.
    attempts
        Detector -> ``"ok"`` or why it failed (or was unavailable).
    update
        For a sample (:func:`align_sample`): its new ``spots`` and ``spot_expression`` with their provenance;
        ``None`` for an image (:func:`align_image`).

    """

    fit: GridFit
    detector: str
    corners: list[CornerDetection]
    spots: pd.DataFrame
    attempts: dict[str, str] = field(default_factory=dict)
    update: ElementUpdate | None = None

    @property
    def slide(self) -> SlideName:
        """The slide layout that fitted."""
        return self.fit.layout.name


# --------------------------------------------------------------------------------------------- image
class _DetectorUnavailable(Exception):
    """The YOLO detector cannot run here (no ultralytics, no weights)."""


def _yolo_corners(image: np.ndarray) -> list[CornerDetection]:
    try:
        from hest_zarr.ops import fiducials_yolo
    except ImportError as error:
        raise _DetectorUnavailable(f"unavailable ({error})") from error
    if not fiducials_yolo.DEFAULT_WEIGHTS.is_file():
        raise _DetectorUnavailable(f"unavailable (no weights at {fiducials_yolo.DEFAULT_WEIGHTS})")
    try:
        return fiducials_yolo.detect_corners_yolo(image)
    except ImportError as error:
        raise _DetectorUnavailable(f"unavailable ({error})") from error


def yolo_available() -> bool:
    """Whether the YOLO corner detector can run (ultralytics importable and its weights installed).

    Examples
    --------
    >>> isinstance(yolo_available(), bool)
    True

    """
    try:
        from hest_zarr.ops import fiducials_yolo
    except ImportError:
        return False
    if not fiducials_yolo.DEFAULT_WEIGHTS.is_file():
        return False
    return importlib.util.find_spec("ultralytics") is not None  # importing it would alter numpy's printing


def _rgb(image: np.ndarray | da.Array, where: str | None) -> tuple[np.ndarray, int, str]:
    """Return the image as ``HxWx3`` uint8 RGB, reduced, the reduction factor and how to name it in messages.

    Images over ``ALIGN_MAX_SIDE`` pixels a side are reduced by the smallest integer factor that brings them under
    it (block means; pixel ``i`` of the reduced image covers ``factor * i ... factor * i + factor - 1``). A dask
    array is reduced block by block, so a large slide is never loaded whole.
    """
    pixels = image if isinstance(image, da.Array) else np.asarray(image)
    if pixels.dtype != np.uint8:
        raise InputError(f"the image must be uint8, got dtype {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise InputError(f"the image must be HxW grey or HxWx3 RGB, got shape {pixels.shape}")
    name = where or f"image of {pixels.shape[1]} x {pixels.shape[0]} px"
    data = pixels if isinstance(pixels, da.Array) else da.from_array(pixels, chunks=(2048, 2048, -1))
    data = da.repeat(data, 3, axis=2) if data.shape[2] == 1 else data[..., :3]
    height, width = int(data.shape[0]), int(data.shape[1])
    if height == 0 or width == 0:
        raise InputError(f"{name}: the image is empty ({width} x {height} px)")
    factor = max(1, int(np.ceil(max(height, width) / ALIGN_MAX_SIDE)))
    if factor > 1:
        data = da.coarsen(np.mean, data, {0: factor, 1: factor}, trim_excess=True)
    reduced = np.asarray(data.compute())
    return np.rint(reduced).astype(np.uint8) if factor > 1 else reduced, factor, name


def _to_full(fit: GridFit, factor: int) -> GridFit:
    """Map a fit in the pixels of an image reduced by ``factor`` (block means) to the full image's pixels."""
    if factor == 1:
        return fit
    affine = fit.affine * factor
    affine[:, 2] += 0.5 * factor - 0.5  # pixel centres at integers in both images
    spots = fit.spots.copy()
    spots[["pxl_row", "pxl_col"]] = (spots[["pxl_row", "pxl_col"]] + 0.5) * factor - 0.5
    return replace(
        fit, affine=affine, residual_px=fit.residual_px * factor, um_per_px=fit.um_per_px / factor, spots=spots
    )


def spot_tissue_flags(image: np.ndarray, fit: GridFit) -> pd.DataFrame:
    """Flag the fitted spots on tissue: ``tissue_fraction`` of each 55 um spot disk and ``in_tissue`` (>= 0.5).

    The mask is :func:`hest_zarr.ops.tissue.threshold_tissue_mask` (saturation above Otsu's threshold, fiducial-size
    dots removed) on the image reduced to at most ``TISSUE_MAX_SIDE`` pixels a side.

    Parameters
    ----------
    image
        ``HxWx3`` uint8 RGB image the fit was made on.
    fit
        The grid fit (spot pixel positions and pixel size).

    Returns
    -------
    ``in_tissue`` (0/1) and ``tissue_fraction``, indexed like ``fit.spots``.

    Examples
    --------
    >>> result = align_image(lowres)  # doctest: +SKIP
    >>> int(spot_tissue_flags(lowres, result.fit)["in_tissue"].sum())  # doctest: +SKIP
    2956

    """
    height, width = image.shape[:2]
    factor = min(1.0, TISSUE_MAX_SIDE / max(height, width))
    if factor < 1.0:
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        factor = size[0] / width
    um_per_px = fit.um_per_px / factor
    mask = threshold_tissue_mask(image, dot_diameter_px=fit.layout.fiducial_diameter_um / um_per_px).mask
    centres = (fit.spots[["pxl_col", "pxl_row"]].to_numpy() + 0.5) * factor  # the mask's pixel i spans [i, i + 1)
    fraction = spot_tissue_fraction(mask, centres, np.full(len(centres), SPOT_DIAMETER_UM / 2 / um_per_px))
    return pd.DataFrame(
        {Keys.IN_TISSUE: (fraction >= IN_TISSUE_FRACTION).astype(np.int32), TISSUE_FRACTION: fraction},
        index=fit.spots.index,
    )


def _yolo_fit(
    pixels: np.ndarray, slides: tuple[SlideName, ...], frame: FrameDetection | None
) -> tuple[tuple[GridFit, str, list[CornerDetection]] | None, str]:
    """Fit the YOLO corners (refined on the classical frame dots, if any): the fit or ``None``, and the outcome."""
    try:
        corners = _yolo_corners(pixels)
    except _DetectorUnavailable as error:
        return None, str(error)
    dots = frame.dots_px if frame is not None else None
    layouts = sorted(slides, key=lambda s: frame is None or s != frame.layout.name)
    fits, errors = [], []
    names = sorted({corner.name for corner in corners}, key=CORNER_NAMES.index)
    if len(names) < 3:
        layouts = []
        errors.append(f"found {len(names)} of the 4 corner patterns ({', '.join(names) or 'none'}); 3 needed")
    for slide_name in layouts:
        try:
            fits.append(fit_spot_grid(corners, visium_layout(slide_name), pixels.shape, dots))
        except AlignmentError as error:
            errors.append(f"{slide_name}: {error}" if len(layouts) > 1 else str(error))
    if len(fits) > 1 and dots is None:
        return None, "its corners fit both slide sizes and no frame dots tell them apart; pass the slide"
    if fits:
        return (fits[0], "yolo", corners), "ok"
    return None, "; ".join(errors)


def align_image(
    image: np.ndarray | da.Array,
    slide: SlideName | Literal["auto"] = "auto",
    detector: Detector = "auto",
    *,
    where: str | None = None,
) -> AlignmentResult:
    """Align a Visium image (H&E or CytAssist, frame visible) to its slide layout: every spot's pixel position.

    Parameters
    ----------
    image
        ``HxWx3`` RGB or ``HxW`` grey uint8 array; a dask array is reduced block by block (images over
        ``ALIGN_MAX_SIDE`` pixels a side are aligned on a reduced copy). Image files:
        :func:`hest_zarr.workflows.align.align_image_file`.
    slide
        ``"6.5mm"``, ``"11mm"`` or ``"auto"`` (the frame that fits).
    detector
        ``"classical"``, ``"yolo"`` or ``"auto"`` (every available detector; the fit with the smaller residual
        wins). Whatever the detector, the fit is refined on the frame dots of the classical search when it finds
        a lattice of dots; YOLO corners alone give 9-10 um median errors where the dots give 3 um.
    where
        How messages name the image (default: its size, ``"image of W x H px"``).

    Returns
    -------
    The fit, the detector used and one row per spot of the slide: ``array_row``, ``array_col``, ``pxl_row``,
    ``pxl_col`` (pixels of ``image``, pixel centres at integers), ``in_tissue``, ``tissue_fraction``.

    Raises
    ------
    AlignmentError
        When no detector aligns the image; the message gives each detector's reason (no frame, too few corners,
        frame dots that do not fit the layout, ...).
    InputError
        An image that is not uint8 grey or RGB, or an unknown ``slide`` or ``detector``.

    Examples
    --------
    >>> from PIL import Image
    >>> lowres = np.asarray(Image.open("spatial/tissue_lowres_image.png").convert("RGB"))  # doctest: +SKIP
    >>> result = align_image(lowres)  # doctest: +SKIP
    >>> result.detector, result.slide, len(result.spots), int(result.spots["in_tissue"].sum())  # doctest: +SKIP
    ('classical', '6.5mm', 4992, 2956)

    """
    slides = resolve_slides(slide)
    if detector not in ("auto", *DETECTORS):
        raise InputError(f"unknown detector {detector!r}; expected 'auto' or one of {list(DETECTORS)}")
    pixels, factor, name = _rgb(image, where)
    wanted = DETECTORS if detector == "auto" else (detector,)
    attempts: dict[str, str] = {}
    fits: list[tuple[GridFit, str, list[CornerDetection]]] = []
    frame = find_frame(pixels, slide)  # the classical corners, and the frame dots every fit is refined on
    if "classical" in wanted:
        if frame is None:
            attempts["classical"] = "no lattice of fiducial dots found (no frame visible?)"
        else:
            try:
                grid = fit_spot_grid(frame.corners, frame.layout, pixels.shape, frame.dots_px)
            except AlignmentError as error:
                attempts["classical"] = str(error)
            else:
                fits.append((grid, "classical", frame.corners))
                attempts["classical"] = "ok"
    if "yolo" in wanted:
        yolo, attempts["yolo"] = _yolo_fit(pixels, slides, frame)
        if yolo is not None:
            fits.append(yolo)
    if not fits:
        reasons = "; ".join(f"{detector_name}: {reason}" for detector_name, reason in attempts.items())
        raise AlignmentError(f"cannot align {name} to a Visium slide layout ({reasons})")
    fit, used, corners = min(fits, key=lambda item: np.inf if np.isnan(item[0].residual_px) else item[0].residual_um)
    flags = spot_tissue_flags(pixels, fit)
    fit = _to_full(fit, factor)
    if factor > 1:
        corners = [replace(c, x=(c.x + 0.5) * factor - 0.5, y=(c.y + 0.5) * factor - 0.5) for c in corners]
    spots = pd.concat([fit.spots, flags], axis=1)
    return AlignmentResult(fit=fit, detector=used, corners=corners, spots=spots, attempts=attempts)


# --------------------------------------------------------------------------------------------- sample
def _visium_spots(sdata: SpatialData, where: str) -> tuple[AnnData, np.ndarray, np.ndarray]:
    """Check a Visium sample: its table, the ids of the table's spots and their radii (px of ``spots``)."""
    missing = [
        name
        for name, group in (
            (Elements.HE, sdata.images),
            (Elements.SPOTS, sdata.shapes),
            (Elements.SPOT_EXPRESSION, sdata.tables),
        )
        if name not in group
    ]
    if missing:
        raise InputError(
            f"{where}: cannot align without {missing} (a Visium store has '{Elements.HE}', spots and a table)"
        )
    table = sdata.tables[Elements.SPOT_EXPRESSION]
    absent = [key for key in (Keys.SPOT_ID, Keys.ARRAY_ROW, Keys.ARRAY_COL) if key not in table.obs.columns]
    if absent:
        raise InputError(f"{where}: '{Elements.SPOT_EXPRESSION}' has no {absent} column (not Visium?)")
    positions = table.obs[[Keys.ARRAY_ROW, Keys.ARRAY_COL]].apply(pd.to_numeric, errors="coerce").to_numpy()
    if not (np.isfinite(positions).all() and np.array_equal(positions, np.round(positions))):
        raise InputError(f"{where}: '{Elements.SPOT_EXPRESSION}' has array_row/array_col that are not whole numbers")
    shapes = sdata.shapes[Elements.SPOTS]
    if "radius" not in shapes.columns or shapes.index.has_duplicates:
        raise InputError(f"{where}: '{Elements.SPOTS}' must be circles (a 'radius' column) with unique spot ids")
    spot_ids = table.obs[Keys.SPOT_ID].astype(str).to_numpy()
    radius = shapes["radius"].reindex(spot_ids).to_numpy()
    if np.isnan(radius).any():
        raise InputError(
            f"{where}: {int(np.isnan(radius).sum())} spot ids of '{Elements.SPOT_EXPRESSION}' are not in "
            f"'{Elements.SPOTS}' (e.g. {spot_ids[np.isnan(radius)][0]!r})"
        )
    return table, spot_ids, radius


def _he_pixels(sdata: SpatialData, level: int | None, where: str) -> tuple[int, np.ndarray]:
    """Return the level of ``he`` to align (default: the finest within ``STORE_LEVEL_MAX_SIDE``) and its pixels."""
    levels = image_levels(sdata.images[Elements.HE])
    if level is None:
        fitting = [index for index, array in enumerate(levels) if max(array.shape[1:]) <= STORE_LEVEL_MAX_SIDE]
        level = fitting[0] if fitting else len(levels) - 1
    if not 0 <= level < len(levels):
        raise InputError(f"{where}: '{Elements.HE}' has levels 0-{len(levels) - 1}, not {level}")
    if levels[level].dtype != np.uint8:
        raise InputError(f"{where}: '{Elements.HE}' is not uint8 (dtype {levels[level].dtype})")
    return level, np.moveaxis(np.asarray(levels[level].compute()), 0, -1)


def _flagged_table(table: AnnData, matched: pd.DataFrame, pixels: np.ndarray) -> tuple[AnnData, bool]:
    """Return a copy of the table with the image's ``in_tissue`` flags, and whether its own flags were kept.

    Tissue is found by its stain: a grey image (CytAssist's, say) has none, so flags already there are kept.
    """
    new_table = table.copy()
    grey = pixels.shape[-1] == 1 or bool((np.ptp(pixels[..., :3], axis=-1) <= GREY_SPREAD).all())
    keep_flags = grey and Keys.IN_TISSUE in new_table.obs
    if not keep_flags:
        if Keys.IN_TISSUE in new_table.obs and ORIGINAL_IN_TISSUE not in new_table.obs:
            new_table.obs[ORIGINAL_IN_TISSUE] = new_table.obs[Keys.IN_TISSUE].to_numpy()
        new_table.obs[Keys.IN_TISSUE] = matched[Keys.IN_TISSUE].to_numpy().astype(np.int32)
        new_table.obs[TISSUE_FRACTION] = matched[TISSUE_FRACTION].to_numpy().astype(np.float32)
    return new_table, keep_flags


def _alignment_parameters(
    result: AlignmentResult, level: int, level_shape: tuple[int, ...], to_global: np.ndarray
) -> dict[str, object]:
    """Return the provenance parameters of an alignment: slide, corners, dots, residual, level, um -> ``global``."""
    fit = result.fit
    centres_to_edges, edges_to_centres = np.eye(3), np.eye(3)
    centres_to_edges[:2, 2], edges_to_centres[:2, 2] = 0.5, -0.5
    um_to_global = edges_to_centres @ to_global @ centres_to_edges @ np.vstack([fit.affine, [0.0, 0.0, 1.0]])
    return {
        "slide": result.slide,
        "corners_used": list(fit.corners_used),
        "n_frame_dots": fit.n_frame_dots,
        "residual_px": fit.residual_px,
        "level": level,
        "level_shape": list(level_shape[:2]),
        "layout_um_to_global": um_to_global[:2].tolist(),
        "um_per_global_px": float(1 / np.sqrt(abs(np.linalg.det(um_to_global[:2, :2])))),
        "attempts": result.attempts,
    }


def align_sample(
    sdata: SpatialData,
    *,
    slide: SlideName | Literal["auto"] = "auto",
    detector: Detector = "auto",
    level: int | None = None,
    where: str = "sample",
) -> AlignmentResult:
    """Align a Visium sample's H&E to its slide layout: new spot positions and ``in_tissue`` flags, as an update.

    Aligns one pyramid level of ``he`` (default: the finest with at most ``STORE_LEVEL_MAX_SIDE`` pixels a side;
    lazy levels are computed) with :func:`align_image`, maps the spots to ``global`` pixels through the level's
    transformation and returns, in :attr:`AlignmentResult.update`, new ``spots`` (same index, joined to the layout
    by the table's ``array_row``/``array_col``; radius kept) and a new ``spot_expression`` (``in_tissue`` from the
    image, the previous flags kept once as ``in_tissue_original``, ``tissue_fraction`` added; a grey image keeps
    the table's flags). The sample itself is left unchanged. Provenance of ``spots``: method = the detector used,
    parameters = slide, corners, frame dots, residual, level, the affine um -> ``global``; ``estimated_error_um`` =
    the RMS fit residual; input ``he/scale<level>`` (store-relative). ``spot_expression`` keeps its provenance with
    ``parameters['in_tissue']`` added.

    Parameters
    ----------
    sdata
        A Visium sample with its record: ``he`` image, ``spots`` circles and a ``spot_expression`` table with
        ``array_row``/``array_col`` (:func:`hest_zarr.open`, a converter's output).
    slide, detector
        As :func:`align_image`.
    level
        Pyramid level of ``he`` to align.
    where
        How messages name the sample (the workflow passes the store's URL).

    Returns
    -------
    The alignment (spots in the level's pixels; the update holds them in ``global``), with its update.

    Raises
    ------
    AlignmentError
        When the image cannot be aligned.
    InputError
        A sample without ``he``, ``spots`` or a ``spot_expression`` table with ``array_row``/``array_col``, a level
        the pyramid lacks, or spots of array positions the layout lacks.

    Examples
    --------
    >>> result = align_sample(hest_zarr.open("perik.zarr"), detector="classical")  # doctest: +SKIP
    >>> result.detector, round(result.fit.residual_um, 1), sorted(result.update.elements)  # doctest: +SKIP
    ('classical', 6.9, ['spot_expression', 'spots'])

    """
    record = get_record(sdata)
    table, spot_ids, radius = _visium_spots(sdata, where)
    level, pixels = _he_pixels(sdata, level, where)
    result = align_image(pixels, slide=slide, detector=detector)

    positions = result.spots.set_index([Keys.ARRAY_ROW, Keys.ARRAY_COL])
    keys = pd.MultiIndex.from_arrays([table.obs[Keys.ARRAY_ROW].astype(int), table.obs[Keys.ARRAY_COL].astype(int)])
    unknown = ~keys.isin(positions.index)
    if unknown.any():
        raise InputError(
            f"{where}: {int(unknown.sum())} spots have array positions outside the {result.slide} layout "
            f"(e.g. {keys[unknown][0]})"
        )
    matched = positions.loc[keys]
    # pixel centres sit at integers in the fit and in `global` (Space Ranger's and HEST's convention, which the
    # converters keep): go to pixel edges, through the level's transformation, and back to centres
    to_global = level_to_global(sdata.images[Elements.HE], level)
    global_xy = (matched[["pxl_col", "pxl_row"]].to_numpy() + 0.5) @ to_global[:2, :2].T + to_global[:2, 2] - 0.5
    spots = circle_spots(global_xy, radius, spot_ids, record.pixel_size_um or 1.0)
    new_table, keep_flags = _flagged_table(table, matched, pixels)
    parameters = {
        **_alignment_parameters(result, level, pixels.shape, to_global),
        "spots_in_tissue": int(new_table.obs[Keys.IN_TISSUE].sum()),
        "in_tissue_from": "kept: a grey image shows no stain" if keep_flags else "the aligned image",
    }
    old = record.elements[Elements.SPOT_EXPRESSION].provenance
    provenance = {
        Elements.SPOTS: Provenance(
            converter="ops.align",
            inputs=[f"{Elements.HE}/scale{level}"],
            method=result.detector,
            parameters=parameters,
            estimated_error_um=None if np.isnan(result.fit.residual_um) else result.fit.residual_um,
        ),
        Elements.SPOT_EXPRESSION: Provenance.model_validate(
            {**old.model_dump(), "parameters": {**old.parameters, "in_tissue": {"source": "ops.align", **parameters}}}
        ),
    }
    elements = {Elements.SPOTS: spots, Elements.SPOT_EXPRESSION: new_table}
    return replace(
        result, update=ElementUpdate(elements, provenance, replace=True, anchored=frozenset({Elements.SPOTS}))
    )
