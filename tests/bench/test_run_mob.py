"""The benchmark end to end on the real ST v1 mouse olfactory bulb sections MOB1 and MOB2.

The stores are converted from ``../shared/data/STUtility_ST_v1``. A small colour-statistics encoder (defined here)
keeps the test fast; expectations are recomputed independently: patch colours from the JPEG with OpenCV, targets
from the count TSVs with pandas, Ridge in closed form with numpy, Pearson with scipy.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from typer.testing import CliRunner

import hest_zarr
from hest_zarr.bench import TASKS_FOLDER, BenchConfig, Encoder, Task, load_task, run_benchmark, select_task_genes
from hest_zarr.bench.run import load_config
from hest_zarr.cli import app
from hest_zarr.converters.st_v1 import read_st_v1
from hest_zarr.errors import InputError
from hest_zarr.store import get_record
from tests.conftest import shared

MOB = ("MOB1", "MOB2")
SPOTS_UNDER_TISSUE = {"MOB1": 379, "MOB2": 407}


class ColourStatistics:
    """Per-channel mean and standard deviation, and the mean of each quarter of the patch (18 values)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        quarters = torch.nn.functional.adaptive_avg_pool2d(pixels, 2).flatten(1)
        return torch.cat([pixels.mean(dim=(2, 3)), pixels.std(dim=(2, 3)), quarters], dim=1)


def colour_encoder(version: int = 1) -> Encoder:
    fingerprint = {"kind": "test-colour-statistics", "version": version}
    return Encoder("colour_stats", ColourStatistics(), fingerprint, (0, 0, 0), (1, 1, 1), None)


def convert(name: str, folder: Path, **edit) -> Path:
    source = shared("STUtility_ST_v1")
    sdata = read_st_v1(
        source / f"{name}.tsv", alignment=source / f"alignment_table_{name}.tsv", image=source / f"{name}.jpg"
    )
    if "genes_prefix" in edit:
        sdata["spot_expression"].var_names = [edit["genes_prefix"] + g for g in sdata["spot_expression"].var_names]
    if edit.get("no_tissue"):
        sdata["spot_expression"].obs["in_tissue"] = 0
    return Path(hest_zarr.write(sdata, folder / f"{name}.zarr"))


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mob_stores")
    for name in MOB:
        convert(name, folder)
    return folder


@pytest.fixture(scope="module")
def task() -> Task:
    return load_task(TASKS_FOLDER / "MOB_ST_v1")


def raw_targets(name: str, genes: list[str]) -> pd.DataFrame:
    """log1p counts of the spots the spot detector selected (under tissue), straight from the TSVs."""
    counts = pd.read_csv(shared("STUtility_ST_v1", f"{name}.tsv"), sep="\t", index_col=0)
    alignment = pd.read_csv(shared("STUtility_ST_v1", f"alignment_table_{name}.tsv"), sep="\t")
    selected = (alignment["x"].astype(str) + "x" + alignment["y"].astype(str))[alignment["selected"] == 1]
    return np.log1p(counts.loc[selected, genes].astype(float))


def test_mob_end_to_end_matches_independent_computations(stores: Path, task: Task, tmp_path: Path) -> None:
    encoder = colour_encoder()
    config = BenchConfig(
        tasks=[task],
        encoders=[encoder],
        output=tmp_path / "results",
        regressors=["pca_ridge", "ridge"],  # XGBoost is checked against a direct call in test_regression.py
        store_root=stores,
        preprocessing="paper",
        progress=False,
    )
    results = run_benchmark(config)
    assert encoder.model.calls > 0

    # the cache table sits in each store, annotating spots, with the encoder's fingerprint in its provenance
    embeddings, targets = {}, {}
    for name in MOB:
        sdata = hest_zarr.open(stores / f"{name}.zarr")
        table = sdata.tables["embeddings_colour_stats"]
        assert table.shape == (SPOTS_UNDER_TISSUE[name], 18)
        assert table.uns["spatialdata_attrs"]["region"] == "spots"
        parameters = get_record(sdata).elements["embeddings_colour_stats"].provenance.parameters
        assert parameters["fingerprint"]["encoder"]["kind"] == "test-colour-statistics"
        assert parameters["fingerprint"]["patches"] == {"element": "spots", "size_px": 224, "pixel_size_um": 0.5}
        assert hest_zarr.validate(stores / f"{name}.zarr", check_data=False) == []
        frame = pd.DataFrame(table.X, index=table.obs["spot_id"].astype(str))
        targets[name] = raw_targets(name, list(task.genes))
        embeddings[name] = frame.loc[targets[name].index].to_numpy(dtype=np.float64)

    # patch colours: a 112 um window (25.5 px at 4.385 um/px) around the spot's detector pixel in the JPEG
    jpeg = cv2.cvtColor(cv2.imread(str(shared("STUtility_ST_v1", "MOB1.jpg"))), cv2.COLOR_BGR2RGB) / 255.0
    alignment = pd.read_csv(shared("STUtility_ST_v1", "alignment_table_MOB1.tsv"), sep="\t")
    alignment.index = alignment["x"].astype(str) + "x" + alignment["y"].astype(str)
    for spot in targets["MOB1"].index[:: len(targets["MOB1"]) // 6]:
        left, top = (round(float(value) - 12.5) for value in alignment.loc[spot, ["pixel_x", "pixel_y"]])
        window = jpeg[top : top + 26, left : left + 26]
        row = list(targets["MOB1"].index).index(spot)
        assert np.allclose(embeddings["MOB1"][row, :3], window.mean(axis=(0, 1)), atol=0.01)

    # Ridge on raw embeddings ('paper' preset: intercept, exact solve), scored per gene with scipy
    ridge = results.result("MOB_ST_v1", "colour_stats", "ridge")
    per_gene = pd.read_csv(tmp_path / "results" / "per_gene.csv")
    for fold, (train, test) in enumerate([("MOB2", "MOB1"), ("MOB1", "MOB2")]):
        x, y = embeddings[train], targets[train].to_numpy()
        xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
        weights = np.linalg.solve(xc.T @ xc + 100 / (18 * 50) * np.eye(18), xc.T @ yc)
        predicted = (embeddings[test] - x.mean(axis=0)) @ weights + y.mean(axis=0)
        expected = [scipy.stats.pearsonr(targets[test].iloc[:, g], predicted[:, g]).statistic for g in range(50)]
        assert np.allclose(ridge.folds[fold].pearson, expected, atol=1e-6)
        rows = per_gene[(per_gene.regressor == "ridge") & (per_gene.fold == fold)]
        assert rows["gene"].tolist() == list(task.genes)
        assert np.allclose(rows["pearson"], expected, atol=1e-6)
        assert (ridge.folds[fold].n_train, ridge.folds[fold].n_test) == (
            SPOTS_UNDER_TISSUE[train],
            SPOTS_UNDER_TISSUE[test],
        )
    assert ridge.mean == pytest.approx(np.mean([np.mean(f.pearson) for f in ridge.folds]))

    # PCA kept the 18 available components
    assert [r.regressor for r in results.results] == ["pca_ridge", "ridge"]
    assert results.result("MOB_ST_v1", "colour_stats", "pca_ridge").folds[0].details["n_components"] == 18
    saved = json.loads((tmp_path / "results" / "results.json").read_text())
    assert saved["protocol"]["version"] == "hest-bench-1.0"
    assert saved["protocol"]["preprocessing"]["name"] == "paper"
    assert [r["pearson_mean"] for r in saved["results"]] == pytest.approx([r.mean for r in results.results])
    summary = pd.read_csv(tmp_path / "results" / "summary.csv", index_col=[0, 1])
    assert summary.loc[("colour_stats", "ridge"), "MOB_ST_v1"] == f"{ridge.mean:.3f} ± {ridge.std:.3f}"
    assert (tmp_path / "results" / "summary.png").stat().st_size > 10_000

    # a rerun reads the cache: no patch goes through the encoder, same scores
    again = colour_encoder()
    rerun = run_benchmark(
        BenchConfig(
            tasks=[task],
            encoders=[again],
            regressors=config.regressors,
            store_root=stores,
            preprocessing="paper",
            progress=False,
        )
    )
    assert again.model.calls == 0
    assert all(entry["from_cache"] for entry in rerun.embeddings)
    assert [r.mean for r in rerun.results] == [r.mean for r in results.results]

    # another fingerprint under the same name embeds again and replaces the table
    changed = colour_encoder(version=2)
    with pytest.warns(UserWarning, match="made with other settings"):
        run_benchmark(
            BenchConfig(tasks=[task], encoders=[changed], regressors=["ridge"], store_root=stores, progress=False)
        )
    assert changed.model.calls > 0


def bad_input_error(task: Task, store_root: Path) -> str:
    encoder = colour_encoder()
    with pytest.raises(InputError) as caught:
        run_benchmark(BenchConfig(tasks=[task], encoders=[encoder], store_root=store_root, progress=False))
    assert encoder.model.calls == 0  # refused before any compute
    return str(caught.value)


def test_a_missing_store_is_refused_before_compute(stores: Path, task: Task, tmp_path: Path) -> None:
    shutil.copytree(stores / "MOB1.zarr", tmp_path / "MOB1.zarr")
    message = bad_input_error(task, tmp_path)
    assert "task 'MOB_ST_v1', sample 'MOB2'" in message and "cannot open the store" in message


def test_samples_sharing_no_gene_are_refused_before_compute(stores: Path, task: Task, tmp_path: Path) -> None:
    shutil.copytree(stores / "MOB1.zarr", tmp_path / "MOB1.zarr")
    convert("MOB2", tmp_path, genes_prefix="renamed_")
    message = bad_input_error(task, tmp_path)
    assert "sample 'MOB2'" in message and "lacks 50 of the task's 50 genes" in message
    from dataclasses import replace

    message = bad_input_error(replace(task, genes=None), tmp_path)
    assert "the samples ['MOB1', 'MOB2'] share no gene name" in message


def test_a_sample_without_patches_is_refused_before_compute(stores: Path, task: Task, tmp_path: Path) -> None:
    shutil.copytree(stores / "MOB2.zarr", tmp_path / "MOB2.zarr")
    convert("MOB1", tmp_path, no_tissue=True)
    message = bad_input_error(task, tmp_path)
    assert "sample 'MOB1'" in message and "no patches" in message


def test_a_patient_in_train_and_test_is_refused_before_compute(stores: Path, tmp_path: Path) -> None:
    data = json.loads((TASKS_FOLDER / "MOB_ST_v1" / "task.json").read_text())
    data["samples"][1]["patient"] = "mouse"
    data["samples"][0]["patient"] = "mouse"
    (tmp_path / "task.json").write_text(json.dumps(data))
    encoder = colour_encoder()
    with pytest.raises(InputError, match=r"fold 0: patient 'mouse' is in both train \(MOB2\) and test \(MOB1\)"):
        run_benchmark(BenchConfig(tasks=[tmp_path], encoders=[encoder], store_root=stores, progress=False))
    assert encoder.model.calls == 0


def test_shipped_gene_list_follows_from_the_stores(stores: Path) -> None:
    """The task's 50 genes are what the selection rule picks from the converted sections today."""
    task = load_task(TASKS_FOLDER / "MOB_ST_v1")
    assert select_task_genes(dataclasses.replace(task, genes=None), store_root=stores).genes == task.genes


def test_cli_runs_a_config_file(stores: Path, tmp_path: Path) -> None:
    config = {
        "protocol": "hest-bench-1.0",
        "tasks": [str(TASKS_FOLDER / "MOB_ST_v1")],
        "store_root": str(stores),
        "encoders": [{"kind": "callable", "name": "pixels_2x2", "target": "torch.nn:Identity", "input_size": 2}],
        "regressors": ["ridge"],
        "output": "out",
    }
    (tmp_path / "bench.yaml").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "bench.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "| pixels_2x2 | ridge |" in result.stdout
    assert (tmp_path / "out" / "results.json").is_file()  # relative to the config file
    # an output given on the command line is relative to the working folder, not to the config file
    assert load_config(tmp_path / "bench.yaml", output=Path("elsewhere")).output == Path("elsewhere")
    config["encoders"][0]["kind"] = "uni"
    (tmp_path / "bad.yaml").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 1 and "'kind' must be one of" in result.stderr
