"""Spot lattices and the pixel size they imply, shared by the converters and :mod:`hest_zarr.ops.pixel_size`.

Every spot technology prints its spots on a lattice of known pitch, so spot centres measured in an image give its
pixel size independently of any file metadata:

- Visium: hexagonal ("orange crate") lattice, 100 um centre to centre along rows. ``array_col`` steps by 2
  between neighbours of one row (50 um per unit) and ``array_row`` by 1 between rows, 87 um apart on 6.5 mm
  capture areas and 86.5 um on 11 mm ones (the slide layouts of Loupe's templates; not ``50 * sqrt(3)``: with
  86.6 um every Space Ranger sample fits 0.46 % anisotropic).
- ST v1: square grid; one array unit is 200 um (1k array) or 100 um (2k array).
- Visium HD: square bins; one array unit is the bin size.

:func:`fit_lattice` fits the affine map lattice (um) -> pixels by least squares; :func:`fit_pixel_size` trims it
iteratively: spots farther from the fit than 3 robust standard deviations (1.4826 x the median absolute residual)
are left out and the fit is repeated until the inliers settle. The pixel size is the square root of the fitted
pixel area; its uncertainty is the delta-method standard error from the residual variance.

This module depends on nothing else of the package but its errors, so converters and operators can both use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from hest_zarr.errors import InputError

#: Centre-to-centre distance of neighbouring Visium spots along an array row.
VISIUM_INTER_SPOT_DISTANCE_UM = 100.0
#: Row pitch of the Visium slide layouts (Loupe templates), and the rows x columns of a 6.5 mm capture area.
VISIUM_6_5MM_ROW_PITCH_UM = 87.0
VISIUM_11MM_ROW_PITCH_UM = 86.5
VISIUM_6_5MM_SHAPE = (78, 128)
#: ST v1 arrays: centre to centre along array rows and columns, both designs (1k and 2k).
ST_GRID_PITCH_UM = 200.0
#: Micrometres per ST v1 array unit of each design (the 2k array interleaves a second grid).
UM_PER_ARRAY_UNIT: dict[str, float] = {"1k": ST_GRID_PITCH_UM, "2k": ST_GRID_PITCH_UM / 2}
#: Relative disagreement between a lattice estimate and a reference pixel size above which it is flagged.
DISAGREEMENT_TOLERANCE = 0.05
#: Spots farther from the fit than this many robust standard deviations are outliers.
OUTLIER_SIGMAS = 3.0
#: Outlier threshold floor, as a fraction of the lattice pitch in pixels (exact lattices have ~0 residuals).
OUTLIER_FLOOR_PITCH_FRACTION = 0.02
MAX_TRIM_ITERATIONS = 10
#: Median absolute deviation -> standard deviation of a normal distribution.
MAD_TO_SIGMA = 1.4826


class PixelSizeDisagreementWarning(UserWarning):
    """The pixel size estimated from the spot lattice disagrees with a reference value by more than the tolerance."""


# --------------------------------------------------------------------------------------------- lattices
def visium_row_pitch_um(array_row: np.ndarray, array_col: np.ndarray) -> float:
    """Return the distance between Visium array rows: 87 um on 6.5 mm capture areas, 86.5 um on 11 mm ones.

    The slide layouts (Loupe's templates: 4,992 spots in 78 rows x 128 columns, or 14,336 in 128 x 224) put
    rows at these integer-ish pitches rather than at ``100 * sqrt(3) / 2 = 86.6`` um. Spots beyond row 77 or
    column 127 mean an 11 mm area; any other set is taken as 6.5 mm (an 11 mm subset inside that range would be
    off by 0.3 % in the pixel size).

    Examples
    --------
    >>> visium_row_pitch_um(np.array([0, 77]), np.array([0, 127])), visium_row_pitch_um(np.array([100]), np.array([0]))
    (87.0, 86.5)

    """
    large = np.max(array_row) >= VISIUM_6_5MM_SHAPE[0] or np.max(array_col) >= VISIUM_6_5MM_SHAPE[1]
    return VISIUM_11MM_ROW_PITCH_UM if large else VISIUM_6_5MM_ROW_PITCH_UM


def visium_lattice_um(array_row: np.ndarray, array_col: np.ndarray) -> np.ndarray:
    """Return Visium spots' lattice positions ``(x, y)`` in micrometres from ``array_row``, ``array_col``.

    Neighbours of one row are 2 columns and 100 um apart; rows are :func:`visium_row_pitch_um` apart.

    Examples
    --------
    >>> visium_lattice_um(np.array([0, 1]), np.array([0, 1])).tolist()
    [[0.0, 0.0], [50.0, 87.0]]

    """
    array_row, array_col = np.asarray(array_row, np.float64), np.asarray(array_col, np.float64)
    row_pitch = visium_row_pitch_um(array_row, array_col)
    return np.c_[array_col * VISIUM_INTER_SPOT_DISTANCE_UM / 2, array_row * row_pitch]


def visium_lattice_name(array_row: np.ndarray, array_col: np.ndarray) -> str:
    """Return the description of the Visium lattice of these spots, as recorded with a fit.

    Examples
    --------
    >>> visium_lattice_name(np.array([0, 1]), np.array([0, 1]))
    'Visium (100 um along rows, rows 87 um apart)'

    """
    row_pitch = visium_row_pitch_um(np.asarray(array_row), np.asarray(array_col))
    return f"Visium ({VISIUM_INTER_SPOT_DISTANCE_UM:g} um along rows, rows {row_pitch:g} um apart)"


def square_lattice_um(array_row: np.ndarray, array_col: np.ndarray, pitch_um: float) -> np.ndarray:
    """Return lattice positions ``(x, y)`` in micrometres of a square grid (ST v1 ids, Visium HD bins).

    Examples
    --------
    >>> square_lattice_um(np.array([3]), np.array([2]), 8.0).tolist()
    [[16.0, 24.0]]

    """
    return np.c_[np.asarray(array_col, np.float64), np.asarray(array_row, np.float64)] * pitch_um


# --------------------------------------------------------------------------------------------- least squares
def spans_plane(positions_um: np.ndarray) -> bool:
    """Tell whether positions ``(n, 2)`` determine an affine map: at least 3 of them, not all on one line.

    Examples
    --------
    >>> spans_plane(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])), spans_plane(np.array([[0.0, 0.0], [1.0, 1.0]]))
    (True, False)

    """
    positions_um = np.asarray(positions_um, dtype=np.float64)
    return len(positions_um) >= 3 and bool(np.linalg.matrix_rank(np.c_[positions_um, np.ones(len(positions_um))]) == 3)


@dataclass(frozen=True)
class LatticeFit:
    """Least-squares affine map from physical spot positions (um) to image pixels, and the pixel size it implies.

    ``pixel_size_um`` is the geometric mean of the two axes' sizes (``sqrt`` of the area of one pixel);
    ``pixel_size_um_xy`` are the micrometres per pixel along the lattice's physical x and y (the array's columns
    and rows, not the image's axes: the two differ on a rotated slide); they differ from each other when the image
    was resized unevenly. Residuals are the distances between fitted and given pixel positions.
    """

    affine: np.ndarray  # (3, 2): [u, v, 1] @ affine = [x_px, y_px]
    pixel_size_um: float
    pixel_size_um_xy: tuple[float, float]
    rms_px: float
    max_px: float
    n_points: int

    def to_pixels(self, positions_um: np.ndarray) -> np.ndarray:
        """Map physical positions (um, shape ``(n, 2)``) to pixels with the fitted affine."""
        positions_um = np.asarray(positions_um, dtype=np.float64)
        return np.c_[positions_um, np.ones(len(positions_um))] @ self.affine

    def parameters(self) -> dict[str, Any]:
        """Return the fit as provenance parameters (pixel sizes in um/px, residuals in px and um)."""
        return {
            "pixel_size_um_x": self.pixel_size_um_xy[0],
            "pixel_size_um_y": self.pixel_size_um_xy[1],
            "pixel_anisotropy": max(self.pixel_size_um_xy) / min(self.pixel_size_um_xy),
            "fit_points": self.n_points,
            "fit_rms_px": self.rms_px,
            "fit_max_px": self.max_px,
            "fit_rms_um": self.rms_px * self.pixel_size_um,
            "affine_um_to_px": self.affine.tolist(),
        }


def fit_lattice(positions_um: np.ndarray, pixels: np.ndarray, source: str) -> LatticeFit:
    """Fit the affine physical (um) -> pixel map of a spot lattice by least squares.

    Parameters
    ----------
    positions_um
        Spot positions on the array in micrometres, shape ``(n, 2)`` as ``(x, y)``.
    pixels
        The same spots' image pixels ``(x, y)``.
    source
        File named in error messages.

    Raises
    ------
    InputError
        Fewer than three spots, or spots on one line (the affine is undetermined).

    Examples
    --------
    >>> grid = np.array([[0, 0], [200, 0], [0, 200], [200, 200]], dtype=float)
    >>> round(fit_lattice(grid, grid / 2 + 10, "demo").pixel_size_um, 6)
    2.0

    """
    positions_um = np.asarray(positions_um, dtype=np.float64)
    pixels = np.asarray(pixels, dtype=np.float64)
    if not spans_plane(positions_um):
        raise InputError(
            f"{source}: {len(positions_um)} spot(s) not spanning a plane; cannot fit the array -> pixel map"
        )
    design = np.c_[positions_um, np.ones(len(positions_um))]
    affine, *_ = np.linalg.lstsq(design, pixels, rcond=None)
    linear = affine[:2]  # rows: pixels per um along physical x and y
    determinant = abs(float(np.linalg.det(linear)))
    if not determinant > 1e-12 * float(np.abs(linear).max()) ** 2:
        raise InputError(f"{source}: the spots' pixel positions do not span a plane; cannot fit the array -> pixel map")
    residuals = np.hypot(*(design @ affine - pixels).T)
    return LatticeFit(
        affine=affine,
        pixel_size_um=float(1 / math.sqrt(determinant)),
        pixel_size_um_xy=(float(1 / np.linalg.norm(linear[0])), float(1 / np.linalg.norm(linear[1]))),
        rms_px=float(np.sqrt(np.mean(residuals**2))),
        max_px=float(residuals.max()),
        n_points=len(design),
    )


# --------------------------------------------------------------------------------------------- robust fit
@dataclass(frozen=True)
class PixelSizeEstimate:
    """A pixel size fitted on a spot lattice.

    Attributes
    ----------
    pixel_size_um
        Micrometres per pixel: the square root of the fitted pixel area.
    uncertainty_um
        Its standard error (delta method on the least-squares covariance).
    pixel_size_um_xy
        Sizes along the lattice's two axes (they differ when the image was resized unevenly).
    n_spots, n_outliers
        Spots given, and spots left out as farther than 3 robust standard deviations from the fit.
    residual_rms_px
        Root-mean-square distance of the inliers to the fitted lattice.
    lattice
        Which lattice was fitted (e.g. ``"ST 2k array, 100 um per array unit"``).

    """

    pixel_size_um: float
    uncertainty_um: float
    pixel_size_um_xy: tuple[float, float]
    n_spots: int
    n_outliers: int
    residual_rms_px: float
    lattice: str

    def parameters(self) -> dict[str, Any]:
        """Return the estimate as provenance parameters."""
        return {
            "pixel_size_um": self.pixel_size_um,
            "uncertainty_um": self.uncertainty_um,
            "pixel_size_um_x": self.pixel_size_um_xy[0],
            "pixel_size_um_y": self.pixel_size_um_xy[1],
            "n_spots": self.n_spots,
            "n_outliers": self.n_outliers,
            "residual_rms_px": self.residual_rms_px,
            "lattice": self.lattice,
        }


def _pixel_size_standard_error(fit: LatticeFit, design: np.ndarray, residuals: np.ndarray) -> float:
    """Delta-method standard error of ``1 / sqrt(|det L|)``, ``L`` the linear part of the fitted affine."""
    n_params = design.shape[1]
    if len(design) <= n_params:
        return float("nan")
    inverse_normal = np.linalg.inv(design.T @ design)
    inverse_transposed = np.linalg.inv(fit.affine[:2]).T
    variance = 0.0
    for output in range(2):  # x and y pixels are fitted independently, each with its own residual variance
        sigma2 = float(np.sum(residuals[:, output] ** 2) / (len(design) - n_params))
        gradient = np.r_[-0.5 * fit.pixel_size_um * inverse_transposed[:, output], 0.0]
        variance += sigma2 * float(gradient @ inverse_normal @ gradient)
    return math.sqrt(variance)


def fit_pixel_size(
    centres_px: np.ndarray,
    lattice_um: np.ndarray,
    *,
    pitch_um: float | None = None,
    lattice: str = "lattice",
    source: str = "spots",
) -> PixelSizeEstimate:
    """Fit the pixel size of spot centres on their lattice, by trimmed (robust) least squares.

    Parameters
    ----------
    centres_px
        Spot centres ``(x, y)`` in image pixels, shape ``(n, 2)``.
    lattice_um
        The same spots' lattice positions ``(x, y)`` in micrometres (:func:`visium_lattice_um`,
        :func:`square_lattice_um`).
    pitch_um
        Distance between neighbouring spots; the outlier threshold is at least 2 % of it (default: the smallest
        distance between two of the given spots).
    lattice
        Name of the lattice, recorded in the estimate.
    source
        What the spots come from, for error messages.

    Raises
    ------
    InputError
        Shapes that differ, non-finite values, or fewer than 3 spots not on one line.

    Examples
    --------
    >>> rows, cols = np.divmod(np.arange(40), 8)
    >>> lattice = square_lattice_um(rows, cols, 100.0)
    >>> round(fit_pixel_size(lattice / 0.5 + 7, lattice).pixel_size_um, 9)
    0.5

    """
    centres_px = np.asarray(centres_px, dtype=np.float64)
    lattice_um = np.asarray(lattice_um, dtype=np.float64)
    if centres_px.shape != lattice_um.shape or centres_px.ndim != 2 or centres_px.shape[1] != 2:
        raise InputError(
            f"{source}: spot centres {centres_px.shape} and lattice positions {lattice_um.shape} must both be (n, 2)"
        )
    finite = np.isfinite(centres_px).all(axis=1) & np.isfinite(lattice_um).all(axis=1)
    if not finite.all():
        raise InputError(f"{source}: {int((~finite).sum())} spot(s) with a missing position or array index")
    if pitch_um is None and len(lattice_um) > 1:
        pitch_um = float(cKDTree(lattice_um).query(lattice_um, k=2)[0][:, 1].min())
    inliers = np.ones(len(centres_px), dtype=bool)
    for _ in range(MAX_TRIM_ITERATIONS):
        fit = fit_lattice(lattice_um[inliers], centres_px[inliers], source)
        distances = np.hypot(*(fit.to_pixels(lattice_um) - centres_px).T)
        pitch_px = (pitch_um or 0.0) / fit.pixel_size_um
        sigma = MAD_TO_SIGMA * float(np.median(distances[inliers]))
        threshold = max(OUTLIER_SIGMAS * sigma, OUTLIER_FLOOR_PITCH_FRACTION * pitch_px)
        updated = distances <= threshold
        if np.array_equal(updated, inliers) or updated.sum() < 3:
            break
        inliers = updated
    fit = fit_lattice(lattice_um[inliers], centres_px[inliers], source)
    design = np.c_[lattice_um[inliers], np.ones(int(inliers.sum()))]
    residuals = design @ fit.affine - centres_px[inliers]
    return PixelSizeEstimate(
        pixel_size_um=fit.pixel_size_um,
        uncertainty_um=_pixel_size_standard_error(fit, design, residuals),
        pixel_size_um_xy=fit.pixel_size_um_xy,
        n_spots=len(centres_px),
        n_outliers=int((~inliers).sum()),
        residual_rms_px=fit.rms_px,
        lattice=lattice,
    )
