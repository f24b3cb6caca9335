"""HEST-Benchmark on sample stores: how well a patch encoder predicts spatial gene expression.

Protocol ``hest-bench-1.0`` (:mod:`~hest_zarr.bench.protocol`): 112 x 112 um patches (224 px at 0.5 um/px)
centred on spots, streamed from the stores by the one patch reader (:mod:`hest_zarr.stream`); the 50 most variable
genes of a task (:mod:`~hest_zarr.bench.genes`); patient-stratified folds (:mod:`~hest_zarr.bench.tasks`);
embeddings cached in the stores (:mod:`~hest_zarr.bench.embed`) from a registry of encoders
(:mod:`~hest_zarr.bench.encoders`); PCA + Ridge, Ridge and XGBoost regressors scored by Pearson's r per gene
(:mod:`~hest_zarr.bench.regression`); results as JSON, CSV, a summary table and a bar plot
(:mod:`~hest_zarr.bench.report`).

Needs the ``ml`` extra (torch, torchvision, xgboost, the EfficientNet-Lite0 packages).

Examples
--------
>>> from hest_zarr.bench import BenchConfig, run_benchmark
>>> results = run_benchmark("bench.yaml")  # doctest: +SKIP
>>> print(summary_markdown(results))  # doctest: +SKIP

"""

from __future__ import annotations

from hest_zarr.bench.embed import embed_patches, embeddings_table_name, sample_embeddings
from hest_zarr.bench.encoders import (
    ENCODER_KINDS,
    Encoder,
    build_encoder,
    efficientnet_lite0,
    register_encoder_kind,
    timm_encoder,
    torchscript_encoder,
    torchvision_encoder,
)
from hest_zarr.bench.genes import GeneSelection, log1p_targets, select_genes
from hest_zarr.bench.protocol import PRESETS, PROTOCOL_VERSION, REGRESSORS, Preprocessing
from hest_zarr.bench.regression import RegressionResult, evaluate, fit_predict, pearson_per_gene, ridge_alpha
from hest_zarr.bench.report import BenchResults, summary_markdown, summary_table, write_results
from hest_zarr.bench.run import BenchConfig, load_config, run_benchmark
from hest_zarr.bench.tasks import (
    TASKS_FOLDER,
    Fold,
    Task,
    TaskSample,
    load_task,
    patient_folds,
    select_task_genes,
    task_from_metadata,
)

__all__ = [
    "ENCODER_KINDS",
    "PRESETS",
    "PROTOCOL_VERSION",
    "REGRESSORS",
    "TASKS_FOLDER",
    "BenchConfig",
    "BenchResults",
    "Encoder",
    "Fold",
    "GeneSelection",
    "Preprocessing",
    "RegressionResult",
    "Task",
    "TaskSample",
    "build_encoder",
    "efficientnet_lite0",
    "embed_patches",
    "embeddings_table_name",
    "evaluate",
    "fit_predict",
    "load_config",
    "load_task",
    "log1p_targets",
    "patient_folds",
    "pearson_per_gene",
    "register_encoder_kind",
    "ridge_alpha",
    "run_benchmark",
    "sample_embeddings",
    "select_genes",
    "select_task_genes",
    "summary_markdown",
    "summary_table",
    "task_from_metadata",
    "timm_encoder",
    "torchscript_encoder",
    "torchvision_encoder",
    "write_results",
]
