"""Visium spot positions from the fiducial frame: corners -> robust affine fit of the slide layout -> every spot.

The fit (:func:`fit_spot_grid`) maps the slide layout (:mod:`hest_zarr.ops.visium_layout`, micrometres) to image
pixels with an affine transform:

1. **Corners.** At least 3 of the 4 corner patterns are needed (they fix rotation, mirroring and which corner is
   which). With 4, the affine through all four and the one through each three are candidates (RANSAC over the
   only subsets there are); with 3, the one through them.
2. **Frame dots.** When the dots of the frame are known (the classical detector's lattice), every frame node of the
   layout is matched to the nearest dot within a fraction of the pitch and the affine refitted by least squares on
   the matches without outliers (beyond 2.5 median residuals), three times with a shrinking tolerance; of the
   candidates that pass the checks below, the one that matches most dots wins. Hundreds of dots give a sub-pixel
   fit. The frame lattice repeats every pitch, so a fit that slipped by whole steps (a misdetected corner) matches
   dots too: it is caught by the corners it leaves behind or by its dots on nodes that are always empty.
3. **Checks.** The fit is refused (:class:`~hest_zarr.errors.AlignmentError`) when it is degenerate or far from a
   similarity (scale ratio above ``MAX_ANISOTROPY``), when fewer than ``MIN_FRAME_MATCH_FRACTION`` of the frame
   nodes inside the image find a dot (a frame of another slide size does not fit), when it passes more than
   ``MAX_CORNER_DISAGREEMENT`` pitches from a corner it started from, when more than ``MAX_EMPTY_NODE_DOTS`` of its
   dots sit on nodes the layout always leaves empty, or when the dots' RMS residual exceeds ``MAX_RESIDUAL_PITCH``
   of the pitch. Without frame dots, four corners must agree within that residual; three are taken as they are
   (the residual is then unknown: NaN).

:func:`align_image` runs a detector (``"classical"``: :func:`hest_zarr.ops.fiducials.find_frame`; ``"yolo"``:
:func:`hest_zarr.ops.fiducials_yolo.detect_corners_yolo`, if ultralytics and its weights are installed; ``"auto"``:
both, keeping the fit with the smaller residual), fits the grid and flags the spots on tissue (the saturation
threshold of :func:`hest_zarr.ops.tissue.threshold_tissue_mask`, spots at least half covered). :func:`align` does it
on a Visium store and writes the new spot positions back.

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
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import cv2
import dask.array as da
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from hest_zarr.converters.slides import slide_image
from hest_zarr.elements import Elements, Keys, circle_spots
from hest_zarr.errors import AlignmentError, InputError
from hest_zarr.ops.fiducials import CORNER_NAMES, CornerDetection, find_frame
from hest_zarr.ops.tissue import (
    IN_TISSUE_FRACTION,
    ORIGINAL_IN_TISSUE,
    TISSUE_FRACTION,
    _image_levels,
    _level_to_global,
    spot_tissue_fraction,
    threshold_tissue_mask,
)
from hest_zarr.ops.visium_layout import SlideLayout, SlideName, resolve_slides, visium_layout
from hest_zarr.schemas import Provenance
from hest_zarr.store import StorageOptions, add_elements, get_record
from hest_zarr.store import open as open_store

Detector = Literal["auto", "classical", "yolo"]
DETECTORS: tuple[str, ...] = ("classical", "yolo")
#: Largest ratio of the affine's two scales (a slide image is close to a similarity: rotation, scale, mirroring).
MAX_ANISOTROPY = 1.15
#: Frame nodes match a dot within these fractions of the pitch, refit after refit.
MATCH_TOLERANCES = (0.3, 0.25, 0.2)
#: The fit to the frame dots must pass within this fraction of the pitch of every corner it started from.
MAX_CORNER_DISAGREEMENT = 0.5
#: At most this fraction of the matched frame dots (and at least ``MIN_FRAME_MATCHES``) may sit on nodes the layout
#: always leaves empty (:meth:`~hest_zarr.ops.visium_layout.SlideLayout.empty_nodes`).
MAX_EMPTY_NODE_DOTS = 0.05
#: Matched dots farther from the fit than this many median residuals are outliers (3 sigma of a 2-D normal).
OUTLIER_MEDIANS = 2.5
#: At least this fraction of the frame nodes that fall inside the image must find a dot (when dots are given).
MIN_FRAME_MATCH_FRACTION = 0.25
MIN_FRAME_MATCHES = 12
#: Largest RMS residual of the matched dots, as a fraction of the pitch.
MAX_RESIDUAL_PITCH = 0.12
#: Diameter of a Visium capture spot (for the in-tissue flag).
SPOT_DIAMETER_UM = 55.0
SPOT_COLUMNS = [Keys.ARRAY_ROW, Keys.ARRAY_COL, "pxl_row", "pxl_col"]
#: Larger images are reduced by an integer factor (block means) to at most this many pixels a side to be aligned.
ALIGN_MAX_SIDE = 4096
#: The tissue mask is computed on the image reduced to at most this many pixels a side.
TISSUE_MAX_SIDE = 1024
#: Longest side (pixels) of the pyramid level :func:`align` reads from a store.
STORE_LEVEL_MAX_SIDE = 4096


@dataclass(frozen=True)
class GridFit:
    """The slide layout fitted to an image.

    Attributes
    ----------
    layout
        The slide layout.
    affine
        ``2 x 3`` matrix from layout micrometres ``(x, y, 1)`` to image pixels ``(x, y)``.
    corners_used
        Corner patterns the fit started from.
    n_frame_dots
        Frame dots the final least-squares fit used (0 without frame dots).
    residual_px, residual_um
        RMS distance between the fitted and the detected dots (or corners, without dots); NaN with exactly three
        corners and no dots (nothing left to measure it).
    um_per_px
        Micrometres per image pixel of the fit.
    spots
        One row per spot of the layout: ``array_row``, ``array_col``, ``pxl_row``, ``pxl_col``.

    """

    layout: SlideLayout
    affine: np.ndarray
    corners_used: tuple[str, ...]
    n_frame_dots: int
    residual_px: float
    residual_um: float
    um_per_px: float
    spots: pd.DataFrame


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
        :attr:`GridFit.spots` plus ``in_tissue`` (0/1) and ``tissue_fraction``.
    attempts
        Detector -> ``"ok"`` or why it failed (or was unavailable).

    """

    fit: GridFit
    detector: str
    corners: list[CornerDetection]
    spots: pd.DataFrame
    attempts: dict[str, str] = field(default_factory=dict)

    @property
    def slide(self) -> SlideName:
        """The slide layout that fitted."""
        return self.fit.layout.name


# --------------------------------------------------------------------------------------------- fit
def _affine_lstsq(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    solution, *_ = np.linalg.lstsq(np.column_stack([source, np.ones(len(source))]), target, rcond=None)
    return solution.T


def _apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ affine[:, :2].T + affine[:, 2]


def _scales(affine: np.ndarray) -> np.ndarray:
    return np.linalg.svd(affine[:, :2], compute_uv=False)


def _frame_matches(
    affine: np.ndarray, nodes_um: np.ndarray, tree: cKDTree, tolerance_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Frame nodes and dots paired one to one (each node its nearest dot within ``tolerance_px``)."""
    predicted = _apply(affine, nodes_um)
    distance, nearest = tree.query(predicted, distance_upper_bound=tolerance_px)
    found = np.flatnonzero(np.isfinite(distance))
    order = found[np.argsort(distance[found])]
    _, first = np.unique(nearest[order], return_index=True)  # a dot serves its closest node only
    pairs = order[first]
    return pairs, nearest[pairs]


def _refine(
    affine: np.ndarray, nodes_um: np.ndarray, dots: np.ndarray, tree: cKDTree, pitch_um: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Refit on the matched frame dots with shrinking tolerances: affine, inlier node and dot indices.

    After each least-squares fit, matches farther from it than ``OUTLIER_MEDIANS`` median residuals (dots moved
    by tissue or debris) are left out and the affine refitted on the others.
    """
    nodes, matched = np.array([], dtype=int), np.array([], dtype=int)
    for fraction in MATCH_TOLERANCES:
        pitch_px = pitch_um * float(np.mean(_scales(affine)))
        candidate_nodes, candidate_dots = _frame_matches(affine, nodes_um, tree, fraction * pitch_px)
        if len(candidate_nodes) < 3:
            break
        fitted = _affine_lstsq(nodes_um[candidate_nodes], dots[candidate_dots])
        distance = np.linalg.norm(_apply(fitted, nodes_um[candidate_nodes]) - dots[candidate_dots], axis=1)
        inliers = distance <= OUTLIER_MEDIANS * np.median(distance)
        if inliers.sum() < 3:
            break
        nodes, matched = candidate_nodes[inliers], candidate_dots[inliers]
        affine = _affine_lstsq(nodes_um[nodes], dots[matched])
    return affine, nodes, matched


def _inside(points: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    height, width = image_shape[:2]
    return (points[:, 0] >= 0) & (points[:, 0] <= width - 1) & (points[:, 1] >= 0) & (points[:, 1] <= height - 1)


@dataclass(frozen=True)
class _Candidate:
    affine: np.ndarray
    n_dots: int
    residual_px: float


class _FrameCheck:
    """Refine an affine from corners on the frame dots, and refuse it when it does not fit (see the module)."""

    def __init__(self, layout: SlideLayout, frame_dots: np.ndarray | None, image_shape: tuple[int, ...]) -> None:
        self.layout = layout
        self.image_shape = image_shape
        nodes, empty = layout.frame_nodes(), layout.empty_nodes()
        self.nodes_um = layout.node_um(nodes["row"].to_numpy(), nodes["col"].to_numpy())
        self.empty_um = layout.node_um(empty["row"].to_numpy(), empty["col"].to_numpy())
        dots = np.zeros((0, 2)) if frame_dots is None else np.asarray(frame_dots, dtype=np.float64).reshape(-1, 2)
        self.dots = dots
        self.tree = cKDTree(dots) if len(dots) >= 3 else None

    def fit(self, affine: np.ndarray, corner_um: np.ndarray, corner_px: np.ndarray) -> _Candidate | tuple[str, int]:
        """Return the refined fit, or why it is refused and how many dots it matched."""
        name = self.layout.name
        scales = _scales(affine)
        if scales[1] <= 0 or scales[0] / scales[1] > MAX_ANISOTROPY:
            return f"no near-similarity maps the layout's corners onto them (scales {scales.round(4).tolist()})", 0
        if self.tree is None:
            return _Candidate(affine, 0, float("nan"))
        affine, nodes, dots = _refine(affine, self.nodes_um, self.dots, self.tree, self.layout.fiducial_pitch_um)
        scales = _scales(affine)
        if len(nodes) < 3 or scales[1] <= 0 or scales[0] / scales[1] > MAX_ANISOTROPY:
            return f"the frame dots give a degenerate or anisotropic fit ({len(nodes)} dots)", len(nodes)
        pitch_px = self.layout.fiducial_pitch_um * float(np.mean(scales))
        visible = int(_inside(_apply(affine, self.nodes_um), self.image_shape).sum())
        needed = max(MIN_FRAME_MATCHES, int(np.ceil(MIN_FRAME_MATCH_FRACTION * visible)))
        if len(nodes) < needed:
            return (
                f"the frame dots do not fit the {name} layout: {len(nodes)} of its {visible} frame nodes inside the "
                f"image found a dot, at least {needed} needed (another slide size, or no frame?)",
                len(nodes),
            )
        # the frame lattice repeats every pitch: a fit that slipped by whole steps leaves its corners behind ...
        disagreement = float(np.linalg.norm(_apply(affine, corner_um) - corner_px, axis=1).max()) / pitch_px
        if disagreement > MAX_CORNER_DISAGREEMENT:
            return (
                f"the fit to the frame dots passes {disagreement:.1f} fiducial pitches from a corner "
                f"(a misdetected corner?)",
                len(nodes),
            )
        # ... or puts dots on nodes that are always empty
        on_empty, _ = _frame_matches(affine, self.empty_um, self.tree, MATCH_TOLERANCES[-1] * pitch_px)
        if len(on_empty) > max(MIN_FRAME_MATCHES, MAX_EMPTY_NODE_DOTS * len(nodes)):
            return (
                f"the fit puts {len(on_empty)} dots on frame nodes that are empty on every slide: it slipped along "
                f"the dot lattice (a misdetected corner?)",
                len(nodes),
            )
        residual_px = float(np.sqrt(np.mean(np.sum((_apply(affine, self.nodes_um[nodes]) - self.dots[dots]) ** 2, 1))))
        if residual_px > MAX_RESIDUAL_PITCH * pitch_px:
            return (
                f"it fits poorly: RMS residual {residual_px:.2f} px is over {MAX_RESIDUAL_PITCH:.0%} of the "
                f"fiducial pitch ({pitch_px:.2f} px)",
                len(nodes),
            )
        return _Candidate(affine, len(nodes), residual_px)


def fit_spot_grid(
    detections: list[CornerDetection],
    layout: SlideLayout,
    image_shape: tuple[int, ...],
    frame_dots: np.ndarray | None = None,
) -> GridFit:
    """Fit the slide layout to an image from corner detections (and, better, the frame's dots).

    Parameters
    ----------
    detections
        Corner patterns found in the image (the best-scoring detection of each name is used).
    layout
        The slide layout to fit (:func:`~hest_zarr.ops.visium_layout.visium_layout`).
    image_shape
        ``(height, width, ...)`` of the image, to count the frame nodes it shows.
    frame_dots
        ``(n, 2)`` image positions ``(x, y)`` of fiducial dots (e.g. :attr:`FrameDetection.dots_px`); the fit is
        refined on every frame node that finds one.

    Returns
    -------
    The fit and every spot's pixel position.

    Raises
    ------
    AlignmentError
        Fewer than 3 distinct corners, a degenerate or strongly anisotropic fit, too few frame dots matched or too
        large a residual (see the module docstring); the message says which.

    Examples
    --------
    >>> from hest_zarr.ops.visium_layout import visium_layout
    >>> layout = visium_layout("6.5mm")
    >>> corners = [  # a 10 um/px image of the slide, unrotated, frame origin at pixel (20, 30)
    ...     CornerDetection(name, *((layout.corner_centroid_um(name) - layout.frame_origin_um) / 10 + (20, 30)), 1.0)
    ...     for name in ("hourglass", "hex_filled", "hex_open")
    ... ]
    >>> fit = fit_spot_grid(corners, layout, (820, 800))
    >>> fit.spots.iloc[0].round(2).tolist(), round(fit.um_per_px, 3)
    ([0.0, 0.0, 72.1, 73.7], 10.0)

    """
    best: dict[str, CornerDetection] = {}
    for detection in detections:
        if detection.name not in best or detection.score > best[detection.name].score:
            best[detection.name] = detection
    names = [name for name in CORNER_NAMES if name in best]
    if len(names) < 3:
        found = ", ".join(names) if names else "none"
        raise AlignmentError(
            f"found {len(names)} of the 4 corner patterns of the {layout.name} frame ({found}); at least 3 are needed"
        )
    corner_um = np.array([layout.corner_centroid_um(name) for name in names])
    corner_px = np.array([[best[name].x, best[name].y] for name in names], dtype=np.float64)
    if not np.isfinite(corner_px).all():
        raise InputError(f"corner positions must be finite, got {corner_px.tolist()}")
    if frame_dots is not None:
        dots = np.asarray(frame_dots, dtype=np.float64)
        if dots.ndim != 2 or dots.shape[1] != 2 or not np.isfinite(dots).all():
            raise InputError(f"frame_dots must be finite (n, 2) pixel positions, got an array of shape {dots.shape}")
    subsets = [tuple(range(len(names)))]
    if len(names) == 4:
        subsets += list(itertools.combinations(range(4), 3))
    frame = _FrameCheck(layout, frame_dots, image_shape)
    accepted, rejected = [], []
    for subset in subsets:
        used = tuple(names[index] for index in subset)
        affine = _affine_lstsq(corner_um[list(subset)], corner_px[list(subset)])
        outcome = frame.fit(affine, corner_um[list(subset)], corner_px[list(subset)])
        (accepted if isinstance(outcome, _Candidate) else rejected).append((used, outcome))
    if not accepted:
        used, reason = max(rejected, key=lambda item: (item[1][1], len(item[0])))
        raise AlignmentError(f"the {layout.name} layout does not fit the corners {list(used)}: {reason[0]}")
    used, candidate = max(accepted, key=lambda item: (item[1].n_dots, len(item[0])))
    affine = candidate.affine
    um_per_px = 1.0 / float(np.sqrt(abs(np.linalg.det(affine[:, :2]))))
    if candidate.n_dots == 0:  # no frame dots: the fourth corner is all there is to check the fit with
        residuals = _apply(affine, corner_um) - corner_px if len(names) > 3 else np.full((1, 2), np.nan)
        candidate = _Candidate(affine, 0, float(np.sqrt(np.mean(np.sum(residuals**2, axis=1)))))
        pitch_px = layout.fiducial_pitch_um / um_per_px
        if candidate.residual_px > MAX_RESIDUAL_PITCH * pitch_px:
            raise AlignmentError(
                f"the 4 corners disagree with the {layout.name} layout (RMS residual {candidate.residual_px:.2f} px, "
                f"over {MAX_RESIDUAL_PITCH:.0%} of the fiducial pitch) and no frame dots tell which is wrong"
            )
    spots_px = _apply(affine, layout.spots[["x_um", "y_um"]].to_numpy())
    spots = pd.DataFrame(
        {
            Keys.ARRAY_ROW: layout.spots[Keys.ARRAY_ROW].to_numpy(),
            Keys.ARRAY_COL: layout.spots[Keys.ARRAY_COL].to_numpy(),
            "pxl_row": spots_px[:, 1],
            "pxl_col": spots_px[:, 0],
        }
    )
    return GridFit(
        layout=layout,
        affine=affine,
        corners_used=used,
        n_frame_dots=candidate.n_dots,
        residual_px=candidate.residual_px,
        residual_um=candidate.residual_px * um_per_px,
        um_per_px=um_per_px,
        spots=spots,
    )


# --------------------------------------------------------------------------------------------- detectors
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


#: Largest channel spread (0-255) of an image taken as grey: no stain to find tissue by.
GREY_SPREAD = 2


def _rgb(image: np.ndarray | str | Path) -> tuple[np.ndarray, int, str]:
    """Return the image as ``HxWx3`` uint8 RGB, reduced, the reduction factor and how to name it in messages.

    Images over ``ALIGN_MAX_SIDE`` pixels a side are reduced by the smallest integer factor that brings them under
    it (block means; pixel ``i`` of the reduced image covers ``factor * i ... factor * i + factor - 1``).
    """
    if isinstance(image, (str, Path)):
        data = slide_image(image).data  # lazy: a large TIFF is read once, block by block
        name = str(image)
    else:
        pixels = np.asarray(image)
        if pixels.dtype != np.uint8:
            raise InputError(f"the image must be uint8, got dtype {pixels.dtype}")
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
            raise InputError(f"the image must be HxW grey or HxWx3 RGB, got shape {pixels.shape}")
        pixels = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels[..., :3]
        data = da.from_array(np.moveaxis(pixels, -1, 0), chunks=(3, 2048, 2048))
        name = f"image of {pixels.shape[1]} x {pixels.shape[0]} px"
    height, width = int(data.shape[1]), int(data.shape[2])
    if height == 0 or width == 0:
        raise InputError(f"{name}: the image is empty ({width} x {height} px)")
    factor = max(1, int(np.ceil(max(height, width) / ALIGN_MAX_SIDE)))
    if factor > 1:
        data = da.coarsen(np.mean, data, {1: factor, 2: factor}, trim_excess=True)
    reduced = np.moveaxis(np.asarray(data.compute()), 0, -1)
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
    >>> result = align_image("spatial/tissue_lowres_image.png")  # doctest: +SKIP
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


def align_image(
    image: np.ndarray | str | Path,
    slide: SlideName | Literal["auto"] = "auto",
    detector: Detector = "auto",
) -> AlignmentResult:
    """Align a Visium image (H&E or CytAssist, frame visible) to its slide layout: every spot's pixel position.

    Parameters
    ----------
    image
        ``HxWx3`` RGB or ``HxW`` grey uint8 array, or the path of a PNG/JPEG/TIFF image.
    slide
        ``"6.5mm"``, ``"11mm"`` or ``"auto"`` (the frame that fits).
    detector
        ``"classical"``, ``"yolo"`` or ``"auto"`` (every available detector; the fit with the smaller residual
        wins). Whatever the detector, the fit is refined on the frame dots of the classical search when it finds
        a lattice of dots; YOLO corners alone give 9-10 um median errors where the dots give 3 um.

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
        An unreadable image, or an unknown ``slide`` or ``detector``.

    Examples
    --------
    >>> result = align_image("spatial/tissue_lowres_image.png")  # doctest: +SKIP
    >>> result.detector, result.slide, len(result.spots), int(result.spots["in_tissue"].sum())  # doctest: +SKIP
    ('classical', '6.5mm', 4992, 2956)

    """
    slides = resolve_slides(slide)
    if detector not in ("auto", *DETECTORS):
        raise InputError(f"unknown detector {detector!r}; expected 'auto' or one of {list(DETECTORS)}")
    pixels, factor, name = _rgb(image)
    wanted = DETECTORS if detector == "auto" else (detector,)
    attempts: dict[str, str] = {}
    fits: list[tuple[GridFit, str, list[CornerDetection]]] = []
    frame = find_frame(pixels, slide)  # the classical corners, and the frame dots every fit is refined on
    dots = frame.dots_px if frame is not None else None
    if "classical" in wanted:
        if frame is None:
            attempts["classical"] = "no lattice of fiducial dots found (no frame visible?)"
        else:
            try:
                fits.append(
                    (fit_spot_grid(frame.corners, frame.layout, pixels.shape, dots), "classical", frame.corners)
                )
                attempts["classical"] = "ok"
            except AlignmentError as error:
                attempts["classical"] = str(error)
    if "yolo" in wanted:
        try:
            corners = _yolo_corners(pixels)
        except _DetectorUnavailable as error:
            attempts["yolo"] = str(error)
        else:
            layouts = sorted(slides, key=lambda s: frame is None or s != frame.layout.name)
            yolo_fits, errors = [], []
            names = sorted({corner.name for corner in corners}, key=CORNER_NAMES.index)
            if len(names) < 3:
                layouts = []
                errors.append(f"found {len(names)} of the 4 corner patterns ({', '.join(names) or 'none'}); 3 needed")
            for slide_name in layouts:
                try:
                    yolo_fits.append(fit_spot_grid(corners, visium_layout(slide_name), pixels.shape, dots))
                except AlignmentError as error:
                    errors.append(f"{slide_name}: {error}" if len(layouts) > 1 else str(error))
            if len(yolo_fits) > 1 and dots is None:
                attempts["yolo"] = "its corners fit both slide sizes and no frame dots tell them apart; pass the slide"
            elif yolo_fits:
                fits.append((yolo_fits[0], "yolo", corners))
                attempts["yolo"] = "ok"
            else:
                attempts["yolo"] = "; ".join(errors)
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


# --------------------------------------------------------------------------------------------- store
def _store_level(levels: list[Any], level: int | None, url: str | Path) -> int:
    if level is None:
        fitting = [index for index, array in enumerate(levels) if max(array.shape[1:]) <= STORE_LEVEL_MAX_SIDE]
        return fitting[0] if fitting else len(levels) - 1
    if not 0 <= level < len(levels):
        raise InputError(f"{url}: '{Elements.HE}' has levels 0-{len(levels) - 1}, not {level}")
    return level


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

    Reads one pyramid level of ``he`` (default: the finest with at most ``STORE_LEVEL_MAX_SIDE`` pixels a side),
    aligns it (:func:`align_image`), maps the spots to ``global`` pixels through the level's transformation and
    replaces the ``spots`` shapes (same index, joined to the layout by the table's ``array_row``/``array_col``;
    radius kept) and the ``spot_expression`` table (``in_tissue`` from the image, the previous flags kept once as
    ``in_tissue_original``, ``tissue_fraction`` added). Provenance: method = the detector used, parameters = slide,
    corners, frame dots, residual, level, the affine um -> ``global``; ``estimated_error_um`` = the RMS fit residual.

    Parameters
    ----------
    url
        Store path or URL of a Visium sample (``he`` image, ``spots`` and ``spot_expression`` with array
        coordinates).
    slide, detector
        As :func:`align_image`.
    level
        Pyramid level of ``he`` to align.
    replace
        Replace the existing ``spots`` and ``spot_expression`` (must be ``True``: the store keeps one set of spot
        positions).
    storage_options
        fsspec options for a remote URL.

    Returns
    -------
    The alignment (spots in the level's pixels; the store holds them in ``global``).

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
    record = get_record(sdata)
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
            f"{url}: cannot align without {missing} (a Visium store has '{Elements.HE}', spots and a table)"
        )
    table = sdata.tables[Elements.SPOT_EXPRESSION]
    absent = [key for key in (Keys.SPOT_ID, Keys.ARRAY_ROW, Keys.ARRAY_COL) if key not in table.obs.columns]
    if absent:
        raise InputError(f"{url}: '{Elements.SPOT_EXPRESSION}' has no {absent} column (not Visium?)")
    positions = table.obs[[Keys.ARRAY_ROW, Keys.ARRAY_COL]].apply(pd.to_numeric, errors="coerce").to_numpy()
    if not (np.isfinite(positions).all() and np.array_equal(positions, np.round(positions))):
        raise InputError(f"{url}: '{Elements.SPOT_EXPRESSION}' has array_row/array_col that are not whole numbers")
    shapes = sdata.shapes[Elements.SPOTS]
    if "radius" not in shapes.columns or shapes.index.has_duplicates:
        raise InputError(f"{url}: '{Elements.SPOTS}' must be circles (a 'radius' column) with unique spot ids")
    spot_ids = table.obs[Keys.SPOT_ID].astype(str).to_numpy()
    radius = shapes["radius"].reindex(spot_ids).to_numpy()
    if np.isnan(radius).any():
        raise InputError(
            f"{url}: {int(np.isnan(radius).sum())} spot ids of '{Elements.SPOT_EXPRESSION}' are not in "
            f"'{Elements.SPOTS}' (e.g. {spot_ids[np.isnan(radius)][0]!r})"
        )
    image = sdata.images[Elements.HE]
    levels = _image_levels(image)
    level = _store_level(levels, level, url)
    if levels[level].dtype != np.uint8:
        raise InputError(f"{url}: '{Elements.HE}' is not uint8 (dtype {levels[level].dtype})")
    pixels = np.moveaxis(np.asarray(levels[level].compute()), 0, -1)
    result = align_image(pixels, slide=slide, detector=detector)

    to_global = _level_to_global(image, level)
    positions = result.spots.set_index([Keys.ARRAY_ROW, Keys.ARRAY_COL])
    obs = table.obs
    keys = pd.MultiIndex.from_arrays([obs[Keys.ARRAY_ROW].astype(int), obs[Keys.ARRAY_COL].astype(int)])
    unknown = ~keys.isin(positions.index)
    if unknown.any():
        raise InputError(
            f"{url}: {int(unknown.sum())} spots have array positions outside the {result.slide} layout "
            f"(e.g. {keys[unknown][0]})"
        )
    matched = positions.loc[keys]
    # pixel centres sit at integers in the fit and in `global` (Space Ranger's and HEST's convention, which the
    # converters keep): go to pixel edges, through the level's transformation, and back to centres
    level_xy = matched[["pxl_col", "pxl_row"]].to_numpy() + 0.5
    global_xy = level_xy @ to_global[:2, :2].T + to_global[:2, 2] - 0.5
    pixel_size_um = record.pixel_size_um or 1.0
    spots = circle_spots(global_xy, radius, spot_ids, pixel_size_um)

    new_table = table.copy()
    # tissue is found by its stain: a grey image (CytAssist's, say) has none, so flags already there are kept
    grey = pixels.shape[-1] == 1 or bool((np.ptp(pixels[..., :3], axis=-1) <= GREY_SPREAD).all())
    keep_flags = grey and Keys.IN_TISSUE in new_table.obs
    if not keep_flags:
        if Keys.IN_TISSUE in new_table.obs and ORIGINAL_IN_TISSUE not in new_table.obs:
            new_table.obs[ORIGINAL_IN_TISSUE] = new_table.obs[Keys.IN_TISSUE].to_numpy()
        new_table.obs[Keys.IN_TISSUE] = matched[Keys.IN_TISSUE].to_numpy().astype(np.int32)
        new_table.obs[TISSUE_FRACTION] = matched[TISSUE_FRACTION].to_numpy().astype(np.float32)

    fit = result.fit
    centres_to_edges, edges_to_centres = np.eye(3), np.eye(3)
    centres_to_edges[:2, 2], edges_to_centres[:2, 2] = 0.5, -0.5
    um_to_global = edges_to_centres @ to_global @ centres_to_edges @ np.vstack([fit.affine, [0.0, 0.0, 1.0]])
    parameters = {
        "slide": result.slide,
        "corners_used": list(fit.corners_used),
        "n_frame_dots": fit.n_frame_dots,
        "residual_px": fit.residual_px,
        "level": level,
        "level_shape": list(pixels.shape[:2]),
        "layout_um_to_global": um_to_global[:2].tolist(),
        "um_per_global_px": float(1 / np.sqrt(abs(np.linalg.det(um_to_global[:2, :2])))),
        "attempts": result.attempts,
        "spots_in_tissue": int(new_table.obs[Keys.IN_TISSUE].sum()),
        "in_tissue_from": "kept: a grey image shows no stain" if keep_flags else "the aligned image",
    }
    inputs = [f"{url}/{Elements.HE}/scale{level}"]
    estimated = None if np.isnan(fit.residual_um) else fit.residual_um
    provenance = {
        Elements.SPOTS: Provenance(
            converter="ops.align",
            inputs=inputs,
            method=result.detector,
            parameters=parameters,
            estimated_error_um=estimated,
        ),
    }
    old = record.elements[Elements.SPOT_EXPRESSION].provenance
    provenance[Elements.SPOT_EXPRESSION] = Provenance.model_validate(
        {**old.model_dump(), "parameters": {**old.parameters, "in_tissue": {"source": "ops.align", **parameters}}}
    )
    add_elements(
        url,
        {Elements.SPOTS: spots, Elements.SPOT_EXPRESSION: new_table},
        provenance,
        replace=True,
        storage_options=storage_options,
    )
    return result
