"""Pixel size from the spot lattice: a robust least-squares fit of array positions (um) to spot centres (px).

Every spot technology prints its spots on a lattice of known pitch, so the spot centres measured in an image
give its pixel size independently of any file metadata. The lattices (Visium rows 87 um apart on 6.5 mm capture
areas, 86.5 um on 11 mm ones; ST v1 arrays, :data:`hest_zarr.elements.lattice.UM_PER_ARRAY_UNIT`; Visium HD bins)
and the trimmed least-squares fit live in :mod:`hest_zarr.elements.lattice`, which the converters use too; their public
names are re-exported here.

:func:`check_pixel_size` runs the fit on a sample (a SpatialData object) and compares the estimate with the pixel
size embedded in the image file and with the one the sample uses (``pixel_size_um`` of its record; the Visium
converter's is already this lattice fit, so the two agree on its samples). The estimate becomes
``pixel_size_um_estimated`` (the embedded value stays in ``pixel_size_um_embedded``); a relative disagreement above
5 % raises a :class:`PixelSizeDisagreementWarning` and is recorded, with the whole comparison, in the spots element's
provenance (``parameters['pixel_size_check']``). The sample keeps its ``pixel_size_um``: changing it would change
every element's ``um`` transformation. :func:`hest_zarr.workflows.pixel_size.estimate_pixel_size` does it on a
store and records the result there.

Measured (``benchmarks/tissue_and_registration.py``): on the scanpy (Space Ranger 1.0) and SFE (2.x) samples the
lattice agrees with 65 um / ``spot_diameter_fullres`` within 0.07 %; on the Space Ranger 3.0 CytAssist sample
(perik) it differs by +7.7 % (= 70/65: that sample's ``spot_diameter_fullres`` spans 70 um). On all three,
``fiducial_diameter_fullres`` measured with the lattice's pixel size is the 105 um fiducial of the slide
layouts within 0.07 %.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from geopandas import GeoDataFrame
from spatialdata import SpatialData

from hest_zarr.elements import Elements, ElementUpdate, Keys, affine_xy, get_record
from hest_zarr.elements.lattice import (
    DISAGREEMENT_TOLERANCE,
    UM_PER_ARRAY_UNIT,
    VISIUM_INTER_SPOT_DISTANCE_UM,
    PixelSizeDisagreementWarning,
    PixelSizeEstimate,
    fit_pixel_size,
    square_lattice_um,
    visium_lattice_name,
    visium_lattice_um,
    visium_row_pitch_um,
)
from hest_zarr.errors import InputError
from hest_zarr.schemas import Provenance, annotated_region

__all__ = [
    "DISAGREEMENT_TOLERANCE",
    "PixelSizeDisagreementWarning",
    "PixelSizeEstimate",
    "PixelSizeReport",
    "check_pixel_size",
    "fit_pixel_size",
    "spot_centres_global",
    "square_lattice_um",
    "visium_lattice_um",
    "visium_row_pitch_um",
]


# --------------------------------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class PixelSizeReport:
    """The estimate of a sample's pixel size and its comparison with the reference values.

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
    update
        What recording the report changes (:func:`check_pixel_size`): ``pixel_size_um_estimated`` and the spots'
        provenance, no element data.

    """

    estimate: PixelSizeEstimate
    spots: str
    references: dict[str, float] = field(default_factory=dict)
    tolerance: float = DISAGREEMENT_TOLERANCE
    update: ElementUpdate | None = None

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


# --------------------------------------------------------------------------------------------- sample
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
    matrix = affine_xy(spots)
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def _sample_lattice(sdata: SpatialData, spots: str) -> tuple[np.ndarray, np.ndarray, float, str]:
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
        lattice = visium_lattice_name(rows, cols)
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


def check_pixel_size(
    sdata: SpatialData,
    *,
    spots: str | None = None,
    tolerance: float = DISAGREEMENT_TOLERANCE,
    where: str = "sample",
) -> PixelSizeReport:
    """Estimate a sample's pixel size from its spot lattice and compare it with the known values.

    Nothing is read from or written to a store. The report's :attr:`~PixelSizeReport.update` records the result
    without touching any element's data: ``pixel_size_um_estimated`` in the metadata (the magnification bucket
    follows it when written) and the comparison in the spots element's provenance
    (``parameters['pixel_size_check']``).

    Parameters
    ----------
    sdata
        A sample with its record (:func:`hest_zarr.open`, a converter's output).
    spots
        Spots element to fit (default: ``spots``, else the spot set with the fewest spots).
    tolerance
        Relative disagreement above which the result is flagged (default 5 %).
    where
        How messages name the sample (the workflow passes the store's URL).

    Returns
    -------
    The estimate, its comparison with the embedded and the sample's pixel sizes, and the record-only update.

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
    >>> report = check_pixel_size(hest_zarr.open("perik.zarr"))  # doctest: +SKIP
    >>> round(report.estimate.pixel_size_um, 4), report.flagged  # doctest: +SKIP
    (4.6776, True)

    """
    record = get_record(sdata)
    try:
        spots = spots or _default_spots(sdata)
        if spots not in sdata.shapes:
            raise InputError(f"no shapes element '{spots}' (found {sorted(sdata.shapes)})")
        centres, lattice_um, pitch, lattice = _sample_lattice(sdata, spots)
    except InputError as err:
        raise InputError(f"{where}: {err}") from err
    estimate = fit_pixel_size(centres, lattice_um, pitch_um=pitch, lattice=lattice, source=f"{where}: {spots}")
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
            f"{where}: the spot lattice gives {estimate.pixel_size_um:.4g} um/px, which disagrees with {disagreeing} "
            f"by more than {tolerance:.0%}",
            PixelSizeDisagreementWarning,
            stacklevel=2,
        )
    provenance = record.elements[spots].provenance
    parameters = {**provenance.parameters, "pixel_size_check": report.summary()}
    update = ElementUpdate(  # the record only: the spots' data stays as it is
        {},
        {spots: Provenance.model_validate({**provenance.model_dump(), "parameters": parameters})},
        metadata_updates={"pixel_size_um_estimated": estimate.pixel_size_um},
        anchored=frozenset(),  # the spots' own provenance, with its source files
    )
    return replace(report, update=update)
