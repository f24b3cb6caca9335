"""Pooling operators on data in memory: record batches of the real SFE Xenium crop, Visium HD samples, the counter.

The URL forms (stores, parquet files, the CLI) are tested in ``tests/workflows/test_pool.py``, which reuses the
helpers and fixtures here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.transformations import get_transformation

import hest_zarr
from hest_zarr.converters import read_sample
from hest_zarr.elements import build_sample, expression_table, square_spots
from hest_zarr.errors import InputError
from hest_zarr.ops.pool import (
    STORE_COLUMNS,
    PooledCounts,
    check_bin_sizes,
    pool_bin_elements,
    pool_sample_bins,
    pool_transcript_batches,
    pseudo_spot_names,
    pseudo_spot_update,
)
from hest_zarr.ops.pool import _counting as counting
from hest_zarr.store import read_record
from tests.conftest import shared

pytestmark = pytest.mark.filterwarnings("ignore:.*a cropped or downscaled image")

XENIUM = ("SFE", "xenium")
CONTROL_PREFIXES = ("BLANK_", "NegControl")


# --------------------------------------------------------------------------------------------- helpers
def groupby_counts(
    transcripts: pd.DataFrame,
    size_um: float,
    *,
    origin_um: tuple[float, float] = (0.0, 0.0),
    min_qv: float | None = 20.0,
    include_controls: bool = True,
) -> pd.Series:
    """The reference: pandas groupby of the raw molecules floored to the grid, (column, row, gene) -> count."""
    kept = transcripts if min_qv is None else transcripts[transcripts["qv"] >= min_qv]
    if not include_controls:
        kept = kept[~kept["feature_name"].astype(str).str.startswith(CONTROL_PREFIXES)]
    column = np.floor((kept["x_location"].to_numpy(np.float64) - origin_um[0]) / size_um).astype(np.int64)
    row = np.floor((kept["y_location"].to_numpy(np.float64) - origin_um[1]) / size_um).astype(np.int64)
    frame = pd.DataFrame({"column": column, "row": row, "gene": kept["feature_name"].astype(str).to_numpy()})
    return frame.groupby(["column", "row", "gene"]).size().sort_index()


def pooled_series(pooled: PooledCounts) -> pd.Series:
    entries = pooled.counts.tocoo()
    index = pd.MultiIndex.from_arrays(
        [pooled.grid[entries.row, 0], pooled.grid[entries.row, 1], pooled.genes[entries.col]],
        names=["column", "row", "gene"],
    )
    return pd.Series(entries.data.astype(np.int64), index=index).sort_index()


def table_series(table) -> pd.Series:
    entries = sparse.coo_matrix(table.X)
    obs = table.obs
    index = pd.MultiIndex.from_arrays(
        [
            obs["array_col"].to_numpy()[entries.row],
            obs["array_row"].to_numpy()[entries.row],
            np.asarray(table.var_names)[entries.col],
        ],
        names=["column", "row", "gene"],
    )
    return pd.Series(entries.data.astype(np.int64), index=index).sort_index()


@pytest.fixture(scope="module")
def raw_transcripts() -> tuple[Path, pd.DataFrame]:
    path = shared(*XENIUM, "transcripts.parquet")
    return path, pd.read_parquet(path)


@pytest.fixture(scope="module")
def xenium_store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SFE Xenium crop converted once (5,260 molecules, no H&E: 'global' = morphology pixels)."""
    url = tmp_path_factory.mktemp("xenium") / "xenium.zarr"
    hest_zarr.write(read_sample(shared(*XENIUM)), url)
    return url


@pytest.fixture
def xenium_store(xenium_store_template: Path, tmp_path: Path) -> Path:
    url = tmp_path / "xenium.zarr"
    shutil.copytree(xenium_store_template, url)
    return url


PIXEL_SIZE_UM = 0.2738  # the real VisiumIO HD sample's microns_per_pixel, rounded


def synthetic_hd_sample(*, seed: int = 5) -> tuple[SpatialData, pd.DataFrame, sparse.csr_matrix]:
    """A Visium HD sample of 2 um bins in memory; returns it with its bins' obs and counts.

    Synthetic: the shared data's only HD sample has 10 bins of all-zero counts. Here: a 44 x 38 array of 2 um bins
    (array rows 3..46, columns 5..42: blocks cut at the edges), 5% of bins absent (filtered out), centres on an
    affine map of the array slightly rotated (0.6 degrees) as a real HD slide is on its image, Poisson(1.5) counts
    of 12 genes, in_tissue on a disc.
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(3, 47), np.arange(5, 43), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    present = rng.random(len(rows)) > 0.05
    rows, cols = rows[present], cols[present]
    step = 2.0 / PIXEL_SIZE_UM
    angle = np.deg2rad(0.6)
    linear = step * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centres = np.column_stack([cols, rows]) @ linear.T + [1500.0, 800.0]
    ids = [f"s_002um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
    counts = sparse.csr_matrix(rng.poisson(1.5, size=(len(ids), 12)).astype(np.int32))
    in_tissue = ((rows - 25) ** 2 + (cols - 24) ** 2 < 15**2).astype(np.int32)
    var = pd.DataFrame({"gene_ids": [f"ENSG{i:05d}" for i in range(12)]}, index=[f"Gene{i}" for i in range(12)])
    obs_columns = {"array_row": rows.astype(np.int32), "array_col": cols.astype(np.int32), "in_tissue": in_tissue}
    sample = build_sample(
        converter="visium_hd",
        metadata={"id": "hd", "st_technology": "Visium HD"},
        pixel_size_um=PIXEL_SIZE_UM,
        inputs={},
        shapes={"spots_square_002um": square_spots(centres, step, ids, PIXEL_SIZE_UM)},
        tables={
            "spot_expression_square_002um": expression_table(
                counts, ids, var, region="spots_square_002um", obs_columns=obs_columns
            )
        },
    )
    bins = pd.DataFrame({"row": rows, "col": cols, "in_tissue": in_tissue, "x": centres[:, 0], "y": centres[:, 1]})
    return sample, bins, counts


def synthetic_hd_store(path: Path, *, seed: int = 5) -> tuple[pd.DataFrame, sparse.csr_matrix]:
    """Write :func:`synthetic_hd_sample` to a store; returns its bins' obs and counts."""
    sample, bins, counts = synthetic_hd_sample(seed=seed)
    hest_zarr.write(sample, path)
    return bins, counts


def block_sums(bins: pd.DataFrame, counts: sparse.csr_matrix, factor: int) -> pd.DataFrame:
    """The reference: counts of the bins summed per (array_row // factor, array_col // factor) block."""
    blocks = [bins["row"].rename("block_row") // factor, bins["col"].rename("block_col") // factor]
    dense = pd.DataFrame(counts.toarray(), columns=[f"Gene{i}" for i in range(counts.shape[1])])
    return dense.groupby(blocks).sum()


# --------------------------------------------------------------------------------------------- Xenium
def store_batches(sdata: SpatialData, rows: int) -> list[pa.RecordBatch]:
    """The ``transcripts`` points of an opened store as arrow record batches (the gene column dictionary-encoded)."""
    frame = sdata.points["transcripts"].compute()
    frame.attrs = {}  # spatialdata's transformations, which arrow cannot serialise
    return pa.Table.from_pandas(frame, preserve_index=False).to_batches(max_chunksize=rows)


def test_pseudo_spots_of_an_opened_store_in_memory(
    xenium_store: Path, raw_transcripts: tuple[Path, pd.DataFrame]
) -> None:
    _, transcripts = raw_transcripts
    before = sorted(read_record(xenium_store).elements)
    sdata = hest_zarr.open(xenium_store)
    pooled = pool_transcript_batches(store_batches(sdata, 1000), size_um=55.0, columns=STORE_COLUMNS)
    reference = groupby_counts(transcripts, 55.0)
    assert pooled_series(pooled).equals(reference)
    assert pooled.n_read == pooled.n_kept == 5260
    assert (pooled.min_qv, pooled.include_controls) == (20.0, True)

    to_global = get_transformation(sdata.points["transcripts"], "global")
    pixel_size_um = hest_zarr.get_record(sdata).pixel_size_um
    update = pseudo_spot_update(pooled, pixel_size_um=pixel_size_um, to_global=to_global, suffix="sq55")
    assert sorted(update.elements) == ["spot_expression_sq55", "spots_sq55"] and not update.replace
    squares, table = update.elements["spots_sq55"], update.elements["spot_expression_sq55"]
    assert len(squares) == table.n_obs == reference.index.droplevel("gene").nunique() == 64
    assert int(table.X.sum()) == 5260
    assert list(squares.index) == list(table.obs_names) == list(pooled.ids())
    x, y = transcripts.loc[0, ["x_location", "y_location"]]  # 1205.3167, 1298.5208 um: square x21_y23
    assert squares.loc["x21_y23"].geometry.bounds == pytest.approx((21 * 55.0, 23 * 55.0, 22 * 55.0, 24 * 55.0))
    assert 21 * 55.0 <= x < 22 * 55.0 and 23 * 55.0 <= y < 24 * 55.0
    provenance = update.provenance["spots_sq55"]
    assert provenance.inputs == ["points/transcripts"] and provenance.parameters["n_transcripts_kept"] == 5260
    anchored = update.read_from(str(xenium_store)).provenance["spot_expression_sq55"]
    assert anchored.inputs == [f"{xenium_store}/points/transcripts"]
    assert sorted(read_record(xenium_store).elements) == before  # nothing written
    assert "spots_sq55" not in hest_zarr.open(xenium_store).shapes


def test_controls_follow_the_one_control_rule(raw_transcripts: tuple[Path, pd.DataFrame]) -> None:
    path, transcripts = raw_transcripts
    batches = pq.read_table(path).to_batches(max_chunksize=500)
    pooled = pool_transcript_batches(batches, size_um=55.0, min_qv=None)
    genes = pd.Index(transcripts["feature_name"].astype(str).unique())
    flagged = set(pooled.genes[pooled.is_control])
    assert flagged == set(genes[genes.str.startswith(CONTROL_PREFIXES)])  # BLANK_ and NegControl probes only
    assert len(flagged) == 3 and not set(pooled.genes) - set(genes)
    without = pool_transcript_batches(batches, size_um=55.0, min_qv=None, include_controls=False)
    assert pooled_series(without).equals(groupby_counts(transcripts, 55.0, min_qv=None, include_controls=False))
    assert not without.is_control.any() and without.n_read == len(transcripts) > without.n_kept


def test_the_sparse_path_gives_the_same_counts(
    raw_transcripts: tuple[Path, pd.DataFrame], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sparse path with tiny buffers, fed molecules sorted by x, so that the dense block is outgrown (spilled)
    mid-way and the sorted runs merge piece by piece."""
    _, transcripts = raw_transcripts
    reference = groupby_counts(transcripts, 20.0)
    monkeypatch.setattr(counting, "DENSE_BUDGET_CELLS", 4000)
    monkeypatch.setattr(counting, "BUFFER_KEYS", 250)
    monkeypatch.setattr(counting, "MERGE_PIECE_KEYS", 64)
    calls = {"spills": 0, "merges": 0}

    def counted(function, key):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(counting._DenseBlock, "to_keys", counted(counting._DenseBlock.to_keys, "spills"))
    monkeypatch.setattr(counting, "_merge", counted(counting._merge, "merges"))
    by_x = pa.Table.from_pandas(transcripts.sort_values("x_location"), preserve_index=False)
    pooled = pool_transcript_batches(by_x.to_batches(max_chunksize=101), size_um=20.0)
    assert pooled_series(pooled).equals(reference)
    assert calls["spills"] == 1 and calls["merges"] > 1  # the sparse path really ran
    assert pooled.n_read == pooled.n_kept == len(transcripts)


def test_overflow_of_int32_counts_is_refused() -> None:
    keys = np.array([7], dtype=np.uint64)
    with pytest.raises(InputError, match="int32"):
        counting._merge(keys, np.array([2**31 - 1], dtype=np.int32), keys, np.array([1]), "transcripts.parquet")


def test_bad_pseudo_spot_input() -> None:
    batch = pa.record_batch({"x": [1.0], "y": [1.0], "gene": ["A"], "qv": [10.0]})
    pooled = pool_transcript_batches([batch], columns=STORE_COLUMNS)
    assert pooled.n_read == 1 and pooled.n_kept == 0
    with pytest.raises(InputError, match=r"sample: no molecule passes the filters \(min_qv=20.0"):
        pseudo_spot_update(pooled, pixel_size_um=1.0, source="sample")
    for suffix in ("a/b", "", "a-b"):
        with pytest.raises(InputError, match="not a valid element name suffix"):
            pseudo_spot_names(suffix)
    with pytest.raises(InputError, match=r"missing column\(s\) \['qv'\].*pass min_qv=None"):
        pool_transcript_batches([batch.drop_columns(["qv"])], columns=STORE_COLUMNS)


# --------------------------------------------------------------------------------------------- Visium HD
def test_hd_bins_of_a_sample_in_memory() -> None:
    sample, bins, counts = synthetic_hd_sample()
    update = pool_sample_bins(sample, 2, 8)
    assert sorted(update.elements) == ["spot_expression_square_008um", "spots_square_008um"]
    table = update.elements["spot_expression_square_008um"]
    reference = block_sums(bins, counts, 4)
    assert list(table.obs_names) == [f"s_008um_{r:05d}_{c:05d}-1" for r, c in reference.index]
    assert np.array_equal(table.X.toarray(), reference.to_numpy()) and table.X.dtype == np.int32
    assert int(table.obs["n_bins"].sum()) == len(bins)
    provenance = update.provenance["spots_square_008um"]
    assert provenance.inputs == ["shapes/spots_square_002um", "tables/spot_expression_square_002um"]
    assert provenance.parameters["factor"] == 4 and provenance.parameters["n_bins_read"] == len(bins)
    assert "spots_square_008um" not in sample.shapes  # the sample is not changed


def test_hd_bins_of_an_opened_store(tmp_path: Path) -> None:
    url = tmp_path / "hd.zarr"
    bins, counts = synthetic_hd_store(url)
    update = pool_sample_bins(hest_zarr.open(url), 2, 16, replace=True, source=str(url))
    table = update.elements["spot_expression_square_016um"]
    assert update.replace and np.array_equal(table.X.toarray(), block_sums(bins, counts, 8).to_numpy())
    assert sorted(read_record(url).elements) == ["spot_expression_square_002um", "spots_square_002um"]


def test_hd_bins_of_the_real_converted_sample() -> None:
    """The real VisiumIO HD sample straight from its converter (no store): 10 isolated 2 um bins, one per block."""
    sample = read_sample(shared("VisiumIO_visiumhd"))
    update = pool_sample_bins(sample, 2, 8)
    small, large = sample.tables["spot_expression_square_002um"], update.elements["spot_expression_square_008um"]
    assert large.n_obs == small.n_obs == 10
    assert sorted(large.obs_names) == sorted(
        f"s_008um_{r // 4:05d}_{c // 4:05d}-1"
        for r, c in zip(small.obs["array_row"], small.obs["array_col"], strict=True)
    )
    assert list(large.obs["n_bins"]) == [1] * 10
    fit = update.provenance["spots_square_008um"].parameters
    assert fit["array_to_pixel"] == "least_squares" and fit["rms_residual_px"] < 1.0


def test_bad_bin_input() -> None:
    for source, target in ((2, 7), (8, 8), (8, 2), (0, 8)):
        with pytest.raises(InputError, match="larger multiple"):
            check_bin_sizes(source, target)
    with pytest.raises(InputError, match="whole micrometres"):
        check_bin_sizes(2, 8.5)
    sample, _, _ = synthetic_hd_sample()
    with pytest.raises(InputError, match=r"hd: no 8 um bins to pool .* found: \['spots_square_002um'\]"):
        pool_sample_bins(sample, 8, 16, source="hd")
    table = sample["spot_expression_square_002um"]
    table.X = sparse.csr_matrix(table.X, dtype=np.float64)
    table.X.data += 0.5  # not counts: refused, not truncated to integers
    with pytest.raises(InputError, match="counts are not integers"):
        pool_bin_elements(
            sample["spots_square_002um"], table, 4, to_bin_um=8, pixel_size_um=1.0, region="spots_square_008um"
        )
