"""H&E <-> DAPI registration for Xenium: feature matching on low resolution, refined at higher resolution.

Xenium places its H&E with an alignment file (:func:`hest_zarr.converters.xenium.read_alignment`); when there is
none, or it is wrong, the H&E is registered to the morphology (DAPI) image here:

1. Both images become one channel where nuclei are bright: the haematoxylin optical density of the H&E (colour
   deconvolution, :func:`skimage.color.rgb2hed`) and the DAPI intensity, each scaled to its 1st-99.5th
   percentiles.
2. Coarse: both are halved (2x2 means) until their longest side is at most ``coarse_max_side``; SIFT keypoints
   (:class:`skimage.feature.SIFT`, rotation and scale invariant) are matched (Lowe's ratio test, cross-checked) and an
   affine fitted by RANSAC.
3. Fine: at the level whose longest side is at most ``fine_max_side`` (full resolution for small images), the H&E is
   warped onto the DAPI by the current affine, the DAPI is cut into overlapping windows, and each textured window's
   residual shift is measured by phase correlation to 1/10 px. The shifted window centres are correspondences
   between the two images; the affine is refitted on them by RANSAC. This repeats until the update is below 0.05
   px.

The residual is the root-mean-square distance (DAPI pixels) between the refined affine's prediction and the
inlier correspondences.

:func:`register_he_to_dapi` works on two arrays; :func:`register_sample` on a Xenium sample (SpatialData), returning
the re-placed elements as an update; :func:`hest_zarr.workflows.register.register` runs it on a store.

Why by hand: opencv's ECC or feature pipelines would do, but opencv is not a dependency of this package;
scikit-image gives SIFT, RANSAC, warping and phase correlation.

Measured (``benchmarks/tissue_and_registration.py``: the SFE Xenium crop's real 237 x 237 px morphology image and a
pseudo-H&E made from it by :func:`simulate_he_from_dapi`, warped by 10 random affines): largest error over a 9 x 9
grid of DAPI points 0.31 px with the SIFT match at full resolution and 0.36 px with it on halved images (the test
bound is 2 px), 1-3 s per registration on two shared cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage import color, feature, measure, registration, transform
from spatialdata import SpatialData
from spatialdata.transformations import Affine, set_transformation

from hest_zarr.elements import (
    Elements,
    ElementUpdate,
    affine_xy,
    frame_transformations,
    get_record,
    load_level,
)
from hest_zarr.errors import HestZarrError, InputError
from hest_zarr.schemas import Provenance, StoreRecord

COARSE_MAX_SIDE = 512
FINE_MAX_SIDE = 2048
#: Lowe's ratio test for SIFT matches.
MATCH_MAX_RATIO = 0.8
#: RANSAC inlier distance at the coarse level (px) and on the refinement correspondences (fine px).
COARSE_RANSAC_PX = 2.0
FINE_RANSAC_PX = 1.0
RANSAC_TRIALS = 5000
MIN_MATCHES = 8
#: Refinement windows (fine px) and their stride; windows whose DAPI varies less than this are skipped.
WINDOW_PX = 48
WINDOW_STRIDE_PX = 24
MIN_WINDOW_STD = 0.05
MAX_REFINEMENTS = 5
CONVERGED_PX = 0.05
#: Alignment methods of the Xenium converter: the alignment came from a file.
FILE_ALIGNMENT_METHODS = ("xenium_explorer_matrix", "keypoints_least_squares_affine")


@dataclass(frozen=True)
class Registration:
    """An affine map from H&E pixels to DAPI pixels.

    Attributes
    ----------
    affine
        3x3 matrix: ``[x_dapi, y_dapi, 1] = affine @ [x_he, y_he, 1]`` (pixel ``i`` spans ``[i, i + 1)``).
    residual_px
        Root-mean-square distance (DAPI px) of the inlier correspondences to the affine.
    n_inliers
        Inlier correspondences of the final fit.
    method
        How it was obtained.
    parameters
        Per-stage details (matches, levels, iterations), for the provenance.
    update
        The elements re-placed by the registration, for a sample (:func:`register_sample`); ``None`` otherwise.

    Examples
    --------
    >>> Registration(np.diag([2.0, 2.0, 1.0]), 0.3, 40, "demo").apply(np.array([[1.0, 2.0]])).tolist()
    [[2.0, 4.0]]

    """

    affine: np.ndarray
    residual_px: float
    n_inliers: int
    method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    update: ElementUpdate | None = None

    def apply(self, xy: np.ndarray) -> np.ndarray:
        """Map ``(n, 2)`` H&E pixel coordinates to DAPI pixels."""
        return _apply(self.affine, np.asarray(xy, dtype=np.float64))


# --------------------------------------------------------------------------------------------- images
def _scaled(channel: np.ndarray) -> np.ndarray:
    low, high = np.percentile(channel, [1, 99.5])
    if high <= low:
        raise InputError("the image is uniform: nothing to register")
    return np.clip((channel - low) / (high - low), 0, 1).astype(np.float32)


def he_nuclei_channel(he: np.ndarray) -> np.ndarray:
    """Return the haematoxylin optical density of an RGB ``(y, x, 3)`` H&E, scaled to ``[0, 1]`` (nuclei bright).

    Examples
    --------
    >>> he = np.full((4, 4, 3), 235, np.uint8)
    >>> he[1, 1] = (80, 40, 140)  # a nucleus
    >>> channel = he_nuclei_channel(he)
    >>> float(channel[1, 1]), float(channel[0, 0])
    (1.0, 0.0)

    """
    he = np.asarray(he)
    if he.ndim != 3 or he.shape[2] != 3:
        raise InputError(f"expected an RGB H&E of shape (y, x, 3), got shape {he.shape}")
    return _scaled(color.rgb2hed(he)[..., 0])


def fluorescence_channel(dapi: np.ndarray) -> np.ndarray:
    """Return a ``(y, x)`` fluorescence image scaled to ``[0, 1]`` by its 1st-99.5th percentiles.

    Examples
    --------
    >>> fluorescence_channel(np.arange(100, dtype=np.uint16).reshape(10, 10)).max()
    np.float32(1.0)

    """
    dapi = np.asarray(dapi)
    if dapi.ndim != 2:
        raise InputError(f"expected a one-channel (y, x) DAPI image, got shape {dapi.shape}")
    return _scaled(dapi.astype(np.float32))


def _halvings(shape: tuple[int, ...], max_side: int) -> int:
    """How many 2x2 halvings bring the longest side to at most ``max_side``."""
    count, side = 0, max(shape[:2])
    while side > max_side and side >= 4:
        side //= 2
        count += 1
    return count


def _halve(image: np.ndarray, times: int) -> np.ndarray:
    for _ in range(times):
        height, width = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
        image = image[:height, :width].reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))
    return image


def _scale(factor: float) -> np.ndarray:
    """Pixels of a level halved ``log2(factor)`` times -> level-0 pixels (pixel edges scale exactly)."""
    return np.diag([factor, factor, 1.0])


# skimage works in pixel-centre (row, col) coordinates; here pixel i spans [i, i + 1), so centres are at i + 0.5.
def _centres_xy(rows_cols: np.ndarray) -> np.ndarray:
    return rows_cols[:, ::-1] + 0.5


def _ransac_affine(source: np.ndarray, target: np.ndarray, threshold_px: float, seed: int) -> tuple[Any, Any]:
    """RANSAC affine from ``source`` to ``target`` points: the model and the inlier mask (``None`` when none fits)."""
    return measure.ransac(
        (source, target),
        transform.AffineTransform,
        min_samples=3,
        residual_threshold=threshold_px,
        max_trials=RANSAC_TRIALS,
        rng=seed,
    )


# --------------------------------------------------------------------------------------------- coarse
def _coarse_affine(he: np.ndarray, dapi: np.ndarray, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """SIFT + RANSAC affine from ``he`` to ``dapi`` pixels (both one-channel), and the match counts."""
    keypoints = []
    for image, name in ((he, "H&E"), (dapi, "DAPI")):
        sift = feature.SIFT()
        try:
            sift.detect_and_extract(image)
        except RuntimeError as err:
            raise HestZarrError(f"registration failed: no SIFT keypoints on the {name} ({err})") from err
        keypoints.append(sift)
    matches = feature.match_descriptors(
        keypoints[0].descriptors, keypoints[1].descriptors, max_ratio=MATCH_MAX_RATIO, cross_check=True
    )
    details: dict[str, Any] = {
        "keypoints_he": len(keypoints[0].keypoints),
        "keypoints_dapi": len(keypoints[1].keypoints),
        "matches": len(matches),
    }
    if len(matches) < MIN_MATCHES:
        raise HestZarrError(
            f"registration failed: {len(matches)} SIFT matches between H&E and DAPI (need {MIN_MATCHES}); "
            "do the images show the same tissue?"
        )
    source = _centres_xy(keypoints[0].keypoints[matches[:, 0]])
    target = _centres_xy(keypoints[1].keypoints[matches[:, 1]])
    model, inliers = _ransac_affine(source, target, COARSE_RANSAC_PX, seed)
    if model is None or inliers is None or inliers.sum() < MIN_MATCHES:
        found = 0 if inliers is None else int(inliers.sum())
        raise HestZarrError(
            f"registration failed: {found} of {len(matches)} SIFT matches agree on one affine (need {MIN_MATCHES})"
        )
    details["coarse_inliers"] = int(inliers.sum())
    return model.params, details


# --------------------------------------------------------------------------------------------- fine
def _warp(image: np.ndarray, affine: np.ndarray, shape: tuple[int, int], fill: float = np.nan) -> np.ndarray:
    """Resample ``image`` onto a grid of ``shape`` by ``affine`` (image px -> grid px, edge convention)."""
    to_edges = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    to_index = np.linalg.inv(to_edges) @ np.linalg.inv(affine) @ to_edges
    return transform.warp(
        image, transform.AffineTransform(to_index), output_shape=shape, order=1, cval=fill, preserve_range=True
    )


def _correspondences(he: np.ndarray, dapi: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Window centres on the DAPI and the H&E points that phase correlation finds there."""
    warped = _warp(he, affine, dapi.shape)
    inverse = np.linalg.inv(affine)
    he_points, dapi_points = [], []
    size = min(WINDOW_PX, *dapi.shape)
    for top in range(0, dapi.shape[0] - size + 1, WINDOW_STRIDE_PX):
        for left in range(0, dapi.shape[1] - size + 1, WINDOW_STRIDE_PX):
            reference = dapi[top : top + size, left : left + size]
            moving = warped[top : top + size, left : left + size]
            if np.isnan(moving).any() or reference.std() < MIN_WINDOW_STD or moving.std() < MIN_WINDOW_STD:
                continue
            shift, _, _ = registration.phase_cross_correlation(reference, moving, upsample_factor=10)
            if np.abs(shift).max() > size / 4:
                continue
            centre = np.array([left + size / 2, top + size / 2])
            moved = centre - shift[::-1]
            he_points.append(moved @ inverse[:2, :2].T + inverse[:2, 2])
            dapi_points.append(centre)
    return np.array(he_points).reshape(-1, 2), np.array(dapi_points).reshape(-1, 2)


def _least_squares_affine(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    design = np.c_[source, np.ones(len(source))]
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    return np.r_[solution.T, [[0.0, 0.0, 1.0]]]


def _apply(affine: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ affine[:2, :2].T + affine[:2, 2]


def _refine(
    he: np.ndarray, dapi: np.ndarray, affine: np.ndarray, seed: int
) -> tuple[np.ndarray, float, int, dict[str, Any]]:
    """Refine ``affine`` (fine he px -> fine dapi px) by windowed phase correlation; return it with its residual."""
    details: dict[str, Any] = {"refinements": 0, "windows": 0}
    residual, n_inliers = float("nan"), 0
    for _ in range(MAX_REFINEMENTS):
        he_points, dapi_points = _correspondences(he, dapi, affine)
        details["windows"] = len(he_points)
        if len(he_points) < MIN_MATCHES:
            raise HestZarrError(
                f"registration refinement failed: {len(he_points)} textured windows overlap (need {MIN_MATCHES}); "
                "the coarse match is probably wrong"
            )
        model, inliers = _ransac_affine(he_points, dapi_points, FINE_RANSAC_PX, seed)
        if model is None or inliers is None or inliers.sum() < MIN_MATCHES:
            raise HestZarrError("registration refinement failed: the windows' shifts agree on no affine")
        refined = _least_squares_affine(he_points[inliers], dapi_points[inliers])
        corners = np.array([[0, 0], [he.shape[1], 0], [0, he.shape[0]], [he.shape[1], he.shape[0]]], np.float64)
        change = np.abs(_apply(refined, corners) - _apply(affine, corners)).max()
        affine = refined
        n_inliers = int(inliers.sum())
        misfit = _apply(refined, he_points[inliers]) - dapi_points[inliers]
        residual = float(np.sqrt(np.mean(np.sum(misfit**2, axis=1))))
        details["refinements"] += 1
        if change < CONVERGED_PX:
            break
    return affine, residual, n_inliers, details


def register_he_to_dapi(
    he: np.ndarray,
    dapi: np.ndarray,
    *,
    coarse_max_side: int = COARSE_MAX_SIDE,
    fine_max_side: int = FINE_MAX_SIDE,
    seed: int = 0,
) -> Registration:
    """Register an H&E to a DAPI (morphology) image: SIFT + RANSAC coarse, phase-correlation refinement.

    Parameters
    ----------
    he
        RGB ``(y, x, 3)`` H&E.
    dapi
        ``(y, x)`` fluorescence image (nuclei bright).
    coarse_max_side
        Longest side of the images the SIFT match runs on.
    fine_max_side
        Longest side of the images the refinement runs on (full resolution when smaller).
    seed
        Seed of RANSAC's random samples.

    Returns
    -------
    The affine H&E px -> DAPI px, its residual (DAPI px) and number of inliers.

    Raises
    ------
    InputError
        Images of the wrong shape, or uniform.
    HestZarrError
        Too few keypoints, matches or textured windows: the images do not show the same tissue, or barely overlap.

    Examples
    --------
    Tested on the real Xenium morphology image with a pseudo-H&E made from it (inverted and coloured) and warped by
    random affines: no paired real H&E exists in the project's test data.

    >>> dapi = tifffile.imread("xenium/morphology_focus.ome.tif")  # doctest: +SKIP
    >>> he, truth = simulate_he_from_dapi(dapi, seed=0)  # doctest: +SKIP
    >>> result = register_he_to_dapi(he, dapi)  # doctest: +SKIP
    >>> result.residual_px < 0.5, result.n_inliers  # doctest: +SKIP
    (True, 64)

    """
    he_channel, dapi_channel = he_nuclei_channel(he), fluorescence_channel(dapi)
    he_coarse, dapi_coarse = (
        _halvings(he_channel.shape, coarse_max_side),
        _halvings(dapi_channel.shape, coarse_max_side),
    )
    coarse, details = _coarse_affine(_halve(he_channel, he_coarse), _halve(dapi_channel, dapi_coarse), seed)
    he_fine, dapi_fine = _halvings(he_channel.shape, fine_max_side), _halvings(dapi_channel.shape, fine_max_side)
    # coarse he px -> fine he px, and coarse dapi px -> fine dapi px
    to_fine = _scale(2.0 ** (dapi_coarse - dapi_fine)) @ coarse @ np.linalg.inv(_scale(2.0 ** (he_coarse - he_fine)))
    fine, residual, n_inliers, refinement = _refine(
        _halve(he_channel, he_fine), _halve(dapi_channel, dapi_fine), to_fine, seed
    )
    affine = _scale(2.0**dapi_fine) @ fine @ np.linalg.inv(_scale(2.0**he_fine))
    return Registration(
        affine=affine,
        residual_px=residual * 2.0**dapi_fine,
        n_inliers=n_inliers,
        method="sift-ransac coarse + phase-correlation windows refined",
        parameters={
            **details,
            **refinement,
            "coarse_halvings": {"he": he_coarse, "dapi": dapi_coarse},
            "fine_halvings": {"he": he_fine, "dapi": dapi_fine},
            "seed": seed,
        },
    )


# --------------------------------------------------------------------------------------------- validation
def simulate_he_from_dapi(dapi: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Make a pseudo-H&E from a DAPI image, placed by a random affine, to validate registration against a truth.

    No paired real H&E exists in the project's test data, so the real DAPI image stands in for the tissue: its
    nuclei (scaled to the 1st-99.5th percentiles, blurred by 1 px, gamma 0.7) are coloured haematoxylin purple over
    an eosin pink with smooth stromal texture, then warped by a random affine (rotation -180 to 180 degrees, scale
    0.8-1.2 with up to 3 % anisotropy, shear up to 0.05 rad, translation up to 20 px) onto a canvas with a 10 px
    glass margin, and Gaussian noise (sd 6 grey levels) is added.

    Parameters
    ----------
    dapi
        ``(y, x)`` fluorescence image.
    seed
        Seed of the random affine, texture and noise.

    Returns
    -------
    The RGB ``(y, x, 3)`` uint8 pseudo-H&E and the true 3x3 affine from its pixels to the DAPI's pixels.

    Examples
    --------
    >>> dapi = np.zeros((64, 64), np.uint16)
    >>> dapi[20:30, 20:30] = 1000
    >>> he, truth = simulate_he_from_dapi(dapi, seed=1)
    >>> he.dtype.name, truth.shape
    ('uint8', (3, 3))

    """
    rng = np.random.default_rng(seed)
    nuclei = ndi.gaussian_filter(fluorescence_channel(dapi), 1.0) ** 0.7
    stroma = ndi.gaussian_filter(rng.random(nuclei.shape), 4)
    stroma = (stroma - stroma.min()) / max(float(np.ptp(stroma)), 1e-9)
    eosin = np.array([235.0, 150, 190]) * (1 - 0.15 * stroma[..., None]) + 255 * 0.15 * stroma[..., None]
    rgb = eosin * (1 - nuclei[..., None]) + np.array([70.0, 40, 130]) * nuclei[..., None]
    scale = rng.uniform(0.8, 1.2)
    he_to_dapi = transform.AffineTransform(
        scale=(scale, scale * rng.uniform(0.97, 1.03)),
        rotation=rng.uniform(-np.pi, np.pi),
        shear=rng.uniform(-0.05, 0.05),
        translation=rng.uniform(-20, 20, 2),
    ).params
    height, width = nuclei.shape
    corners = np.array([[0, 0], [width, 0], [0, height], [width, height]], np.float64)
    on_he = _apply(np.linalg.inv(he_to_dapi), corners)
    low, high = on_he.min(axis=0) - 10, on_he.max(axis=0) + 10
    he_to_dapi = he_to_dapi @ np.array([[1, 0, low[0]], [0, 1, low[1]], [0, 0, 1]])
    size = np.ceil(high - low).astype(int)
    channels = [_warp(rgb[..., k], np.linalg.inv(he_to_dapi), (size[1], size[0]), fill=245.0) for k in range(3)]
    he = np.stack(channels, axis=-1) + rng.normal(0, 6, (size[1], size[0], 3))
    return np.clip(he, 0, 255).astype(np.uint8), he_to_dapi


# --------------------------------------------------------------------------------------------- sample
def _xenium_frame_elements(sdata: SpatialData, record: StoreRecord) -> list[str]:
    """Elements the Xenium converter placed through the H&E alignment (all but the H&E and the tables)."""
    return [
        name
        for name, element_record in record.elements.items()
        if element_record.provenance.converter == "xenium"
        and element_record.kind in ("images", "labels", "points", "shapes")
        and name != Elements.HE
        and name in sdata
    ]


def _replaced_frames(
    sdata: SpatialData, record: StoreRecord, result: Registration, he_to_global: np.ndarray
) -> ElementUpdate:
    """Re-place the Xenium elements by ``result`` (H&E level-0 px -> DAPI level-0 px), on shallow copies.

    The correction maps ``global`` as the store places the DAPI to ``global`` as the registration places it; every
    element keeps its own coordinates and gets the corrected transformation, and a provenance naming the
    registration with its residual in micrometres (DAPI pixels times the DAPI's pixel size).
    """
    dapi_to_global = affine_xy(sdata.images[Elements.DAPI])
    correction = he_to_global @ np.linalg.inv(result.affine) @ np.linalg.inv(dapi_to_global)
    pixel_size_um = record.pixel_size_um or 1.0
    dapi_pixel_um = float(np.sqrt(abs(np.linalg.det(dapi_to_global[:2, :2])))) * pixel_size_um
    elements: dict[str, Any] = {}
    provenance: dict[str, Provenance] = {}
    for name in _xenium_frame_elements(sdata, record):
        element = sdata[name].copy(deep=False)  # the data are shared; the caller's element keeps its transformations
        to_global = Affine(correction @ affine_xy(element), input_axes=("x", "y"), output_axes=("x", "y"))
        set_transformation(element, frame_transformations(pixel_size_um, to_global), set_all=True)
        old = record.elements[name].provenance
        elements[name] = element
        provenance[name] = Provenance.model_validate(
            {
                **old.model_dump(exclude={"hest_zarr_version"}),
                "method": f"ops.register: {result.method}",
                "parameters": {
                    **old.parameters,
                    "registration": {
                        "he_to_dapi_px": result.affine.tolist(),
                        "residual_px": result.residual_px,
                        "n_inliers": result.n_inliers,
                        "replaced_method": old.method,
                        **result.parameters,
                    },
                },
                "estimated_error_um": result.residual_px * dapi_pixel_um,
            }
        )
    return ElementUpdate(elements, provenance, replace=True, anchored=frozenset())  # converters' inputs kept


def register_sample(
    sdata: SpatialData,
    *,
    force: bool = False,
    coarse_max_side: int = COARSE_MAX_SIDE,
    fine_max_side: int = FINE_MAX_SIDE,
    seed: int = 0,
    source: str = "sample",
) -> Registration:
    """Register a Xenium sample's H&E to its DAPI image and re-place the Xenium elements on the H&E.

    A sample whose alignment came from a file (Xenium Explorer matrix or keypoints, see the provenance of ``dapi``)
    keeps it unless ``force``: the returned registration is then that alignment, with no update. Otherwise the H&E
    and DAPI levels whose longest side is at most ``fine_max_side`` are registered (:func:`register_he_to_dapi`), and
    the update replaces every element the Xenium converter placed (``dapi``, ``transcripts``, ``cells``, ``nuclei``,
    label rasters) by a copy with its transformation corrected, its provenance naming the registration and its
    residual (``estimated_error_um``). ``global`` stays the H&E's pixels and the pixel size is kept; ``sdata`` is not
    changed.

    Parameters
    ----------
    sdata
        A Xenium sample holding ``he`` and ``dapi`` and carrying its record (e.g. :func:`hest_zarr.open` of a store).
    force
        Register even when an alignment file placed the H&E.
    coarse_max_side, fine_max_side, seed
        See :func:`register_he_to_dapi`.
    source
        Name of the sample for error messages.

    Returns
    -------
    The registration, H&E level-0 pixels -> DAPI level-0 pixels; its ``update`` (``None`` when a file's alignment
    is kept) holds the re-placed elements. Their provenance keeps the converter's ``inputs`` (source files).

    Raises
    ------
    InputError
        The sample lacks ``he`` or ``dapi``.
    HestZarrError
        The registration failed (too few matches).

    Examples
    --------
    >>> registration = register_sample(hest_zarr.open("xenium.zarr"), force=True)  # doctest: +SKIP
    >>> sorted(result.update.elements)  # doctest: +SKIP
    ['cells', 'dapi', 'nuclei', 'transcripts']

    """
    record = get_record(sdata)
    missing = [name for name in (Elements.HE, Elements.DAPI) if name not in sdata.images]
    if missing:
        raise InputError(f"{source}: no {missing} image(s) to register (found images {sorted(sdata.images)})")
    he_element, dapi_element = sdata.images[Elements.HE], sdata.images[Elements.DAPI]
    he_to_global = affine_xy(he_element)
    current = np.linalg.inv(affine_xy(dapi_element)) @ he_to_global  # H&E px -> DAPI px as the sample places them
    dapi_provenance = record.elements[Elements.DAPI].provenance
    if dapi_provenance.method in FILE_ALIGNMENT_METHODS and not force:
        return Registration(
            affine=current,
            residual_px=float("nan"),
            n_inliers=int(dapi_provenance.parameters.get("n_keypoints", 0)),
            method=f"kept: {dapi_provenance.method}",
            parameters={"alignment_file": dapi_provenance.parameters.get("alignment_file")},
        )

    he_level, he_pixels = load_level(he_element, fine_max_side)
    dapi_level, dapi_pixels = load_level(dapi_element, fine_max_side)
    found = register_he_to_dapi(
        np.moveaxis(he_pixels, 0, -1),
        dapi_pixels[0],
        coarse_max_side=coarse_max_side,
        fine_max_side=fine_max_side,
        seed=seed,
    )
    result = Registration(
        affine=_scale(2.0**dapi_level) @ found.affine @ np.linalg.inv(_scale(2.0**he_level)),
        residual_px=found.residual_px * 2.0**dapi_level,
        n_inliers=found.n_inliers,
        method=found.method,
        parameters={**found.parameters, "levels": {"he": he_level, "dapi": dapi_level}},
    )
    return replace(result, update=_replaced_frames(sdata, record, result, he_to_global))
