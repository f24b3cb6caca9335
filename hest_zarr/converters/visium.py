"""Visium (Space Ranger ``outs/``, any version, CytAssist included) into a sample store.

Counts: a 10x h5 or MEX directory (read with scanpy's 10x readers; MEX files may be gzipped or not), or an AnnData
``.h5ad`` whose raw counts are in ``layers['counts']``, ``X`` or ``raw.X``. Positions: the old headerless
``tissue_positions_list.csv``, the new ``tissue_positions.csv`` with header or ``tissue_positions.parquet`` (read with
pandas); without any of them, a Loupe manual-alignment JSON (``oligo`` entries with ``row``, ``col``, ``imageX``,
``imageY``, ``dia`` and ``tissue``). Loupe names no barcodes, so its spots are matched to the barcodes by array
position: from Space Ranger's barcode coordinate list (``barcodes/visium-vN_coordinates.txt`` of its install) or from
``array_row``/``array_col`` columns of an AnnData's ``obs``.

Why not ``spatialdata_io.visium``: it names coordinate systems after the dataset, keeps images at their
downscaled resolution in separate systems, reads neither h5ad counts nor Loupe alignments, and gives no hook to fail
with a clear message on mismatched barcodes or truncated files; the store layout needs ``global`` =
full-resolution pixels and ``um``.

Spots are circles centred on Space Ranger's ``pxl_col_in_fullres, pxl_row_in_fullres`` (Loupe's ``imageX,
imageY``) with the radius of the 55 um capture spot. The pixel size is measured on the spot lattice
(:func:`spot_lattice_pixel_size`): the trimmed least-squares fit of every positioned spot's centre to its
``array_row, array_col`` on the slide layout (100 um along rows, rows 87 um apart on 6.5 mm capture areas).
``65 um / spot_diameter_fullres`` (Loupe's ``dia``) is only the fallback for fewer than 3 spots not on one line: it
matches the lattice on Space Ranger 1.0 and 2.x outputs but is 7.7 % low on Space Ranger 3.0 CytAssist ones, whose
``spot_diameter_fullres`` spans 70 um.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity, Scale
from spatialdata_io._constants._constants import VisiumKeys
from xarray import DataArray

from hest_zarr.elements import (
    Elements,
    Keys,
    build_sample,
    circle_spots,
    expression_table,
    frame_transformations,
    integer_counts,
)
from hest_zarr.elements.lattice import (
    DISAGREEMENT_TOLERANCE,
    VISIUM_INTER_SPOT_DISTANCE_UM,
    PixelSizeDisagreementWarning,
    fit_pixel_size,
    spans_plane,
    visium_lattice_name,
    visium_lattice_um,
)
from hest_zarr.errors import InputError
from hest_zarr.schemas import SampleMetadata

VISIUM_SPOT_DIAMETER_UM = 55.0
#: What Space Ranger's ``spot_diameter_fullres`` (and Loupe's ``dia``) span according to the 10x docs (a
#: theoretical 65 um spot, not the 55 um capture spot); the fallback pixel size is this over it. Measured with the
#: lattice's pixel size it spans 65.0 um on the scanpy (Space Ranger 1.0) sample, 64.96 um on SFE's (2.x) and
#: 70.0 um on perik's (3.0 CytAssist).
SPOT_DIAMETER_FULLRES_UM = 65.0
#: Columns of a positions frame that place its spots on the lattice and in the image.
LATTICE_COLUMNS = ["array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
COUNTS_CANDIDATES = (
    VisiumKeys.FILTERED_COUNTS_FILE.value,
    "filtered_feature_bc_matrix",
    VisiumKeys.RAW_COUNTS_FILE.value,
    "raw_feature_bc_matrix",
)
POSITIONS_CANDIDATES = (
    f"spatial/{VisiumKeys.SPOTS_FILE_2.value}",
    f"spatial/{VisiumKeys.SPOTS_FILE_1.value}",
    "spatial/tissue_positions.parquet",
)
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
SPOT_OBS_COLUMNS = (Keys.ARRAY_ROW, Keys.ARRAY_COL, Keys.IN_TISSUE)
SCALEFACTORS_FILE = f"spatial/{VisiumKeys.SCALEFACTORS_FILE.value}"
#: AnnData matrices that may hold raw counts, in the order they are tried.
ANNDATA_COUNT_MATRICES = ("layers['counts']", "X", "raw.X")
_GENOME_SPECIES = {"GRCh38": "Homo sapiens", "hg19": "Homo sapiens", "mm10": "Mus musculus", "GRCm39": "Mus musculus"}


# --------------------------------------------------------------------------------------------- counts
def read_counts(path: Path) -> AnnData:
    """Read a counts file as integer counts: a 10x h5, a 10x MEX directory or an AnnData ``.h5ad``.

    ``var_names`` are gene symbols made unique; Ensembl ids stay in ``var['gene_ids']``. An AnnData's raw counts
    are found by :func:`read_anndata_counts`.

    Examples
    --------
    >>> read_counts(Path("outs/filtered_feature_bc_matrix.h5")).X.dtype  # doctest: +SKIP
    dtype('int32')

    """
    import scanpy as sc

    if path.suffix.lower() == ".h5ad":
        return read_anndata_counts(path)
    if path.is_dir() and (path / "matrix.mtx").is_file() and (path / "features.tsv").is_file():
        return read_plain_mex(path)
    try:
        if path.is_dir():
            adata = sc.read_10x_mtx(path, var_names="gene_symbols", make_unique=True, gex_only=False)
        else:
            try:
                adata = sc.read_10x_h5(path, gex_only=False)
            except Exception:  # e.g. float indptr/shape written by R's rhdf5; the direct reader says what is wrong
                adata = read_10x_h5_arrays(path)
            adata.var_names_make_unique()
    except InputError:
        raise
    except FileNotFoundError as err:
        raise InputError(f"{path}: incomplete matrix ({err})") from err
    except Exception as err:  # h5py raises OSError/KeyError, scanpy ValueError on damaged files
        raise InputError(f"{path}: not a readable 10x feature-barcode matrix ({type(err).__name__}: {err})") from err
    adata.X = integer_counts(adata.X, str(path))
    return adata


def read_10x_h5_arrays(path: Path) -> AnnData:
    """Read a 10x feature-barcode h5 (the ``matrix/`` layout of Cell Ranger >= 3) directly with h5py.

    The fallback of :func:`read_counts` for files scanpy cannot read, such as those written by R's rhdf5
    (SpatialExperimentIO, DropletUtils): their ``shape``, ``indptr``, ``indices`` and ``data`` may be float64, and
    are accepted where every value is an exact integer (the counts are raw counts). The matrix is features x
    barcodes CSC: ``shape = (n_features, n_barcodes)``, ``indptr`` has ``n_barcodes + 1`` entries and ``indices``
    are feature rows; those same arrays are the barcodes x features CSR that is returned. ``obs`` is indexed by
    ``barcodes``; ``var`` by ``features/name``, with ``gene_ids`` (``id``), ``feature_types`` (``feature_type``) and
    every other ``features/`` dataset but ``_all_tag_keys`` (``genome``...), as scanpy names them; groups under
    ``features/`` (``target_sets``) are not read.

    Raises
    ------
    InputError
        Not a readable HDF5 file (truncated), a missing dataset, a non-integral value, or lengths that disagree with
        ``matrix/shape``; the message names the file and the dataset.

    Examples
    --------
    >>> read_10x_h5_arrays(Path("Xenium_small/cell_feature_matrix.h5")).shape  # doctest: +SKIP
    (6, 4)

    """
    import h5py

    def problem(detail: str) -> InputError:
        return InputError(f"{path}: not a readable 10x feature-barcode matrix ({detail})")

    def dataset(h5: h5py.File, key: str) -> np.ndarray:
        node = h5.get(key)
        if not isinstance(node, h5py.Dataset):
            raise problem(f"no '{key}' dataset (expected the Cell Ranger >= 3 layout)")
        try:
            is_text = h5py.check_string_dtype(node.dtype) is not None
            return np.asarray(node.asstr("utf-8")[()] if is_text else node[()])
        except (OSError, UnicodeDecodeError) as err:
            raise problem(f"'{key}' cannot be read: {err}") from err

    def exact_integers(key: str, values: np.ndarray) -> np.ndarray:
        if np.issubdtype(values.dtype, np.integer):
            return values.astype(np.int64)
        if not np.issubdtype(values.dtype, np.floating):
            raise problem(f"'{key}' must hold integers, found {values.dtype}")
        inexact = ~np.isfinite(values) | (values != np.round(values))
        if inexact.any():
            at = int(np.argmax(inexact))
            raise problem(f"'{key}' must hold integers, found {values[at].item()!r} at position {at}")
        return values.astype(np.int64)

    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise problem(f"not a readable HDF5 file: {err}") from err
    with h5:
        shape, indptr, indices, data = (
            exact_integers(key, dataset(h5, key))
            for key in ("matrix/shape", "matrix/indptr", "matrix/indices", "matrix/data")
        )
        barcodes = dataset(h5, "matrix/barcodes")
        renamed = {"name": "name", "id": "gene_ids", "feature_type": "feature_types"}
        for tag, node in h5.get("matrix/features", {}).items():
            if isinstance(node, h5py.Dataset) and tag not in renamed and tag != "_all_tag_keys":
                renamed[tag] = tag
        features = {column: dataset(h5, f"matrix/features/{key}") for key, column in renamed.items()}
    if shape.shape != (2,):
        raise problem(f"'matrix/shape' must be (n_features, n_barcodes), found {shape.tolist()}")
    n_features, n_barcodes = (int(n) for n in shape)
    if len(indptr) != n_barcodes + 1 or indptr[0] != 0 or indptr[-1] != len(data) or (np.diff(indptr) < 0).any():
        raise problem(
            f"'matrix/indptr' must rise from 0 to the {len(data)} values of 'matrix/data' in n_barcodes + 1 = "
            f"{n_barcodes + 1} entries ('matrix/shape' {shape.tolist()} is features x barcodes); found {len(indptr)} "
            f"entries from {indptr[0] if len(indptr) else None} to {indptr[-1] if len(indptr) else None}"
        )
    if len(indices) != len(data) or (len(indices) and (indices.min() < 0 or indices.max() >= n_features)):
        raise problem(
            f"'matrix/indices' must hold one feature row in 0-{n_features - 1} per value of 'matrix/data' "
            f"({len(data)}); found {len(indices)} rows"
            + (f" in {indices.min()}-{indices.max()}" if len(indices) else "")
        )
    lengths = {"matrix/barcodes": (len(barcodes), n_barcodes)}
    lengths.update({f"matrix/features/{key}": (len(features[column]), n_features) for key, column in renamed.items()})
    for key, (found, expected) in lengths.items():
        if found != expected:
            raise problem(f"'{key}' has {found} entries, 'matrix/shape' {shape.tolist()} says {expected}")
    names = features.pop("name")
    var = pd.DataFrame(features, index=names)
    matrix = sparse.csr_matrix((data, indices, indptr), shape=(n_barcodes, n_features))
    return AnnData(X=matrix, obs=pd.DataFrame(index=pd.Index(barcodes, dtype=str)), var=var)


def read_plain_mex(path: Path) -> AnnData:
    """Read a Space Ranger 2+ MEX directory whose files are not gzipped (scanpy 1.11 reads those only gzipped)."""
    from scipy.io import mmread

    try:
        matrix = sparse.csr_matrix(mmread(path / "matrix.mtx").T)
        features = pd.read_csv(path / "features.tsv", sep="\t", header=None)
        barcodes = pd.read_csv(path / "barcodes.tsv", sep="\t", header=None)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: not a readable MEX directory ({type(err).__name__}: {err})") from err
    if matrix.shape != (len(barcodes), len(features)):
        raise InputError(
            f"{path}: matrix.mtx is {matrix.shape[1]} x {matrix.shape[0]} but there are {len(features)} features "
            f"and {len(barcodes)} barcodes"
        )
    var = pd.DataFrame({"gene_ids": features[0].astype(str).to_numpy()}, index=features[1].astype(str).to_numpy())
    if features.shape[1] > 2:
        var["feature_types"] = features[2].to_numpy()
    obs = pd.DataFrame(index=barcodes[0].astype(str).to_numpy())
    adata = AnnData(X=integer_counts(matrix, str(path)), obs=obs, var=var)
    adata.var_names_make_unique()
    return adata


def _first_non_count(matrix: Any) -> float | None:
    """Return a value that is not a raw count (negative or fractional), or ``None`` when all are counts."""
    values = matrix.data if sparse.issparse(matrix) else np.asarray(matrix).ravel()
    bad = (values < 0) | (values != np.round(values))
    return float(values[np.argmax(bad)]) if bad.any() else None


def read_anndata_counts(path: Path) -> AnnData:
    """Read the raw integer counts of an AnnData file, refusing normalised data.

    The first of ``layers['counts']``, ``X`` and ``raw.X`` that holds only non-negative integers is kept (with
    ``raw.var`` as genes for ``raw.X``); ``obs`` is kept whole, so ``array_row``/``array_col`` columns can place
    spots of a Loupe alignment.

    Raises
    ------
    InputError
        The file is not an AnnData, or none of the three matrices holds raw counts (log-normalised data).

    Examples
    --------
    >>> read_anndata_counts(Path("processed.h5ad")).X.dtype  # doctest: +SKIP
    dtype('int32')

    """
    import anndata

    try:
        adata = anndata.read_h5ad(path)
    except Exception as err:  # h5py and anndata raise many types on foreign or damaged files
        raise InputError(f"{path}: not a readable AnnData file ({type(err).__name__}: {err})") from err
    matrices = {
        "layers['counts']": (adata.layers.get("counts"), adata.var),
        "X": (adata.X, adata.var),
        "raw.X": (adata.raw.X, adata.raw.var) if adata.raw is not None else (None, None),
    }
    found = []
    for name in ANNDATA_COUNT_MATRICES:
        matrix, var = matrices[name]
        if matrix is None:
            found.append(f"no {name}")
            continue
        offending = _first_non_count(matrix)
        if offending is None:
            counts = AnnData(
                X=integer_counts(matrix, f"{path} {name}"), obs=adata.obs, var=var.copy(), obsm=dict(adata.obsm)
            )
            counts.obs_names = counts.obs_names.astype(str)
            counts.var_names_make_unique()
            return counts
        found.append(f"{name} holds {offending:g}")
    raise InputError(
        f"{path}: no raw integer counts (expected non-negative integers in {', '.join(ANNDATA_COUNT_MATRICES)}; "
        f"found {'; '.join(found)}): log-normalised or scaled data cannot be stored as counts"
    )


def find_counts(root: Path) -> Path:
    """Return the counts file of a Space Ranger folder: a 10x matrix (filtered first), else its only ``*.h5ad``.

    Examples
    --------
    >>> find_counts(Path("outs")).name  # doctest: +SKIP
    'filtered_feature_bc_matrix.h5'

    """
    for name in COUNTS_CANDIDATES:
        if (root / name).exists():
            return root / name
    h5ads = sorted(root.glob("*.h5ad"))
    if len(h5ads) > 1:
        raise InputError(
            f"{root}: several AnnData files ({', '.join(p.name for p in h5ads)}); pass counts= to pick one"
        )
    if h5ads:
        return h5ads[0]
    raise InputError(f"{root}: no count matrix found (expected one of {', '.join(COUNTS_CANDIDATES)}, or a *.h5ad)")


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
            frame = pd.read_csv(path, header=0 if has_header else None)
            if not has_header:
                frame.columns = POSITION_COLUMNS[: frame.shape[1]]
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: cannot read spot positions ({err})") from err
    missing = [c for c in POSITION_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing position column(s) {missing}; found {list(frame.columns)}")
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


# --------------------------------------------------------------------------------------------- pixel size
def spot_lattice_pixel_size(
    spots: pd.DataFrame, spot_diameter_px: float, source: str, *, fiducial_diameter_px: float | None = None
) -> tuple[float, dict[str, Any]]:
    """Return the size of a full-resolution pixel (um) measured on the Visium spot lattice, and its provenance.

    The centres ``pxl_col_in_fullres, pxl_row_in_fullres`` of every spot with a position (all rows of the positions
    file, not only the counts' barcodes: more spots, a tighter fit) are fitted to their slide-layout positions
    (:func:`hest_zarr.elements.lattice.visium_lattice_um` of ``array_row, array_col``) by trimmed least squares
    (:func:`hest_zarr.elements.lattice.fit_pixel_size`). With fewer than 3 such spots not on one line the lattice is
    undetermined and the pixel size falls back to ``65 um / spot_diameter_fullres``, with a warning.

    Parameters
    ----------
    spots
        Spots with ``array_row``, ``array_col``, ``pxl_row_in_fullres`` and ``pxl_col_in_fullres`` columns; rows
        with a missing value are left out.
    spot_diameter_px
        Space Ranger's ``spot_diameter_fullres`` (Loupe's ``dia``).
    source
        The positions file, named in warnings and errors.
    fiducial_diameter_px
        Space Ranger's ``fiducial_diameter_fullres``: recorded in micrometres as a check (the slide layouts' fiducials
        are 105 um).

    Returns
    -------
    The pixel size and the spots' provenance parameters: ``pixel_size_method`` (``"spot lattice"``, or the
    fallback), ``pixel_size_fit`` (pixel size, standard error ``uncertainty_um``, ``residual_rms_px``, spots and
    outliers), ``pixel_size_um_from_spot_diameter`` and ``difference_vs_spot_diameter`` (lattice / that - 1),
    ``spot_diameter_fullres_um`` and ``fiducial_diameter_fullres_um`` (those diameters at the lattice's pixel size).

    Warns
    -----
    PixelSizeDisagreementWarning
        The lattice and ``65 um / spot_diameter_fullres`` differ by more than 5 % (Space Ranger 3.0 CytAssist: 7.7 %).
    UserWarning
        Too few spots for the lattice: the fallback is used.

    Examples
    --------
    >>> rows, cols = np.divmod(np.arange(40), 8)
    >>> spots = pd.DataFrame({"array_row": rows, "array_col": 2 * cols + rows % 2})
    >>> spots[["pxl_col_in_fullres", "pxl_row_in_fullres"]] = visium_lattice_um(rows, 2 * cols + rows % 2) / 0.5
    >>> pixel_size, parameters = spot_lattice_pixel_size(spots, 130.0, "tissue_positions.csv")
    >>> round(pixel_size, 9), parameters["pixel_size_method"], abs(parameters["difference_vs_spot_diameter"]) < 1e-9
    (0.5, 'spot lattice', True)

    """
    from_diameter = SPOT_DIAMETER_FULLRES_UM / spot_diameter_px
    try:
        values = spots[LATTICE_COLUMNS].to_numpy(dtype=np.float64)
    except ValueError as err:
        raise InputError(f"{source}: {', '.join(LATTICE_COLUMNS)} must be numbers ({err})") from err
    values = values[np.isfinite(values).all(axis=1)]
    rows, cols, centres = values[:, 0], values[:, 1], values[:, [3, 2]]
    lattice_um = visium_lattice_um(rows, cols) if len(values) else np.empty((0, 2))
    parameters: dict[str, Any] = {
        "spot_diameter_px": spot_diameter_px,
        "pixel_size_um_from_spot_diameter": from_diameter,
    }
    if not spans_plane(lattice_um):
        warnings.warn(
            f"{source}: {len(values)} spot(s) with a position, too few or on one line to fit the spot lattice; the "
            f"pixel size falls back to {SPOT_DIAMETER_FULLRES_UM:g} um / spot_diameter_fullres = {from_diameter:.4g} "
            "um/px (7.7 % low on Space Ranger 3.0 CytAssist outputs)",
            UserWarning,
            stacklevel=3,
        )
        parameters["pixel_size_method"] = f"{SPOT_DIAMETER_FULLRES_UM:g} um / spot_diameter_fullres (too few spots)"
        return from_diameter, parameters
    estimate = fit_pixel_size(
        centres,
        lattice_um,
        pitch_um=VISIUM_INTER_SPOT_DISTANCE_UM,
        lattice=visium_lattice_name(rows, cols),
        source=source,
    )
    pixel_size = estimate.pixel_size_um
    difference = pixel_size / from_diameter - 1
    parameters.update(
        pixel_size_method="spot lattice",
        pixel_size_fit=estimate.parameters(),
        difference_vs_spot_diameter=difference,
        spot_diameter_fullres_um=spot_diameter_px * pixel_size,
    )
    if fiducial_diameter_px is not None:
        parameters["fiducial_diameter_fullres_um"] = fiducial_diameter_px * pixel_size
    if abs(difference) > DISAGREEMENT_TOLERANCE:
        warnings.warn(
            f"{source}: the spot lattice gives {pixel_size:.4g} um/px, {difference:+.1%} against "
            f"{SPOT_DIAMETER_FULLRES_UM:g} um / spot_diameter_fullres ({from_diameter:.4g} um/px): "
            f"spot_diameter_fullres spans {spot_diameter_px * pixel_size:.1f} um here; the lattice is used",
            PixelSizeDisagreementWarning,
            stacklevel=3,
        )
    return pixel_size, parameters


# --------------------------------------------------------------------------------------------- images
def read_scalefactors(path: Path) -> dict[str, float]:
    """Read ``scalefactors_json.json``, which must give ``spot_diameter_fullres``.

    Examples
    --------
    >>> read_scalefactors(Path("outs/spatial/scalefactors_json.json"))["spot_diameter_fullres"]  # doctest: +SKIP
    89.43

    """
    try:
        factors = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read scale factors ({err})") from err
    if "spot_diameter_fullres" not in factors:
        raise InputError(f"{path}: no 'spot_diameter_fullres' entry")
    return factors


def _read_image(path: Path) -> np.ndarray:
    """Read an RGB image into ``c, y, x`` uint8 (Space Ranger PNG/JPG/TIFF images)."""
    import tifffile
    from PIL import Image

    try:
        if path.suffix.lower() in (".tif", ".tiff", ".btf"):
            pixels = tifffile.imread(path)
        else:
            with Image.open(path) as handle:
                pixels = np.asarray(handle.convert("RGB"))
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read image ({err})") from err
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    if pixels.ndim != 3 or pixels.shape[-1] not in (3, 4):
        raise InputError(f"{path}: expected an RGB image, found shape {pixels.shape}")
    if pixels.dtype == np.uint16:
        pixels = (pixels // 257).astype(np.uint8)
    return np.moveaxis(pixels[..., :3].astype(np.uint8, copy=False), -1, 0)


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


def he_image(
    image_path: Path, scale: float, pixel_size_um: float, centres: np.ndarray
) -> tuple[DataArray, dict[str, int]]:
    """Read the H&E of a sample, check it covers the spot ``centres`` (full-resolution px), place it in ``global``.

    Returns the image element and the measured metadata (``fullres_px_*`` for a full-resolution image).

    Examples
    --------
    >>> element, measured = he_image(Path("slide.tif"), 1.0, 0.2738, centres)  # doctest: +SKIP
    >>> measured  # doctest: +SKIP
    {'fullres_px_height': 21943, 'fullres_px_width': 25421}

    """
    pixels = _read_image(image_path)
    fullres_shape = (round(pixels.shape[1] / scale), round(pixels.shape[2] / scale))
    _check_image_covers_spots(image_path, fullres_shape, centres)
    to_global = Identity() if scale == 1.0 else Scale([1 / scale, 1 / scale], axes=("x", "y"))
    element = Image2DModel.parse(
        pixels,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations=frame_transformations(pixel_size_um, to_global),
    )
    measured = {"fullres_px_height": fullres_shape[0], "fullres_px_width": fullres_shape[1]} if scale == 1.0 else {}
    return element, measured


def _check_image_covers_spots(image_path: Path, fullres_shape: tuple[int, int], centres: np.ndarray) -> None:
    height, width = fullres_shape
    beyond = (centres[:, 0] > width) | (centres[:, 1] > height) | (centres < 0).any(axis=1)
    if beyond.any():
        raise InputError(
            f"{image_path}: image covers {width} x {height} full-resolution px but {int(beyond.sum())} spots lie "
            f"outside it (max x {centres[:, 0].max():.0f}, max y {centres[:, 1].max():.0f}); wrong image?"
        )


def species_from_genome(adata: AnnData) -> str | None:
    """Return the species of the reference genome named in ``var['genome']`` (10x matrices), if known.

    Examples
    --------
    >>> species_from_genome(AnnData(var=pd.DataFrame({"genome": ["mm10"]}, index=["Xkr4"])))
    'Mus musculus'

    """
    genome = str(adata.var["genome"].iloc[0]) if "genome" in adata.var and adata.n_vars else None
    return _GENOME_SPECIES.get(genome)


# --------------------------------------------------------------------------------------------- converter
def read_visium(
    path: str | Path,
    *,
    image: str | Path | None = None,
    sample_id: str | None = None,
    metadata: SampleMetadata | None = None,
    counts: str | Path | None = None,
    alignment: str | Path | None = None,
    barcode_coordinates: str | Path | None = None,
    include_image: bool = True,
) -> SpatialData:
    """Read a Space Ranger ``outs/`` folder into a sample (a SpatialData object with its record).

    Parameters
    ----------
    path
        The ``outs/`` folder (holding the counts and ``spatial/``).
    image
        Full-resolution H&E. Without it the hires (else lowres) image of ``spatial/`` is stored as ``he``,
        scaled to full-resolution coordinates.
    sample_id
        Sample id (default: the folder name).
    metadata
        Known metadata (e.g. the HEST-1k CSV row); converter-measured fields fill its gaps.
    counts
        Counts file (10x h5, MEX directory or ``.h5ad``); default: found in ``path`` (:func:`find_counts`).
    alignment
        Loupe alignment JSON to place the spots; default: used only when ``spatial/`` has no positions file, found
        as the ``*.json`` with ``oligo`` entries in ``path`` or ``path/spatial``.
    barcode_coordinates
        Space Ranger's ``visium-vN_coordinates.txt``, which gives Loupe spots their barcodes (not needed when the
        counts' ``obs`` hold ``array_row``/``array_col``).
    include_image
        Store an H&E; ``False`` converts spots and counts only (e.g. when ``spatial/`` holds a cropped image).

    Returns
    -------
    The sample: ``spots`` (circles), ``spot_expression`` (raw counts) and ``he`` when an image exists.

    Raises
    ------
    InputError
        Missing or unreadable files, positions lacking barcodes of the matrix, normalised counts, an image smaller
        than the spot coordinates imply.

    Examples
    --------
    >>> sdata = read_visium("outs", sample_id="V1_Mouse_Brain")  # doctest: +SKIP
    >>> sdata = read_visium("GSM123", alignment="GSM123/V10M24-003-B1.json", image="GSM123/slide.tif")  # doctest: +SKIP
    >>> hest_zarr.write(sdata, "V1_Mouse_Brain.zarr")  # doctest: +SKIP

    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: no such directory (expected a Space Ranger outs/ folder)")
    if image is not None and not include_image:
        raise InputError(f"{image}: an image was given with include_image=False")
    counts_path = Path(counts) if counts is not None else find_counts(root)
    if not counts_path.exists():
        raise InputError(f"{counts_path}: no such counts file")
    factors_path = root / SCALEFACTORS_FILE
    factors = read_scalefactors(factors_path) if factors_path.is_file() else {}
    positions_path = next((root / name for name in POSITIONS_CANDIDATES if (root / name).exists()), None)
    alignment_path = Path(alignment) if alignment is not None else None
    if alignment_path is None and positions_path is None:
        alignment_path = find_loupe_alignment(root)
        if alignment_path is None:
            raise InputError(
                f"{root}: no spot positions found (expected one of {', '.join(POSITIONS_CANDIDATES)}, "
                "or a Loupe alignment *.json with 'oligo' entries)"
            )
    adata = read_counts(counts_path)

    if alignment_path is not None:
        coordinates_path = Path(barcode_coordinates) if barcode_coordinates is not None else None
        positions, lattice_spots = loupe_positions(alignment_path, adata, coordinates_path)
        spot_diameter_px = float(lattice_spots["spot_diameter_fullres"].median())
        fiducial_diameter_px = None
        spot_inputs = [str(p) for p in (counts_path, alignment_path, coordinates_path) if p is not None]
        positions_source = " + ".join(spot_inputs[1:])
        method = "loupe alignment"
    else:
        if not factors:
            raise InputError(f"{root}: no scale factors (expected {SCALEFACTORS_FILE})")
        positions = lattice_spots = read_positions(positions_path)
        spot_diameter_px = float(factors["spot_diameter_fullres"])
        fiducial_diameter_px = factors.get("fiducial_diameter_fullres")
        spot_inputs = [str(counts_path), str(positions_path), str(factors_path)]
        positions_source = str(positions_path)
        method = "space ranger"
    pixel_size_um, spot_parameters = spot_lattice_pixel_size(
        lattice_spots, spot_diameter_px, positions_source, fiducial_diameter_px=fiducial_diameter_px
    )
    positions = positions_for_barcodes(positions, adata.obs_names, positions_source, counts_path)
    barcodes = adata.obs_names.astype(str)
    centres = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    spots = circle_spots(centres, VISIUM_SPOT_DIAMETER_UM / pixel_size_um / 2, barcodes, pixel_size_um)
    table = spot_expression(adata, positions, counts_path)
    inputs: dict[str, list[str]] = {Elements.SPOTS: spot_inputs, Elements.SPOT_EXPRESSION: spot_inputs}
    images: dict[str, Any] = {}
    parameters: dict[str, dict[str, Any]] = {Elements.SPOTS: spot_parameters}
    measured: dict[str, Any] = {}
    picked = (Path(image), 1.0) if image is not None else pick_spatial_image(root, factors)
    if include_image and picked is not None:
        image_path, scale = picked
        if not image_path.is_file():
            raise InputError(f"{image_path}: no such image file")
        images[Elements.HE], measured = he_image(image_path, scale, pixel_size_um, centres)
        inputs[Elements.HE] = [str(image_path)]
        parameters[Elements.HE] = {"scale_to_fullres": 1 / scale}

    measured.update(
        id=sample_id or root.name,
        st_technology="Visium",
        species=species_from_genome(adata),
        spot_diameter=VISIUM_SPOT_DIAMETER_UM,
        inter_spot_dist=VISIUM_INTER_SPOT_DISTANCE_UM,
        spots_under_tissue=int(positions[Keys.IN_TISSUE].sum()),
        nb_genes=int(adata.n_vars),
        pixel_size_um_estimated=pixel_size_um,
    )
    return build_sample(
        converter="visium",
        metadata=measured,
        pixel_size_um=pixel_size_um,
        inputs=inputs,
        known_metadata=metadata,
        images=images,
        shapes={Elements.SPOTS: spots},
        tables={Elements.SPOT_EXPRESSION: table},
        parameters=parameters,
        methods={Elements.SPOTS: method},
    )
