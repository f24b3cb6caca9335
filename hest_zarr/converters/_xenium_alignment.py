"""Where Xenium micrometres land in the store: the H&E alignment (Xenium Explorer matrix or keypoints) and the frame.

Without an H&E, ``global`` is the morphology image's pixels; with one, the H&E's pixels, through the alignment
read by :func:`read_alignment` (H&E pixels -> Xenium micrometres). :class:`XeniumFrame` gives every element in
micrometres, and the morphology image, its transformations to ``global`` and ``um``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from spatialdata.transformations import Affine, BaseTransformation, Identity, Scale

from hest_zarr.converters._xenium_inputs import DEFAULT_PIXEL_SIZE_UM
from hest_zarr.elements import CoordinateSystems, frame_transformations
from hest_zarr.errors import InputError

KEYPOINT_COLUMNS = ("fixedX", "fixedY", "alignmentX", "alignmentY")


# --------------------------------------------------------------------------------------------- alignment
@dataclass(frozen=True)
class XeniumAlignment:
    """An H&E's placement on a Xenium slide.

    Attributes
    ----------
    he_to_um
        3x3 affine matrix from H&E pixels ``(x, y, 1)`` to Xenium micrometres.
    method
        ``"xenium_explorer_matrix"`` or ``"keypoints_least_squares_affine"``.
    source
        Path of the alignment file.
    estimated_error_um
        Root-mean-square residual of the keypoints under the fitted affine, ``None`` for a matrix.
    n_keypoints
        Number of keypoints fitted, ``None`` for a matrix.

    Examples
    --------
    >>> XeniumAlignment(np.diag([0.5, 0.5, 1.0]), "xenium_explorer_matrix", "he_alignment.csv").he_pixel_size_um
    0.5

    """

    he_to_um: np.ndarray
    method: str
    source: str
    estimated_error_um: float | None = None
    n_keypoints: int | None = None

    @property
    def he_pixel_size_um(self) -> float:
        """Micrometres per H&E pixel: the scale of :attr:`he_to_um`."""
        return float(np.sqrt(abs(np.linalg.det(self.he_to_um[:2, :2]))))

    def provenance(self) -> dict[str, Any]:
        """Parameters recorded in the provenance of every element the alignment places."""
        entries: dict[str, Any] = {"alignment_file": self.source, "he_to_um": self.he_to_um.tolist()}
        if self.n_keypoints is not None:
            entries["n_keypoints"] = self.n_keypoints
        return entries


def read_alignment(path: str | Path, *, xenium_pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM) -> XeniumAlignment:
    """Read an H&E alignment: Xenium Explorer's 3x3 matrix CSV, or a keypoints CSV.

    Parameters
    ----------
    path
        The CSV. A header naming ``fixedX, fixedY, alignmentX, alignmentY`` marks a keypoints file; anything else
        must be a headerless 3x3 matrix mapping H&E pixels to Xenium morphology pixels (last row ``0, 0, 1``).
    xenium_pixel_size_um
        Micrometres per Xenium morphology pixel (``experiment.xenium``), to bring the matrix to micrometres.

    Returns
    -------
    The alignment, H&E pixels -> Xenium micrometres.

    Raises
    ------
    InputError
        Missing file, a matrix that is not 3x3 affine or not invertible, keypoints with missing columns or
        values, fewer than 3 keypoints, or keypoints on one line.

    Examples
    --------
    >>> read_alignment("he_alignment.csv").he_pixel_size_um  # doctest: +SKIP
    0.2738

    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such alignment file (expected a 3x3 matrix CSV or a keypoints CSV)")
    try:
        with path.open() as handle:
            header = handle.readline()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the alignment file ({err})") from err
    if "fixedx" in header.lower():
        return _fit_keypoints(path)
    return _read_matrix(path, xenium_pixel_size_um)


def _read_matrix(path: Path, xenium_pixel_size_um: float) -> XeniumAlignment:
    try:
        matrix = np.loadtxt(path, delimiter=",", ndmin=2)
    except ValueError as err:
        raise InputError(f"{path}: expected a 3x3 matrix of numbers (comma-separated), found text ({err})") from err
    if matrix.shape != (3, 3):
        raise InputError(f"{path}: expected a 3x3 alignment matrix, found shape {matrix.shape}")
    if not np.allclose(matrix[2], [0, 0, 1]):
        raise InputError(f"{path}: expected an affine matrix with last row 0,0,1, found {matrix[2].tolist()}")
    if abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        raise InputError(f"{path}: the alignment matrix is not invertible (determinant 0)")
    to_um = np.diag([xenium_pixel_size_um, xenium_pixel_size_um, 1.0]) @ matrix
    return XeniumAlignment(he_to_um=to_um, method="xenium_explorer_matrix", source=str(path))


def _fit_keypoints(path: Path) -> XeniumAlignment:
    try:
        keypoints = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: cannot read keypoints ({err})") from err
    missing = [c for c in KEYPOINT_COLUMNS if c not in keypoints.columns]
    if missing:
        raise InputError(f"{path}: missing keypoint column(s) {missing}; found {list(keypoints.columns)}")
    values = keypoints[list(KEYPOINT_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        raise InputError(f"{path}: {int(np.isnan(values).any(axis=1).sum())} keypoint row(s) with missing values")
    if len(values) < 3:
        raise InputError(f"{path}: found {len(values)} keypoints, need at least 3 to fit an affine transformation")
    fixed_um, he_px = values[:, :2], values[:, 2:]
    # Ordinary least squares on centred coordinates (better conditioned than with a column of ones).
    he_mean, fixed_mean = he_px.mean(axis=0), fixed_um.mean(axis=0)
    linear, _, rank, _ = np.linalg.lstsq(he_px - he_mean, fixed_um - fixed_mean, rcond=None)
    if rank < 2:
        raise InputError(f"{path}: the {len(values)} H&E keypoints lie on one line; an affine needs 3 not collinear")
    he_to_um = np.eye(3)
    he_to_um[:2, :2] = linear.T
    he_to_um[:2, 2] = fixed_mean - he_mean @ linear
    residuals = fixed_um - (he_px @ linear + he_to_um[:2, 2])
    error = float(np.sqrt(np.mean(np.sum(residuals**2, axis=1))))
    return XeniumAlignment(
        he_to_um=he_to_um,
        method="keypoints_least_squares_affine",
        source=str(path),
        estimated_error_um=error,
        n_keypoints=len(values),
    )


# --------------------------------------------------------------------------------------------- frames
def _as_transformation(matrix: np.ndarray) -> BaseTransformation:
    """Return a 3x3 affine as the simplest spatialdata transformation that equals it."""
    if np.allclose(matrix, np.eye(3), rtol=0, atol=1e-12):
        return Identity()
    if matrix[0, 1] == matrix[1, 0] == matrix[0, 2] == matrix[1, 2] == 0:
        return Scale([matrix[0, 0], matrix[1, 1]], axes=("x", "y"))
    return Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))


@dataclass(frozen=True)
class XeniumFrame:
    """Where Xenium micrometres land in the store.

    Attributes
    ----------
    pixel_size_um
        Micrometres per ``global`` pixel (the morphology pixel, or the H&E pixel when aligned).
    um_to_global
        3x3 affine matrix from Xenium micrometres to ``global`` pixels.
    morphology_pixel_size_um
        Micrometres per morphology-image pixel.

    Examples
    --------
    >>> frame = XeniumFrame.morphology(0.2125)
    >>> sorted(frame.micrometre_transformations()), frame.to_global(np.array([[0.2125, 0.425]])).tolist()
    (['global', 'um'], [[1.0, 2.0]])

    """

    pixel_size_um: float
    um_to_global: np.ndarray
    morphology_pixel_size_um: float

    @classmethod
    def morphology(cls, pixel_size_um: float) -> XeniumFrame:
        """``global`` = the morphology image's pixels."""
        return cls(pixel_size_um, np.diag([1 / pixel_size_um, 1 / pixel_size_um, 1.0]), pixel_size_um)

    @classmethod
    def aligned(cls, alignment: XeniumAlignment, morphology_pixel_size_um: float) -> XeniumFrame:
        """``global`` = the H&E's pixels."""
        return cls(alignment.he_pixel_size_um, np.linalg.inv(alignment.he_to_um), morphology_pixel_size_um)

    def micrometre_transformations(self) -> dict[str, BaseTransformation]:
        """Return the transformations of an element in Xenium micrometres (molecules, cells, nuclei)."""
        to_global = _as_transformation(self.um_to_global)
        um_of_global = np.diag([self.pixel_size_um, self.pixel_size_um, 1.0]) @ self.um_to_global
        if np.allclose(um_of_global, np.eye(3), rtol=0, atol=1e-12):
            return {CoordinateSystems.GLOBAL: to_global, CoordinateSystems.UM: Identity()}
        return frame_transformations(self.pixel_size_um, to_global)

    def morphology_transformations(self) -> dict[str, BaseTransformation]:
        """Return the transformations of the morphology (DAPI) image, pixels of ``morphology_pixel_size_um``."""
        size = self.morphology_pixel_size_um
        return frame_transformations(
            self.pixel_size_um, _as_transformation(self.um_to_global @ np.diag([size, size, 1.0]))
        )

    def to_global(self, xy_um: np.ndarray) -> np.ndarray:
        """Map ``(n, 2)`` micrometre coordinates to ``global`` pixels."""
        return xy_um @ self.um_to_global[:2, :2].T + self.um_to_global[:2, 2]
