"""Gene selection and regression targets of a HEST-Benchmark task.

The selection (protocol ``hest-bench-1.0``), on the raw counts of the spots the task uses (those with a patch):

1. Candidates are the gene names present in every sample (the tables' ``var_names``).
2. Control and blank probes are dropped: names matching :data:`CONTROL_PROBE` (``BLANK...``,
   ``NegControlProbe...``, ``NegControlCodeword...``, ``SystemControl...``, ``UnassignedCodeword...``,
   ``DeprecatedCodeword...``, ``NegPrb...``, ``Intergenic_Region...``; case-insensitive).
3. A gene is dropped when, in any sample, fewer than 10% of that sample's spots have a non-zero count
   (``count(x > 0) / n_spots < 0.10``).
4. The rest are ranked by their variability over all spots of all samples pooled, and the first 50 kept.
   The variance criterion (named, recorded):

   - ``"log1p-variance"`` (default): the population variance (``ddof=0``) of ``log1p(count)``, float64.
   - ``"seurat-dispersion"``: scanpy's ``highly_variable_genes(flavor="seurat")`` normalised dispersion
     on ``log1p(count)`` (what the public HEST code ranks by).

   Ties are broken by gene name, so the list is the same on every machine.

Targets are ``log1p`` of the raw counts, with no other normalisation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from hest_zarr.bench.protocol import MIN_EXPRESSED_FRACTION, N_GENES
from hest_zarr.elements import is_control_feature
from hest_zarr.errors import InputError

VarianceCriterion = Literal["log1p-variance", "seurat-dispersion"]
VARIANCE_CRITERIA: Final = ("log1p-variance", "seurat-dispersion")


@dataclass(frozen=True)
class GeneSelection:
    """The genes a task predicts and how they were chosen.

    Attributes
    ----------
    genes
        Selected genes, most variable first.
    scores
        The criterion's value of each selected gene (same order).
    criterion, n_genes, min_expressed_fraction
        The settings used.
    n_shared
        Gene names present in every sample.
    n_controls
        Shared names dropped as control or blank probes.
    n_expressed
        Shared, non-control genes passing the expression filter in every sample.
    n_spots
        Spots of every sample the selection saw.

    """

    genes: list[str]
    scores: list[float]
    criterion: str
    n_genes: int
    min_expressed_fraction: float
    n_shared: int
    n_controls: int
    n_expressed: int
    n_spots: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """Return the selection as a JSON-ready dict."""
        return asdict(self)


def _counts(table: AnnData, genes: Sequence[str]) -> np.ndarray:
    matrix = table[:, list(genes)].X
    return np.asarray(matrix.toarray() if sparse.issparse(matrix) else matrix, dtype=np.float64)


def select_genes(
    tables: Mapping[str, AnnData],
    *,
    n_genes: int = N_GENES,
    min_expressed_fraction: float = MIN_EXPRESSED_FRACTION,
    criterion: VarianceCriterion = "log1p-variance",
) -> GeneSelection:
    """Select a task's genes from the raw counts of its samples (see the module docstring for the exact rule).

    Parameters
    ----------
    tables
        Sample id -> raw counts (spots x genes) of the spots the task uses.
    n_genes
        Genes to keep.
    min_expressed_fraction
        Minimum fraction of a sample's spots with a non-zero count, in every sample.
    criterion
        ``"log1p-variance"`` or ``"seurat-dispersion"``.

    Raises
    ------
    InputError
        No sample, a sample without spots, duplicated gene names, samples sharing no gene, or no gene left
        after the filters.

    Examples
    --------
    >>> counts = np.array([[0, 1, 5], [0, 2, 0], [3, 3, 9], [0, 4, 1]])
    >>> table = AnnData(counts, var=pd.DataFrame(index=["a", "b", "c"]))
    >>> select_genes({"s1": table}, n_genes=2, min_expressed_fraction=0.5).genes
    ['c', 'b']

    """
    if criterion not in VARIANCE_CRITERIA:
        raise InputError(f"unknown variance criterion {criterion!r}; expected one of {VARIANCE_CRITERIA}")
    if not tables:
        raise InputError("gene selection needs at least one sample")
    shared: set[str] | None = None
    for sample, table in tables.items():
        if table.n_obs == 0:
            raise InputError(f"sample {sample!r}: no spot to select genes from")
        names = table.var_names
        if names.has_duplicates:
            raise InputError(f"sample {sample!r}: gene names are not unique (e.g. {names[names.duplicated()][0]!r})")
        shared = set(names) if shared is None else shared & set(names)
    candidates = sorted(shared or ())
    if not candidates:
        raise InputError(f"the samples {sorted(tables)} share no gene name: nothing to predict")
    is_control = is_control_feature(candidates)
    controls = [gene for gene, control in zip(candidates, is_control, strict=True) if control]
    candidates = [gene for gene, control in zip(candidates, is_control, strict=True) if not control]
    expressed = np.ones(len(candidates), dtype=bool)
    for table in tables.values():  # counted sparse: only the kept genes are made dense below
        nonzero = table[:, candidates].X > 0
        expressed &= np.asarray(nonzero.sum(axis=0)).ravel() / table.n_obs >= min_expressed_fraction
    kept = [gene for gene, keep in zip(candidates, expressed, strict=True) if keep]
    if not kept:
        raise InputError(
            f"no gene of the samples {sorted(tables)} has non-zero counts in at least "
            f"{min_expressed_fraction:.0%} of every sample's spots"
        )
    pooled = np.log1p(np.concatenate([_counts(table, kept) for table in tables.values()]))
    scores = _scores(pooled, kept, criterion)
    order = sorted(range(len(kept)), key=lambda i: (-scores[i], kept[i]))[:n_genes]
    return GeneSelection(
        genes=[kept[i] for i in order],
        scores=[float(scores[i]) for i in order],
        criterion=criterion,
        n_genes=n_genes,
        min_expressed_fraction=min_expressed_fraction,
        n_shared=len(candidates) + len(controls),
        n_controls=len(controls),
        n_expressed=len(kept),
        n_spots={sample: int(table.n_obs) for sample, table in tables.items()},
    )


def _scores(log_counts: np.ndarray, genes: list[str], criterion: VarianceCriterion) -> np.ndarray:
    if criterion == "log1p-variance":
        return log_counts.var(axis=0)
    import scanpy as sc

    pooled = AnnData(log_counts.astype(np.float32), var=pd.DataFrame(index=genes))
    statistics = sc.pp.highly_variable_genes(
        pooled, flavor="seurat", n_top_genes=min(len(genes), N_GENES), inplace=False
    )
    return np.nan_to_num(statistics["dispersions_norm"].to_numpy(dtype=np.float64), nan=-np.inf)


def log1p_targets(table: AnnData, ids: Sequence[str], genes: Sequence[str], *, source: str = "table") -> np.ndarray:
    """Return ``log1p`` of the raw counts of the given spots (rows, by obs name) and genes, as float32.

    Raises
    ------
    InputError
        A spot or gene the table does not hold.

    Examples
    --------
    >>> obs, var = pd.DataFrame(index=["s1", "s2"]), pd.DataFrame(index=["a", "b"])
    >>> table = AnnData(np.array([[0, 3], [1, 0]]), obs=obs, var=var)
    >>> log1p_targets(table, ["s2", "s1"], ["b"]).ravel()
    array([0.       , 1.3862944], dtype=float32)

    """
    missing_genes = [gene for gene in genes if gene not in table.var_names]
    if missing_genes:
        raise InputError(f"{source}: lacks {len(missing_genes)} task gene(s), e.g. {missing_genes[0]!r}")
    rows = table.obs_names.get_indexer(list(ids))
    if (rows < 0).any():
        raise InputError(f"{source}: no expression row for spot {list(ids)[int(np.argmax(rows < 0))]!r}")
    matrix = table[rows, list(genes)].X
    dense = np.asarray(matrix.toarray() if sparse.issparse(matrix) else matrix, dtype=np.float64)
    if (dense < 0).any():
        raise InputError(f"{source}: negative counts; the benchmark needs raw counts")
    return np.log1p(dense).astype(np.float32)
