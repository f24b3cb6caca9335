"""Run the HEST-Benchmark: every task x encoder x regressor, from sample stores to results files.

Order of work, so that bad input fails before any compute:

1. Check the configuration, load the tasks and check their folds (:mod:`~hest_zarr.bench.tasks`).
2. Open every store, plan its patches and read the expression of the spots with a patch; check the genes
   (select them when a task has no list). Build the encoders (weights files checked).
3. Embed each (sample, encoder) once, or read it from the store's ``embeddings_<encoder>`` table.
4. Regress and score from those embeddings; write the results (:mod:`~hest_zarr.bench.report`).

A configuration file (YAML or JSON; relative paths resolve against its folder)::

    protocol: hest-bench-1.0
    tasks: [tasks/MOB_ST_v1]              # task folders or task.json files
    store_root: stores                     # where relative store URLs of the tasks live
    encoders:
      - {kind: efficientnet-lite0, name: efficientnet_lite0}
      - {kind: efficientnet-lite0, name: efficientnet_lite0_random, pretrained: false, seed: 0}
    regressors: [pca_ridge, ridge, xgboost]
    preprocessing: hest-code               # or paper (see hest_zarr.bench.protocol)
    output: results
    device: auto                           # cpu, cuda, cuda:1
    precision: auto                        # fp16 autocast on CUDA, fp32 on CPU
    batch_size: 64
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hest_zarr.bench.embed import sample_embeddings
from hest_zarr.bench.encoders import Encoder, build_encoder, resolve_device, resolve_precision
from hest_zarr.bench.genes import log1p_targets, select_genes
from hest_zarr.bench.protocol import (
    DEFAULT_PRESET,
    DEFAULT_SEED,
    PRESETS,
    PROTOCOL_VERSION,
    REGRESSORS,
    protocol_record,
)
from hest_zarr.bench.regression import RegressionResult, evaluate
from hest_zarr.bench.report import BenchResults, write_results
from hest_zarr.bench.tasks import SampleSpots, Task, load_task, read_task_spots
from hest_zarr.errors import InputError
from hest_zarr.schemas import HEST_ZARR_VERSION

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    """What to run: tasks, encoders, regressors, and how.

    Attributes
    ----------
    tasks
        :class:`~hest_zarr.bench.tasks.Task` objects, task folders or ``task.json`` files.
    encoders
        :class:`~hest_zarr.bench.encoders.Encoder` objects or specs for
        :func:`~hest_zarr.bench.encoders.build_encoder`.
    output
        Folder for the results files (``None``: return the results only).
    regressors
        Any of ``pca_ridge``, ``ridge``, ``xgboost``.
    preprocessing
        Preset name (:data:`~hest_zarr.bench.protocol.PRESETS`).
    store_root
        Folder or URL prefix that relative store URLs of the tasks resolve against.
    device, precision, batch_size
        Encoder inference settings.
    cache
        Read and write embeddings in the stores.
    seed
        Random state of the regressors.
    n_jobs
        XGBoost threads (default: all cores).
    storage_options
        fsspec options for remote stores.
    progress
        Show progress bars.

    """

    tasks: Sequence[Task | str | Path]
    encoders: Sequence[Encoder | Mapping[str, Any]]
    output: str | Path | None = None
    regressors: Sequence[str] = REGRESSORS
    preprocessing: str = DEFAULT_PRESET
    store_root: str | Path | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    cache: bool = True
    seed: int = DEFAULT_SEED
    n_jobs: int | None = None
    storage_options: dict[str, Any] | None = None
    progress: bool = True


def load_config(path: str | Path, **overrides: Any) -> BenchConfig:
    """Read a benchmark configuration (YAML or JSON); ``overrides`` replace its values when not ``None``.

    Examples
    --------
    >>> config = load_config("bench.yaml", output="results_gpu", device="cuda")  # doctest: +SKIP

    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such benchmark configuration")
    try:
        data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML or JSON ({err})") from err
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of settings")
    protocol = data.pop("protocol", PROTOCOL_VERSION)
    if protocol != PROTOCOL_VERSION:
        raise InputError(f"{path}: protocol {protocol!r}; this version runs {PROTOCOL_VERSION!r}")
    known = {f.name for f in dataclasses.fields(BenchConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{path}: unknown setting(s) {unknown}; known: {sorted(known)}")
    # paths in the file are relative to the file; paths given as overrides (the command line) to the working folder
    folder = path.parent
    data["tasks"] = [folder / task if isinstance(task, str) else task for task in data.get("tasks") or []]
    for key in ("output", "store_root"):
        value = data.get(key)
        if isinstance(value, str | Path) and "://" not in str(value):
            data[key] = folder / value
    data.update({key: value for key, value in overrides.items() if value is not None})
    for key in ("tasks", "encoders"):
        if not data.get(key):
            raise InputError(f"{path}: '{key}' must list at least one entry")
    return BenchConfig(**data)


@dataclass
class PreparedTask:
    """A task whose stores were opened and checked: the spots used and their log1p targets."""

    task: Task
    spots: dict[str, SampleSpots]
    targets: dict[str, np.ndarray]


def prepare_task(
    task: Task, *, store_root: str | Path | None = None, storage_options: dict[str, Any] | None = None
) -> PreparedTask:
    """Open a task's stores, check them and read its targets; select its genes when it lists none."""
    spots = read_task_spots(task, store_root=store_root, storage_options=storage_options)
    if task.genes is None:
        task = task.with_genes(select_genes({sample: s.table for sample, s in spots.items()}))
        logger.warning("task %r lists no genes: selected %d from its stores", task.name, len(task.genes or ()))
    genes = list(task.genes or ())
    targets = {
        sample: log1p_targets(s.table, s.ids, genes, source=f"task {task.name!r}, sample {sample!r} ({s.url})")
        for sample, s in spots.items()
    }
    return PreparedTask(task, spots, targets)


def _environment(device: str, precision: str) -> dict[str, Any]:
    import sklearn
    import torch
    import xgboost

    return {
        "hest_zarr": HEST_ZARR_VERSION,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "scikit_learn": sklearn.__version__,
        "xgboost": xgboost.__version__,
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor(),
        "precision": precision,
    }


def _check_names(config: BenchConfig) -> None:
    unknown = [regressor for regressor in config.regressors if regressor not in REGRESSORS]
    if unknown or not config.regressors:
        raise InputError(f"regressors {list(config.regressors)}: choose among {list(REGRESSORS)}")
    if config.preprocessing not in PRESETS:
        raise InputError(f"preprocessing {config.preprocessing!r}: choose among {sorted(PRESETS)}")
    if config.batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {config.batch_size}")


def _load_tasks(config: BenchConfig) -> list[PreparedTask]:
    """Step 1-2: load the tasks (unique names), open and check their stores, read their targets."""
    tasks = [task if isinstance(task, Task) else load_task(task) for task in config.tasks]
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise InputError(f"task names must be unique, got {names}")
    return [prepare_task(t, store_root=config.store_root, storage_options=config.storage_options) for t in tasks]


def _build_encoders(config: BenchConfig, device: torch.device) -> list[Encoder]:
    """Step 2: build every encoder on the device (weights files checked); names must be unique."""
    encoders = [build_encoder(spec).to(device) for spec in config.encoders]
    encoder_names = [encoder.name for encoder in encoders]
    if len(set(encoder_names)) != len(encoder_names):
        raise InputError(f"encoder names must be unique, got {encoder_names}")
    return encoders


def _embed_all(
    config: BenchConfig, prepared: Sequence[PreparedTask], encoders: Sequence[Encoder], precision: str
) -> tuple[dict[tuple[str, str], dict[str, np.ndarray]], list[dict[str, Any]]]:
    """Step 3: embed each (sample, encoder) once, or read its cache; return them by (task, encoder), and the log."""
    embeddings: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    log: list[dict[str, Any]] = []
    for encoder in encoders:
        for entry in prepared:
            task = entry.task
            for sample, spots in entry.spots.items():
                result = sample_embeddings(
                    spots.url,
                    encoder,
                    spots.ids,
                    element=task.element,
                    size_px=task.size_px,
                    pixel_size_um=task.pixel_size_um,
                    in_tissue_only=task.in_tissue_only,
                    batch_size=config.batch_size,
                    precision=precision,
                    cache=config.cache,
                    storage_options=config.storage_options,
                    progress=config.progress,
                )
                embeddings.setdefault((task.name, encoder.name), {})[sample] = result.embeddings
                log.append(
                    {
                        "task": task.name,
                        "encoder": encoder.name,
                        "sample": sample,
                        "table": result.table,
                        "from_cache": result.from_cache,
                        "n_spots": len(result.ids),
                        "dim": int(result.embeddings.shape[1]),
                        "seconds": round(result.seconds, 3),
                    }
                )
                logger.info(
                    "%s / %s / %s: %s", task.name, encoder.name, sample, "cached" if result.from_cache else "embedded"
                )
    return embeddings, log


def _regress_all(
    config: BenchConfig,
    prepared: Sequence[PreparedTask],
    encoders: Sequence[Encoder],
    embeddings: Mapping[tuple[str, str], dict[str, np.ndarray]],
) -> list[RegressionResult]:
    """Step 4: fit and score every task x encoder x regressor on the folds of its task."""
    results = []
    for entry in prepared:
        for encoder in encoders:
            for regressor in config.regressors:
                results.append(
                    evaluate(
                        regressor,
                        embeddings[(entry.task.name, encoder.name)],
                        entry.targets,
                        entry.task.folds,
                        list(entry.task.genes or ()),
                        task=entry.task.name,
                        encoder=encoder.name,
                        preprocessing=config.preprocessing,
                        seed=config.seed,
                        n_jobs=config.n_jobs,
                    )
                )
                logger.info("%s / %s / %s: r = %.4f", entry.task.name, encoder.name, regressor, results[-1].mean)
    return results


def _settings(config: BenchConfig, device: str, precision: str) -> dict[str, Any]:
    """Return the run's settings as the results record them."""
    return {
        "regressors": list(config.regressors),
        "preprocessing": config.preprocessing,
        "store_root": str(config.store_root) if config.store_root is not None else None,
        "device": device,
        "precision": precision,
        "batch_size": config.batch_size,
        "cache": config.cache,
        "seed": config.seed,
    }


def run_benchmark(config: BenchConfig | str | Path) -> BenchResults:
    """Run the benchmark and, when ``config.output`` is set, write its results there.

    The steps of the module docstring, in order and each timed (``timings`` of the results): checks (tasks,
    stores, genes, encoders), embedding, regression.

    Examples
    --------
    >>> from hest_zarr.bench import BenchConfig, run_benchmark
    >>> results = run_benchmark(BenchConfig(  # doctest: +SKIP
    ...     tasks=["hest_zarr/bench/tasks/MOB_ST_v1"], store_root="stores",
    ...     encoders=[{"kind": "efficientnet-lite0"}], output="results"))
    >>> results.result("MOB_ST_v1", "efficientnet_lite0", "pca_ridge").mean  # doctest: +SKIP

    """
    started = time.perf_counter()
    if not isinstance(config, BenchConfig):
        config = load_config(config)
    _check_names(config)
    prepared = _load_tasks(config)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    encoders = _build_encoders(config, device)
    checked = time.perf_counter()
    embeddings, embedding_log = _embed_all(config, prepared, encoders, precision)
    embedded = time.perf_counter()
    results = _regress_all(config, prepared, encoders, embeddings)
    finished = time.perf_counter()

    bench = BenchResults(
        protocol=protocol_record(PRESETS[config.preprocessing], config.seed),
        settings=_settings(config, str(device), precision),
        tasks=[
            {**entry.task.to_dict(), "n_spots": {sample: len(s.ids) for sample, s in entry.spots.items()}}
            for entry in prepared
        ],
        encoders=[{"name": encoder.name, "fingerprint": encoder.fingerprint} for encoder in encoders],
        embeddings=embedding_log,
        results=results,
        timings={
            "checks_s": round(checked - started, 3),
            "embedding_s": round(embedded - checked, 3),
            "regression_s": round(finished - embedded, 3),
            "total_s": round(finished - started, 3),
        },
        environment=_environment(str(device), precision),
    )
    if config.output is not None:
        write_results(bench, config.output)
    return bench
