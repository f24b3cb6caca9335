"""Visium fiducial frame: corner-pattern detections shared by the detectors, and the classical detector.

Every detector returns :class:`CornerDetection` objects (the YOLO one lives in
:mod:`hest_zarr.ops.fiducials_yolo`). The classical detector (:func:`find_frame`,
:func:`detect_corners_classical`) needs no weights:

1. **Dots** and 2. **Lattice** (:mod:`hest_zarr.ops._dot_lattice`): dark round dots found over an image pyramid
   grow into hexagonal lattices fitted by least squares; a frame with its 4 corners ends the search.
3. **Frame.** The slide layout's frame (:mod:`hest_zarr.ops.visium_layout`) is correlated with the lattice's dots
   as a template (band nodes +1, corner-pattern dots +2, corner holes -2, the empty nodes around the frame -1) over
   every shift, the 12 orientations (6 lattice directions, mirrored or not: rotations by any angle and mirroring)
   and both slide sizes. The band code, which differs between slide versions, is not scored.
4. **Corners.** Frame nodes without a dot are probed once more with a lower threshold (faint dots under thin
   tissue). A corner pattern counts as found when at most one of its dots is missing, at most two dots of the
   search sit on its holes or the empty nodes around it, and at most two nodes disagree in all; its position is the
   centroid of its dots on the fitted lattice.

Measured on the real perik CytAssist slide (``benchmarks/align_fiducials.py``): 3 corners on the 600 px lowres
image (the fourth is under tissue), 4 on Space Ranger's 3000 px ``aligned_fiducials.jpg`` at full, hires and
1000 px scales, 2 on ``detected_tissue_image.jpg`` (two corners under dark tissue); 1-3.5 s per image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from typing import Literal

import cv2
import numpy as np
import pandas as pd
from scipy import signal
from scipy.spatial import cKDTree

from hest_zarr.ops._dot_lattice import (
    HEX_STEPS,
    MIN_LATTICE_DOTS,
    Lattice,
    darkness_views,
    dot_sets,
    fit_lattice,
    lattice_pieces,
    log_response,
    pitch_candidates,
)
from hest_zarr.ops.visium_layout import (
    CORNER_NAMES,
    CORNER_WINDOW,
    CornerName,
    SlideLayout,
    SlideName,
    resolve_slides,
    visium_layout,
)


@dataclass(frozen=True)
class CornerDetection:
    """One corner pattern found in an image.

    Attributes
    ----------
    name
        Which corner pattern (layout names: hourglass top-left, hex_filled top-right, triangle bottom-left,
        hex_open bottom-right, on an unrotated, unmirrored slide).
    x, y
        Image pixel coordinates (x = column, y = row) of the centroid of the pattern's fiducial dots.
    score
        Detector confidence in [0, 1].

    """

    name: CornerName
    x: float
    y: float
    score: float


# --------------------------------------------------------------------------------------------- classical detector
#: Score weights of the frame template: band node, corner-pattern dot, corner-pattern hole, empty node next to both.
BAND_WEIGHT, CORNER_DOT_WEIGHT, CORNER_HOLE_WEIGHT, GAP_WEIGHT = 1.0, 2.0, -2.0, -1.0
#: A corner pattern counts as found when at most ``CORNER_MISSING_DOTS`` of its dots are missing, at most
#: ``CORNER_EXTRA_DOTS`` dots sit on its holes and on the empty nodes around it (tissue structures next to a corner),
#: at most ``CORNER_MISMATCHES`` of both together, and ``MIN_CORNER_DOTS`` of its dots are seen.
CORNER_MISSING_DOTS, CORNER_EXTRA_DOTS, CORNER_MISMATCHES, MIN_CORNER_DOTS = 1, 2, 2, 5

#: Missed dots are probed for within this fraction of the pitch of a node, with the LoG at this fraction of the
#: pitch (a 105 um dot on the 150 um pitch answers best at 0.25), and kept at this fraction of the median response
#: of the dots found.
PROBE_RADIUS = 0.2
DOT_SIGMA_PITCH = 0.25
PROBE_RESPONSE = 0.3

#: Margin (frame nodes) of the frame template around the frame.
_TEMPLATE_MARGIN = 2


@dataclass(frozen=True)
class FrameDetection:
    """A capture-area frame found by the classical detector.

    Attributes
    ----------
    layout
        The slide layout whose frame matched.
    corners
        The corner patterns found (at most one per name).
    dots_px
        ``(n, 2)`` image positions ``(x, y)`` of the dots on the frame's nodes (pixel centres at integers).
    dot_nodes
        ``(n, 2)`` frame node ``(row, col)`` of each dot.
    pitch_px
        Fiducial pitch (150 um) in image pixels.
    score
        Template score of the frame placement (band dots count 1, corner dots 2, dots on empty nodes count
        against it).

    """

    layout: SlideLayout
    corners: list[CornerDetection]
    dots_px: np.ndarray
    dot_nodes: np.ndarray
    pitch_px: float
    score: float


@cache
def _frame_template(slide: SlideName) -> tuple[np.ndarray, np.ndarray]:
    """Score weights over the frame's nodes (with a margin) and the empty nodes around the corner windows.

    Returns the weights grid (node ``(row, col)`` at ``[row + margin, col + margin]``) and a boolean grid of the
    nodes that must be empty (:meth:`SlideLayout.empty_nodes`).
    """
    layout = visium_layout(slide)
    margin = _TEMPLATE_MARGIN
    weights = np.zeros((layout.frame_rows + 2 * margin, layout.frame_cols + 2 * margin))
    nodes = layout.frame_nodes()
    is_corner = (nodes["corner"] != "").to_numpy()
    weights[nodes["row"] + margin, nodes["col"] + margin] = np.where(is_corner, CORNER_DOT_WEIGHT, BAND_WEIGHT)
    empty = layout.empty_nodes()
    is_hole = (empty["kind"] == "hole").to_numpy()
    weights[empty["row"] + margin, empty["col"] + margin] = np.where(is_hole, CORNER_HOLE_WEIGHT, GAP_WEIGHT)
    must_be_empty = np.zeros(weights.shape, dtype=bool)
    must_be_empty[empty["row"] + margin, empty["col"] + margin] = True
    return weights, must_be_empty


@dataclass(frozen=True)
class _Placement:
    """The layout's frame laid on a lattice: layout node ``(row, col)`` -> lattice node ``ij``."""

    layout: SlideLayout
    lattice: Lattice
    steps: np.ndarray  # (2, 2) lattice steps of layout steps (col + 2) and (row + 1, col + 1), as rows
    shift: tuple[int, int]  # lattice frame (row', col') of layout node (0, 0)
    score: float

    def node_ij(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        rows_, cols_ = np.asarray(rows) + self.shift[0], np.asarray(cols) + self.shift[1]
        along, diagonal = (cols_ - rows_) // 2, rows_
        return along[:, None] * self.steps[0] + diagonal[:, None] * self.steps[1]

    def node_px(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self.lattice.position(self.node_ij(rows, cols))

    def dot_nodes(self) -> np.ndarray:
        """Layout node ``(row, col)`` of every lattice dot."""
        along_diagonal = np.rint(np.linalg.solve(self.steps.T.astype(np.float64), self.lattice.ij.T).T).astype(int)
        rows_ = along_diagonal[:, 1]
        cols_ = 2 * along_diagonal[:, 0] + along_diagonal[:, 1]
        return np.column_stack([rows_ - self.shift[0], cols_ - self.shift[1]])


def _place_frame(lattice: Lattice, layout: SlideLayout) -> _Placement:
    """Best placement of the layout's frame on the lattice over the 12 orientations (6 directions x mirroring)."""
    weights, _ = _frame_template(layout.name)
    margin = _TEMPLATE_MARGIN
    best = None
    for direction in range(6):
        for turn in (1, -1):
            steps = np.array([HEX_STEPS[direction], HEX_STEPS[(direction + turn) % 6]])
            placement = _Placement(layout, lattice, steps, (0, 0), 0.0)
            nodes = placement.dot_nodes()  # lattice frame (row', col') as shift is (0, 0)
            origin = nodes.min(axis=0)
            grid = np.zeros(tuple(nodes.max(axis=0) - origin + 1))
            grid[tuple((nodes - origin).T)] = 1.0
            scores = signal.correlate(grid, weights, mode="full", method="fft")
            shift_rows = np.arange(scores.shape[0])[:, None] - weights.shape[0] + 1 + margin + origin[0]
            shift_cols = np.arange(scores.shape[1])[None, :] - weights.shape[1] + 1 + margin + origin[1]
            scores[(shift_rows + shift_cols) % 2 == 1] = -np.inf
            index = np.unravel_index(np.argmax(scores), scores.shape)
            score = float(np.round(scores[index]))
            if best is None or score > best.score:
                shift = (int(shift_rows[index[0], 0]), int(shift_cols[0, index[1]]))
                best = _Placement(layout, lattice, steps, shift, score)
    return best


def _corners(placement: _Placement) -> list[CornerDetection]:
    """Corner patterns of the placed frame that the lattice's dots show."""
    layout = placement.layout
    margin = _TEMPLATE_MARGIN
    _, must_be_empty = _frame_template(layout.name)
    seen = {tuple(node) for node in placement.dot_nodes().tolist()}
    corners = []
    for name, (top, left) in layout.corner_windows().items():
        dot_rows, dot_cols = layout.corner_nodes(name)
        window = must_be_empty[
            top + margin - 1 : top + margin + CORNER_WINDOW[0] + 1,
            left + margin - 2 : left + margin + CORNER_WINDOW[1] + 2,
        ]
        empty_rows, empty_cols = np.nonzero(window)
        empty_rows, empty_cols = empty_rows + top - 1, empty_cols + left - 2
        present = sum((row, col) in seen for row, col in zip(dot_rows.tolist(), dot_cols.tolist(), strict=True))
        extra = sum((row, col) in seen for row, col in zip(empty_rows.tolist(), empty_cols.tolist(), strict=True))
        missing = len(dot_rows) - present
        if (
            missing > CORNER_MISSING_DOTS
            or extra > CORNER_EXTRA_DOTS
            or missing + extra > CORNER_MISMATCHES
            or present < MIN_CORNER_DOTS
        ):
            continue
        agreement = (present + len(empty_rows) - extra) / (len(dot_rows) + len(empty_rows))
        x, y = placement.node_px(dot_rows, dot_cols).mean(axis=0)
        corners.append(CornerDetection(name, float(x), float(y), float(agreement)))
    return corners


def find_frame(image: np.ndarray, slide: SlideName | Literal["auto"] = "auto") -> FrameDetection | None:
    """Find a Visium fiducial frame and its corner patterns without any trained weights.

    Dark round dots are found as maxima of the scale-normalised Laplacian of Gaussian over an image pyramid;
    the hexagonal lattice of the fiducials is the most frequent neighbour vector (length and angle modulo 60
    degrees), grown over linked dots and fitted by least squares; the slide layout's frame (bands, corner patterns,
    empty gaps) is then correlated with the lattice's dots over the 12 orientations (6 lattice directions, mirrored
    or not) and every shift. The placement with the most corner patterns found, then the best score, wins; its
    frame nodes without a dot are probed once more at a lower threshold (see the module docstring).

    Parameters
    ----------
    image
        ``HxWx3`` RGB or ``HxW`` grey uint8 image (H&E, CytAssist greyscale), any rotation or mirroring.
    slide
        ``"6.5mm"``, ``"11mm"`` or ``"auto"`` (try both).

    Returns
    -------
    The frame (possibly with fewer than 3 corners: :func:`~hest_zarr.ops.align.fit_spot_grid` refuses those), or
    ``None`` when no lattice of dots was found at all.

    Raises
    ------
    InputError
        An image that is not uint8 grey or RGB, or an unknown ``slide``.

    Examples
    --------
    >>> find_frame(np.full((400, 400, 3), 240, np.uint8)) is None
    True
    >>> from PIL import Image
    >>> frame = find_frame(np.asarray(Image.open("spatial/tissue_lowres_image.png")))  # doctest: +SKIP
    >>> frame.layout.name, sorted(corner.name for corner in frame.corners), len(frame.dots_px)  # doctest: +SKIP
    ('6.5mm', ['hex_filled', 'hex_open', 'hourglass'], 459)

    """
    slides = resolve_slides(slide)
    views = darkness_views(image)
    best, best_key = None, None
    for darkness, reduction in views:
        for xy, sigma in dot_sets(darkness, reduction):  # coarse to fine: a full frame ends the search
            if len(xy) < MIN_LATTICE_DOTS:
                continue
            tree = cKDTree(xy)
            for pitch, angle in pitch_candidates(xy, tree, sigma):
                claimed = np.zeros(len(xy), dtype=bool)
                for piece in lattice_pieces(xy, tree, pitch, angle):
                    if claimed[piece[:, 0]].mean() > 0.5:  # grows into a lattice already tried
                        continue
                    lattice = fit_lattice(xy, piece)
                    if lattice is None:
                        continue
                    claimed[lattice.members] = True
                    for name in slides:
                        placement = _place_frame(lattice, visium_layout(name))
                        key = (len(_corners(placement)), placement.score)
                        if best_key is None or key > best_key:
                            best, best_key = placement, key
                    if best_key[0] == len(CORNER_NAMES):
                        return _frame_detection(_probe_missing_dots(best, *views[0]))
    return None if best is None else _frame_detection(_probe_missing_dots(best, *views[0]))


def _probe_missing_dots(placement: _Placement, darkness: np.ndarray, reduction: float) -> _Placement:
    """Look for the dots the search missed (faint, under thin tissue) where the placed frame puts one.

    At every frame node without a dot, the Laplacian of Gaussian at the dot's scale is searched within
    ``PROBE_RADIUS`` pitches; a local maximum of at least ``PROBE_RESPONSE`` times the median response of the dots
    already found counts as a dot. The nodes that must stay empty are not probed: dots there come from the search
    alone, with its stricter threshold, so that tissue structures next to a corner do not veto it (and a corner
    whose holes the search saw dots on stays refused).
    """
    lattice, layout = placement.lattice, placement.layout
    pitch = lattice.pitch * reduction  # in pixels of the darkness view
    sigma = max(1.0, DOT_SIGMA_PITCH * pitch)
    response = log_response(darkness, sigma)
    radius = max(1, round(PROBE_RADIUS * pitch))
    is_peak = response >= cv2.dilate(response, np.ones((3, 3), np.uint8))
    height, width = response.shape

    def peak(x: float, y: float) -> tuple[float, float, float] | None:
        """Return the strongest local maximum of the response within ``radius`` of ``(x, y)``."""
        column, row = round(x), round(y)
        if not (radius <= column < width - radius and radius <= row < height - radius):
            return None
        window = np.where(
            is_peak[row - radius : row + radius + 1, column - radius : column + radius + 1],
            response[row - radius : row + radius + 1, column - radius : column + radius + 1],
            -np.inf,
        )
        d_row, d_col = np.unravel_index(int(np.argmax(window)), window.shape)
        if not np.isfinite(window[d_row, d_col]):
            return None
        return column - radius + d_col, row - radius + d_row, float(window[d_row, d_col])

    to_view = lambda points: (points + 0.5) * reduction - 0.5  # noqa: E731
    found = [peak(x, y) for x, y in to_view(lattice.xy)]
    strengths = [value for value in found if value is not None]
    if not strengths:
        return placement
    threshold = PROBE_RESPONSE * float(np.median([value[2] for value in strengths]))
    seen = {tuple(node) for node in placement.dot_nodes().tolist()}
    frame = layout.frame_nodes()
    rows, cols = frame["row"].to_numpy(), frame["col"].to_numpy()
    missing = np.array([(row, col) not in seen for row, col in zip(rows.tolist(), cols.tolist(), strict=True)])
    if not missing.any():
        return placement
    rows, cols = rows[missing], cols[missing]
    new_xy, new_ij = [], []
    for (x, y), ij in zip(to_view(placement.node_px(rows, cols)), placement.node_ij(rows, cols), strict=True):
        dot = peak(x, y)
        if dot is not None and dot[2] >= threshold:
            new_xy.append(((dot[0] + 0.5) / reduction - 0.5, (dot[1] + 0.5) / reduction - 0.5))
            new_ij.append(ij)
    if not new_xy:
        return placement
    probed = replace(
        lattice,
        ij=np.vstack([lattice.ij, np.array(new_ij)]),
        xy=np.vstack([lattice.xy, np.array(new_xy)]),
        members=np.concatenate([lattice.members, np.full(len(new_xy), -1)]),
    )
    return replace(placement, lattice=probed)


def _frame_detection(placement: _Placement) -> FrameDetection:
    corners = _corners(placement)
    nodes = placement.dot_nodes()
    frame = placement.layout.frame_nodes()
    on_frame = pd.MultiIndex.from_arrays([nodes[:, 0], nodes[:, 1]]).isin(
        pd.MultiIndex.from_arrays([frame["row"], frame["col"]])
    )
    return FrameDetection(
        layout=placement.layout,
        corners=corners,
        dots_px=placement.lattice.xy[on_frame],
        dot_nodes=nodes[on_frame],
        pitch_px=placement.lattice.pitch,
        score=placement.score,
    )


def detect_corners_classical(image: np.ndarray, slide: SlideName | Literal["auto"] = "auto") -> list[CornerDetection]:
    """Find the corner patterns of a Visium fiducial frame by blob detection and lattice/template matching.

    See :func:`find_frame` for the method; this returns only its corners, in :data:`CORNER_NAMES` order.

    Parameters
    ----------
    image
        ``HxWx3`` RGB or ``HxW`` grey uint8 image.
    slide
        ``"6.5mm"``, ``"11mm"`` or ``"auto"``.

    Returns
    -------
    At most one detection per corner name; ``x, y`` are the centroid of the pattern's dots in image pixels
    (pixel centres at integer coordinates). Empty when no frame was found.

    Examples
    --------
    >>> detect_corners_classical(np.full((400, 400), 240, np.uint8))
    []
    >>> from PIL import Image
    >>> lowres = np.asarray(Image.open("spatial/tissue_lowres_image.png").convert("RGB"))  # doctest: +SKIP
    >>> [(c.name, round(c.x), round(c.y)) for c in detect_corners_classical(lowres)]  # doctest: +SKIP
    [('hourglass', 34, 142), ('hex_filled', 339, 142), ('hex_open', 338, 453)]

    """
    frame = find_frame(image, slide)
    if frame is None:
        return []
    order = {name: index for index, name in enumerate(CORNER_NAMES)}
    return sorted(frame.corners, key=lambda corner: order[corner.name])
