"""Pooling workflows: stores (local and S3) and parquet files in, pseudo-spots and larger Visium HD bins written.

The operators they run are tested on data in memory in ``tests/ops/test_pool.py``, whose helpers and fixtures these
tests reuse.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import sparse
from spatialdata.transformations import get_transformation
from typer.testing import CliRunner

import hest_zarr
from hest_zarr.cli import app
from hest_zarr.converters import read_sample
from hest_zarr.errors import InputError
from hest_zarr.workflows.pool import pool_bins, pool_parquet, pool_transcripts
from tests.conftest import shared
from tests.ops import test_pool as operator_tests
from tests.ops.test_pool import PIXEL_SIZE_UM, XENIUM, groupby_counts, pooled_series, synthetic_hd_store, table_series

# the operator tests' fixtures: the real SFE transcripts, and a store converted from them once per module
raw_transcripts = operator_tests.raw_transcripts
xenium_store_template = operator_tests.xenium_store_template
xenium_store = operator_tests.xenium_store

pytestmark = pytest.mark.filterwarnings("ignore:.*a cropped or downscaled image")


# --------------------------------------------------------------------------------------------- Xenium
@pytest.mark.parametrize("size_um", [55.0, 20.0])
def test_pseudo_spots_equal_a_groupby_of_the_real_transcripts(
    xenium_store: Path, raw_transcripts: tuple[Path, pd.DataFrame], size_um: float
) -> None:
    _, transcripts = raw_transcripts
    suffix = None if size_um == 55.0 else "square_020um"
    summary = pool_transcripts(xenium_store, size_um, suffix=suffix)
    spots_name = "spots" if suffix is None else f"spots_{suffix}"
    table_name = "spot_expression" if suffix is None else f"spot_expression_{suffix}"
    assert (summary.spots, summary.table) == (spots_name, table_name)
    assert hest_zarr.validate(xenium_store) == []

    sdata = hest_zarr.open(xenium_store)
    table = sdata.tables[table_name]
    reference = groupby_counts(transcripts, size_um)
    assert table_series(table).equals(reference)
    assert table.X.dtype == np.int32 and sparse.issparse(table.X)
    assert int(table.X.sum()) == summary.total_counts == len(transcripts) == 5260  # the crop holds only qv >= 20
    assert summary.n_spots == table.n_obs == reference.index.droplevel("gene").nunique()
    assert table.uns["spatialdata_attrs"]["region"] == spots_name
    assert list(table.obs["spot_id"]) == list(table.obs_names)

    squares = sdata.shapes[spots_name]
    assert list(squares.index) == list(table.obs["spot_id"])
    x, y = transcripts.loc[0, ["x_location", "y_location"]]  # 1205.3167, 1298.5208 um
    column, row = int(x // size_um), int(y // size_um)  # 55 um: x21_y23; 20 um: x60_y64
    square = squares.loc[f"x{column}_y{row}"].geometry
    assert square.bounds == pytest.approx(
        (column * size_um, row * size_um, (column + 1) * size_um, (row + 1) * size_um), abs=1e-9
    )
    assert square.bounds[0] <= x < square.bounds[2] and square.bounds[1] <= y < square.bounds[3]
    assert np.allclose(squares.geometry.area, size_um**2)
    assert get_transformation(squares, "global").to_affine_matrix(("x", "y"), ("x", "y")) == pytest.approx(
        get_transformation(sdata["transcripts"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    )
    provenance = hest_zarr.get_record(sdata).elements[spots_name].provenance
    assert provenance.method == "pseudo-spots"
    assert provenance.parameters["size_um"] == size_um
    assert provenance.parameters["n_transcripts_read"] == provenance.parameters["n_transcripts_kept"] == 5260


def test_controls_are_flagged_and_filters_match_the_groupby(raw_transcripts: tuple[Path, pd.DataFrame]) -> None:
    path, transcripts = raw_transcripts
    pooled = pool_parquet(path, size_um=55.0)
    flags = dict(zip(pooled.genes, pooled.is_control, strict=True))
    assert flags["BLANK_0070"] and flags["NegControlProbe_00003"] and not flags["LEF1"]
    assert list(pooled.genes) == sorted(pooled.genes)

    filtered = pool_parquet(path, size_um=55.0, min_qv=39.0, include_controls=False, origin_um=(7.5, -3.25))
    reference = groupby_counts(transcripts, 55.0, min_qv=39.0, include_controls=False, origin_um=(7.5, -3.25))
    assert pooled_series(filtered).equals(reference)
    assert filtered.n_kept == int(reference.sum()) < len(transcripts)
    assert not filtered.is_control.any()
    every = pool_parquet(path, size_um=55.0, min_qv=None)
    assert every.n_kept == every.n_read == len(transcripts)


def test_streaming_over_many_small_batches_gives_the_same_counts(raw_transcripts: tuple[Path, pd.DataFrame]) -> None:
    path, transcripts = raw_transcripts
    assert pooled_series(pool_parquet(path, size_um=20.0, batch_rows=97)).equals(groupby_counts(transcripts, 20.0))
    with pytest.raises(InputError, match="batch_rows must be at least 1"):
        pool_parquet(path, batch_rows=0)


def test_raw_file_and_store_give_the_same_counts(
    xenium_store: Path, raw_transcripts: tuple[Path, pd.DataFrame]
) -> None:
    path, _ = raw_transcripts
    from_file = pool_parquet(path, size_um=55.0)
    from_store = pool_parquet(xenium_store / "points" / "transcripts" / "points.parquet", size_um=55.0)
    assert pooled_series(from_store).equals(pooled_series(from_file))
    assert list(from_store.ids()) == list(from_file.ids())


def test_remote_store(s3_server, s3_bucket: str) -> None:
    url = f"{s3_bucket}/xenium.zarr"
    options = s3_server.storage_options
    hest_zarr.write(read_sample(shared(*XENIUM)), url, storage_options=options)
    summary = pool_transcripts(url, 55.0, storage_options=options)
    remote = hest_zarr.open(url, storage_options=options).tables["spot_expression"]
    local = pool_parquet(shared(*XENIUM, "transcripts.parquet"), size_um=55.0)
    assert table_series(remote).equals(pooled_series(local))
    assert summary.total_counts == 5260


def test_pool_replaces_only_when_asked(xenium_store: Path) -> None:
    pool_transcripts(xenium_store, 55.0)
    with pytest.raises(InputError, match=r"already holds \['spots', 'spot_expression'\]"):
        pool_transcripts(xenium_store, 40.0)
    summary = pool_transcripts(xenium_store, 40.0, replace=True)
    spots = hest_zarr.open(xenium_store).shapes["spots"]
    assert len(spots) == summary.n_spots and np.allclose(spots.geometry.area, 40.0**2)


def test_provenance_inputs_are_anchored_under_the_store(xenium_store: Path) -> None:
    pool_transcripts(xenium_store, 55.0)
    provenance = hest_zarr.get_record(hest_zarr.open(xenium_store)).elements["spot_expression"].provenance
    assert provenance.inputs == [f"{xenium_store}/points/transcripts"]
    assert provenance.converter == "ops.pool"


def test_bad_transcript_input(
    xenium_store: Path, raw_transcripts: tuple[Path, pd.DataFrame], tmp_path: Path, perik_visium: Path
) -> None:
    path, transcripts = raw_transcripts
    for size in (0.0, -5.0, float("nan")):
        with pytest.raises(InputError, match="square side must be a positive number"):
            pool_parquet(path, size_um=size)
    with pytest.raises(InputError, match="grid origin"):
        pool_parquet(path, origin_um=(0.0, float("inf")))
    with pytest.raises(InputError, match="suffix"):
        pool_transcripts(xenium_store, suffix="a/b")
    with pytest.raises(InputError, match="no such parquet"):
        pool_parquet(tmp_path / "missing.parquet")
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"truncated\.parquet: not a readable parquet file"):
        pool_parquet(truncated)

    no_gene = tmp_path / "no_gene.parquet"
    pq.write_table(pa.Table.from_pandas(transcripts.drop(columns="feature_name")), no_gene)
    with pytest.raises(InputError, match="not a transcript table"):
        pool_parquet(no_gene)
    no_qv = tmp_path / "no_qv.parquet"
    pq.write_table(pa.Table.from_pandas(transcripts.drop(columns="qv")), no_qv)
    with pytest.raises(InputError, match=r"no 'qv' column to filter on; pass min_qv=None"):
        pool_parquet(no_qv)
    assert pool_parquet(no_qv, min_qv=None).n_kept == len(transcripts)
    missing_x = transcripts.copy()
    missing_x.loc[10, "x_location"] = np.nan
    nan_file = tmp_path / "nan.parquet"
    missing_x.to_parquet(nan_file)
    with pytest.raises(InputError, match=r"1 molecule\(s\) with a missing or infinite x coordinate"):
        pool_parquet(nan_file)
    far = transcripts.copy()
    far.loc[0, "y_location"] = 1e9
    far_file = tmp_path / "far.parquet"
    far.to_parquet(far_file)
    with pytest.raises(InputError, match="y spans"):
        pool_parquet(far_file, size_um=1.0)
    with pytest.raises(InputError, match="no molecule passes"):
        pool_transcripts(xenium_store, min_qv=1000.0)

    visium = tmp_path / "visium.zarr"
    hest_zarr.write(read_sample(perik_visium), visium)
    with pytest.raises(InputError, match="no 'transcripts' points element"):
        pool_transcripts(visium)


# --------------------------------------------------------------------------------------------- Visium HD
def test_hd_bins_pool_to_the_sums_of_their_blocks(tmp_path: Path) -> None:
    url = tmp_path / "hd.zarr"
    bins, counts = synthetic_hd_store(url)
    summary = pool_bins(url, 2, 8)
    assert (summary.spots, summary.table) == ("spots_square_008um", "spot_expression_square_008um")
    assert hest_zarr.validate(url) == []
    sdata = hest_zarr.open(url)
    table = sdata.tables["spot_expression_square_008um"]

    blocks = pd.DataFrame({"block_row": bins["row"] // 4, "block_col": bins["col"] // 4})
    dense = pd.DataFrame(counts.toarray(), columns=[f"Gene{i}" for i in range(12)])
    reference = dense.groupby([blocks["block_row"], blocks["block_col"]]).sum()
    ids = [f"s_008um_{r:05d}_{c:05d}-1" for r, c in reference.index]
    assert list(table.obs_names) == ids
    assert np.array_equal(table.X.toarray(), reference.to_numpy())
    assert table.X.dtype == np.int32
    assert int(table.X.sum()) == summary.total_counts == int(counts.sum())
    in_tissue = bins["in_tissue"].groupby([blocks["block_row"], blocks["block_col"]]).max()
    assert np.array_equal(table.obs["in_tissue"].to_numpy(), in_tissue.to_numpy())
    assert np.array_equal(table.obs["n_bins"].to_numpy(), blocks.groupby(["block_row", "block_col"]).size().to_numpy())

    # a block's centre is where the block's array centre maps: the mean of its 16 bins' centres when all are present
    squares = sdata.shapes["spots_square_008um"].loc[ids]
    centres = np.column_stack([squares.geometry.centroid.x, squares.geometry.centroid.y])
    full = np.flatnonzero(table.obs["n_bins"].to_numpy() == 16)
    assert len(full) > 20
    bin_means = bins[["x", "y"]].groupby([blocks["block_row"], blocks["block_col"]]).mean().to_numpy()
    assert np.abs(centres[full] - bin_means[full]).max() < 1e-6
    step = 2.0 / PIXEL_SIZE_UM
    angle = np.deg2rad(0.6)
    linear = step * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    array_centres = (
        np.column_stack([reference.index.get_level_values(1), reference.index.get_level_values(0)]) * 4 + 1.5
    )
    assert np.abs(centres - (array_centres @ linear.T + [1500.0, 800.0])).max() < 1e-6  # partial blocks too
    sides = squares.geometry.bounds.to_numpy()
    assert np.allclose(sides[:, 2] - sides[:, 0], 4 * step)


def test_hd_pooling_composes(tmp_path: Path) -> None:
    url = tmp_path / "hd.zarr"
    synthetic_hd_store(url, seed=11)
    pool_bins(url, 2, 8)
    pool_bins(url, 8, 16)
    direct = tmp_path / "direct.zarr"
    synthetic_hd_store(direct, seed=11)
    pool_bins(direct, 2, 16)
    stepwise = hest_zarr.open(url)
    at_once = hest_zarr.open(direct)
    a, b = stepwise.tables["spot_expression_square_016um"], at_once.tables["spot_expression_square_016um"]
    assert list(a.obs_names) == list(b.obs_names)
    assert (a.X != b.X).nnz == 0
    for column in ("array_row", "array_col", "in_tissue"):  # n_bins: 8 um bins in one, 2 um bins in the other
        assert np.array_equal(a.obs[column].to_numpy(), b.obs[column].to_numpy())
    assert np.allclose(
        stepwise.shapes["spots_square_016um"].geometry.centroid.x,
        at_once.shapes["spots_square_016um"].geometry.centroid.x,
    )
    assert np.allclose(
        stepwise.shapes["spots_square_016um"].geometry.centroid.y,
        at_once.shapes["spots_square_016um"].geometry.centroid.y,
    )


def test_hd_pooling_on_the_real_bin_positions(tmp_path: Path) -> None:
    """The real VisiumIO HD sample: 10 isolated 2 um bins, each alone in its 8 um block, placed on the real image."""
    url = tmp_path / "hd.zarr"
    hest_zarr.write(read_sample(shared("VisiumIO_visiumhd")), url)
    pool_bins(url, 2, 8)
    sdata = hest_zarr.open(url)
    small, large = sdata.tables["spot_expression_square_002um"], sdata.tables["spot_expression_square_008um"]
    assert sorted(large.obs_names) == sorted(
        f"s_008um_{r // 4:05d}_{c // 4:05d}-1"
        for r, c in zip(small.obs["array_row"], small.obs["array_col"], strict=True)
    )
    fit = hest_zarr.get_record(sdata).elements["spots_square_008um"].provenance.parameters
    assert (
        fit["array_to_pixel"] == "least_squares" and fit["rms_residual_px"] < 1.0
    )  # the HD array is affine on the image
    squares = sdata.shapes["spots_square_008um"]
    bounds = squares.geometry.bounds.to_numpy()
    side_px = 8.0 / 0.2738242950835738
    assert np.allclose(bounds[:, 2] - bounds[:, 0], side_px, rtol=1e-6)
    # each 8 um centre lies within 1.5 bins of 2 um (x sqrt 2) of its single 2 um bin
    small_squares = sdata.shapes["spots_square_002um"]
    for barcode, row, col in zip(small.obs_names, small.obs["array_row"], small.obs["array_col"], strict=True):
        block = squares.loc[f"s_008um_{row // 4:05d}_{col // 4:05d}-1"].geometry.centroid
        distance = block.distance(small_squares.loc[barcode].geometry.centroid)
        assert distance <= 1.5 * 2.0 / 0.2738242950835738 * np.sqrt(2) + 1.0


def test_bad_hd_input(tmp_path: Path, xenium_store: Path) -> None:
    url = tmp_path / "hd.zarr"
    synthetic_hd_store(url)
    for source, target in ((2, 7), (8, 8), (8, 2), (0, 8)):
        with pytest.raises(InputError, match="larger multiple"):
            pool_bins(url, source, target)
    with pytest.raises(InputError, match="whole micrometres"):
        pool_bins(url, 2, 8.5)
    with pytest.raises(InputError, match=r"no 8 um bins to pool .* found: \['spots_square_002um'\]"):
        pool_bins(url, 8, 16)
    pool_bins(url, 2, 8)
    with pytest.raises(InputError, match="already holds"):
        pool_bins(url, 2, 8)
    with pytest.raises(InputError, match="no 2 um bins to pool"):
        pool_bins(xenium_store, 2, 8)


# --------------------------------------------------------------------------------------------- CLI
def test_cli_pool(xenium_store: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["pool", str(xenium_store), "--size-um", "30", "--min-qv", "0", "--suffix", "sq30"])
    assert result.exit_code == 0, result.output
    assert "'spots_sq30'" in result.output and "5260 molecules" in result.output
    table = hest_zarr.open(xenium_store).tables["spot_expression_sq30"]
    assert int(table.X.sum()) == 5260
    result = runner.invoke(app, ["pool", str(xenium_store), "--to-bin-um", "7"])
    assert result.exit_code == 1
    assert "larger multiple" in result.output

    hd = tmp_path / "hd.zarr"
    synthetic_hd_store(hd)
    result = runner.invoke(app, ["pool", str(hd), "--from-bin-um", "2", "--to-bin-um", "16"])
    assert result.exit_code == 0, result.output
    assert "'spots_square_016um'" in result.output
