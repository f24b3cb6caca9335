"""Benchmark tasks as files: samples (store URLs, patients), folds, genes and patch geometry.

A task is a folder holding ``task.json`` and ``splits/train_<i>.csv``, ``splits/test_<i>.csv`` (columns
``sample_id, patient, url``; HEST's split layout). ``task.json``::

    {
      "protocol": "hest-bench-1.0",
      "name": "MOB_ST_v1",
      "samples": [{"id": "MOB1", "url": "MOB1.zarr", "patient": "MOB1"}, ...],
      "split": {"scheme": "patient-kfold", "n_folds": 2, "folds": [{"train": ["MOB2"], "test": ["MOB1"]}, ...]},
      "genes": ["ENSMUSG...", ...],            # null: selected from the stores when the task runs
      "gene_selection": {...},                 # how the genes were chosen (GeneSelection.to_dict())
      "patches": {"element": "spots", "table": "spot_expression", "in_tissue_only": true,
                  "size_px": 224, "pixel_size_um": 0.5}
    }

Store URLs that are neither absolute paths nor URLs resolve against a store root given at run time, else
against the task's folder. Folds: with the ``patient-kfold`` scheme patients are sorted by id and patient ``i``
goes to test fold ``i mod k`` (``k`` = number of patients unless given, e.g. ``k/2`` for ccRCC); every other
sample is in that fold's training set. Hand-written folds (scheme ``explicit``) are checked the same way:
every fold must have training and test samples and no patient on both sides.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
from anndata import AnnData

from hest_zarr.bench.genes import GeneSelection, VarianceCriterion, select_genes
from hest_zarr.bench.protocol import PATCH_PIXEL_SIZE_UM, PATCH_SIZE_PX, PROTOCOL_VERSION
from hest_zarr.elements import Elements, Keys
from hest_zarr.errors import HestZarrError, InputError
from hest_zarr.ops.patch import plan_patches
from hest_zarr.store import StorageOptions
from hest_zarr.store import open as open_store

TASK_FILE: Final = "task.json"
SPLITS_FOLDER: Final = "splits"
PATIENT_KFOLD: Final = "patient-kfold"
#: Example tasks shipped with the package.
TASKS_FOLDER: Final = Path(__file__).parent / "tasks"


@dataclass(frozen=True)
class TaskSample:
    """One sample of a task: its id, its store (path or URL) and its patient."""

    id: str
    url: str
    patient: str


@dataclass(frozen=True)
class Fold:
    """Sample ids of one fold's training and test sets."""

    train: tuple[str, ...]
    test: tuple[str, ...]


def patient_folds(samples: Sequence[TaskSample], n_folds: int | None = None) -> tuple[Fold, ...]:
    """Split samples into folds by patient: patients sorted by id, patient ``i`` tested in fold ``i mod k``.

    Parameters
    ----------
    samples
        The task's samples.
    n_folds
        Number of folds ``k`` (default: the number of patients).

    Examples
    --------
    >>> samples = [TaskSample("A1", "a1.zarr", "p1"), TaskSample("A2", "a2.zarr", "p1")]
    >>> samples.append(TaskSample("B", "b.zarr", "p2"))
    >>> [fold.test for fold in patient_folds(samples)]
    [('A1', 'A2'), ('B',)]

    """
    patients = sorted({sample.patient for sample in samples})
    k = len(patients) if n_folds is None else n_folds
    if not 2 <= k <= len(patients):
        raise InputError(f"{k} folds asked for {len(patients)} patient(s): need 2 <= folds <= patients")
    fold_of = {patient: rank % k for rank, patient in enumerate(patients)}
    return tuple(
        Fold(
            train=tuple(s.id for s in samples if fold_of[s.patient] != fold),
            test=tuple(s.id for s in samples if fold_of[s.patient] == fold),
        )
        for fold in range(k)
    )


def check_folds(samples: Sequence[TaskSample], folds: Sequence[Fold], where: str) -> None:
    """Raise :class:`InputError` unless every fold has known train and test samples and no shared patient.

    Examples
    --------
    >>> samples = [TaskSample("A", "a.zarr", "p1"), TaskSample("B", "b.zarr", "p1")]
    >>> check_folds(samples, [Fold(("A",), ("B",))], "task T")
    Traceback (most recent call last):
    ...
    hest_zarr.errors.InputError: task T, fold 0: patient 'p1' is in both train (A) and test (B)

    """
    patient_of = {sample.id: sample.patient for sample in samples}
    if not folds:
        raise InputError(f"{where}: no fold")
    for number, fold in enumerate(folds):
        for side, ids in (("train", fold.train), ("test", fold.test)):
            if not ids:
                raise InputError(f"{where}, fold {number}: empty {side} set")
            unknown = [sample for sample in ids if sample not in patient_of]
            if unknown:
                raise InputError(f"{where}, fold {number}: {side} names unknown sample {unknown[0]!r}")
        for patient in sorted({patient_of[s] for s in fold.train} & {patient_of[s] for s in fold.test}):
            train = ", ".join(s for s in fold.train if patient_of[s] == patient)
            test = ", ".join(s for s in fold.test if patient_of[s] == patient)
            raise InputError(
                f"{where}, fold {number}: patient {patient!r} is in both train ({train}) and test ({test})"
            )


@dataclass(frozen=True)
class Task:
    """A benchmark task: samples, folds, genes and how patches are cut.

    Build one with :meth:`Task.create` (folds from patients), :func:`task_from_metadata` (HEST-1k metadata)
    or :func:`load_task` (a task file); fill its genes with :func:`select_task_genes`; write it with
    :meth:`Task.save`.
    """

    name: str
    samples: tuple[TaskSample, ...]
    folds: tuple[Fold, ...]
    split_scheme: str = PATIENT_KFOLD
    genes: tuple[str, ...] | None = None
    gene_selection: dict[str, Any] | None = None
    element: str = Elements.SPOTS
    table: str = Elements.SPOT_EXPRESSION
    in_tissue_only: bool = True
    size_px: int = PATCH_SIZE_PX
    pixel_size_um: float = PATCH_PIXEL_SIZE_UM
    description: str = ""
    protocol: str = PROTOCOL_VERSION
    folder: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if self.protocol != PROTOCOL_VERSION:
            raise InputError(f"{where}: protocol {self.protocol!r}; this version runs {PROTOCOL_VERSION!r}")
        if not self.samples:
            raise InputError(f"{where}: no sample")
        ids = [sample.id for sample in self.samples]
        duplicated = sorted({sample for sample in ids if ids.count(sample) > 1})
        if duplicated:
            raise InputError(f"{where}: sample id {duplicated[0]!r} appears twice")
        if self.genes is not None and not self.genes:
            raise InputError(f"{where}: empty gene list")
        check_folds(self.samples, self.folds, where)

    @classmethod
    def create(
        cls, name: str, samples: Iterable[TaskSample | Mapping[str, str]], *, n_folds: int | None = None, **options: Any
    ) -> Task:
        """Make a task whose folds split the patients (``patient-kfold``).

        Parameters
        ----------
        name
            Task name (a column of the summary table).
        samples
            :class:`TaskSample` or dicts with ``id``, ``url`` and ``patient``.
        n_folds
            Number of folds (default: one per patient).
        options
            Other :class:`Task` fields (``genes``, ``in_tissue_only``, ``size_px``, ``pixel_size_um``, ...).

        Examples
        --------
        >>> task = Task.create("MOB", [{"id": "MOB1", "url": "MOB1.zarr", "patient": "MOB1"},
        ...                            {"id": "MOB2", "url": "MOB2.zarr", "patient": "MOB2"}])
        >>> [(fold.train, fold.test) for fold in task.folds]
        [(('MOB2',), ('MOB1',)), (('MOB1',), ('MOB2',))]

        """
        parsed = tuple(_sample(sample, name) for sample in samples)
        return cls(
            name=name, samples=parsed, folds=patient_folds(parsed, n_folds), split_scheme=PATIENT_KFOLD, **options
        )

    def sample(self, sample_id: str) -> TaskSample:
        """Return the sample of that id."""
        for sample in self.samples:
            if sample.id == sample_id:
                return sample
        raise InputError(f"task {self.name!r}: no sample {sample_id!r}")

    def url(self, sample: TaskSample, store_root: str | Path | None = None) -> str:
        """Return a sample's store URL, a relative one resolved against ``store_root`` else the task's folder."""
        url = sample.url
        if "://" in url or Path(url).is_absolute():
            return url
        if store_root is not None:
            root = str(store_root)
            return f"{root.rstrip('/')}/{url}" if "://" in root else str(Path(root) / url)
        return str((self.folder or Path.cwd()) / url)

    def with_genes(self, selection: GeneSelection) -> Task:
        """Return the task with the selected genes and the record of their selection."""
        return replace(self, genes=tuple(selection.genes), gene_selection=selection.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Return the content of ``task.json``."""
        return {
            "protocol": self.protocol,
            "name": self.name,
            "description": self.description,
            "samples": [{"id": s.id, "url": s.url, "patient": s.patient} for s in self.samples],
            "split": {
                "scheme": self.split_scheme,
                "n_folds": len(self.folds),
                "folds": [{"train": list(f.train), "test": list(f.test)} for f in self.folds],
            },
            "genes": list(self.genes) if self.genes is not None else None,
            "gene_selection": self.gene_selection,
            "patches": {
                "element": self.element,
                "table": self.table,
                "in_tissue_only": self.in_tissue_only,
                "size_px": self.size_px,
                "pixel_size_um": self.pixel_size_um,
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], folder: Path | None = None) -> Task:
        """Build a task from the content of ``task.json`` (folds derived from the scheme when not listed)."""
        where = f"task file {folder / TASK_FILE}" if folder is not None else "task"
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise InputError(f"{where}: missing 'name'")
        samples = tuple(_sample(sample, name) for sample in data.get("samples") or ())
        split = dict(data.get("split") or {})
        scheme = split.get("scheme", PATIENT_KFOLD)
        if split.get("folds") is not None:
            folds = tuple(_fold(fold, where) for fold in split["folds"])
        elif scheme == PATIENT_KFOLD:
            folds = patient_folds(samples, split.get("n_folds")) if samples else ()
        else:
            raise InputError(f"{where}: split scheme {scheme!r} without a 'folds' list")
        patches = dict(data.get("patches") or {})
        return cls(
            name=name,
            samples=samples,
            folds=folds,
            split_scheme=scheme,
            genes=tuple(data["genes"]) if data.get("genes") is not None else None,
            gene_selection=data.get("gene_selection"),
            element=patches.get("element", Elements.SPOTS),
            table=patches.get("table", Elements.SPOT_EXPRESSION),
            in_tissue_only=bool(patches.get("in_tissue_only", True)),
            size_px=int(patches.get("size_px", PATCH_SIZE_PX)),
            pixel_size_um=float(patches.get("pixel_size_um", PATCH_PIXEL_SIZE_UM)),
            description=data.get("description", ""),
            protocol=data.get("protocol", PROTOCOL_VERSION),
            folder=folder,
        )

    def save(self, folder: str | Path) -> Path:
        """Write ``task.json`` and the split CSVs into a folder; return the task file's path.

        Examples
        --------
        >>> task.save("tasks/MOB_ST_v1")  # doctest: +SKIP
        PosixPath('tasks/MOB_ST_v1/task.json')

        """
        folder = Path(folder)
        splits = folder / SPLITS_FOLDER
        splits.mkdir(parents=True, exist_ok=True)
        for old in [*splits.glob("train_*.csv"), *splits.glob("test_*.csv")]:
            old.unlink()
        for number, fold in enumerate(self.folds):
            for side, ids in (("train", fold.train), ("test", fold.test)):
                rows = [self.sample(sample) for sample in ids]
                pd.DataFrame(
                    {
                        "sample_id": [s.id for s in rows],
                        "patient": [s.patient for s in rows],
                        "url": [s.url for s in rows],
                    }
                ).to_csv(splits / f"{side}_{number}.csv", index=False)
        path = folder / TASK_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _sample(sample: TaskSample | Mapping[str, Any], task: str) -> TaskSample:
    if isinstance(sample, TaskSample):
        return sample
    missing = [key for key in ("id", "url", "patient") if not sample.get(key)]
    if missing:
        raise InputError(f"task {task!r}: sample {dict(sample)} lacks {missing}")
    return TaskSample(str(sample["id"]), str(sample["url"]), str(sample["patient"]))


def _fold(fold: Mapping[str, Any], where: str) -> Fold:
    if not isinstance(fold, Mapping) or "train" not in fold or "test" not in fold:
        raise InputError(f"{where}: every fold needs 'train' and 'test' lists, got {fold!r}")
    return Fold(tuple(map(str, fold["train"])), tuple(map(str, fold["test"])))


def load_task(path: str | Path) -> Task:
    """Read a task from its folder or its ``task.json``.

    Examples
    --------
    >>> load_task(TASKS_FOLDER / "MOB_ST_v1").name
    'MOB_ST_v1'

    """
    path = Path(path)
    file = path / TASK_FILE if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{file}: no such task file")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{file}: not valid JSON ({err})") from err
    return Task.from_dict(data, folder=file.parent.resolve())


def task_from_metadata(
    name: str,
    metadata_csv: str | Path,
    sample_ids: Sequence[str],
    *,
    url_template: str = "{id}.zarr",
    n_folds: int | None = None,
    **options: Any,
) -> Task:
    """Make a task from HEST-1k metadata: patients from the ``patient`` column, scoped by dataset.

    HEST-1k patient ids are unique within a dataset only ("patient 1" of two studies are two people), so the
    patient key is ``"<dataset_title> / <patient>"``; a blank patient becomes the sample id (one patient per
    sample), with a warning.

    Examples
    --------
    >>> ids = ["TENX95", "TENX99", "NCBI783", "NCBI785"]
    >>> task = task_from_metadata("IDC", "HEST_v1_1_0.csv", ids)  # doctest: +SKIP

    """
    from hest_zarr.schemas import metadata_by_id, read_hest_metadata_csv

    known = metadata_by_id(read_hest_metadata_csv(metadata_csv)[0])
    samples = []
    for sample_id in sample_ids:
        if sample_id not in known:
            raise InputError(f"{metadata_csv}: no sample {sample_id!r}")
        row = known[sample_id]
        if row.patient is None:
            warnings.warn(f"{metadata_csv}: {sample_id} has no patient; it is its own patient", stacklevel=2)
            patient = sample_id
        else:
            patient = f"{row.dataset_title or 'unknown dataset'} / {row.patient}"
        samples.append(TaskSample(sample_id, url_template.format(id=sample_id), patient))
    return Task.create(name, samples, n_folds=n_folds, **options)


# --------------------------------------------------------------------------------------------- reading stores
@dataclass
class SampleSpots:
    """The spots of one sample a task uses (those with a patch and an expression row) and their raw counts.

    ``table`` is the expression table restricted to ``ids`` (in that order, ``obs_names == ids``).
    """

    sample: TaskSample
    url: str
    ids: np.ndarray
    table: AnnData


def read_sample_spots(
    task: Task, sample: TaskSample, *, store_root: str | Path | None = None, storage_options: StorageOptions = None
) -> SampleSpots:
    """Open a sample's store, plan its patches and return the spots with both a patch and expression.

    Raises
    ------
    InputError
        Missing or unreadable store, no such table, a table annotating another element, or no patch.

    """
    url = task.url(sample, store_root)
    where = f"task {task.name!r}, sample {sample.id!r} ({url})"
    try:
        sdata = open_store(url, storage_options)
    except HestZarrError as err:
        raise InputError(f"{where}: cannot open the store: {err}") from err
    if task.table not in sdata.tables:
        raise InputError(f"{where}: no table {task.table!r} (tables: {sorted(sdata.tables)})")
    table = sdata.tables[task.table]
    attrs = table.uns.get("spatialdata_attrs", {})
    if attrs.get("region") != task.element:
        raise InputError(f"{where}: table {task.table!r} annotates {attrs.get('region')!r}, not {task.element!r}")
    try:
        plan = plan_patches(
            sdata,
            element=task.element,
            size_px=task.size_px,
            pixel_size_um=task.pixel_size_um,
            in_tissue_only=task.in_tissue_only,
        )
    except InputError as err:
        raise InputError(f"{where}: no patches: {err}") from err
    spot_ids = pd.Index(table.obs[attrs.get("instance_key", Keys.SPOT_ID)].astype(str))
    if spot_ids.has_duplicates:
        raise InputError(f"{where}: table {task.table!r} has spot {spot_ids[spot_ids.duplicated()][0]!r} twice")
    rows = spot_ids.get_indexer(plan.ids)
    has_row = rows >= 0
    if not has_row.any():
        raise InputError(f"{where}: none of the {len(plan)} patches has a row in {task.table!r}")
    subset = table[rows[has_row]].copy()
    subset.obs_names = plan.ids[has_row]
    return SampleSpots(sample, url, plan.ids[has_row], subset)


def read_task_spots(
    task: Task, *, store_root: str | Path | None = None, storage_options: StorageOptions = None
) -> dict[str, SampleSpots]:
    """Read every sample's spots (see :func:`read_sample_spots`) and check they hold the task's genes."""
    spots = {
        sample.id: read_sample_spots(task, sample, store_root=store_root, storage_options=storage_options)
        for sample in task.samples
    }
    if task.genes is None:
        shared = set.intersection(*(set(s.table.var_names) for s in spots.values()))
        if not shared:
            raise InputError(f"task {task.name!r}: the samples {sorted(spots)} share no gene name: nothing to predict")
        return spots
    for sample_id, sample_spots in spots.items():
        missing = [gene for gene in task.genes if gene not in sample_spots.table.var_names]
        if missing:
            raise InputError(
                f"task {task.name!r}, sample {sample_id!r} ({sample_spots.url}): table {task.table!r} lacks "
                f"{len(missing)} of the task's {len(task.genes)} genes, e.g. {missing[0]!r}"
            )
    return spots


def select_task_genes(
    task: Task,
    *,
    store_root: str | Path | None = None,
    storage_options: StorageOptions = None,
    criterion: VarianceCriterion = "log1p-variance",
) -> Task:
    """Return the task with genes selected from its stores (:func:`~hest_zarr.bench.genes.select_genes`).

    Examples
    --------
    >>> task = select_task_genes(Task.create("MOB", samples), store_root="stores")  # doctest: +SKIP

    """
    spots = read_task_spots(replace(task, genes=None), store_root=store_root, storage_options=storage_options)
    return task.with_genes(select_genes({sample: s.table for sample, s in spots.items()}, criterion=criterion))
