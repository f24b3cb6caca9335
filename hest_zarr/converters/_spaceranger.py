"""Space Ranger's spot positions, scale factors and images, shared by the Visium and Visium HD converters.

Positions: the old headerless ``tissue_positions_list.csv``, the new ``tissue_positions.csv`` with header or
``tissue_positions.parquet`` (:func:`read_positions`); without any of them, a Loupe manual-alignment JSON
(:func:`read_loupe_alignment`: ``oligo`` entries with ``row``, ``col``, ``imageX``, ``imageY``, ``dia`` and
``tissue``). Loupe names no barcodes, so its spots are matched to the barcodes by array position
(:func:`loupe_positions`): from Space Ranger's barcode coordinate list (``barcodes/visium-vN_coordinates.txt`` of its
install) or from ``array_row``/``array_col`` columns of an AnnData's ``obs``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata_io._constants._constants import VisiumKeys

from hest_zarr.converters._files import SourceFile, refuse_duplicates
from hest_zarr.converters._tables import refuse_cut_last_line
from hest_zarr.elements import Elements, Keys, expression_table
from hest_zarr.errors import InputError

#: The spot positions of a Space Ranger ``outs/`` folder, newest layout first.
POSITIONS = SourceFile(
    "spot positions",
    (
        f"spatial/{VisiumKeys.SPOTS_FILE_2.value}",
        f"spatial/{VisiumKeys.SPOTS_FILE_1.value}",
        "spatial/tissue_positions.parquet",
    ),
)
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
SPOT_OBS_COLUMNS = (Keys.ARRAY_ROW, Keys.ARRAY_COL, Keys.IN_TISSUE)


# --------------------------------------------------------------------------------------------- positions
def read_positions(path: Path) -> pd.DataFrame:
    """Read Space Ranger spot positions (any version) indexed by barcode.

    Examples
    --------
    >>> read_positions(Path("outs/spatial/tissue_positions.parquet")).columns.tolist()  # doctest: +SKIP
    ['in_tissue', 'array_row', 'array_col', 'pxl_row_in_fullres', 'pxl_col_in_fullres']

    """
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            with path.open() as handle:
                has_header = handle.readline().startswith("barcode")
            refuse_cut_last_line(path, ",", has_header=has_header)
            frame = pd.read_csv(path, header=0 if has_header else None)
            if not has_header:
                frame.columns = POSITION_COLUMNS[: frame.shape[1]]
    except InputError:
        raise
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: cannot read spot positions ({err})") from err
    missing = [c for c in POSITION_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing position column(s) {missing}; found {list(frame.columns)}")
    refuse_duplicates(frame["barcode"].astype(str), path)
    return frame[POSITION_COLUMNS].set_index("barcode")


def read_loupe_alignment(path: Path) -> pd.DataFrame:
    """Read the spots of a Loupe manual-alignment JSON, one row per ``(array_row, array_col)``.

    Columns: ``in_tissue`` (Loupe's ``tissue``; spots it left unselected have no entry and count as 0),
    ``pxl_row_in_fullres``/``pxl_col_in_fullres`` (``imageY``/``imageX``) and ``spot_diameter_fullres`` (``dia``).

    Examples
    --------
    >>> read_loupe_alignment(Path("V10M24-003-B1.json")).loc[(0, 0), "pxl_col_in_fullres"]  # doctest: +SKIP
    3255.5408

    """
    try:
        document = json.loads(path.read_text())
        frame = pd.DataFrame(document["oligo"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(
            f"{path}: not a Loupe alignment file with 'oligo' spots ({type(err).__name__}: {err})"
        ) from err
    missing = [key for key in ("row", "col", "imageX", "imageY", "dia") if key not in frame.columns]
    if missing:
        raise InputError(f"{path}: Loupe 'oligo' entries lack {missing}; found keys {list(frame.columns)}")
    in_tissue = frame["tissue"].eq(True) if "tissue" in frame.columns else pd.Series(False, index=frame.index)
    spots = pd.DataFrame(
        {
            Keys.ARRAY_ROW: frame["row"].astype(np.int32),
            Keys.ARRAY_COL: frame["col"].astype(np.int32),
            Keys.IN_TISSUE: in_tissue.astype(np.int32),
            "pxl_row_in_fullres": frame["imageY"].astype(np.float64),
            "pxl_col_in_fullres": frame["imageX"].astype(np.float64),
            "spot_diameter_fullres": frame["dia"].astype(np.float64),
        }
    ).set_index([Keys.ARRAY_ROW, Keys.ARRAY_COL])
    if spots.index.has_duplicates:
        raise InputError(
            f"{path}: Loupe 'oligo' entries repeat array position (row, col) {spots.index[spots.index.duplicated()][0]}"
        )
    return spots


def find_loupe_alignment(root: Path) -> Path | None:
    """Return the Loupe alignment JSON (a ``*.json`` with ``oligo`` entries) in ``root`` or ``root/spatial``.

    Examples
    --------
    >>> find_loupe_alignment(Path("GSM123")).name  # doctest: +SKIP
    'V10M24-003-B1.json'

    """
    found = []
    for candidate in sorted(root.glob("*.json")) + sorted((root / "spatial").glob("*.json")):
        if candidate.name == VisiumKeys.SCALEFACTORS_FILE.value:
            continue
        try:
            document = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(document, dict) and isinstance(document.get("oligo"), list):
            found.append(candidate)
    if len(found) > 1:
        raise InputError(f"{root}: several Loupe alignment files ({', '.join(map(str, found))}); pass alignment=")
    return found[0] if found else None


def read_barcode_coordinates(path: Path) -> pd.DataFrame:
    """Read Space Ranger's barcode coordinate list (``visium-vN_coordinates.txt``): barcode, 1-based column and row.

    Returns ``array_row``/``array_col`` (0-based, as in ``tissue_positions.csv``) indexed by the 16-base barcode.

    Examples
    --------
    >>> read_barcode_coordinates(Path("visium-v1_coordinates.txt")).shape  # doctest: +SKIP
    (4992, 2)

    """
    try:
        table = pd.read_csv(path, sep="\t", header=None, names=["barcode", "col", "row"], dtype={"barcode": str})
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: cannot read barcode coordinates ({err})") from err
    if not all(pd.api.types.is_integer_dtype(table[column]) for column in ("col", "row")):
        raise InputError(f"{path}: expected 3 tab-separated columns: barcode, 1-based column, 1-based row")
    return pd.DataFrame(
        {Keys.ARRAY_ROW: table["row"].astype(np.int32) - 1, Keys.ARRAY_COL: table["col"].astype(np.int32) - 1}
    ).set_index(table["barcode"])


def loupe_positions(
    alignment_path: Path, adata: AnnData, barcode_coordinates: Path | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the positions of the barcodes of ``adata`` from a Loupe alignment, and every spot of the alignment.

    Barcodes get their array position from ``barcode_coordinates`` (Space Ranger's list; a ``-1`` gem-group suffix
    is ignored) or else from ``adata.obs['array_row', 'array_col']``; barcodes without one are left out. The
    second frame is :func:`read_loupe_alignment`'s, with ``array_row``/``array_col`` as columns.

    Examples
    --------
    >>> counts = read_counts(Path("GSM123/filtered_feature_bc_matrix.h5"))  # doctest: +SKIP
    >>> alignment, coordinates = Path("GSM123/V10M24-003-B1.json"), Path("visium-v2_coordinates.txt")
    >>> positions, all_spots = loupe_positions(alignment, counts, coordinates)  # doctest: +SKIP

    """
    if barcode_coordinates is not None:
        coordinates = read_barcode_coordinates(barcode_coordinates)
        keys = adata.obs_names.str.replace(r"-\d+$", "", regex=True)
        grid = coordinates.reindex(keys).set_index(adata.obs_names)
    elif {Keys.ARRAY_ROW, Keys.ARRAY_COL} <= set(adata.obs.columns):
        grid = adata.obs[[Keys.ARRAY_ROW, Keys.ARRAY_COL]]
    else:
        raise InputError(
            f"{alignment_path}: a Loupe alignment places spots by array row/column and names no barcodes; pass "
            "barcode_coordinates= (Space Ranger's barcodes/visium-vN_coordinates.txt) or counts whose obs hold "
            "array_row/array_col"
        )
    spots = read_loupe_alignment(alignment_path)
    grid = grid.dropna().astype(np.int32)
    joined = grid.join(spots, on=[Keys.ARRAY_ROW, Keys.ARRAY_COL], how="inner")
    joined.index.name = "barcode"
    return joined[POSITION_COLUMNS[1:]], spots.reset_index()


def positions_for_barcodes(
    positions: pd.DataFrame, barcodes: pd.Index, positions_source: str, counts_path: Path
) -> pd.DataFrame:
    """Return the positions rows of ``barcodes`` in their order, or fail naming both files when some lack one.

    Examples
    --------
    >>> positions = pd.DataFrame({"in_tissue": [1, 0]}, index=["AAAC-1", "TTTG-1"])
    >>> positions_for_barcodes(positions, pd.Index(["TTTG-1"]), "tissue_positions.csv", Path("matrix.h5"))
            in_tissue
    TTTG-1          0

    """
    missing = barcodes.difference(positions.index)
    if len(missing):
        raise InputError(
            f"{positions_source}: {len(missing)} of the {len(barcodes)} barcodes of {counts_path.name} have no "
            f"position (e.g. {missing[0]}); positions and counts come from different samples?"
        )
    return positions.loc[barcodes]


def spot_expression(
    adata: AnnData, positions: pd.DataFrame, counts_path: Path, region: str = Elements.SPOTS
) -> AnnData:
    """Build the expression table of Visium spots or bins: raw counts, barcode ids, array position, in_tissue.

    Examples
    --------
    >>> spot_expression(counts, positions, Path("matrix.h5"), region="spots_square_008um")  # doctest: +SKIP

    """
    return expression_table(
        adata.X,
        adata.obs_names.astype(str),
        adata.var,
        region=region,
        obs_columns={column: positions[column].to_numpy(dtype=np.int32) for column in SPOT_OBS_COLUMNS},
        source=str(counts_path),
    )


# --------------------------------------------------------------------------------------------- scale factors, images
def read_scalefactors(path: Path) -> dict[str, float]:
    """Read ``scalefactors_json.json``, which must give ``spot_diameter_fullres``.

    Examples
    --------
    >>> read_scalefactors(Path("outs/spatial/scalefactors_json.json"))["spot_diameter_fullres"]  # doctest: +SKIP
    89.43

    """
    try:
        factors = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read scale factors ({err})") from err
    if not isinstance(factors, dict):
        raise InputError(f"{path}: expected a JSON object of scale factors, found {type(factors).__name__}")
    if "spot_diameter_fullres" not in factors:
        raise InputError(f"{path}: no 'spot_diameter_fullres' entry")
    for key in SCALE_FACTORS:
        if key in factors:
            factors[key] = positive_number(factors[key], f"{path}: {key!r}")
    return factors


#: The numbers of ``scalefactors_json.json`` that are sizes or scales: finite and > 0 in any valid file.
SCALE_FACTORS = (
    "spot_diameter_fullres",
    "fiducial_diameter_fullres",
    "tissue_hires_scalef",
    "tissue_lowres_scalef",
    "regist_target_img_scalef",
    "bin_size_um",
    "microns_per_pixel",
)


def positive_number(value: object, what: str) -> float:
    """Return ``value`` as a finite float > 0, or refuse it naming ``what`` and the value found.

    Examples
    --------
    >>> positive_number("89.4", "scalefactors_json.json: 'spot_diameter_fullres'")
    89.4
    >>> positive_number(0, "scalefactors_json.json: 'spot_diameter_fullres'")
    Traceback (most recent call last):
    hest_zarr.errors.InputError: scalefactors_json.json: 'spot_diameter_fullres' is 0; expected a positive number

    """
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise InputError(f"{what} is {value!r}; expected a positive number")
    return number


def pick_spatial_image(root: Path, factors: dict[str, float]) -> tuple[Path, float] | None:
    """Return Space Ranger's hires (else lowres) image under ``root/spatial`` and its scale to full resolution.

    Examples
    --------
    >>> pick_spatial_image(Path("outs"), {"tissue_hires_scalef": 0.15})  # doctest: +SKIP
    (PosixPath('outs/spatial/tissue_hires_image.png'), 0.15)

    """
    for name, key in (
        (VisiumKeys.IMAGE_HIRES_FILE.value, VisiumKeys.SCALEFACTORS_HIRES.value),
        (VisiumKeys.IMAGE_LOWRES_FILE.value, VisiumKeys.SCALEFACTORS_LOWRES.value),
    ):
        if (root / name).is_file() and key in factors:
            return root / name, float(factors[key])
    return None
