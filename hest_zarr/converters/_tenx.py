"""10x count matrices, shared by the Visium, Visium HD and Xenium converters: h5, MEX and AnnData ``.h5ad``.

:func:`read_counts` reads any of them as integer counts: a 10x feature-barcode h5 with scanpy (else directly with
h5py, :func:`read_10x_h5_arrays`, for files written by R's rhdf5), a MEX directory gzipped (scanpy) or not
(:func:`read_plain_mex`), or an AnnData whose raw counts are in ``layers['counts']``, ``X`` or ``raw.X``
(:func:`read_anndata_counts`). :data:`COUNTS` names the matrices of a Space Ranger ``outs/`` folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from spatialdata_io._constants._constants import VisiumKeys

from hest_zarr.converters._files import SourceFile, refuse_duplicates
from hest_zarr.elements import integer_counts
from hest_zarr.errors import InputError

#: The count matrix of a Space Ranger ``outs/`` (or Visium HD bin) folder: filtered first, h5 before MEX.
COUNTS = SourceFile(
    "count matrix",
    (
        VisiumKeys.FILTERED_COUNTS_FILE.value,
        "filtered_feature_bc_matrix",
        VisiumKeys.RAW_COUNTS_FILE.value,
        "raw_feature_bc_matrix",
    ),
)
#: AnnData matrices that may hold raw counts, in the order they are tried.
ANNDATA_COUNT_MATRICES = ("layers['counts']", "X", "raw.X")
_GENOME_SPECIES = {"GRCh38": "Homo sapiens", "hg19": "Homo sapiens", "mm10": "Mus musculus", "GRCm39": "Mus musculus"}


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
        adata = read_anndata_counts(path)
        refuse_duplicates(adata.obs_names, path)
        return adata
    if path.is_dir() and (path / "matrix.mtx").is_file() and (path / "features.tsv").is_file():
        adata = read_plain_mex(path)
        refuse_duplicates(adata.obs_names, path)
        return adata
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
    refuse_duplicates(adata.obs_names, path)
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


def species_from_genome(adata: AnnData) -> str | None:
    """Return the species of the reference genome named in ``var['genome']`` (10x matrices), if known.

    Examples
    --------
    >>> species_from_genome(AnnData(var=pd.DataFrame({"genome": ["mm10"]}, index=["Xkr4"])))
    'Mus musculus'

    """
    genome = str(adata.var["genome"].iloc[0]) if "genome" in adata.var and adata.n_vars else None
    return _GENOME_SPECIES.get(genome)
