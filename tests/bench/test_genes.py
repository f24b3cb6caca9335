"""Gene selection on hand-built AnnData tables (synthetic: the rule is checked against values worked out here)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from scipy import sparse

from hest_zarr.bench.genes import log1p_targets, select_genes
from hest_zarr.errors import InputError


def table(counts: dict[str, list[int]], *, sparse_matrix: bool = False) -> AnnData:
    matrix = np.array(list(counts.values()), dtype=np.int32).T
    return AnnData(
        sparse.csr_matrix(matrix) if sparse_matrix else matrix,
        obs=pd.DataFrame(index=[f"spot{i}" for i in range(matrix.shape[0])]),
        var=pd.DataFrame(index=list(counts)),
    )


# 10 spots per sample. Per-sample expressed fractions and pooled log1p variances are worked out in the test.
SAMPLE_A = {
    "steady": [5] * 10,  # expressed everywhere, variance 0
    "wide": [0, 0, 0, 0, 0, 50, 50, 50, 50, 50],  # 50% expressed, large variance
    "rare_in_a": [9, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # 10% in A: kept (>= 10%) if B passes
    "absent_in_a": [0] * 10,  # 0% in A: dropped whatever B holds
    "BLANK_0001": [0, 100, 0, 100, 0, 100, 0, 100, 0, 100],  # control probe: dropped though most variable
    "NegControlProbe_7": [1, 80, 1, 80, 1, 80, 1, 80, 1, 80],
    "mid": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    "only_in_a": [3] * 10,  # not in B: not shared
}
SAMPLE_B = {
    "steady": [5] * 10,
    "wide": [0, 0, 0, 0, 0, 0, 0, 0, 90, 90],
    "rare_in_a": [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "absent_in_a": [30, 0, 30, 0, 30, 0, 30, 0, 30, 0],
    "BLANK_0001": [100, 0] * 5,
    "NegControlProbe_7": [80, 1] * 5,
    "mid": [10, 9, 8, 7, 6, 5, 4, 3, 2, 1],
    "only_in_b": [7] * 10,
}


def expected_ranking(genes: list[str]) -> list[str]:
    """Pooled population variance of log1p counts, computed directly, highest first (ties by name)."""
    variances = {g: np.var(np.log1p(np.array(SAMPLE_A[g] + SAMPLE_B[g], dtype=float))) for g in genes}
    return sorted(genes, key=lambda g: (-variances[g], g))


@pytest.mark.parametrize("sparse_matrix", [False, True])
def test_selection_filters_then_ranks_by_pooled_log1p_variance(sparse_matrix: bool) -> None:
    tables = {"A": table(SAMPLE_A, sparse_matrix=sparse_matrix), "B": table(SAMPLE_B, sparse_matrix=sparse_matrix)}
    selection = select_genes(tables, n_genes=50, min_expressed_fraction=0.10)
    survivors = ["steady", "wide", "rare_in_a", "mid"]  # shared, not control, >= 10% in both samples
    assert selection.genes == expected_ranking(survivors)
    assert selection.genes == ["wide", "rare_in_a", "mid", "steady"]
    assert selection.n_shared == 7
    assert selection.n_controls == 2
    assert selection.n_expressed == 4
    assert selection.n_spots == {"A": 10, "B": 10}
    variance_wide = np.var(np.log1p([0] * 5 + [50] * 5 + [0] * 8 + [90] * 2))
    assert selection.scores[0] == pytest.approx(variance_wide, rel=1e-12)
    assert selection.scores[-1] == 0.0


def test_top_n_and_a_stricter_threshold() -> None:
    tables = {"A": table(SAMPLE_A), "B": table(SAMPLE_B)}
    assert select_genes(tables, n_genes=2).genes == ["wide", "rare_in_a"]
    # 'rare_in_a' is non-zero in exactly 10% of A's spots: a 20% threshold drops it
    assert select_genes(tables, min_expressed_fraction=0.2).genes == ["wide", "mid", "steady"]


def test_seurat_dispersion_criterion_matches_scanpy_on_the_pooled_log1p() -> None:
    import scanpy as sc

    rng = np.random.default_rng(3)
    counts = {f"g{i}": list(rng.poisson(lam, 60)) for i, lam in enumerate(np.linspace(0.5, 20, 30))}
    first = {g: v[:30] for g, v in counts.items()}
    second = {g: v[30:] for g, v in counts.items()}
    selection = select_genes({"A": table(first), "B": table(second)}, n_genes=5, criterion="seurat-dispersion")
    pooled = AnnData(
        np.log1p(np.array(list(counts.values()), dtype=np.float32).T), var=pd.DataFrame(index=list(counts))
    )
    statistics = sc.pp.highly_variable_genes(pooled, flavor="seurat", n_top_genes=30, inplace=False)
    statistics.index = list(counts)
    expected = statistics["dispersions_norm"].sort_values(ascending=False, kind="stable").index[:5].tolist()
    assert selection.genes == expected


def test_samples_sharing_no_gene_are_refused() -> None:
    with pytest.raises(InputError, match="share no gene name"):
        select_genes({"A": table({"a": [1, 2]}), "B": table({"b": [1, 2]})})


def test_no_gene_passing_the_expression_filter_is_refused() -> None:
    with pytest.raises(InputError, match="at least 10% of every sample"):
        select_genes({"A": table({"a": [0] * 20}), "B": table({"a": [1] * 20})})


def test_targets_are_log1p_of_raw_counts_in_the_order_asked() -> None:
    source = table(SAMPLE_A)
    targets = log1p_targets(source, ["spot9", "spot0"], ["mid", "wide"])
    assert targets.dtype == np.float32
    assert np.allclose(targets, np.log1p([[10, 50], [1, 0]]))
    with pytest.raises(InputError, match="lacks 1 task gene"):
        log1p_targets(source, ["spot0"], ["only_in_b"])
    with pytest.raises(InputError, match="no expression row for spot 'spot99'"):
        log1p_targets(source, ["spot99"], ["mid"])
