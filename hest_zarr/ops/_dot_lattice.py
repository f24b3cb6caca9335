"""The dot lattice of a Visium fiducial frame, found without weights (steps 1-2 of :mod:`hest_zarr.ops.fiducials`).

1. **Dots.** Maxima of the scale-normalised Laplacian of Gaussian, two scales per octave of an image pyramid, on
   two views of darkness: 1 - mean(R, G, B), and the same faded out over saturated pixels (stain, coloured
   overlays). Octaves are searched coarse to fine (:func:`dot_sets`).
2. **Lattice.** The most frequent neighbour vector (length, angle modulo 60 degrees) gives the pitch and the
   orientation (:func:`pitch_candidates`); dots linked by such steps form connected pieces (:func:`lattice_pieces`),
   and the largest grow into a lattice fitted by least squares (:func:`fit_lattice`: a regular hexagonal lattice
   while its dots span a thin band, an affine one once they span the frame), never reaching farther than half the
   span of the dots that fix it.

Private to :mod:`hest_zarr.ops`: :mod:`hest_zarr.ops.fiducials` lays the slide layout's frame on these lattices.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi
from scipy import sparse
from scipy.sparse import csgraph
from scipy.spatial import cKDTree

from hest_zarr.errors import InputError

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
#: The six neighbour steps of a hexagonal lattice in the basis of two of them 60 degrees apart, in angular order.
HEX_STEPS = np.array([[1, 0], [0, 1], [-1, 1], [-1, 0], [0, -1], [1, -1]])


@dataclass(frozen=True)
class Lattice:
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


def darkness_views(image: np.ndarray) -> list[tuple[np.ndarray, float]]:
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


def log_response(darkness: np.ndarray, sigma: float) -> np.ndarray:
    """Scale-normalised Laplacian of Gaussian of the darkness, positive on dark dots of radius about sigma * sqrt 2."""
    return -cv2.Laplacian(cv2.GaussianBlur(darkness, (0, 0), sigma), cv2.CV_32F, ksize=1) * sigma**2


def _blob_peaks(darkness: np.ndarray, sigma: float) -> np.ndarray:
    """Sub-pixel maxima ``(x, y)`` of the scale-normalised Laplacian of Gaussian response of dark dots."""
    response = log_response(darkness, sigma)
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


def dot_sets(darkness: np.ndarray, reduction: float) -> Iterator[tuple[np.ndarray, float]]:
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


def pitch_candidates(xy: np.ndarray, tree: cKDTree, sigma: float) -> list[tuple[float, float]]:
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


def lattice_pieces(xy: np.ndarray, tree: cKDTree, pitch: float, angle: float) -> list[np.ndarray]:
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
            ij[int(node)] = ij[parent] + HEX_STEPS[step_of[(parent, int(node))]]
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


def fit_lattice(xy: np.ndarray, piece: np.ndarray) -> Lattice | None:
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
                return Lattice(basis=basis, origin=origin, ij=grown_ij, xy=xy[grown], members=grown)
            affine = True
        members, ij = grown, grown_ij
    return None
