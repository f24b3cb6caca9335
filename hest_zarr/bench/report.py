"""Results files of a benchmark run: JSON, CSV, the summary table in the paper's layout and a bar plot.

``write_results(results, folder)`` writes:

- ``results.json``: protocol (version, constants, preset), settings, tasks (samples, folds, genes), encoder
  fingerprints, embedding log (cached or computed, seconds), and per task/encoder/regressor the mean and
  standard deviation over folds, every fold's score and every gene's r (NaN written as ``null``);
- ``per_fold.csv``: ``task, encoder, regressor, fold, train, test, n_train, n_test, pearson_mean, n_undefined``;
- ``per_gene.csv``: ``task, encoder, regressor, fold, gene, pearson``;
- ``summary.csv`` and ``summary.md``: rows encoder x regressor, columns tasks (and their average when there
  are several), cells ``mean ± std`` (the HEST-Benchmark table's layout);
- ``summary.png``: bars of the mean per task, grouped by encoder and regressor, with the standard deviation.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hest_zarr.bench.regression import RegressionResult

AVERAGE = "average"


@dataclass
class BenchResults:
    """Everything a run produced and what it ran with: what :func:`~hest_zarr.bench.run.run_benchmark` returns.

    It lives here, with the functions that turn it into files (:func:`write_results`), so that the runner
    depends on the report and not the other way round.
    """

    protocol: dict[str, Any]
    settings: dict[str, Any]
    tasks: list[dict[str, Any]]
    encoders: list[dict[str, Any]]
    embeddings: list[dict[str, Any]]
    results: list[RegressionResult]
    timings: dict[str, float]
    environment: dict[str, Any]
    created: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    def result(self, task: str, encoder: str, regressor: str) -> RegressionResult:
        """Return one (task, encoder, regressor) result."""
        for result in self.results:
            if (result.task, result.encoder, result.regressor) == (task, encoder, regressor):
                return result
        raise KeyError((task, encoder, regressor))


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def results_dict(results: BenchResults) -> dict[str, Any]:
    """Return everything of a run as a JSON-ready dict (NaN as ``None``)."""
    entries = []
    for result in results.results:
        with warnings.catch_warnings():  # a gene without r on every fold has no mean
            warnings.simplefilter("ignore", RuntimeWarning)
            gene_means = np.nanmean([fold.pearson for fold in result.folds], axis=0)
        entries.append(
            {
                "task": result.task,
                "encoder": result.encoder,
                "regressor": result.regressor,
                "pearson_mean": _finite(result.mean),
                "pearson_std": _finite(result.std),
                "n_genes": len(result.genes),
                "pearson_per_gene_mean": {g: _finite(v) for g, v in zip(result.genes, gene_means, strict=True)},
                "folds": [
                    {
                        "fold": fold.fold,
                        "train": fold.train,
                        "test": fold.test,
                        "n_train": fold.n_train,
                        "n_test": fold.n_test,
                        "pearson_mean": _finite(fold.mean),
                        "n_undefined": fold.n_undefined,
                        "details": fold.details,
                        "pearson_per_gene": {g: _finite(r) for g, r in zip(result.genes, fold.pearson, strict=True)},
                    }
                    for fold in result.folds
                ],
            }
        )
    return {
        "protocol": results.protocol,
        "created": results.created,
        "settings": results.settings,
        "environment": results.environment,
        "timings": results.timings,
        "tasks": results.tasks,
        "encoders": results.encoders,
        "embeddings": results.embeddings,
        "results": entries,
    }


def per_fold_frame(results: BenchResults) -> pd.DataFrame:
    """One row per task, encoder, regressor and fold."""
    rows = [
        {
            "task": r.task,
            "encoder": r.encoder,
            "regressor": r.regressor,
            "fold": fold.fold,
            "train": ";".join(fold.train),
            "test": ";".join(fold.test),
            "n_train": fold.n_train,
            "n_test": fold.n_test,
            "pearson_mean": fold.mean,
            "n_undefined": fold.n_undefined,
        }
        for r in results.results
        for fold in r.folds
    ]
    return pd.DataFrame(rows)


def per_gene_frame(results: BenchResults) -> pd.DataFrame:
    """One row per task, encoder, regressor, fold and gene."""
    rows = [
        {
            "task": r.task,
            "encoder": r.encoder,
            "regressor": r.regressor,
            "fold": fold.fold,
            "gene": gene,
            "pearson": value,
        }
        for r in results.results
        for fold in r.folds
        for gene, value in zip(r.genes, fold.pearson, strict=True)
    ]
    return pd.DataFrame(rows)


def summary_table(results: BenchResults, *, digits: int = 3) -> pd.DataFrame:
    """Rows encoder x regressor, columns tasks (+ ``average`` over tasks when several), cells ``mean ± std``.

    The average column is the mean over tasks of the task means (as in the paper); its ± is the standard
    deviation of those task means.
    """
    means = pd.DataFrame(
        [
            {"encoder": r.encoder, "regressor": r.regressor, "task": r.task, "mean": r.mean, "std": r.std}
            for r in results.results
        ]
    )
    tasks = list(dict.fromkeys(means["task"]))
    rows = {}
    for (encoder, regressor), group in means.groupby(["encoder", "regressor"], sort=False):
        by_task = group.set_index("task")
        cells = {
            task: f"{by_task.at[task, 'mean']:.{digits}f} ± {by_task.at[task, 'std']:.{digits}f}" for task in tasks
        }
        if len(tasks) > 1:
            task_means = by_task["mean"].to_numpy()
            cells[AVERAGE] = f"{np.mean(task_means):.{digits}f} ± {np.std(task_means):.{digits}f}"
        rows[(encoder, regressor)] = cells
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["encoder", "regressor"])
    return table


def summary_markdown(results: BenchResults, *, digits: int = 3) -> str:
    """Return the summary table as Markdown (Pearson r, mean ± std over folds)."""
    table = summary_table(results, digits=digits)
    header = ["encoder", "regressor", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (encoder, regressor), row in table.iterrows():
        lines.append("| " + " | ".join([encoder, regressor, *row.tolist()]) + " |")
    return "\n".join(lines) + "\n"


def bar_plot(results: BenchResults, path: str | Path) -> Path:
    """Draw the mean Pearson r per task (groups) and encoder x regressor (bars), with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in results.results))
    series = list(dict.fromkeys((r.encoder, r.regressor) for r in results.results))
    width = 0.8 / len(series)
    colours = plt.get_cmap("tab20").colors
    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 + len(tasks) * len(series) * 0.45), 4.5))
    for number, (encoder, regressor) in enumerate(series):
        found = [results.result(task, encoder, regressor) for task in tasks]
        positions = np.arange(len(tasks)) + (number - (len(series) - 1) / 2) * width
        axes.bar(
            positions,
            [r.mean for r in found],
            width,
            yerr=[r.std for r in found],
            capsize=3,
            color=colours[number % len(colours)],
            label=f"{encoder} / {regressor}",
        )
    axes.set_xticks(np.arange(len(tasks)), tasks)
    axes.set_ylabel("Pearson r (mean ± std over folds)")
    axes.set_title(f"HEST-Benchmark ({results.protocol['version']}, {results.settings['preprocessing']})")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_results(results: BenchResults, folder: str | Path) -> dict[str, Path]:
    """Write every results file into a folder (created if needed); return their paths by kind.

    Examples
    --------
    >>> write_results(results, "bench_results")["summary"]  # doctest: +SKIP
    PosixPath('bench_results/summary.csv')

    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": folder / "results.json",
        "per_fold": folder / "per_fold.csv",
        "per_gene": folder / "per_gene.csv",
        "summary": folder / "summary.csv",
        "markdown": folder / "summary.md",
        "plot": folder / "summary.png",
    }
    paths["json"].write_text(json.dumps(results_dict(results), indent=2) + "\n")
    per_fold_frame(results).to_csv(paths["per_fold"], index=False)
    per_gene_frame(results).to_csv(paths["per_gene"], index=False)
    summary_table(results).to_csv(paths["summary"])
    paths["markdown"].write_text(summary_markdown(results))
    bar_plot(results, paths["plot"])
    return paths
