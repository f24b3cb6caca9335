"""The Visium slide layout fitted to an image: corners -> robust affine fit of the layout -> every spot's pixels.

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

Pixel coordinates put pixel centres at integers (``pxl_row``, ``pxl_col`` as Space Ranger's
``pxl_row_in_fullres``, ``pxl_col_in_fullres``, in pixels of the image). :mod:`hest_zarr.ops.align` runs the
detectors and this fit on images and samples.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from hest_zarr.elements import Keys
from hest_zarr.errors import AlignmentError, InputError
from hest_zarr.ops.fiducials import CornerDetection
from hest_zarr.ops.visium_layout import CORNER_NAMES, SlideLayout

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
        ``(n, 2)`` image positions ``(x, y)`` of fiducial dots (e.g.
        :attr:`~hest_zarr.ops.fiducials.FrameDetection.dots_px`); the fit is refined on every frame node that finds
        one.

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
