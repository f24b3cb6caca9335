"""The input files of a Xenium output folder: their names, the experiment manifest, and reading a table file.

Every input is a :class:`~hest_zarr.converters._files.SourceFile` (the names Xenium Onboard Analysis gives it across
versions, from spatialdata-io's ``XeniumKeys``); :func:`locate_inputs` finds them all in a folder and refuses one
that lacks the cell-feature matrix, or both the cell boundaries and the cell summary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from spatialdata_io._constants._constants import XeniumKeys

from hest_zarr.converters._files import SourceFile
from hest_zarr.errors import InputError

#: Micrometres per morphology pixel of every Xenium instrument so far, used when ``experiment.xenium`` is absent.
DEFAULT_PIXEL_SIZE_UM = 0.2125
SOURCE = "xenium"
CELL_ID = XeniumKeys.CELL_ID.value
TRANSCRIPTS = SourceFile("transcripts", (XeniumKeys.TRANSCRIPTS_FILE.value, "transcripts.csv.gz"))
CELL_BOUNDARIES = SourceFile("cell boundaries", (XeniumKeys.CELL_BOUNDARIES_FILE.value, "cell_boundaries.csv.gz"))
NUCLEUS_BOUNDARIES = SourceFile(
    "nucleus boundaries", (XeniumKeys.NUCLEUS_BOUNDARIES_FILE.value, "nucleus_boundaries.csv.gz")
)
CELL_SUMMARY = SourceFile("cell summary", (XeniumKeys.CELL_METADATA_FILE.value, "cells.csv.gz"))
CELL_FEATURE_MATRIX = SourceFile(
    "cell-feature matrix", (XeniumKeys.CELL_FEATURE_MATRIX_FILE.value, "cell_feature_matrix")
)
MORPHOLOGY = SourceFile(
    "morphology image",
    (
        XeniumKeys.MORPHOLOGY_FOCUS_FILE.value,
        f"{XeniumKeys.MORPHOLOGY_FOCUS_DIR.value}/{XeniumKeys.MORPHOLOGY_FOCUS_CHANNEL_IMAGE.value.format(0)}",
        f"{XeniumKeys.MORPHOLOGY_FOCUS_DIR.value}/{XeniumKeys.MORPHOLOGY_FOCUS_V4_DAPI_FILENAME.value}",
        XeniumKeys.MORPHOLOGY_MIP_FILE.value,
        "morphology.ome.tif",
    ),
)
CELLS_ZARR = SourceFile("segmentation masks", (XeniumKeys.CELLS_ZARR.value,))
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


# --------------------------------------------------------------------------------------------- the files of a folder
@dataclass(frozen=True)
class XeniumInputs:
    """The input files found in a Xenium output folder (``None``: absent).

    Attributes
    ----------
    root
        The folder.
    counts
        The cell-feature matrix (``cell_feature_matrix.h5`` or its MEX folder).
    boundaries, summary
        The cell boundaries and the cell summary (``cells.parquet`` / ``cells.csv.gz``); at least one is found.
    transcripts, nuclei, morphology, cells_zarr
        The optional molecules, nucleus boundaries, morphology image and ``cells.zarr.zip``.

    """

    root: Path
    counts: Path
    boundaries: Path | None
    summary: Path | None
    transcripts: Path | None
    nuclei: Path | None
    morphology: Path | None
    cells_zarr: Path | None

    def absent_inputs(self) -> dict[str, list[str]]:
        """Provenance entry naming the optional inputs the folder lacks (a minimal bundle); empty when it has them all.

        Examples
        --------
        >>> inputs = XeniumInputs(Path("outs"), Path("outs/cell_feature_matrix.h5"), *[None] * 6)
        >>> inputs.absent_inputs()["absent_inputs"][0]
        'transcripts (transcripts.parquet or transcripts.csv.gz)'

        """
        optional = {
            TRANSCRIPTS: self.transcripts,
            CELL_BOUNDARIES: self.boundaries,
            NUCLEUS_BOUNDARIES: self.nuclei,
            MORPHOLOGY: self.morphology,
        }
        absent = [f"{source.what} ({source.expected})" for source, found in optional.items() if found is None]
        return {"absent_inputs": absent} if absent else {}


def locate_inputs(root: Path, experiment: XeniumExperiment) -> XeniumInputs:
    """Find the input files of a Xenium output folder; the manifest may name the morphology image and the masks.

    Raises
    ------
    InputError
        No cell-feature matrix, or neither cell boundaries nor a cell summary.

    Examples
    --------
    >>> root = Path("xenium_outs")
    >>> locate_inputs(root, read_experiment(root)).counts.name  # doctest: +SKIP
    'cell_feature_matrix.h5'

    """
    boundaries, summary = CELL_BOUNDARIES.find(root), CELL_SUMMARY.find(root)
    counts = CELL_FEATURE_MATRIX.require(root)
    if boundaries is None and summary is None:
        raise InputError(
            f"{root}: no cell boundaries nor cell summary found (expected {CELL_BOUNDARIES.expected} or "
            f"{CELL_SUMMARY.expected})"
        )
    images = experiment.specs.get("images", {})
    explorer_files = experiment.specs.get("xenium_explorer_files")
    masks = explorer_files.get("cells_zarr_filepath") if isinstance(explorer_files, dict) else None
    return XeniumInputs(
        root=root,
        counts=counts,
        boundaries=boundaries,
        summary=summary,
        transcripts=TRANSCRIPTS.find(root),
        nuclei=NUCLEUS_BOUNDARIES.find(root),
        morphology=_named_or_found(root, images.get("morphology_focus_filepath"), MORPHOLOGY),
        cells_zarr=_named_or_found(root, masks, CELLS_ZARR),
    )


def _named_or_found(root: Path, named: Any, source: SourceFile) -> Path | None:
    """Return the file the manifest names when it exists, else the first of the usual names."""
    if isinstance(named, str) and (root / named).is_file():
        return root / named
    return source.find(root)


# --------------------------------------------------------------------------------------------- tables on disk
def binary_columns(schema: pa.Schema) -> list[str]:
    """Name the byte-string columns of a parquet schema."""
    return [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]


def decode_binary(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Decode byte-string columns (XOA 1.x writes ids and names as parquet binary) to text."""
    frame = frame.copy()
    for column in columns:
        frame[column] = frame[column].str.decode("utf-8")
    return frame


def parquet_schema(path: Path) -> pa.Schema:
    """Read a parquet file's schema; refuse a file that is not parquet."""
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"{path}: not a readable parquet file (truncated or not parquet? {err})") from err


def read_table(path: Path) -> pd.DataFrame:
    """Read a Xenium table (parquet or csv/csv.gz) in memory, byte strings decoded."""
    if path.suffix == ".parquet":
        schema = parquet_schema(path)
        try:
            frame = pd.read_parquet(path)
        except (OSError, pa.ArrowException) as err:
            raise InputError(f"{path}: not a readable parquet file ({err})") from err
        return decode_binary(frame, binary_columns(schema))
    try:
        return pd.read_csv(path)
    except (OSError, EOFError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: not a readable CSV table (truncated or not CSV? {err})") from err


def require_columns(path: Path, found: list[str], required: tuple[str, ...], what: str) -> None:
    """Refuse a table that lacks one of the ``required`` columns, naming them and what the table should be."""
    missing = [c for c in required if c not in found]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing} (expected {what}); found {found}")
