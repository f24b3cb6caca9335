"""The Xenium cell-feature matrix: the ``cell_expression`` table (genes and controls) and the ``cell_protein`` table.

Xenium Protein features (``feature_types == "Protein Expression"``, XOA >= 4) leave the raw counts for the float
table ``cell_protein``: the stored fixed-point integers divided by the h5's ``protein_scaling_factor``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from geopandas import GeoDataFrame
from scipy import sparse
from spatialdata.models import TableModel

from hest_zarr.converters._tenx import read_counts
from hest_zarr.converters._xenium_inputs import XeniumExperiment
from hest_zarr.elements import Elements, Keys, expression_table, is_control_feature
from hest_zarr.errors import InputError

#: Table of the protein intensities (Xenium Protein), annotating ``cells``.
CELL_PROTEIN = "cell_protein"
PROTEIN_FEATURE_TYPE = "Protein Expression"
PROTEIN_SCALING_ATTRIBUTE = "protein_scaling_factor"


# --------------------------------------------------------------------------------------------- counts
def read_cell_feature_matrix(path: str | Path) -> AnnData:
    """Read ``cell_feature_matrix.h5`` (or its MEX folder): every feature, raw integer counts, controls flagged.

    The reader is Visium's (:func:`~hest_zarr.converters._tenx.read_counts`: scanpy's ``read_10x_h5(gex_only=False)``,
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


def cell_table(
    counts: AnnData,
    counts_path: Path,
    cells: GeoDataFrame,
    cells_path: Path,
    summary: tuple[Path, pd.DataFrame] | None,
) -> AnnData:
    """Build the ``cell_expression`` table: the RNA counts annotating ``cells``, the cell summary's columns in ``obs``.

    Raises
    ------
    InputError
        A counted cell that is not in ``cells`` or, when a summary is given, not in the summary.

    """
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


def protein_element(
    protein: AnnData, counts_path: Path, experiment: XeniumExperiment, *, stacklevel: int = 2
) -> tuple[AnnData, dict[str, Any]]:
    """Build the ``cell_protein`` table and its provenance parameters; warn when the values cannot be scaled.

    ``stacklevel`` is passed to :func:`warnings.warn` (2: the warning names the caller of this function).
    """
    factor = read_protein_scaling_factor(counts_path)
    if factor is None:
        warnings.warn(
            f"{counts_path}: {protein.n_vars} protein features but no {PROTEIN_SCALING_ATTRIBUTE}: their values are "
            "stored as found in the file (not divided by a scaling factor)",
            UserWarning,
            stacklevel=stacklevel,
        )
    parameters = {
        **experiment.provenance(),
        PROTEIN_SCALING_ATTRIBUTE: factor,
        "protein_values": "stored integer / protein_scaling_factor" if factor is not None else "as stored",
    }
    return protein_table(protein, factor), parameters
