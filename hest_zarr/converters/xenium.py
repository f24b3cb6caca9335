"""Xenium (a Xenium Onboard Analysis output folder) into a sample store, optionally placed on an H&E.

What is read, and how:

- ``transcripts.parquet`` (else ``transcripts.csv.gz``): every molecule, BLANK_/NegControl/Unassigned codewords
  included, as the points element ``transcripts``. Columns: ``x``, ``y`` (micrometres, from ``x_location``,
  ``y_location``), ``gene`` (categorical, from ``feature_name``), ``qv``, ``cell_id`` and every other column of
  the file unchanged. Parquet is read by dask in row-group partitions (``blocksize``), so a large file is
  never held in memory; the gzipped CSV cannot be split and is read whole.
- ``cell_boundaries`` / ``nucleus_boundaries`` (parquet, else csv.gz): the ``cells`` and ``nuclei`` polygons,
  built in one vectorised call (``shapely.linearrings`` over the vertex rows grouped by cell, then
  ``shapely.polygons``), indexed by ``cell_id``, with ``source = "xenium"``. Multi-nucleate cells (XOA >= 2
  files carry a ``label_id`` per nucleus) keep one polygon per nucleus, indexed ``<cell_id>_<k>``, with the
  owning cell in a ``cell_id`` column.
- ``cell_feature_matrix.h5`` (or the ``cell_feature_matrix/`` MEX folder): the ``cell_expression`` table, read
  by the same reader as Visium (scanpy's ``read_10x_h5(gex_only=False)``, else, for files scanpy cannot read such
  as R-written ones with float ``indptr``/``shape``, h5py directly:
  :func:`hest_zarr.converters.visium.read_10x_h5_arrays`), raw integer counts of every feature;
  ``var['is_control']`` flags negative-control probes/codewords, unassigned/deprecated codewords, genomic
  controls and ``BLANK_`` features. The columns of ``cells.parquet`` (centroids, counts, areas) join ``obs``.
  Xenium Protein features (``feature_types == "Protein Expression"``, XOA >= 4) go to the ``cell_protein`` table
  instead: float intensities, the fixed-point integers of the h5 divided by its ``protein_scaling_factor``.
- ``cells.zarr.zip``: the ``nucleus_labels`` and ``cell_labels`` label rasters (``masks/0``, ``masks/1``) on the
  morphology pixels, read lazily, and the ``label_cell_ids`` table (label value -> cell id), see
  :func:`read_cells_zarr`.
- ``morphology_focus.ome.tif`` (XOA 1), ``morphology_focus/morphology_focus_0000.ome.tif`` (XOA 2-3),
  ``morphology_focus/ch0000_dapi.ome.tif`` (XOA 4), else ``morphology_mip.ome.tif``, else the z-stack
  ``morphology.ome.tif`` (projected by its maximum): the ``dapi`` image, channel ``DAPI``, lazily through
  tifffile's zarr view (only the tiles a computation touches are decoded).
- A minimal bundle (e.g. SpatialExperimentIO's ``Xenium_small``: the matrix and ``cells.csv.gz`` only) converts
  too: transcripts, boundaries and images are optional. Without cell boundaries, ``cells`` are circles at the cell
  summary's ``x_centroid, y_centroid`` (um) with the radius of the cell's area, ``sqrt(cell_area / pi)``
  (:func:`centroid_circles`, provenance method ``centroid_circles``). The optional inputs a folder lacks are listed
  in every element's provenance (``absent_inputs``).
- ``experiment.xenium``: the pixel size (``pixel_size``, um per morphology pixel) and the panel, organism,
  preservation and software version, recorded in the provenance. Without it Xenium's 0.2125 um/px is used
  and a note says so.

Frames. Molecules, cells and nuclei keep their micrometre coordinates; their transformation carries them to
``global``. Without an H&E, ``global`` is the morphology image's pixels (``um / pixel_size``) and ``um`` is the
identity. With an H&E and its alignment, ``global`` is the H&E's pixels (the HEST convention) and every element
gets the composed transformation Xenium um -> H&E pixels; ``um`` is then ``global`` scaled by the H&E pixel size
(the store's rule, checked by :func:`hest_zarr.validate`), which equals Xenium's micrometres up to the rotation
and offset of the alignment. The alignment is either

- the 3x3 matrix Xenium Explorer exports: it maps H&E pixels to Xenium morphology pixels (10x Genomics
  knowledge base, "How can I convert coordinates between H&E image and Xenium data"); scaled by the Xenium pixel
  size it maps H&E pixels to micrometres; or
- a Xenium Explorer keypoints CSV (``fixedX, fixedY`` on the Xenium image in micrometres, ``alignmentX,
  alignmentY`` on the H&E in pixels): the affine H&E pixels -> micrometres is fitted by least squares and its
  root-mean-square residual (um) is recorded as each placed element's ``estimated_error_um``.

The H&E pixel size is the scale of that mapping (square root of its determinant).

Why not ``spatialdata_io.xenium``: it requires ``experiment.xenium`` and ``cells.zarr.zip`` (absent from many
exports, e.g. the SFE test crop), names its own elements and coordinate systems (``global`` = morphology
pixels, labels rasters, ``cell_circles``), drops non-gene features by default and offers no hook for the
H&E frame or for errors that name the file. Its file and column names (``XeniumKeys``) are used here.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from anndata import AnnData
from geopandas import GeoDataFrame
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, Labels2DModel, PointsModel, ShapesModel, TableModel
from spatialdata.transformations import Affine, BaseTransformation, Identity, Scale
from spatialdata_io._constants._constants import XeniumKeys
from spatialdata_io.readers.xenium import cell_id_str_from_prefix_suffix_uint32
from xarray import DataArray

from hest_zarr.converters.slides import RGB_CHANNELS, he_element, slide_image
from hest_zarr.converters.visium import read_counts
from hest_zarr.elements import CoordinateSystems, Elements, Keys, build_sample, expression_table, frame_transformations
from hest_zarr.errors import InputError
from hest_zarr.schemas import ElementRecord, Provenance, SampleMetadata
from hest_zarr.store import get_record, set_record

#: Micrometres per morphology pixel of every Xenium instrument so far, used when ``experiment.xenium`` is absent.
DEFAULT_PIXEL_SIZE_UM = 0.2125
SOURCE = "xenium"
CELL_ID = XeniumKeys.CELL_ID.value
TRANSCRIPTS_CANDIDATES = (XeniumKeys.TRANSCRIPTS_FILE.value, "transcripts.csv.gz")
CELL_BOUNDARIES_CANDIDATES = (XeniumKeys.CELL_BOUNDARIES_FILE.value, "cell_boundaries.csv.gz")
NUCLEUS_BOUNDARIES_CANDIDATES = (XeniumKeys.NUCLEUS_BOUNDARIES_FILE.value, "nucleus_boundaries.csv.gz")
CELLS_CANDIDATES = (XeniumKeys.CELL_METADATA_FILE.value, "cells.csv.gz")
COUNTS_CANDIDATES = (XeniumKeys.CELL_FEATURE_MATRIX_FILE.value, "cell_feature_matrix")
MORPHOLOGY_CANDIDATES = (
    XeniumKeys.MORPHOLOGY_FOCUS_FILE.value,
    f"{XeniumKeys.MORPHOLOGY_FOCUS_DIR.value}/{XeniumKeys.MORPHOLOGY_FOCUS_CHANNEL_IMAGE.value.format(0)}",
    f"{XeniumKeys.MORPHOLOGY_FOCUS_DIR.value}/{XeniumKeys.MORPHOLOGY_FOCUS_V4_DAPI_FILENAME.value}",
    XeniumKeys.MORPHOLOGY_MIP_FILE.value,
    "morphology.ome.tif",
)
DAPI_CHANNEL = XeniumKeys.MORPHOLOGY_FOCUS_CHANNEL_0.value
CELLS_ZARR = XeniumKeys.CELLS_ZARR.value
#: Element names of the label rasters of ``cells.zarr.zip`` -> their index under ``masks/``.
NUCLEUS_LABELS = "nucleus_labels"
CELL_LABELS = "cell_labels"
MASK_INDEX = {NUCLEUS_LABELS: 0, CELL_LABELS: 1}
#: Table mapping every label value of both rasters to its cell id.
LABEL_CELL_IDS = "label_cell_ids"
#: Table of the protein intensities (Xenium Protein), annotating ``cells``.
CELL_PROTEIN = "cell_protein"
PROTEIN_FEATURE_TYPE = "Protein Expression"
PROTEIN_SCALING_ATTRIBUTE = "protein_scaling_factor"
#: ``feature_types`` of the cell-feature matrix that are not measured genes (nor proteins).
CONTROL_FEATURE_TYPES = frozenset(
    {
        "Negative Control Probe",
        "Negative Control Codeword",
        "Unassigned Codeword",
        "Deprecated Codeword",
        "Genomic Control",
        "Blank Codeword",
    }
)
#: Name prefixes of the same features, for matrices whose ``feature_types`` do not say it.
CONTROL_PREFIXES = ("BLANK_", "NegControl", "UnassignedCodeword", "DeprecatedCodeword", "Intergenic")
KEYPOINT_COLUMNS = ("fixedX", "fixedY", "alignmentX", "alignmentY")
#: ``experiment.xenium`` entries recorded in the provenance of every element.
EXPERIMENT_KEYS = (
    "analysis_sw_version",
    "run_name",
    "region_name",
    "panel_name",
    "panel_design_id",
    "panel_organism",
    "panel_tissue_type",
    "panel_num_targets_predesigned",
    "panel_num_targets_custom",
    "chemistry_version",
    "segmentation_stain",
)
_ORGANISMS = {"human": "Homo sapiens", "mouse": "Mus musculus"}
_PRESERVATION = {"fresh_frozen": "Fresh Frozen", "ff": "Fresh Frozen", "fresh frozen": "Fresh Frozen", "ffpe": "FFPE"}
MORPHOLOGY_CHUNK_PX = 1024
#: Provenance method of ``cells`` drawn from the cell summary (a bundle without cell boundaries).
CENTROID_CIRCLES = "centroid_circles"
CENTROID_CIRCLES_NOTE = (
    "no cell boundaries: each cell is a circle at its x_centroid, y_centroid (um) of the cell summary, of radius "
    "sqrt(cell_area / pi) (the circle of the cell's area)"
)
CSV_PARTITION_ROWS = 1_000_000


# --------------------------------------------------------------------------------------------- experiment.xenium
@dataclass(frozen=True)
class XeniumExperiment:
    """What ``experiment.xenium`` says (or the defaults when the file is absent).

    Attributes
    ----------
    pixel_size_um
        Micrometres per morphology-image pixel.
    specs
        The whole JSON manifest (empty when absent).
    source
        Path of the file, ``None`` when absent.
    note
        Why a default was used, ``None`` when the file gave the value.

    Examples
    --------
    >>> experiment = XeniumExperiment(0.2125, {"panel_organism": "Human", "preservation_method": "FFPE"})
    >>> experiment.species, experiment.preservation_method
    ('Homo sapiens', 'FFPE')

    """

    pixel_size_um: float
    specs: Mapping[str, Any]
    source: str | None = None
    note: str | None = None

    @property
    def species(self) -> str | None:
        """Species of the panel (``panel_organism``), in HEST-1k spelling."""
        return _ORGANISMS.get(str(self.specs.get("panel_organism", "")).lower())

    @property
    def preservation_method(self) -> str | None:
        """Preservation (``fresh_frozen``, ``FF``, ``FFPE``...), in HEST-1k spelling."""
        return _PRESERVATION.get(str(self.specs.get("preservation_method", "")).lower())

    def provenance(self) -> dict[str, Any]:
        """Entries recorded in every element's provenance parameters."""
        entries: dict[str, Any] = {"xenium_pixel_size_um": self.pixel_size_um}
        entries.update({key: self.specs[key] for key in EXPERIMENT_KEYS if key in self.specs})
        if self.note is not None:
            entries["pixel_size_note"] = self.note
        return entries


def read_experiment(path: str | Path) -> XeniumExperiment:
    """Read ``experiment.xenium`` (a Xenium output folder or the file itself).

    Parameters
    ----------
    path
        The output folder, or the ``experiment.xenium`` file.

    Returns
    -------
    The experiment; without the file, :data:`DEFAULT_PIXEL_SIZE_UM` and a note saying it was assumed.

    Raises
    ------
    InputError
        The file is not JSON, or its ``pixel_size`` is not a positive number.

    Examples
    --------
    >>> read_experiment("../shared/data/spatialdata-io_experiment_xenium/xenium-3.0.0").pixel_size_um  # doctest: +SKIP
    0.2125

    """
    path = Path(path)
    file = path / XeniumKeys.XENIUM_SPECS.value if path.is_dir() else path
    if not file.is_file():
        note = f"no {XeniumKeys.XENIUM_SPECS.value}: Xenium's {DEFAULT_PIXEL_SIZE_UM} um/px assumed"
        return XeniumExperiment(DEFAULT_PIXEL_SIZE_UM, {}, note=note)
    try:
        specs = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{file}: not a readable experiment manifest (expected JSON; {err})") from err
    if not isinstance(specs, dict):
        raise InputError(f"{file}: expected a JSON object, found {type(specs).__name__}")
    if "pixel_size" not in specs:
        note = f"{file.name} has no pixel_size: Xenium's {DEFAULT_PIXEL_SIZE_UM} um/px assumed"
        return XeniumExperiment(DEFAULT_PIXEL_SIZE_UM, specs, source=str(file), note=note)
    pixel_size = specs["pixel_size"]
    if isinstance(pixel_size, bool) or not isinstance(pixel_size, int | float) or not pixel_size > 0:
        raise InputError(f"{file}: pixel_size must be a positive number of um, found {pixel_size!r}")
    return XeniumExperiment(float(pixel_size), specs, source=str(file))


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


# --------------------------------------------------------------------------------------------- tables on disk
def _first_existing(root: Path, candidates: tuple[str, ...], what: str) -> Path:
    found = _first_or_none(root, candidates)
    if found is None:
        raise InputError(f"{root}: no {what} found (expected one of {', '.join(candidates)})")
    return found


def _first_or_none(root: Path, candidates: tuple[str, ...]) -> Path | None:
    return next((root / name for name in candidates if (root / name).exists()), None)


def _binary_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]


def _decode(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Decode byte-string columns (XOA 1.x writes ids and names as parquet binary) to text."""
    frame = frame.copy()
    for column in columns:
        frame[column] = frame[column].str.decode("utf-8")
    return frame


def _parquet_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"{path}: not a readable parquet file (truncated or not parquet? {err})") from err


def _read_frame(path: Path) -> pd.DataFrame:
    """Read a Xenium table (parquet or csv/csv.gz) in memory, byte strings decoded."""
    if path.suffix == ".parquet":
        schema = _parquet_schema(path)
        try:
            frame = pd.read_parquet(path)
        except (OSError, pa.ArrowException) as err:
            raise InputError(f"{path}: not a readable parquet file ({err})") from err
        return _decode(frame, _binary_columns(schema))
    try:
        return pd.read_csv(path)
    except (OSError, EOFError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: not a readable CSV table (truncated or not CSV? {err})") from err


def _require_columns(path: Path, found: list[str], required: tuple[str, ...], what: str) -> None:
    missing = [c for c in required if c not in found]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing} (expected {what}); found {found}")


# --------------------------------------------------------------------------------------------- transcripts
def read_transcripts(
    path: str | Path, *, frame: XeniumFrame | None = None, blocksize: int | str = "default"
) -> dd.DataFrame:
    """Read every Xenium molecule as a points element (micrometres, lazily).

    Parameters
    ----------
    path
        ``transcripts.parquet`` or ``transcripts.csv.gz``.
    frame
        Where micrometres land in ``global`` (default: morphology pixels at 0.2125 um/px).
    blocksize
        Target bytes per dask partition of a parquet file (row groups are combined up to it; dask's default
        is 256 MiB). A gzipped CSV is one stream and is read whole.

    Returns
    -------
    The points: ``x, y`` (um), ``gene`` (categorical, all codewords kept), ``qv``, ``cell_id`` and the file's other
    columns, one row per molecule.

    Raises
    ------
    InputError
        Missing, truncated or unreadable file, or one without ``x_location, y_location, feature_name``.

    Examples
    --------
    >>> points = read_transcripts("xenium/transcripts.parquet")  # doctest: +SKIP
    >>> points["gene"].value_counts().compute()["BLANK_0070"]  # doctest: +SKIP

    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such transcripts file (expected transcripts.parquet or transcripts.csv.gz)")
    frame = frame if frame is not None else XeniumFrame.morphology(DEFAULT_PIXEL_SIZE_UM)
    if path.suffix == ".parquet":
        schema = _parquet_schema(path)
        table = dd.read_parquet(str(path), blocksize=blocksize)
        binary = _binary_columns(schema)
        if binary:
            table = table.map_partitions(_decode, binary)
    else:
        table = dd.from_pandas(_read_frame(path), chunksize=CSV_PARTITION_ROWS, sort=False)
    required = (XeniumKeys.TRANSCRIPTS_X.value, XeniumKeys.TRANSCRIPTS_Y.value, XeniumKeys.FEATURE_NAME.value)
    _require_columns(path, list(table.columns), required, "Xenium transcripts")
    table = table.rename(columns=dict(zip(required, ("x", "y", "gene"), strict=True)))
    genes = np.sort(table["gene"].dropna().unique().compute().astype(str).to_numpy())
    table["gene"] = table["gene"].astype(pd.CategoricalDtype(categories=genes))
    return PointsModel.parse(
        table,
        coordinates={"x": "x", "y": "y"},
        feature_key="gene",
        instance_key=CELL_ID if CELL_ID in table.columns else None,
        transformations=frame.micrometre_transformations(),
        sort=True,
    )


# --------------------------------------------------------------------------------------------- boundaries
def read_boundaries(path: str | Path, *, frame: XeniumFrame | None = None) -> GeoDataFrame:
    """Read Xenium cell or nucleus boundaries as polygons, one per cell (or nucleus), in micrometres.

    Parameters
    ----------
    path
        ``cell_boundaries`` or ``nucleus_boundaries`` (``.parquet`` or ``.csv.gz``): one row per vertex, the rows
        of one polygon contiguous.
    frame
        Where micrometres land in ``global`` (default: morphology pixels at 0.2125 um/px).

    Returns
    -------
    Polygons indexed by ``cell_id`` (``<cell_id>_<k>`` for the k-th nucleus of a multi-nucleate cell, the cell in
    a ``cell_id`` column), with ``source = "xenium"``; every polygon of the file, vertices as written.

    Raises
    ------
    InputError
        Unreadable file, missing columns, a polygon's rows not contiguous, or a polygon of fewer than 3 vertices.

    Examples
    --------
    >>> cells = read_boundaries("xenium/cell_boundaries.parquet")  # doctest: +SKIP
    >>> cells.loc["jcccmpde-1", "geometry"].area  # doctest: +SKIP

    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such boundaries file")
    frame = frame if frame is not None else XeniumFrame.morphology(DEFAULT_PIXEL_SIZE_UM)
    vertices = _read_frame(path)
    vertex_columns = [XeniumKeys.BOUNDARIES_VERTEX_X.value, XeniumKeys.BOUNDARIES_VERTEX_Y.value]
    _require_columns(path, list(vertices.columns), (CELL_ID, *vertex_columns), "Xenium boundaries")
    group_column = "label_id" if "label_id" in vertices.columns else CELL_ID
    keys = vertices[group_column].to_numpy()
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.array([], dtype=int)
    if len(starts) != pd.unique(keys).size:
        raise InputError(
            f"{path}: the vertices of each polygon must be contiguous rows; {pd.unique(keys).size} {group_column}s "
            f"form {len(starts)} runs"
        )
    sizes = np.diff(np.r_[starts, len(keys)])
    if (sizes < 3).any():
        raise InputError(
            f"{path}: {int((sizes < 3).sum())} polygon(s) with fewer than 3 vertices "
            f"(e.g. {group_column} {keys[starts[sizes < 3][0]]!r})"
        )
    rings = shapely.linearrings(
        vertices[vertex_columns].to_numpy(dtype=np.float64), indices=np.repeat(np.arange(len(starts)), sizes)
    )
    cell_ids = pd.Index(vertices[CELL_ID].to_numpy()[starts].astype(str))
    columns: dict[str, Any] = {"source": pd.Categorical([SOURCE] * len(starts))}
    index = cell_ids
    if cell_ids.has_duplicates:
        columns[CELL_ID] = cell_ids.to_numpy()
        nucleus_number = pd.Series(cell_ids).groupby(cell_ids).cumcount().astype(str).to_numpy()
        index = pd.Index(cell_ids.to_numpy() + "_" + nucleus_number)
    polygons = GeoDataFrame(columns, geometry=shapely.polygons(rings), index=index.rename(CELL_ID))
    return ShapesModel.parse(polygons, transformations=frame.micrometre_transformations())


# --------------------------------------------------------------------------------------------- cells and counts
def read_cells(path: str | Path) -> pd.DataFrame:
    """Read the cell summary (``cells.parquet`` or ``cells.csv.gz``) indexed by cell id.

    Columns as written (``x_centroid, y_centroid`` in um, ``transcript_counts``, ``cell_area``...); unnamed
    columns (row numbers that R writers add) are dropped.

    Raises
    ------
    InputError
        Unreadable file, no ``cell_id`` column, or repeated cell ids.

    Examples
    --------
    >>> read_cells("xenium/cells.parquet").loc["jcccmpde-1", "transcript_counts"]  # doctest: +SKIP
    198

    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such cell summary file")
    cells = _read_frame(path)
    _require_columns(path, list(cells.columns), (CELL_ID,), "a Xenium cell summary")
    cells = cells.drop(columns=[c for c in cells.columns if str(c).startswith("Unnamed:")])
    index = pd.Index(cells.pop(CELL_ID).astype(str), name=CELL_ID)
    if index.has_duplicates:
        raise InputError(f"{path}: repeated cell id(s), e.g. {index[index.duplicated()][0]!r}")
    cells.index = index
    return cells


def centroid_circles(path: str | Path, cells: pd.DataFrame, *, frame: XeniumFrame | None = None) -> GeoDataFrame:
    """Return the ``cells`` element of a bundle without boundaries: circles at the cell summary's centroids.

    Each cell of ``cells`` (as :func:`read_cells` returns it, in its order) becomes a circle centred on
    ``x_centroid, y_centroid`` (micrometres) whose area is the cell's ``cell_area`` (um2): radius
    ``sqrt(cell_area / pi)``. The shape is an approximation; the centre is Xenium's own centroid.

    Raises
    ------
    InputError
        A missing centroid or area column, or a cell with a non-finite centroid or a non-positive area.

    Examples
    --------
    >>> cells = pd.DataFrame({"x_centroid": [10.0], "y_centroid": [4.0], "cell_area": [np.pi * 9]}, index=["a-1"])
    >>> circle = centroid_circles("cells.csv.gz", cells)
    >>> circle.geometry.x.tolist(), circle["radius"].tolist()
    ([10.0], [3.0])

    """
    path = Path(path)
    columns = (XeniumKeys.CELL_X.value, XeniumKeys.CELL_Y.value, XeniumKeys.CELL_AREA.value)
    _require_columns(path, list(cells.columns), columns, "cell centroids and areas, to draw cells without boundaries")
    x, y, area = (pd.to_numeric(cells[column], errors="coerce").to_numpy(np.float64) for column in columns)
    unusable = ~(np.isfinite(x) & np.isfinite(y) & np.isfinite(area) & (area > 0))
    if unusable.any():
        raise InputError(
            f"{path}: {int(unusable.sum())} cell(s) without a finite centroid and a positive cell_area (e.g. "
            f"{cells.index[unusable][0]!r}); cells without boundaries are drawn from both"
        )
    frame = frame if frame is not None else XeniumFrame.morphology(DEFAULT_PIXEL_SIZE_UM)
    circles = GeoDataFrame(
        {"source": pd.Categorical([SOURCE] * len(cells)), "radius": np.sqrt(area / np.pi)},
        geometry=shapely.points(np.column_stack([x, y])),
        index=pd.Index(cells.index.astype(str), name=CELL_ID),
    )
    return ShapesModel.parse(circles, transformations=frame.micrometre_transformations())


def _absent_inputs(
    transcripts: Path | None, boundaries: Path | None, nuclei: Path | None, morphology: Path | None
) -> dict[str, list[str]]:
    """Provenance entry naming the optional inputs a folder lacks (a minimal bundle); empty when it has them all."""
    optional = {
        "transcripts": (transcripts, TRANSCRIPTS_CANDIDATES),
        "cell boundaries": (boundaries, CELL_BOUNDARIES_CANDIDATES),
        "nucleus boundaries": (nuclei, NUCLEUS_BOUNDARIES_CANDIDATES),
        "morphology image": (morphology, MORPHOLOGY_CANDIDATES),
    }
    absent = [f"{what} ({' or '.join(names)})" for what, (found, names) in optional.items() if found is None]
    return {"absent_inputs": absent} if absent else {}


def is_control_feature(names: pd.Index, feature_types: pd.Series | None = None) -> np.ndarray:
    """Flag control features: negative-control probes and codewords, unassigned/deprecated codewords, BLANK_.

    Examples
    --------
    >>> is_control_feature(pd.Index(["ACTB", "BLANK_0070", "NegControlProbe_00003"])).tolist()
    [False, True, True]

    """
    by_name = np.asarray(pd.Series(names.astype(str)).str.startswith(CONTROL_PREFIXES), dtype=bool)
    if feature_types is None:
        return by_name
    return by_name | np.asarray(pd.Series(feature_types).astype(str).isin(CONTROL_FEATURE_TYPES), dtype=bool)


def read_cell_feature_matrix(path: str | Path) -> AnnData:
    """Read ``cell_feature_matrix.h5`` (or its MEX folder): every feature, raw integer counts, controls flagged.

    The reader is Visium's (:func:`~hest_zarr.converters.visium.read_counts`: scanpy's ``read_10x_h5(gex_only=False)``,
    else h5py directly for R-written files with float arrays); ``var`` keeps ``gene_ids``,
    ``feature_types`` and ``genome`` and gains a boolean ``is_control``.

    Raises
    ------
    InputError
        Missing or unreadable matrix, or non-integer counts.

    Examples
    --------
    >>> counts = read_cell_feature_matrix("xenium/cell_feature_matrix.h5")  # doctest: +SKIP
    >>> counts.var.loc["BLANK_0070", "is_control"]  # doctest: +SKIP
    True

    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such cell-feature matrix")
    counts = read_counts(path)
    counts.var["is_control"] = is_control_feature(counts.var_names, counts.var.get("feature_types"))
    return counts


# --------------------------------------------------------------------------------------------- protein
def split_protein_features(counts: AnnData) -> tuple[AnnData, AnnData | None]:
    """Split a cell-feature matrix into its RNA features (genes and controls) and its protein features.

    Protein features are those whose ``feature_types`` is ``"Protein Expression"`` (Xenium Protein, XOA >= 4).

    Returns
    -------
    The RNA part, and the protein part (``None`` when the matrix has no protein feature).

    Examples
    --------
    >>> var = pd.DataFrame({"feature_types": ["Gene Expression", "Protein Expression"]}, index=["ACTB", "CD45"])
    >>> rna, protein = split_protein_features(AnnData(np.ones((2, 2), dtype=np.int32), var=var))
    >>> rna.var_names.tolist(), protein.var_names.tolist()
    (['ACTB'], ['CD45'])

    """
    types = counts.var.get("feature_types")
    is_protein = np.zeros(counts.n_vars, dtype=bool) if types is None else types.astype(str).eq(PROTEIN_FEATURE_TYPE)
    is_protein = np.asarray(is_protein)
    if not is_protein.any():
        return counts, None
    return counts[:, ~is_protein].copy(), counts[:, is_protein].copy()


def read_protein_scaling_factor(path: str | Path) -> float | None:
    """Return the ``protein_scaling_factor`` attribute of ``cell_feature_matrix.h5``, ``None`` where it is absent.

    Xenium Protein stores each protein intensity as an integer: the intensity times this factor (10 in XOA 4, a
    fixed-point encoding), written as an attribute of the HDF5 file's root (10x Genomics' description in
    satijalab/seurat#10024; spatialdata-io divides by it the same way). A MEX folder has no such attribute.

    Raises
    ------
    InputError
        The attribute is not a positive number.

    Examples
    --------
    >>> read_protein_scaling_factor("outs/cell_feature_matrix.h5")  # doctest: +SKIP
    10.0

    """
    import h5py

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as h5:
            factor = h5.attrs.get(PROTEIN_SCALING_ATTRIBUTE)
    except OSError as err:
        raise InputError(f"{path}: not a readable HDF5 file ({err})") from err
    if factor is None:
        return None
    factor = np.asarray(factor).squeeze()
    if factor.ndim or not np.issubdtype(factor.dtype, np.number) or not factor > 0:
        raise InputError(f"{path}: {PROTEIN_SCALING_ATTRIBUTE} must be a positive number, found {factor!r}")
    return float(factor)


def protein_table(protein: AnnData, scaling_factor: float | None) -> AnnData:
    """Build the ``cell_protein`` table (float intensities annotating ``cells``) from the protein features.

    The stored values are divided by ``scaling_factor`` (so ``X`` holds the intensities 10x reports); without a
    factor they are kept as stored. ``uns['protein_scaling_factor']`` records the factor that was applied.

    Examples
    --------
    >>> protein = AnnData(np.array([[15, 0], [3, 240]], dtype=np.int32), var=pd.DataFrame(index=["CD45", "PanCK"]))
    >>> protein.obs_names = ["cell_a", "cell_b"]
    >>> protein_table(protein, 10.0).X.toarray().tolist()
    [[1.5, 0.0], [0.30000001192092896, 24.0]]

    """
    values = sparse.csr_matrix(protein.X, dtype=np.float64)
    if scaling_factor is not None:
        values = values / scaling_factor
    ids = protein.obs_names.astype(str).to_numpy()
    obs = pd.DataFrame({Keys.SPOT_ID: ids, Keys.REGION: pd.Categorical([Elements.CELLS] * len(ids))}, index=ids)
    table = AnnData(X=sparse.csr_matrix(values, dtype=np.float32), obs=obs, var=protein.var.copy())
    if scaling_factor is not None:
        table.uns[PROTEIN_SCALING_ATTRIBUTE] = scaling_factor
    return TableModel.parse(table, region=Elements.CELLS, region_key=Keys.REGION, instance_key=Keys.SPOT_ID)


# --------------------------------------------------------------------------------------------- cells.zarr.zip
@dataclass(frozen=True)
class XeniumMasks:
    """The segmentation masks of ``cells.zarr.zip`` and the cell behind every label value.

    Attributes
    ----------
    labels
        ``nucleus_labels`` (``masks/0``) and ``cell_labels`` (``masks/1``): lazy ``(y, x)`` label rasters on the
        morphology image's pixels, 0 = background.
    label_cell_ids
        One row per label value: ``region`` (the labels element), ``label`` and ``cell_id`` (the string id of
        ``cells`` and ``cell_expression``). Several nucleus labels may name one cell (multi-nucleate cells).
    layout
        How the file maps labels to cells: ``"polygon_sets"`` (XOA >= 2), ``"seg_mask_value"`` (XOA 1.3-1.x) or
        ``"none"`` (older files carry no mapping).
    source
        Path of the file.
    homogeneous_transform
        ``masks/homogeneous_transform`` as stored (recorded, not used: the masks are placed on the morphology
        pixels, as 10x documents them), ``None`` when absent.

    """

    labels: dict[str, da.Array]
    label_cell_ids: pd.DataFrame
    layout: str
    source: str
    homogeneous_transform: list[list[float]] | None = None

    def provenance(self) -> dict[str, Any]:
        """Parameters recorded in the provenance of the labels and of ``label_cell_ids``."""
        entries: dict[str, Any] = {"cells_zarr_layout": self.layout}
        if self.homogeneous_transform is not None:
            entries["homogeneous_transform"] = self.homogeneous_transform
        return entries


def decode_cell_ids(cell_id: np.ndarray) -> np.ndarray:
    """Decode the ``cell_id`` array of a Xenium zarr file into the string ids of the parquet and h5 files.

    XOA >= 1.3 stores ``(n, 2)`` uint32 pairs: the prefix's eight hexadecimal digits, most significant first,
    each written as a letter (0 -> ``a`` ... 15 -> ``p``), then ``-`` and the dataset suffix (10x Genomics,
    "Xenium Zarr output files", cell ID format; decoded by spatialdata-io's ``cell_id_str_from_prefix_suffix_uint32``).
    Older files store one integer per cell, kept as its decimal text.

    Examples
    --------
    >>> decode_cell_ids(np.array([[0x9222CF34, 1], [0, 2]], dtype=np.uint32)).tolist()
    ['jcccmpde-1', 'aaaaaaaa-2']
    >>> decode_cell_ids(np.array([1, 17], dtype=np.uint32)).tolist()
    ['1', '17']

    """
    cell_id = np.asarray(cell_id)
    if cell_id.ndim == 2 and cell_id.shape[1] == 1:
        cell_id = cell_id[:, 0]
    if cell_id.ndim == 1:
        return cell_id.astype(np.int64).astype(str)
    return cell_id_str_from_prefix_suffix_uint32(cell_id[:, 0], cell_id[:, 1].astype(np.int64))


def _open_zip_group(path: Path) -> Any:
    import zipfile

    import zarr

    try:
        store = zarr.storage.ZipStore(path, mode="r", read_only=True)
        return zarr.open_group(store, mode="r")
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, zarr.errors.BaseZarrError) as err:
        raise InputError(
            f"{path}: not a readable zipped zarr store (truncated, or not a Xenium cells.zarr.zip? "
            f"{type(err).__name__}: {err})"
        ) from err


def _zip_array(path: Path, group: Any, key: str, what: str) -> Any:
    import zarr

    try:
        node = group[key]
    except KeyError as err:
        raise InputError(f"{path}: no '{key}' array (expected {what}); found {sorted(group.keys())}") from err
    if not isinstance(node, zarr.Array):
        raise InputError(f"{path}: '{key}' is a group, expected {what}")
    return node


def _read_whole(path: Path, array: Any, key: str) -> np.ndarray:
    import zipfile

    import zarr

    try:
        return np.asarray(array[...])
    except (zipfile.BadZipFile, OSError, ValueError, zarr.errors.BaseZarrError) as err:
        raise InputError(f"{path}: the '{key}' array cannot be read ({type(err).__name__}: {err})") from err


def _label_rows(region: str, labels: np.ndarray, cell_ids: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"region": region, "label": labels.astype(np.int64), CELL_ID: cell_ids})


def _label_cell_ids(path: Path, group: Any, cell_ids: np.ndarray) -> tuple[pd.DataFrame, str]:
    """Map label values to cell ids: ``polygon_sets/<mask>/cell_index`` (XOA >= 2) or ``seg_mask_value`` (XOA 1.3+)."""
    if "polygon_sets" in group:
        rows = []
        for name, mask in MASK_INDEX.items():
            key = f"polygon_sets/{mask}/cell_index"
            cell_index = _read_whole(path, _zip_array(path, group, key, "the cell of every polygon"), key)
            cell_index = cell_index.astype(np.int64).ravel()
            if len(cell_index) and (cell_index.min() < 0 or cell_index.max() >= len(cell_ids)):
                raise InputError(
                    f"{path}: '{key}' points outside the {len(cell_ids)} cells of 'cell_id' "
                    f"(values {cell_index.min()}-{cell_index.max()})"
                )
            # the raster value of polygon p is p + 1 (0 is background)
            rows.append(_label_rows(name, np.arange(1, len(cell_index) + 1), cell_ids[cell_index]))
        return pd.concat(rows, ignore_index=True), "polygon_sets"
    if "seg_mask_value" in group:
        values = _read_whole(path, _zip_array(path, group, "seg_mask_value", "a label per cell"), "seg_mask_value")
        values = values.ravel()
        if len(values) != len(cell_ids):
            raise InputError(f"{path}: 'seg_mask_value' has {len(values)} values for {len(cell_ids)} cells")
        # XOA 1.3-1.x: one nucleus per cell, drawn with its cell's value in both masks
        rows = [_label_rows(name, values, cell_ids) for name in MASK_INDEX]
        return pd.concat(rows, ignore_index=True), "seg_mask_value"
    return _label_rows(CELL_LABELS, np.array([], dtype=np.int64), np.array([], dtype=str)), "none"


def read_cells_zarr(path: str | Path, *, chunk_size: int = MORPHOLOGY_CHUNK_PX) -> XeniumMasks:
    """Read the nucleus and cell label rasters of ``cells.zarr.zip`` and which cell each label value is.

    The file is a zarr v2 store in a zip (10x Genomics, "Overview of Xenium Zarr Output Files"): ``masks/0``
    (nuclei) and ``masks/1`` (cells) are uint32 rasters of the morphology image's shape, 0 the background;
    ``cell_id`` names the cells (see :func:`decode_cell_ids`); ``polygon_sets/<mask>/cell_index`` (XOA >= 2) gives
    the cell row of every polygon, whose raster value is its position + 1; XOA 1.3-1.x has ``seg_mask_value``
    instead (the raster value of each cell, shared by its one nucleus). The rasters are read lazily, chunk by
    chunk, when computed; only ``cell_id`` and the mapping arrays are read now.

    Why not ``spatialdata_io.xenium``: it reads the labels only inside its whole-folder reader, asserts on the
    XOA version from ``experiment.xenium`` and raises no error that names the file.

    Parameters
    ----------
    path
        ``cells.zarr.zip``.
    chunk_size
        Chunk side (pixels) of the lazy rasters.

    Raises
    ------
    InputError
        A missing, truncated or corrupt zip, missing ``masks/0``, ``masks/1`` or ``cell_id``, masks that are not
        2D integer rasters of one shape, or a mapping that points outside ``cell_id``.

    Examples
    --------
    >>> masks = read_cells_zarr("xenium_outs/cells.zarr.zip")  # doctest: +SKIP
    >>> masks.label_cell_ids.query("region == 'cell_labels'").head()  # doctest: +SKIP

    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected Xenium's cells.zarr.zip)")
    group = _open_zip_group(path)
    labels = {}
    for name, mask in MASK_INDEX.items():
        key = f"masks/{mask}"
        raster = _zip_array(path, group, key, f"the {name.split('_')[0]} label raster")
        if raster.ndim != 2 or not np.issubdtype(raster.dtype, np.integer):
            raise InputError(f"{path}: '{key}' must be a 2D integer raster, found {raster.ndim}D {raster.dtype}")
        labels[name] = da.from_zarr(raster).rechunk((chunk_size, chunk_size))
    shapes = {name: raster.shape for name, raster in labels.items()}
    if len(set(shapes.values())) > 1:
        raise InputError(f"{path}: the nucleus and cell masks differ in shape ({shapes})")
    cell_ids = _read_whole(path, _zip_array(path, group, CELL_ID, "the cell ids"), CELL_ID)
    if not (cell_ids.ndim == 1 or (cell_ids.ndim == 2 and cell_ids.shape[1] in (1, 2))):
        raise InputError(f"{path}: 'cell_id' must be (n,) ids or (n, 2) prefix/suffix pairs, found {cell_ids.shape}")
    cell_ids = decode_cell_ids(cell_ids)
    label_cell_ids, layout = _label_cell_ids(path, group, cell_ids)
    if layout == "none":
        warnings.warn(
            f"{path}: no polygon_sets nor seg_mask_value (a file older than XOA 1.3): the labels are kept but no "
            "label value is mapped to a cell id",
            UserWarning,
            stacklevel=2,
        )
    transform = None
    if "homogeneous_transform" in group["masks"]:
        key = "masks/homogeneous_transform"
        transform = _read_whole(path, group[key], key).astype(np.float64).tolist()
    return XeniumMasks(labels, label_cell_ids, layout, str(path), transform)


def label_elements(masks: XeniumMasks, frame: XeniumFrame) -> dict[str, DataArray]:
    """Return the ``nucleus_labels`` and ``cell_labels`` elements, placed like the morphology image.

    Examples
    --------
    >>> labels = label_elements(read_cells_zarr("cells.zarr.zip"), XeniumFrame.morphology(0.2125))  # doctest: +SKIP

    """
    return {
        name: Labels2DModel.parse(raster, dims=("y", "x"), transformations=frame.morphology_transformations())
        for name, raster in masks.labels.items()
    }


def label_cell_ids_table(masks: XeniumMasks) -> AnnData:
    """Return the ``label_cell_ids`` table: one row per label value, annotating both label elements.

    ``obs`` holds ``region`` (``nucleus_labels`` / ``cell_labels``), ``label`` (the raster value, its instance key)
    and ``cell_id``, which joins ``cell_expression``'s ``spot_id``; ``X`` has no column.

    Examples
    --------
    >>> table = label_cell_ids_table(read_cells_zarr("cells.zarr.zip"))  # doctest: +SKIP

    """
    rows = masks.label_cell_ids
    obs = pd.DataFrame(
        {
            "region": pd.Categorical(rows["region"], categories=list(MASK_INDEX)),
            "label": rows["label"].to_numpy(),
            CELL_ID: rows[CELL_ID].astype(str).to_numpy(),
        },
        index=(rows["region"] + ":" + rows["label"].astype(str)).to_numpy(),
    )
    table = AnnData(X=sparse.csr_matrix((len(obs), 0), dtype=np.float32), obs=obs)
    return TableModel.parse(table, region=list(MASK_INDEX), region_key="region", instance_key="label")


# --------------------------------------------------------------------------------------------- morphology image
def read_morphology(path: str | Path, *, frame: XeniumFrame | None = None) -> DataArray:
    """Read the DAPI morphology image lazily as the ``dapi`` element (``c = ["DAPI"]``, the file's dtype).

    A z-stack (``morphology.ome.tif``) is projected by its maximum; of several channels (XOA >= 2 focus images)
    the first, DAPI, is kept. Pixels are read through tifffile's zarr view when computed.

    Raises
    ------
    InputError
        Missing or unreadable TIFF.

    Examples
    --------
    >>> read_morphology("xenium/morphology_focus.ome.tif").shape  # doctest: +SKIP
    (1, 237, 237)

    """
    import tifffile
    import zarr

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such morphology image")
    frame = frame if frame is not None else XeniumFrame.morphology(DEFAULT_PIXEL_SIZE_UM)
    try:
        with tifffile.TiffFile(path) as tif:
            axes = tif.series[0].axes
        stored = zarr.open(tifffile.imread(path, aszarr=True, series=0, level=0), mode="r")
    except (OSError, ValueError, KeyError, IndexError, tifffile.TiffFileError) as err:
        raise InputError(f"{path}: not a readable TIFF image ({type(err).__name__}: {err})") from err
    pixels = da.from_zarr(stored)
    if "Y" not in axes or "X" not in axes:
        raise InputError(f"{path}: expected an image with Y and X axes, found axes {axes!r}")
    for axis in reversed(range(len(axes))):
        if axes[axis] == "Z":
            pixels = pixels.max(axis=axis)
        elif axes[axis] not in "YX":
            pixels = da.take(pixels, 0, axis=axis)
    pixels = pixels.rechunk((MORPHOLOGY_CHUNK_PX, MORPHOLOGY_CHUNK_PX))[None]
    return Image2DModel.parse(
        pixels, dims=("c", "y", "x"), c_coords=[DAPI_CHANNEL], transformations=frame.morphology_transformations()
    )


def _morphology_path(root: Path, experiment: XeniumExperiment) -> Path | None:
    named = experiment.specs.get("images", {}).get("morphology_focus_filepath")
    if isinstance(named, str) and (root / named).is_file():
        return root / named
    return _first_or_none(root, MORPHOLOGY_CANDIDATES)


def _warn_unless_image_covers(path: Path, dapi: DataArray, cells_um: GeoDataFrame, pixel_size_um: float) -> bool:
    """Warn when the morphology image does not span the cells (a cropped or downscaled export)."""
    width_um, height_um = dapi.shape[2] * pixel_size_um, dapi.shape[1] * pixel_size_um
    min_x, min_y, max_x, max_y = cells_um.total_bounds
    covers = min_x >= 0 and min_y >= 0 and max_x <= width_um and max_y <= height_um
    if not covers:
        warnings.warn(
            f"{path}: the image spans x 0-{width_um:.1f}, y 0-{height_um:.1f} um at {pixel_size_um} um/px but the "
            f"cells span x {min_x:.1f}-{max_x:.1f}, y {min_y:.1f}-{max_y:.1f} um; stored as is (a cropped or "
            "downscaled image?)",
            UserWarning,
            stacklevel=3,
        )
    return bool(covers)


# --------------------------------------------------------------------------------------------- H&E
def _he_image(he_image: str | Path | np.ndarray | da.Array, pixel_size_um: float) -> tuple[DataArray, dict[str, Any]]:
    """Return the ``he`` element in its own pixels (= ``global``) and the metadata it measures."""
    if isinstance(he_image, str | Path):
        slide = slide_image(he_image)
        measured = slide.metadata()
        return he_element(slide, pixel_size_um=pixel_size_um), measured
    pixels = da.asarray(he_image)
    if pixels.ndim != 3 or pixels.shape[0] != 3 or pixels.dtype != np.uint8:
        raise InputError(f"he_image array: expected (3, y, x) uint8 RGB, found {pixels.shape} {pixels.dtype}")
    he = Image2DModel.parse(
        pixels, dims=("c", "y", "x"), c_coords=list(RGB_CHANNELS), transformations=frame_transformations(pixel_size_um)
    )
    return he, {"fullres_px_height": int(pixels.shape[1]), "fullres_px_width": int(pixels.shape[2])}


def _cells_on_he(alignment: XeniumAlignment, frame: XeniumFrame, cells_um: GeoDataFrame, he: DataArray) -> int:
    """Count the cells whose centre falls on the H&E; refuse an alignment that puts none there."""
    centres = frame.to_global(shapely.get_coordinates(shapely.centroid(cells_um.geometry.values)))
    height, width = he.shape[1], he.shape[2]
    inside = (centres[:, 0] >= 0) & (centres[:, 0] < width) & (centres[:, 1] >= 0) & (centres[:, 1] < height)
    if len(centres) and not inside.any():
        raise InputError(
            f"{alignment.source}: the alignment places all {len(centres)} cells outside the H&E image ({width} x "
            f"{height} px; cell centres at x {centres[:, 0].min():.0f}-{centres[:, 0].max():.0f}, y "
            f"{centres[:, 1].min():.0f}-{centres[:, 1].max():.0f} px). Expected a matrix from H&E pixels to Xenium "
            "pixels (Xenium Explorer's export); is it inverted, or for another image?"
        )
    return int(inside.sum())


# --------------------------------------------------------------------------------------------- the sample
def _cell_table(
    counts: AnnData,
    counts_path: Path,
    cells: GeoDataFrame,
    cells_path: Path,
    summary: tuple[Path, pd.DataFrame] | None,
) -> AnnData:
    ids = counts.obs_names.astype(str)
    missing = ids.difference(cells.index)
    if len(missing):
        raise InputError(
            f"{counts_path}: {len(missing)} of the {len(ids)} cells are not among the cells of {cells_path.name} "
            f"(e.g. {missing[0]!r}); files from different runs?"
        )
    obs_columns: dict[str, Any] = {}
    if summary is not None:
        summary_path, summary_frame = summary
        absent = ids.difference(summary_frame.index)
        if len(absent):
            raise InputError(
                f"{summary_path}: {len(absent)} of the {len(ids)} cells of {counts_path.name} are missing "
                f"(e.g. {absent[0]!r})"
            )
        rows = summary_frame.loc[ids]
        obs_columns = {column: rows[column].to_numpy() for column in rows.columns}
    return expression_table(
        counts.X, ids, counts.var, region=Elements.CELLS, obs_columns=obs_columns, source=str(counts_path)
    )


def read_xenium(
    path: str | Path,
    *,
    he_image: str | Path | np.ndarray | da.Array | None = None,
    alignment: str | Path | None = None,
    sample_id: str | None = None,
    metadata: SampleMetadata | None = None,
    labels: bool = True,
) -> SpatialData:
    """Read a Xenium output folder into a sample, optionally placed on its H&E.

    Parameters
    ----------
    path
        The Xenium output folder (``transcripts``, ``cell_boundaries``, ``cell_feature_matrix.h5``...). Only the
        matrix and the cell boundaries or the cell summary (``cells.parquet`` / ``cells.csv.gz``) are required.
    he_image
        The H&E: a slide file (any format :func:`~hest_zarr.converters.slides.slide_image` reads) or a
        ``(3, y, x)`` uint8 array. Requires ``alignment``; ``global`` is then the H&E's pixels.
    alignment
        Xenium Explorer's 3x3 matrix CSV (H&E pixels -> Xenium pixels) or a keypoints CSV
        (``fixedX, fixedY`` um, ``alignmentX, alignmentY`` H&E pixels).
    sample_id
        Sample id (default: the folder name).
    metadata
        Known metadata (e.g. the HEST-1k CSV row); converter-measured fields fill its gaps.
    labels
        Read the label rasters of ``cells.zarr.zip`` when the folder has one (lazily; they are written with the
        store).

    Returns
    -------
    The sample: ``transcripts`` (points, um), ``cells`` and ``nuclei`` (polygons, um; without boundary files,
    ``cells`` are circles at the cell summary's centroids, see :func:`centroid_circles`), ``cell_expression``
    (raw counts of genes and controls annotating ``cells``), ``dapi`` when a morphology image exists, ``he`` when
    given. With Xenium Protein features, ``cell_protein`` (float intensities, the h5's ``protein_scaling_factor``
    divided out, annotating ``cells``). With ``cells.zarr.zip``, ``nucleus_labels`` and ``cell_labels`` (label
    rasters on the morphology pixels) and ``label_cell_ids`` (label value -> cell id, see
    :func:`label_cell_ids_table`).

    Raises
    ------
    InputError
        A missing or unreadable required file (cell-feature matrix; cell boundaries or, without them, a cell summary
        with centroids and areas), an unreadable optional file (transcripts, nucleus boundaries...), an H&E without
        alignment (or the reverse), a bad alignment, an alignment that puts no cell on the H&E, counts whose
        cells are not in ``cells``, an unreadable ``cells.zarr.zip`` or one whose labels name cells not in ``cells``.

    Examples
    --------
    >>> sdata = read_xenium("xenium_outs", he_image="he.ome.tif", alignment="he_alignment.csv")  # doctest: +SKIP
    >>> hest_zarr.write(sdata, "TENX95.zarr")  # doctest: +SKIP

    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: no such directory (expected a Xenium output folder)")
    if (he_image is None) != (alignment is None):
        given, lacking = ("he_image", "alignment") if alignment is None else ("alignment", "he_image")
        raise InputError(f"{root}: {given} given without {lacking}; an H&E is placed on Xenium only by its alignment")
    experiment = read_experiment(root)
    transcripts_path = _first_or_none(root, TRANSCRIPTS_CANDIDATES)
    boundaries_path = _first_or_none(root, CELL_BOUNDARIES_CANDIDATES)
    counts_path = _first_existing(root, COUNTS_CANDIDATES, "cell-feature matrix")
    nuclei_path = _first_or_none(root, NUCLEUS_BOUNDARIES_CANDIDATES)
    summary_path = _first_or_none(root, CELLS_CANDIDATES)
    if boundaries_path is None and summary_path is None:
        raise InputError(
            f"{root}: no cell boundaries nor cell summary found (expected one of "
            f"{', '.join(CELL_BOUNDARIES_CANDIDATES + CELLS_CANDIDATES)})"
        )
    morphology_path = _morphology_path(root, experiment)
    absent = _absent_inputs(transcripts_path, boundaries_path, nuclei_path, morphology_path)
    frame = XeniumFrame.morphology(experiment.pixel_size_um)
    aligned = he = None
    measured: dict[str, Any] = {
        "id": sample_id or root.name,
        "st_technology": "Xenium",
        "species": experiment.species,
        "preservation_method": experiment.preservation_method,
    }
    if alignment is not None and he_image is not None:  # read first: a bad H&E or alignment fails fast
        aligned = read_alignment(alignment, xenium_pixel_size_um=experiment.pixel_size_um)
        frame = XeniumFrame.aligned(aligned, experiment.pixel_size_um)
        he, he_measured = _he_image(he_image, frame.pixel_size_um)
        measured.update(he_measured, pixel_size_um_estimated=frame.pixel_size_um)

    experiment_inputs = [experiment.source] if experiment.source else []
    summary = (summary_path, read_cells(summary_path)) if summary_path is not None else None
    methods: dict[str, str] = {}
    if boundaries_path is not None:
        cells_path, cells = boundaries_path, read_boundaries(boundaries_path, frame=frame)
    else:
        cells_path, cells = summary_path, centroid_circles(*summary, frame=frame)
        methods[Elements.CELLS] = CENTROID_CIRCLES
    shapes = {Elements.CELLS: cells}
    inputs: dict[str, list[str]] = {Elements.CELLS: [str(cells_path), *experiment_inputs]}
    if nuclei_path is not None:
        shapes[Elements.NUCLEI] = read_boundaries(nuclei_path, frame=frame)
        inputs[Elements.NUCLEI] = [str(nuclei_path), *experiment_inputs]
    points = {}
    if transcripts_path is not None:
        points[Elements.TRANSCRIPTS] = read_transcripts(transcripts_path, frame=frame)
        inputs[Elements.TRANSCRIPTS] = [str(transcripts_path), *experiment_inputs]
    counts, protein = split_protein_features(read_cell_feature_matrix(counts_path))
    measured["nb_genes"] = int((~counts.var["is_control"]).sum())
    tables = {Elements.CELL_EXPRESSION: _cell_table(counts, counts_path, cells, cells_path, summary)}
    inputs[Elements.CELL_EXPRESSION] = [str(counts_path)] + ([str(summary_path)] if summary_path else [])
    parameters = {name: {**experiment.provenance(), **absent} for name in [*shapes, *points, *tables]}
    if boundaries_path is None:
        parameters[Elements.CELLS]["cell_geometry"] = CENTROID_CIRCLES_NOTE
    if protein is not None:
        tables[CELL_PROTEIN], parameters[CELL_PROTEIN] = _protein(protein, counts_path, experiment)
        inputs[CELL_PROTEIN] = [str(counts_path)]

    # added after build_sample, which takes no labels: the label table must not precede the labels it annotates
    added_later: dict[str, dict[str, Any]] = {"labels": {}, "tables": {}}
    cells_zarr_path = _cells_zarr_path(root, experiment) if labels else None
    if cells_zarr_path is not None:
        masks = read_cells_zarr(cells_zarr_path)
        _check_label_cells(masks, cells, cells_path)
        added_later["labels"] = label_elements(masks, frame)
        if masks.layout != "none":
            added_later["tables"] = {LABEL_CELL_IDS: label_cell_ids_table(masks)}
        for name in (*added_later["labels"], *added_later["tables"]):
            inputs[name] = [str(cells_zarr_path), *experiment_inputs]
            parameters[name] = {**experiment.provenance(), **masks.provenance()}

    images: dict[str, Any] = {}
    if morphology_path is not None:
        images[Elements.DAPI] = read_morphology(morphology_path, frame=frame)
        inputs[Elements.DAPI] = [str(morphology_path), *experiment_inputs]
        covers = _warn_unless_image_covers(
            morphology_path, images[Elements.DAPI], cells, frame.morphology_pixel_size_um
        )
        parameters[Elements.DAPI] = {**experiment.provenance(), "covers_cells": covers}

    if aligned is not None and he is not None:
        for name in (*shapes, *points, *images, *added_later["labels"]):
            methods[name] = aligned.method
            inputs[name].append(aligned.source)
            parameters[name].update(aligned.provenance())
        parameters[Elements.CELLS]["cells_on_he"] = _cells_on_he(aligned, frame, cells, he)
        images[Elements.HE] = he
        inputs[Elements.HE] = [str(he_image)] if isinstance(he_image, str | Path) else []

    estimated_errors_um = (
        dict.fromkeys(methods, aligned.estimated_error_um)
        if aligned is not None and aligned.estimated_error_um is not None
        else {}
    )
    sample = build_sample(
        converter=SOURCE,
        metadata=measured,
        pixel_size_um=frame.pixel_size_um,
        inputs=inputs,
        known_metadata=metadata,
        images=images,
        shapes=shapes,
        points=points,
        tables=tables,
        parameters=parameters,
        methods=methods,
        estimated_errors_um=estimated_errors_um,
    )
    _add_elements(sample, added_later, inputs, parameters, methods, estimated_errors_um)
    return sample


def _protein(protein: AnnData, counts_path: Path, experiment: XeniumExperiment) -> tuple[AnnData, dict[str, Any]]:
    """Build the ``cell_protein`` table and its provenance parameters; warn when the values cannot be scaled."""
    factor = read_protein_scaling_factor(counts_path)
    if factor is None:
        warnings.warn(
            f"{counts_path}: {protein.n_vars} protein features but no {PROTEIN_SCALING_ATTRIBUTE}: their values are "
            "stored as found in the file (not divided by a scaling factor)",
            UserWarning,
            stacklevel=3,
        )
    parameters = {
        **experiment.provenance(),
        PROTEIN_SCALING_ATTRIBUTE: factor,
        "protein_values": "stored integer / protein_scaling_factor" if factor is not None else "as stored",
    }
    return protein_table(protein, factor), parameters


def _cells_zarr_path(root: Path, experiment: XeniumExperiment) -> Path | None:
    files = experiment.specs.get("xenium_explorer_files")
    named = files.get("cells_zarr_filepath") if isinstance(files, dict) else None
    if isinstance(named, str) and (root / named).is_file():
        return root / named
    return _first_or_none(root, (CELLS_ZARR,))


def _check_label_cells(masks: XeniumMasks, cells: GeoDataFrame, cells_path: Path) -> None:
    """Refuse labels that name cells the boundaries do not have (files of different runs)."""
    unknown = pd.Index(masks.label_cell_ids[CELL_ID].unique()).difference(cells.index)
    if len(unknown):
        raise InputError(
            f"{masks.source}: {len(unknown)} cell id(s) of its labels are not among the cells of {cells_path.name} "
            f"(e.g. {unknown[0]!r}); files from different runs?"
        )


def _add_elements(
    sample: SpatialData,
    elements: Mapping[str, Mapping[str, Any]],
    inputs: Mapping[str, list[str]],
    parameters: Mapping[str, Mapping[str, Any]],
    methods: Mapping[str, str],
    estimated_errors_um: Mapping[str, float],
) -> None:
    """Add elements (kind -> name -> element, in that order) and their records to a sample."""
    record = get_record(sample)
    for kind, group in elements.items():
        for name, element in group.items():
            getattr(sample, kind)[name] = element
            record.elements[name] = _element_record(
                kind, inputs[name], parameters[name], methods.get(name), estimated_errors_um.get(name)
            )
    set_record(sample, record)


def _element_record(
    kind: str, inputs: list[str], parameters: Mapping[str, Any], method: str | None, estimated_error_um: float | None
) -> ElementRecord:
    return ElementRecord(
        kind=kind,
        provenance=Provenance(
            converter=SOURCE,
            inputs=inputs,
            method=method,
            parameters=dict(parameters),
            estimated_error_um=estimated_error_um,
        ),
    )
