"""Visium fiducial frame: corner-pattern detections shared by the detectors, and the classical detector.

Every detector returns :class:`CornerDetection` objects (the YOLO one lives in
:mod:`hest_zarr.ops.fiducials_yolo`). The classical detector (:func:`find_frame`,
:func:`detect_corners_classical`) needs no weights:

1. **Dots.** Maxima of the scale-normalised Laplacian of Gaussian, two scales per octave of an image pyramid, on
   two views of darkness: 1 - mean(R, G, B), and the same faded out over saturated pixels (stain, coloured
   overlays). Octaves are searched coarse to fine; a frame with its 4 corners ends the search.
2. **Lattice.** The most frequent neighbour vector (length, angle modulo 60 degrees) gives the pitch and the
   orientation; dots linked by such steps form connected pieces, and the largest grow into a lattice fitted by
   least squares (a regular hexagonal lattice while its dots span a thin band, an affine one once they span the
   frame), never reaching farther than half the span of the dots that fix it.
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

from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache
from typing import Literal

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy import signal, sparse
from scipy.sparse import csgraph
from scipy.spatial import cKDTree

from hest_zarr.errors import InputError
from hest_zarr.ops.visium_layout import CORNER_WINDOW, SlideLayout, SlideName, resolve_slides, visium_layout

#: The four corner patterns of a Visium capture-area frame, as named in the slide layout.
CornerName = Literal["hourglass", "hex_filled", "triangle", "hex_open"]
CORNER_NAMES: tuple[CornerName, ...] = ("hourglass", "hex_filled", "triangle", "hex_open")


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
#: Images are reduced (area averaging) to at most this many pixels on their longest side before the dot search.
MAX_SEARCH_SIDE = 4096
#: Saturation (max - min of R, G, B in [0, 1]) up to which a pixel counts as grey, and from which it counts as
#: colour (tissue stain, overlay) and not at all.
GREY_SATURATION = (0.12, 0.27)
#: Laplacian-of-Gaussian scales (pixels of an octave) searched in every octave of the image pyramid.
DOT_SIGMAS = (1.4, 2.0)
#: The coarsest octave searched still has this many pixels on its shorter side.
MIN_OCTAVE_SIDE = 96
#: A dot's LoG response must exceed both this and ``DOT_NOISE_FACTOR`` robust standard deviations of the response.
DOT_MIN_RESPONSE = 0.01
DOT_NOISE_FACTOR = 6.0
#: Neighbour distances searched for the lattice pitch, in LoG scales (a dot of radius r answers best at r / sqrt 2
#: and the fiducial pitch is about 2.9 dot radii, about 4 scales).
PITCH_RANGE_SIGMAS = (2.5, 6.5)
#: Lattice (pitch, angle) candidates and connected pieces of each tried per dot set.
PITCH_CANDIDATES = 3
PIECES_PER_CANDIDATE = 3
#: A dot links to a neighbour, or sits on a lattice node, within this fraction of the pitch.
LINK_TOLERANCE = 0.2
NODE_TOLERANCE = 0.25
#: ... or, tighter, within this many median residuals of the lattice's dots (but never under this fraction of it).
NODE_TOLERANCE_RESIDUALS = 2.5
MIN_NODE_TOLERANCE = 0.18
#: Refits after which a lattice that still changes is given up.
MAX_GROWTH_ROUNDS = 60
#: A lattice grows by at least this many pitches beyond its dots at each refit.
GROWTH_STEPS = 4
#: A lattice whose dots span at least this many pitches in every direction is fitted as an affine lattice.
AFFINE_MIN_EXTENT = 10
#: A lattice grows from a connected piece of at least ``MIN_PIECE_DOTS`` dots and needs ``MIN_LATTICE_DOTS``;
#: one that gathers more than ``MAX_LATTICE_DOTS`` is noise (a frame has fewer than 1,000 dots).
MIN_PIECE_DOTS = 30
MIN_LATTICE_DOTS = 20
MAX_LATTICE_DOTS = 3000
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
#: The six neighbour steps of a hexagonal lattice in the basis of two of them 60 degrees apart, in angular order.
_HEX_STEPS = np.array([[1, 0], [0, 1], [-1, 1], [-1, 0], [0, -1], [1, -1]])


@dataclass(frozen=True)
class _Lattice:
    """Dots on a hexagonal lattice: ``xy = origin + ij @ basis`` (basis rows 60 degrees apart)."""

    basis: np.ndarray
    origin: np.ndarray
    ij: np.ndarray
    xy: np.ndarray
    members: np.ndarray  # index of each dot in the dot set

    @property
    def pitch(self) -> float:
        return float(np.linalg.norm(self.basis, axis=1).mean())

    def position(self, ij: np.ndarray) -> np.ndarray:
        return self.origin + np.asarray(ij, dtype=np.float64) @ self.basis


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


def _darkness_variants(image: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Return two views of how dark each pixel is, reduced to ``MAX_SEARCH_SIDE``, with the reduction.

    Fiducial dots are dark grey. The first view is 1 - mean(R, G, B): it sees dots through a thin stain. The
    second fades that out over the saturations (max - min of R, G, B) ``GREY_SATURATION`` so that stained tissue
    and coloured overlays (Space Ranger's rings drawn around the dots) do not answer as dots.
    """
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise InputError(f"fiducial detection needs a uint8 image, got dtype {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InputError(f"fiducial detection needs an HxW grey or HxWx3 RGB image, got shape {array.shape}")
    if array.ndim == 3:
        array = np.ascontiguousarray(array[..., :3])
    scale = min(1.0, MAX_SEARCH_SIDE / max(array.shape[:2]))
    if scale < 1.0:
        size = (max(1, round(array.shape[1] * scale)), max(1, round(array.shape[0] * scale)))
        array = cv2.resize(array, size, interpolation=cv2.INTER_AREA)
    if array.ndim == 2:
        return [(1.0 - array.astype(np.float32) / 255.0, scale)]
    rgb = array.astype(np.float32) / 255.0
    darkness = 1.0 - rgb.mean(axis=2)
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    low, high = GREY_SATURATION
    greyness = np.clip((high - saturation) / (high - low), 0.0, 1.0)
    return [(darkness, scale), (darkness * greyness, scale)]


def _log_response(darkness: np.ndarray, sigma: float) -> np.ndarray:
    """Scale-normalised Laplacian of Gaussian of the darkness, positive on dark dots of radius about sigma * sqrt 2."""
    return -cv2.Laplacian(cv2.GaussianBlur(darkness, (0, 0), sigma), cv2.CV_32F, ksize=1) * sigma**2


def _blob_peaks(darkness: np.ndarray, sigma: float) -> np.ndarray:
    """Sub-pixel maxima ``(x, y)`` of the scale-normalised Laplacian of Gaussian response of dark dots."""
    response = _log_response(darkness, sigma)
    sample = response[::4, ::4]
    noise = 1.4826 * float(np.median(np.abs(sample - np.median(sample))))
    threshold = max(DOT_MIN_RESPONSE, DOT_NOISE_FACTOR * noise)
    size = 2 * int(np.ceil(1.2 * sigma)) + 1
    peaks = (response >= cv2.dilate(response, np.ones((size, size), np.uint8))) & (response > threshold)
    peaks[[0, -1], :] = peaks[:, [0, -1]] = False
    rows, cols = np.nonzero(peaks)
    centre = response[rows, cols]

    def offset(before: np.ndarray, after: np.ndarray) -> np.ndarray:
        curvature = np.maximum(2 * centre - before - after, 1e-12)
        return np.clip((after - before) / (2 * curvature), -0.5, 0.5)

    dx = offset(response[rows, cols - 1], response[rows, cols + 1])
    dy = offset(response[rows - 1, cols], response[rows + 1, cols])
    return np.column_stack([cols + dx, rows + dy])


def _dot_sets(darkness: np.ndarray, reduction: float) -> Iterator[tuple[np.ndarray, float]]:
    """Yield dot candidates from the coarsest octave to the finest, at every LoG scale of an octave.

    Each set is ``(xy in input-image pixels, LoG scale in input-image pixels)``.
    """
    levels = [darkness]
    while min(levels[-1].shape) >= 2 * MIN_OCTAVE_SIDE:
        level = levels[-1]
        levels.append(cv2.resize(level, (level.shape[1] // 2, level.shape[0] // 2), interpolation=cv2.INTER_AREA))
    for octave in range(len(levels) - 1, -1, -1):
        factor = 2**octave / reduction  # input-image pixels per octave pixel
        for sigma in DOT_SIGMAS[::-1]:
            xy = _blob_peaks(levels[octave], sigma)
            yield (xy + 0.5) * factor - 0.5, sigma * factor


def _pitch_candidates(xy: np.ndarray, tree: cKDTree, sigma: float) -> list[tuple[float, float]]:
    """Most frequent ``(length, angle mod 60 degrees)`` of the vectors to each dot's six nearest neighbours."""
    _, neighbours = tree.query(xy, k=7)
    vectors = (xy[neighbours[:, 1:]] - xy[:, None, :]).reshape(-1, 2)
    lengths = np.hypot(vectors[:, 0], vectors[:, 1])
    angles = np.degrees(np.arctan2(vectors[:, 1], vectors[:, 0])) % 60.0
    low, high = PITCH_RANGE_SIGMAS[0] * sigma, PITCH_RANGE_SIGMAS[1] * sigma
    keep = (lengths > low) & (lengths < high)
    length_edges = np.arange(np.log(low), np.log(high) + 0.03, 0.03)
    angle_edges = np.arange(0.0, 60.0 + 2.0, 2.0)
    counts, _, _ = np.histogram2d(np.log(lengths[keep]), angles[keep], bins=[length_edges, angle_edges])
    smooth = ndi.gaussian_filter(counts, 1.0, mode=["constant", "wrap"])
    is_peak = (smooth == ndi.maximum_filter(smooth, size=3, mode=["constant", "wrap"])) & (smooth > 0)
    peaks = np.argwhere(is_peak)
    peaks = peaks[np.argsort(-smooth[is_peak])][:PITCH_CANDIDATES]
    candidates = []
    for length_bin, angle_bin in peaks:
        selected = (
            keep
            & (np.abs(np.log(np.maximum(lengths, 1e-9)) - length_edges[length_bin] - 0.015) < 0.045)
            & (np.abs((angles - angle_edges[angle_bin] - 1.0 + 30.0) % 60.0 - 30.0) < 3.0)
        )
        if selected.sum() < MIN_LATTICE_DOTS:
            continue
        # refine on the selected vectors: median length, circular mean of the angle (period 60 degrees)
        phase = np.radians(angles[selected] * 6.0)
        angle = np.degrees(np.arctan2(np.sin(phase).mean(), np.cos(phase).mean())) / 6.0
        candidates.append((float(np.median(lengths[selected])), float(angle % 60.0)))
    return candidates


def _lattice_pieces(xy: np.ndarray, tree: cKDTree, pitch: float, angle: float) -> list[np.ndarray]:
    """Return the connected pieces (largest first) of dots linked by lattice steps: ``(n, 3)`` dot index, i, j."""
    directions = np.radians(angle + 60.0 * np.arange(6))
    steps = pitch * np.column_stack([np.cos(directions), np.sin(directions)])
    pairs = tree.query_pairs((1 + 2 * LINK_TOLERANCE) * pitch, output_type="ndarray")
    if len(pairs) == 0:
        return []
    offsets = xy[pairs[:, 1]] - xy[pairs[:, 0]]
    errors = np.linalg.norm(offsets[:, None, :] - steps[None], axis=2)
    step = errors.argmin(axis=1)
    linked = errors[np.arange(len(pairs)), step] < LINK_TOLERANCE * pitch
    pairs, step = pairs[linked], step[linked]
    n = len(xy)
    graph = sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)).tocsr()
    n_pieces, labels = csgraph.connected_components(graph, directed=False)
    sizes = np.bincount(labels, minlength=n_pieces)
    step_of = {(a, b): s for (a, b), s in zip(pairs.tolist(), step.tolist(), strict=True)}
    step_of.update({(b, a): (s + 3) % 6 for (a, b), s in zip(pairs.tolist(), step.tolist(), strict=True)})
    symmetric = graph + graph.T
    pieces = []
    for label in np.argsort(-sizes)[:PIECES_PER_CANDIDATE]:
        if sizes[label] < MIN_PIECE_DOTS:
            break
        start = int(np.flatnonzero(labels == label)[0])
        order, predecessors = csgraph.breadth_first_order(symmetric, start, directed=False)
        ij = {start: np.zeros(2, dtype=np.int64)}
        for node in order[1:]:
            parent = int(predecessors[node])
            ij[int(node)] = ij[parent] + _HEX_STEPS[step_of[(parent, int(node))]]
        pieces.append(np.array([[node, *ij[node]] for node in order.tolist()], dtype=np.int64))
    return pieces


def _fit_hexagonal(ij: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares regular hexagonal lattice (second step = first turned by +60 degrees): basis and origin."""
    i, j = ij[:, 0].astype(np.float64), ij[:, 1].astype(np.float64)
    cos60, sin60 = 0.5, np.sqrt(3) / 2
    along, across = i + j * cos60, j * sin60
    ones, zeros = np.ones_like(i), np.zeros_like(i)
    # x = ox + u * along - v * across ; y = oy + u * across + v * along
    design = np.block(
        [
            [along[:, None], -across[:, None], ones[:, None], zeros[:, None]],
            [across[:, None], along[:, None], zeros[:, None], ones[:, None]],
        ]
    )
    (u, v, origin_x, origin_y), *_ = np.linalg.lstsq(design, np.concatenate([xy[:, 0], xy[:, 1]]), rcond=None)
    first = np.array([u, v])
    second = np.array([u * cos60 - v * sin60, u * sin60 + v * cos60])
    return np.array([first, second]), np.array([origin_x, origin_y])


def _fit_affine(ij: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares affine lattice: basis and origin."""
    solution, *_ = np.linalg.lstsq(np.column_stack([ij, np.ones(len(ij))]), xy, rcond=None)
    return solution[:2], solution[2]


def _fit_lattice(xy: np.ndarray, piece: np.ndarray) -> _Lattice | None:
    """Grow a lattice from a connected piece of dots.

    A regular hexagonal lattice (``xy = origin + ij @ basis``) is fitted by least squares to its dots (rotation,
    scale and shift only, so that a long thin band fixes it in every direction); dots within ``NODE_TOLERANCE``
    of a node are added when they lie no farther from the lattice's dots than half its extent (at least
    ``GROWTH_STEPS`` pitches), and the lattice is refitted, until no dot is added. One dot per node: the closest.
    Last, a lattice whose dots span at least ``AFFINE_MIN_EXTENT`` pitches in every direction is refitted as a
    general affine lattice (scanner anisotropy, the 11 mm frame's 0.4 % non-regular lattice).
    """
    members, ij = piece[:, 0], piece[:, 1:]
    affine = False
    for _ in range(MAX_GROWTH_ROUNDS):
        basis, origin = (_fit_affine if affine else _fit_hexagonal)(ij, xy[members])
        pitch = float(np.linalg.norm(basis, axis=1).mean())
        if not pitch > 0:
            return None
        residual = np.median(np.linalg.norm(xy[members] - origin - ij @ basis, axis=1))
        tolerance = float(
            np.clip(NODE_TOLERANCE_RESIDUALS * residual, MIN_NODE_TOLERANCE * pitch, NODE_TOLERANCE * pitch)
        )
        extents = 4 * np.sqrt(np.linalg.eigvalsh(np.cov(xy[members].T)))  # +-2 sd along the principal axes
        reach = max(GROWTH_STEPS * pitch, extents[1] / 2)
        distance_to_members, _ = cKDTree(xy[members]).query(xy, distance_upper_bound=reach)
        near = np.flatnonzero(np.isfinite(distance_to_members))
        nodes = np.rint(np.linalg.solve(basis.T, (xy[near] - origin).T).T).astype(np.int64)
        distance = np.linalg.norm(xy[near] - origin - nodes @ basis, axis=1)
        on_node = distance < tolerance
        near, nodes, distance = near[on_node], nodes[on_node], distance[on_node]
        closest = np.argsort(distance)
        keys = (nodes[closest, 0] << 32) + nodes[closest, 1]  # one integer per node
        _, first = np.unique(keys, return_index=True)
        grown, grown_ij = near[closest][first], nodes[closest][first]
        if not MIN_LATTICE_DOTS <= len(grown) <= MAX_LATTICE_DOTS:
            return None
        if len(grown) == len(members) and np.array_equal(np.sort(grown), np.sort(members)):
            if affine or extents[0] < AFFINE_MIN_EXTENT * pitch:
                return _Lattice(basis=basis, origin=origin, ij=grown_ij, xy=xy[grown], members=grown)
            affine = True
        members, ij = grown, grown_ij
    return None


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
    lattice: _Lattice
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


def _place_frame(lattice: _Lattice, layout: SlideLayout) -> _Placement:
    """Best placement of the layout's frame on the lattice over the 12 orientations (6 directions x mirroring)."""
    weights, _ = _frame_template(layout.name)
    margin = _TEMPLATE_MARGIN
    best = None
    for direction in range(6):
        for turn in (1, -1):
            steps = np.array([_HEX_STEPS[direction], _HEX_STEPS[(direction + turn) % 6]])
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
    views = _darkness_variants(image)
    best, best_key = None, None
    for darkness, reduction in views:
        for xy, sigma in _dot_sets(darkness, reduction):  # coarse to fine: a full frame ends the search
            if len(xy) < MIN_LATTICE_DOTS:
                continue
            tree = cKDTree(xy)
            for pitch, angle in _pitch_candidates(xy, tree, sigma):
                claimed = np.zeros(len(xy), dtype=bool)
                for piece in _lattice_pieces(xy, tree, pitch, angle):
                    if claimed[piece[:, 0]].mean() > 0.5:  # grows into a lattice already tried
                        continue
                    lattice = _fit_lattice(xy, piece)
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
    response = _log_response(darkness, sigma)
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
