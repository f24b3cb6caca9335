"""Pixel size from the spot lattice: a robust least-squares fit of array positions (um) to spot centres (px).

Every spot technology prints its spots on a lattice of known pitch, so the spot centres measured in an image
give its pixel size independently of any file metadata:

- Visium: hexagonal ("orange crate") lattice, 100 um centre to centre along rows. ``array_col`` steps by 2
  between neighbours of one row (50 um per unit) and ``array_row`` by 1 between rows, 87 um apart on 6.5 mm
  capture areas and 86.5 um on 11 mm ones (the slide layouts of Loupe's templates; not ``50 * sqrt(3)``: with
  86.6 um every Space Ranger sample fits 0.46 % anisotropic).
- ST v1: the 1k array is a square grid of 200 um; the 2k array puts a spot in the middle of every square, so one
  array unit is 100 um (:data:`hest_zarr.converters.st_v1.UM_PER_ARRAY_UNIT`, recorded by the converter).
- Visium HD: square bins; one array unit is the bin size.

The affine map lattice (um) -> pixels is fitted by least squares (:func:`hest_zarr.converters.legacy.fit_lattice`,
the fit the ST v1 converter uses), trimmed iteratively: spots farther from the fit than 3 robust standard
deviations (1.4826 x the median absolute residual) are left out and the fit is repeated until the inliers settle.
The pixel size is the square root of the fitted pixel area; its uncertainty is the delta-method standard error
from the residual variance.

:func:`estimate_pixel_size` runs this on a store and compares the estimate with the pixel size embedded in the
image file and with the one the store uses (``pixel_size_um`` of its record: Visium's is 65 um over Space
Ranger's ``spot_diameter_fullres``). The estimate becomes ``pixel_size_um_estimated`` (the embedded value stays in
``pixel_size_um_embedded``); a relative disagreement above 5 % raises a :class:`PixelSizeDisagreementWarning`
and is recorded, with the whole comparison, in the spots element's provenance (``parameters['pixel_size_check']``).
The store keeps its ``pixel_size_um``: changing it would change every element's ``um`` transformation.

Measured (``benchmarks/tissue_and_registration.py``): on the scanpy (Space Ranger 1.0) and SFE (2.x) samples the
lattice agrees with 65 um / ``spot_diameter_fullres`` within 0.07 %; on the Space Ranger 3.0 CytAssist sample
(perik) it differs by +7.7 % (= 70/65: that sample's ``spot_diameter_fullres`` spans 70 um). On all three,
``fiducial_diameter_fullres`` measured with the lattice's pixel size is the 105 um fiducial of the slide
layouts within 0.07 %.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from geopandas import GeoDataFrame
from scipy.spatial import cKDTree
from spatialdata import SpatialData
from spatialdata.transformations import get_transformation

from hest_zarr._constants import CoordinateSystems, Elements, Keys
from hest_zarr.converters.legacy import LatticeFit, fit_lattice
from hest_zarr.converters.st_v1 import UM_PER_ARRAY_UNIT
from hest_zarr.converters.visium import VISIUM_INTER_SPOT_DISTANCE_UM
from hest_zarr.errors import InputError
from hest_zarr.schemas import Provenance, annotated_region, magnification_from_pixel_size
from hest_zarr.store import StorageOptions, add_elements, get_record
from hest_zarr.store import open as open_store

#: Relative disagreement between the estimate and a reference pixel size above which the store is flagged.
DISAGREEMENT_TOLERANCE = 0.05
#: Spots farther from the fit than this many robust standard deviations are outliers.
OUTLIER_SIGMAS = 3.0
#: Outlier threshold floor, as a fraction of the lattice pitch in pixels (exact lattices have ~0 residuals).
OUTLIER_FLOOR_PITCH_FRACTION = 0.02
MAX_TRIM_ITERATIONS = 10
#: Row pitch of the Visium slide layouts (Loupe templates), and the rows x columns of a 6.5 mm capture area.
VISIUM_6_5MM_ROW_PITCH_UM = 87.0
VISIUM_11MM_ROW_PITCH_UM = 86.5
VISIUM_6_5MM_SHAPE = (78, 128)
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


def square_lattice_um(array_row: np.ndarray, array_col: np.ndarray, pitch_um: float) -> np.ndarray:
    """Return lattice positions ``(x, y)`` in micrometres of a square grid (ST v1 ids, Visium HD bins).

    Examples
    --------
    >>> square_lattice_um(np.array([3]), np.array([2]), 8.0).tolist()
    [[16.0, 24.0]]

    """
    return np.c_[np.asarray(array_col, np.float64), np.asarray(array_row, np.float64)] * pitch_um


# --------------------------------------------------------------------------------------------- fit
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


# --------------------------------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class PixelSizeReport:
    """The estimate of a store's pixel size and its comparison with the reference values.

    Attributes
    ----------
    estimate
        The lattice fit.
    spots
        The spots element it was fitted on.
    references
        Reference pixel sizes by name: ``"embedded"`` (read from the image file) and ``"store"`` (the store's
        ``global`` -> ``um`` scale), where known.
    tolerance
        Relative disagreement above which the report is flagged.

    """

    estimate: PixelSizeEstimate
    spots: str
    references: dict[str, float] = field(default_factory=dict)
    tolerance: float = DISAGREEMENT_TOLERANCE

    @property
    def differences(self) -> dict[str, float]:
        """Relative difference ``estimate / reference - 1`` for every reference."""
        return {name: self.estimate.pixel_size_um / value - 1 for name, value in self.references.items()}

    @property
    def flagged(self) -> bool:
        """Whether any reference disagrees with the estimate by more than the tolerance."""
        return any(abs(difference) > self.tolerance for difference in self.differences.values())

    def summary(self) -> dict[str, Any]:
        """Return the report as plain values (recorded in the provenance, printed by the CLI)."""
        return {
            "estimated_um": self.estimate.pixel_size_um,
            "uncertainty_um": self.estimate.uncertainty_um,
            "spots": self.spots,
            **{f"{name}_um": value for name, value in self.references.items()},
            **{f"difference_vs_{name}": value for name, value in self.differences.items()},
            "tolerance": self.tolerance,
            "disagreement": self.flagged,
            "fit": self.estimate.parameters(),
        }


# --------------------------------------------------------------------------------------------- store
def _default_spots(sdata: SpatialData) -> str:
    """``spots`` when present, else the spot set with the fewest spots (Visium HD: the coarsest bins)."""
    if Elements.SPOTS in sdata.shapes:
        return Elements.SPOTS
    candidates = [name for name in sdata.shapes if name.startswith(Elements.SPOTS + "_")]
    if not candidates:
        raise InputError(f"no spots element (found shapes {sorted(sdata.shapes)}); a pixel size needs a spot lattice")
    return min(candidates, key=lambda name: len(sdata.shapes[name]))


def _spot_table(sdata: SpatialData, spots: str) -> pd.DataFrame:
    for name, table in sdata.tables.items():
        if annotated_region(name) == spots:
            return table.obs.set_index(Keys.SPOT_ID, drop=False)
    raise InputError(f"no table annotates '{spots}'; its array_row/array_col are needed for the lattice")


def spot_centres_global(spots: GeoDataFrame) -> np.ndarray:
    """Return the centres ``(x, y)`` of a spots element (circles or squares) in ``global`` pixels.

    Examples
    --------
    >>> centres = spot_centres_global(sdata["spots"])  # doctest: +SKIP

    """
    geometry = spots.geometry
    points = geometry if (geometry.geom_type == "Point").all() else geometry.centroid
    xy = np.c_[points.x.to_numpy(), points.y.to_numpy()]
    matrix = get_transformation(spots, CoordinateSystems.GLOBAL).to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def _store_lattice(sdata: SpatialData, spots: str) -> tuple[np.ndarray, np.ndarray, float, str]:
    """Spot centres (global px), their lattice positions (um), the lattice pitch (um) and the lattice's name."""
    record = get_record(sdata)
    obs = _spot_table(sdata, spots)
    element = sdata.shapes[spots]
    missing = [c for c in (Keys.ARRAY_ROW, Keys.ARRAY_COL) if c not in obs.columns]
    if missing:
        raise InputError(f"the table annotating '{spots}' has no {missing} column(s); the lattice is unknown")
    obs = obs.reindex(element.index.astype(str))
    if obs[Keys.SPOT_ID].isna().any():
        raise InputError(f"{int(obs[Keys.SPOT_ID].isna().sum())} spot(s) of '{spots}' have no row in their table")
    rows, cols = obs[Keys.ARRAY_ROW].to_numpy(np.float64), obs[Keys.ARRAY_COL].to_numpy(np.float64)
    technology = record.metadata.st_technology
    parameters = record.elements[spots].provenance.parameters if spots in record.elements else {}
    if technology == "Visium":
        lattice_um, pitch = visium_lattice_um(rows, cols), VISIUM_INTER_SPOT_DISTANCE_UM
        row_pitch = visium_row_pitch_um(rows, cols)
        lattice = f"Visium ({VISIUM_INTER_SPOT_DISTANCE_UM:g} um along rows, rows {row_pitch:g} um apart)"
    elif technology == "Visium HD":
        if "bin_size_um" not in parameters:
            raise InputError(f"'{spots}' records no bin_size_um in its provenance; the bin pitch is unknown")
        pitch = float(parameters["bin_size_um"])
        lattice_um = square_lattice_um(rows, cols, pitch)
        lattice = f"Visium HD square bins, {pitch:g} um pitch"
    elif technology == "Spatial Transcriptomics":
        design = parameters.get("array_design", "1k")
        pitch = float(parameters.get("um_per_array_unit", UM_PER_ARRAY_UNIT[design]))
        lattice_um = square_lattice_um(rows, cols, pitch)
        lattice = f"ST {design} array, {pitch:g} um per array unit"
    else:
        raise InputError(f"no spot lattice for {technology} samples (Visium, Visium HD and ST v1 have one)")
    return spot_centres_global(element), lattice_um, pitch, lattice


def estimate_pixel_size(
    url: str | Path,
    *,
    spots: str | None = None,
    tolerance: float = DISAGREEMENT_TOLERANCE,
    write: bool = True,
    storage_options: StorageOptions = None,
) -> PixelSizeReport:
    """Estimate a store's pixel size from its spot lattice, compare it with the known values, and record it.

    Parameters
    ----------
    url
        Store path or URL.
    spots
        Spots element to fit (default: ``spots``, else the spot set with the fewest spots).
    tolerance
        Relative disagreement above which the result is flagged (default 5 %).
    write
        Record the result: ``pixel_size_um_estimated`` (and the magnification bucket it implies) in the metadata,
        the comparison in the spots element's provenance (``parameters['pixel_size_check']``). The spots
        element is rewritten unchanged to carry it.
    storage_options
        fsspec options for a remote URL.

    Returns
    -------
    The estimate and its comparison with the embedded and the store's pixel sizes.

    Warns
    -----
    PixelSizeDisagreementWarning
        The estimate differs from a reference by more than ``tolerance``.

    Raises
    ------
    InputError
        No spots, no table with ``array_row``/``array_col`` for them, or a technology without a spot lattice.

    Examples
    --------
    >>> report = estimate_pixel_size("perik.zarr")  # doctest: +SKIP
    >>> round(report.estimate.pixel_size_um, 4), report.flagged  # doctest: +SKIP
    (4.6776, True)

    """
    sdata = open_store(url, storage_options)
    record = get_record(sdata)
    try:
        spots = spots or _default_spots(sdata)
        if spots not in sdata.shapes:
            raise InputError(f"no shapes element '{spots}' (found {sorted(sdata.shapes)})")
        centres, lattice_um, pitch, lattice = _store_lattice(sdata, spots)
    except InputError as err:
        raise InputError(f"{url}: {err}") from err
    estimate = fit_pixel_size(centres, lattice_um, pitch_um=pitch, lattice=lattice, source=f"{url}: {spots}")
    references = {
        name: value
        for name, value in (("embedded", record.metadata.pixel_size_um_embedded), ("store", record.pixel_size_um))
        if value is not None
    }
    report = PixelSizeReport(estimate=estimate, spots=spots, references=references, tolerance=tolerance)
    if report.flagged:
        disagreeing = ", ".join(
            f"{name} {references[name]:.4g} um/px ({difference:+.1%})"
            for name, difference in report.differences.items()
            if abs(difference) > tolerance
        )
        warnings.warn(
            f"{url}: the spot lattice gives {estimate.pixel_size_um:.4g} um/px, which disagrees with {disagreeing} "
            f"by more than {tolerance:.0%}",
            PixelSizeDisagreementWarning,
            stacklevel=2,
        )
    if write:
        provenance = record.elements[spots].provenance
        parameters = {**provenance.parameters, "pixel_size_check": report.summary()}
        magnification = magnification_from_pixel_size(estimate.pixel_size_um)
        add_elements(
            url,
            {spots: sdata.shapes[spots]},
            {spots: Provenance.model_validate({**provenance.model_dump(), "parameters": parameters})},
            metadata_updates={"pixel_size_um_estimated": estimate.pixel_size_um, "magnification": magnification},
            replace=True,
            storage_options=storage_options,
        )
    return report
