"""Legacy Spatial Transcriptomics (ST v1, Stahl et al. 2016) into a sample store.

Inputs: a count table whose spot ids are ``XxY`` (``x`` = array column, ``y`` = array row; floats such as
``13.064x6.086`` are the positions adjusted by the ST spot detector), with spots as rows or as columns; optionally
the spot detector's alignment table (``x, y, new_x, new_y, pixel_x, pixel_y[, selected]``) and the H&E it refers to.

Array designs: the 1k array is a square grid of 100 um spots, 200 um centre to centre (one array unit = 200 um).
The 2k array interleaves a spot in the middle of every square of that grid: its ids form a checkerboard
(``x + y`` has one parity), one array unit is 100 um and nearest neighbours are diagonal, 141 um apart. The
design is recognised from the ids' parity.

Placement: with an alignment table, every spot whose id matches a row (on ``x, y``, else ``new_x, new_y``) sits at
that row's ``pixel_x, pixel_y`` exactly, and ``in_tissue`` is its ``selected`` flag. The pixel size comes from a
least-squares affine fit of the detector's array positions (``new_x, new_y`` in micrometres) to ``pixel_x,
pixel_y`` over all rows; spots of the count table the detector did not report are placed by that fit
(``position_fitted`` = True, ``in_tissue`` = 0). Without an alignment table spots sit on the array grid in
micrometres and ``global`` is micrometres (pixel size 1.0); an image cannot be placed then.

Why not an existing reader: neither spatialdata-io nor scanpy reads ST v1 count tables or spot detector output.
"""

from __future__ import annotations

import gzip
import math
import re
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from spatialdata import SpatialData

from hest_zarr.converters._files import refuse_duplicates
from hest_zarr.converters._images import he_image
from hest_zarr.converters._tables import SpotPlacement, compact_integers, infer_species, read_delimited_table
from hest_zarr.elements import Elements, Keys, circle_spots, expression_table, spot_sample
from hest_zarr.elements.lattice import ST_GRID_PITCH_UM, UM_PER_ARRAY_UNIT, fit_lattice
from hest_zarr.errors import InputError
from hest_zarr.schemas import SampleMetadata

ST_SPOT_DIAMETER_UM = 100.0
ArrayDesign = Literal["auto", "1k", "2k"]
#: Nearest centre-to-centre distance of each design (HEST's ``inter_spot_dist``).
NEAREST_SPOT_DISTANCE_UM: dict[str, float] = {"1k": ST_GRID_PITCH_UM, "2k": ST_GRID_PITCH_UM / math.sqrt(2)}
SPOT_ID = re.compile(r"^(\d+(?:\.\d+)?)x(\d+(?:\.\d+)?)$")
ALIGNMENT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")
#: Below this fraction of count-table spots found in the alignment table, the two belong to different samples.
MIN_MATCHED_FRACTION = 0.5
ID_DECIMALS = 3


def parse_spot_ids(labels: pd.Index) -> np.ndarray | None:
    """Return the ``(x, y)`` array positions of ``XxY`` spot ids, or ``None`` when a label is not one.

    Examples
    --------
    >>> parse_spot_ids(pd.Index(["10x12", "13.064x6.086"])).tolist()
    [[10.0, 12.0], [13.064, 6.086]]

    """
    matches = [SPOT_ID.match(str(label).strip()) for label in labels]
    if not matches or not all(matches):
        return None
    return np.array([[float(m.group(1)), float(m.group(2))] for m in matches if m is not None])


def detect_array_design(array_xy: np.ndarray) -> Literal["1k", "2k"]:
    """Return ``"2k"`` when the rounded ids form a checkerboard (one parity of ``x + y``), else ``"1k"``.

    Examples
    --------
    >>> detect_array_design(np.array([[1, 1], [2, 2], [1, 3], [3, 1]]))
    '2k'

    """
    parity = np.round(array_xy).astype(np.int64).sum(axis=1) % 2
    return "2k" if len(np.unique(parity)) == 1 else "1k"


#: Suffixes of the text tables an ST v1 folder holds (each optionally ``.gz``) and of the images.
TABLE_SUFFIXES = (".tsv", ".csv", ".txt")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def _first_lines(path: Path, count: int = 2) -> list[str]:
    """Return the first lines of a text file (gzipped or not); ``[]`` when it is not readable text."""
    try:
        with gzip.open(path, "rt") if path.suffix.lower() == ".gz" else path.open() as handle:
            return [handle.readline() for _ in range(count)]
    except (OSError, EOFError, UnicodeDecodeError, zlib.error):
        return []


def _split(line: str) -> list[str]:
    return [field.strip().strip('"') for field in re.split(r"[\t,;]", line.strip())]


def looks_like_st_table(path: str | Path) -> bool:
    """Tell whether a text table (optionally gzipped) has ``XxY`` spot ids on its first line or in its first column.

    Examples
    --------
    >>> looks_like_st_table("hest_zarr/data/st_v1_mob1/MOB1.tsv.gz")  # doctest: +SKIP
    True

    """
    lines = _first_lines(Path(path))
    if len(lines) < 2:
        return False
    fields = _split(lines[0]) + _split(lines[1])[:1]
    return any(SPOT_ID.match(field) for field in fields)


def _is_alignment_table(path: Path) -> bool:
    lines = _first_lines(path, 1)
    return bool(lines) and set(ALIGNMENT_COLUMNS) <= set(_split(lines[0]))


def _is_table_name(path: Path) -> bool:
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
    return path.is_file() and suffixes[-1:] != [] and suffixes[-1] in TABLE_SUFFIXES


def st_count_tables(folder: Path) -> list[Path]:
    """Return the ST v1 count tables of a folder (text tables with ``XxY`` spot ids, not alignment tables)."""
    tables = sorted(p for p in folder.iterdir() if _is_table_name(p))
    return [p for p in tables if not _is_alignment_table(p) and looks_like_st_table(p)]


def _stem(path: Path) -> str:
    return path.name.split(".")[0]


def _pick(candidates: list[Path], stem: str) -> Path | None:
    """Return the candidate named after ``stem`` (``alignment_table_MOB1.tsv`` for ``MOB1``), else the only one."""
    named = [p for p in candidates if _stem(p) == stem or _stem(p).endswith(f"_{stem}")]
    if len(named) == 1:
        return named[0]
    return candidates[0] if len(candidates) == 1 else None


def find_st_inputs(folder: str | Path) -> tuple[Path, Path | None, Path | None]:
    """Find the count table, the spot detector alignment table and the H&E of an ST v1 sample folder.

    The count table is the folder's one text table (``.tsv/.csv/.txt``, optionally ``.gz``) with ``XxY`` spot ids;
    the alignment table one with ``x, y, pixel_x, pixel_y`` columns, and the image a JPG/PNG/TIFF, each taken when
    it is named after the count table (``alignment_table_MOB1.tsv``, ``MOB1.jpg``) or is the only one. The image is
    only taken with an alignment table, which places the spots on it.

    Raises
    ------
    InputError
        No count table, or several (the message lists them: pass one).

    Examples
    --------
    >>> [p.name if p else None for p in find_st_inputs("hest_zarr/data/st_v1_mob1")]  # doctest: +SKIP
    ['MOB1.tsv.gz', 'alignment_table_MOB1.tsv.gz', 'MOB1.jpg']

    """
    folder = Path(folder)
    counts = st_count_tables(folder)
    if not counts:
        found = sorted(p.name for p in folder.iterdir())
        listed = ", ".join(found[:10]) + (", ..." if len(found) > 10 else "") if found else "nothing"
        raise InputError(
            f"{folder}: no ST v1 count table in this folder (expected a .tsv/.csv/.txt table, optionally .gz, with "
            f"XxY spot ids such as '10x12' on its rows or columns); found {listed}"
        )
    if len(counts) > 1:
        raise InputError(
            f"{folder}: {len(counts)} ST v1 count tables ({', '.join(p.name for p in counts)}); pass the one to "
            "convert (and its --alignment and --image)"
        )
    stem = _stem(counts[0])
    alignment = _pick(sorted(p for p in folder.iterdir() if _is_table_name(p) and _is_alignment_table(p)), stem)
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    image = _pick(images, stem) if alignment is not None else None
    return counts[0], alignment, image


def _read_counts_table(path: Path) -> tuple[pd.DataFrame, np.ndarray, str]:
    """Return the counts as spots x genes, the spots' array positions and the file's orientation."""
    table = read_delimited_table(path)
    table.index = table.index.astype(str)
    table.columns = table.columns.astype(str)
    from_rows, from_columns = parse_spot_ids(table.index), parse_spot_ids(table.columns)
    if (from_rows is None) == (from_columns is None):
        raise InputError(
            f"{path}: unknown layout (expected XxY spot ids such as '10x12' on either the rows or the columns); "
            f"found rows {list(table.index[:2])}, columns {list(table.columns[:2])}"
        )
    counts, positions, orientation = (
        (table, from_rows, "spots x genes") if from_rows is not None else (table.T, from_columns, "genes x spots")
    )
    refuse_duplicates(counts.index, path, "spot id")
    non_numeric = [c for c in counts.columns if not pd.api.types.is_numeric_dtype(counts[c])]
    if non_numeric:
        raise InputError(f"{path}: non-numeric counts (gene {non_numeric[0]!r}); expected a numeric count table")
    return counts, positions, orientation


def _id_keys(array_xy: np.ndarray) -> pd.MultiIndex:
    rounded = np.round(np.asarray(array_xy, dtype=np.float64), ID_DECIMALS)
    return pd.MultiIndex.from_arrays([rounded[:, 0], rounded[:, 1]])


def _read_alignment(path: Path) -> pd.DataFrame:
    table = read_delimited_table(path, index_col=None)
    missing = [c for c in ALIGNMENT_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(
            f"{path}: not a spot detector alignment table: missing column(s) {missing} "
            f"(expected x, y, new_x, new_y, pixel_x, pixel_y, selected); found {list(table.columns)}"
        )
    return table


def _match_alignment(
    spot_xy: np.ndarray, alignment: pd.DataFrame, path: Path, counts_name: str
) -> tuple[np.ndarray, str]:
    """Row of the alignment table of every spot (-1 where none), matching ids on x, y or on new_x, new_y."""
    candidates = []
    for columns in (("x", "y"), ("new_x", "new_y")):
        if set(columns) <= set(alignment.columns):
            keys = _id_keys(alignment[list(columns)].to_numpy(dtype=np.float64))
            if keys.has_duplicates:
                raise InputError(f"{path}: array position {keys[keys.duplicated()][0]} appears twice in {columns}")
            candidates.append((keys.get_indexer(_id_keys(spot_xy)), ", ".join(columns)))
    rows, matched_on = max(candidates, key=lambda candidate: int((candidate[0] >= 0).sum()))  # first wins ties
    if (rows >= 0).mean() < MIN_MATCHED_FRACTION:
        raise InputError(
            f"{path}: only {(rows >= 0).sum()} of the {len(rows)} spots of {counts_name} have a row in this "
            f"alignment table (matched on x, y and on new_x, new_y); alignment and counts come from different samples?"
        )
    return rows, matched_on


def _grid_placement(spot_xy: np.ndarray, design: str, um_per_unit: float) -> SpotPlacement:
    """Place the spots on the array grid, in micrometres (no alignment table: ``global`` is micrometres)."""
    return SpotPlacement(
        centres=spot_xy * um_per_unit,
        pixel_size=1.0,
        method=f"array ids on the ST {design} grid ({um_per_unit:g} um per array unit); no image: global = micrometres",
        parameters={"global_units": "um"},
    )


def _aligned_placement(
    spot_xy: np.ndarray, alignment_path: Path, counts_name: str, um_per_unit: float
) -> SpotPlacement:
    """Place the spots by the spot detector's alignment table: matched rows exactly, the others by the affine fit."""
    table = _read_alignment(alignment_path)
    rows, matched_on = _match_alignment(spot_xy, table, alignment_path, counts_name)
    measured_columns = ["new_x", "new_y"] if {"new_x", "new_y"} <= set(table.columns) else ["x", "y"]
    fit = fit_lattice(
        table[measured_columns].to_numpy(dtype=np.float64) * um_per_unit,
        table[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64),
        str(alignment_path),
    )
    matched = rows >= 0
    aligned_pixels = table[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    centres = fit.to_pixels(spot_xy * um_per_unit)
    centres[matched] = aligned_pixels[rows[matched]]
    # how far the fit from ideal grid ids lands from the detected spots: the error of the spots placed by it
    grid_error_px = np.hypot(*(fit.to_pixels(table[["x", "y"]].to_numpy(float) * um_per_unit) - aligned_pixels).T)
    obs_columns: dict[str, np.ndarray] = {}
    if "selected" in table.columns:
        selected = table["selected"].to_numpy(dtype=np.int32)
        obs_columns[Keys.IN_TISSUE] = np.where(matched, selected[np.maximum(rows, 0)], 0).astype(np.int32)
    obs_columns["position_fitted"] = ~matched
    return SpotPlacement(
        centres=centres,
        pixel_size=fit.pixel_size_um,
        method=(
            "spot detector alignment: pixel_x, pixel_y of the matched row; pixel size and unmatched spots from the "
            f"least-squares affine fit of {', '.join(measured_columns)} (x {um_per_unit:g} um) to pixel_x, pixel_y"
        ),
        parameters={
            **fit.parameters(),
            "matched_on": matched_on,
            "spots_matched": int(matched.sum()),
            "spots_fitted": int((~matched).sum()),
            "fitted_spot_error_rms_px": float(np.sqrt(np.mean(grid_error_px**2))),
            "fit_columns": measured_columns,
            "global_units": "image pixels",
        },
        obs_columns=obs_columns,
        error_um=fit.rms_px * fit.pixel_size_um,
    )


def read_st_v1(
    counts: str | Path,
    *,
    alignment: str | Path | None = None,
    image: str | Path | None = None,
    array_design: ArrayDesign = "auto",
    sample_id: str | None = None,
    metadata: SampleMetadata | None = None,
) -> SpatialData:
    """Read an ST v1 count table (and its spot detector alignment and H&E) into a sample.

    Parameters
    ----------
    counts
        Count table (CSV/TSV/TXT, optionally gzipped) with ``XxY`` spot ids on the rows or the columns, or a folder
        holding one (with its alignment table and image, found by :func:`find_st_inputs` when not given).
    alignment
        Spot detector output (``x, y, new_x, new_y, pixel_x, pixel_y, selected``) in the image's pixels.
    image
        The H&E (JPG/PNG/TIFF) the alignment table refers to; needs ``alignment``.
    array_design
        ``"1k"`` (200 um square grid), ``"2k"`` (checkerboard on a 100 um grid) or ``"auto"`` (from the ids).
    sample_id
        Sample id (default: the count file's name without suffixes).
    metadata
        Known metadata (species, organ...); its values win over the measured ones.

    Returns
    -------
    The sample: ``spots`` (100 um circles), ``spot_expression`` (raw counts; ``array_col`` = x, ``array_row`` = y,
    and with an alignment ``in_tissue`` and ``position_fitted``) and ``he`` when an image is given.

    Raises
    ------
    InputError
        Missing or unreadable files, a table without ``XxY`` ids, an alignment table matching under half of the
        spots, an image without an alignment table, an image smaller than the spot positions.

    Examples
    --------
    >>> sdata = read_st_v1("MOB1.tsv", alignment="alignment_table_MOB1.tsv", image="MOB1.jpg")  # doctest: +SKIP
    >>> hest_zarr.write(sdata, "MOB1.zarr")  # doctest: +SKIP

    """
    counts_path = Path(counts)
    if counts_path.is_dir():
        counts_path, found_alignment, found_image = find_st_inputs(counts_path)
        if alignment is None:
            alignment, image = found_alignment, image if image is not None else found_image
    frame, spot_xy, orientation = _read_counts_table(counts_path)
    design = detect_array_design(spot_xy) if array_design == "auto" else array_design
    um_per_unit = UM_PER_ARRAY_UNIT[design]
    spot_ids = frame.index.to_numpy(dtype=str)
    inputs = [str(counts_path)]
    images: dict[str, Any] = {}
    measured: dict[str, Any] = {}
    if alignment is None:
        if image is not None:
            raise InputError(
                f"{image}: an image needs the spot detector's alignment table to place the spots on it (pass alignment)"
            )
        placement = _grid_placement(spot_xy, design, um_per_unit)
    else:
        alignment_path = Path(alignment)
        placement = _aligned_placement(spot_xy, alignment_path, counts_path.name, um_per_unit)
        inputs.append(str(alignment_path))
        if image is not None:
            images[Elements.HE], measured = he_image(Path(image), 1.0, placement.pixel_size, placement.centres)
    obs_columns: dict[str, Any] = {
        Keys.ARRAY_COL: compact_integers(spot_xy[:, 0]),
        Keys.ARRAY_ROW: compact_integers(spot_xy[:, 1]),
        **placement.obs_columns,
    }
    spot_parameters: dict[str, Any] = {
        "array_design": design,
        "array_design_detected": array_design == "auto",
        "um_per_array_unit": um_per_unit,
        "spot_diameter_um": ST_SPOT_DIAMETER_UM,
        **placement.parameters,
    }
    pixel_size = placement.pixel_size
    spots = circle_spots(
        placement.centres, ST_SPOT_DIAMETER_UM / 2 / pixel_size, spot_ids, pixel_size, source=str(counts_path)
    )
    table_parameters: dict[str, Any] = {"counts_orientation": orientation}
    species = infer_species(frame.columns)
    if species is not None:
        table_parameters["species_inference"] = species[1]
    expression = expression_table(
        frame.to_numpy(),
        spot_ids,
        pd.DataFrame(index=frame.columns),
        obs_columns=obs_columns,
        source=str(counts_path),
    )
    element_inputs = {Elements.SPOTS: inputs, Elements.SPOT_EXPRESSION: inputs}
    if images:
        element_inputs[Elements.HE] = [str(image)]
    measured.update(
        id=sample_id or counts_path.name.split(".")[0],
        st_technology="Spatial Transcriptomics",
        species=species[0] if species else None,
        spot_diameter=ST_SPOT_DIAMETER_UM,
        inter_spot_dist=NEAREST_SPOT_DISTANCE_UM[design],
        spots_under_tissue=int(obs_columns[Keys.IN_TISSUE].sum()) if Keys.IN_TISSUE in obs_columns else None,
        nb_genes=int(frame.shape[1]),
        pixel_size_um_estimated=pixel_size if alignment is not None else None,
    )
    return spot_sample(
        spots,
        expression,
        method=placement.method,
        estimated_error_um=placement.error_um,
        converter="st_v1",
        metadata=measured,
        pixel_size_um=pixel_size,
        inputs=element_inputs,
        known_metadata=metadata,
        images=images,
        parameters={Elements.SPOTS: spot_parameters, Elements.SPOT_EXPRESSION: table_parameters},
    )
