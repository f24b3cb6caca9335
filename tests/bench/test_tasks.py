"""Task definitions: patient folds, fold checks, task files, tasks from the HEST-1k metadata CSV."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hest_zarr.bench.protocol import PROTOCOL_VERSION
from hest_zarr.bench.tasks import TASKS_FOLDER, Fold, Task, TaskSample, load_task, patient_folds, task_from_metadata
from hest_zarr.errors import InputError
from tests.conftest import shared


def random_samples(seed: int) -> list[TaskSample]:
    """Synthetic: 1 to 40 samples over 2 to 12 patients, ids and patients shuffled."""
    rng = np.random.default_rng(seed)
    n_patients = int(rng.integers(2, 13))
    n_samples = int(rng.integers(n_patients, 41))
    patients = np.concatenate([np.arange(n_patients), rng.integers(0, n_patients, n_samples - n_patients)])
    rng.shuffle(patients)
    return [TaskSample(f"S{i:02d}", f"S{i:02d}.zarr", f"patient {p}") for i, p in enumerate(patients)]


@pytest.mark.parametrize("seed", range(25))
def test_patient_folds_never_put_a_patient_on_both_sides(seed: int) -> None:
    samples = random_samples(seed)
    patient_of = {s.id: s.patient for s in samples}
    n_patients = len(set(patient_of.values()))
    for n_folds in sorted({n_patients, max(2, n_patients // 2)}):
        folds = patient_folds(samples, n_folds)
        assert len(folds) == n_folds
        tested = [sample for fold in folds for sample in fold.test]
        assert sorted(tested) == sorted(patient_of)  # every sample is tested exactly once
        for fold in folds:
            assert {patient_of[s] for s in fold.train}.isdisjoint({patient_of[s] for s in fold.test})
            assert sorted(fold.train + fold.test) == sorted(patient_of)  # the rest trains


def test_patient_folds_follow_sorted_patients_round_robin() -> None:
    samples = [
        TaskSample(s, f"{s}.zarr", p) for s, p in [("a", "p3"), ("b", "p1"), ("c", "p2"), ("d", "p1"), ("e", "p4")]
    ]
    folds = patient_folds(samples, 2)  # p1 -> 0, p2 -> 1, p3 -> 0, p4 -> 1
    assert folds[0] == Fold(train=("c", "e"), test=("a", "b", "d"))
    assert folds[1] == Fold(train=("a", "b", "d"), test=("c", "e"))
    with pytest.raises(InputError, match="5 folds asked for 4 patient"):
        patient_folds(samples, 5)
    with pytest.raises(InputError, match="1 folds asked for 1 patient"):
        patient_folds(samples[:1])


def test_hand_written_folds_with_a_patient_on_both_sides_are_refused() -> None:
    data = {
        "name": "T",
        "samples": [
            {"id": "A1", "url": "a1.zarr", "patient": "P1"},
            {"id": "A2", "url": "a2.zarr", "patient": "P1"},
            {"id": "B", "url": "b.zarr", "patient": "P2"},
        ],
        "split": {"scheme": "explicit", "folds": [{"train": ["A1", "B"], "test": ["A2"]}]},
    }
    with pytest.raises(InputError, match=r"fold 0: patient 'P1' is in both train \(A1\) and test \(A2\)"):
        Task.from_dict(data)
    data["split"]["folds"] = [{"train": ["A1"], "test": ["C"]}]
    with pytest.raises(InputError, match="test names unknown sample 'C'"):
        Task.from_dict(data)
    data["split"]["folds"] = [{"train": [], "test": ["B"]}]
    with pytest.raises(InputError, match="empty train set"):
        Task.from_dict(data)


def test_task_file_round_trip_and_split_csvs(tmp_path: Path) -> None:
    task = Task.create(
        "demo",
        [{"id": "A", "url": "a.zarr", "patient": "p1"}, {"id": "B", "url": "s3://bucket/b.zarr", "patient": "p2"}],
        genes=("g1", "g2"),
        size_px=112,
    )
    path = task.save(tmp_path / "demo")
    loaded = load_task(tmp_path / "demo")
    assert loaded == task
    assert json.loads(path.read_text())["protocol"] == PROTOCOL_VERSION
    train = pd.read_csv(tmp_path / "demo" / "splits" / "train_0.csv")
    test = pd.read_csv(tmp_path / "demo" / "splits" / "test_0.csv")
    assert train.to_dict("records") == [{"sample_id": "B", "patient": "p2", "url": "s3://bucket/b.zarr"}]
    assert test.to_dict("records") == [{"sample_id": "A", "patient": "p1", "url": "a.zarr"}]
    # relative URLs resolve against the store root, else the task folder; URLs stay as they are
    assert loaded.url(loaded.sample("A")) == str(tmp_path.resolve() / "demo" / "a.zarr")
    assert loaded.url(loaded.sample("A"), "s3://stores/") == "s3://stores/a.zarr"
    assert loaded.url(loaded.sample("B"), "/elsewhere") == "s3://bucket/b.zarr"


def test_task_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such task file"):
        load_task(tmp_path / "missing")
    (tmp_path / "task.json").write_text("{not json")
    with pytest.raises(InputError, match=r"task\.json: not valid JSON"):
        load_task(tmp_path)
    (tmp_path / "task.json").write_text(json.dumps({"name": "T", "protocol": "hest-bench-0.9", "samples": []}))
    with pytest.raises(InputError, match=r"protocol 'hest-bench-0\.9'"):
        load_task(tmp_path)


def test_the_shipped_mob_task() -> None:
    task = load_task(TASKS_FOLDER / "MOB_ST_v1")
    assert [s.id for s in task.samples] == ["MOB1", "MOB2"]
    assert task.folds == (Fold(("MOB2",), ("MOB1",)), Fold(("MOB1",), ("MOB2",)))
    assert len(task.genes) == 50 and len(set(task.genes)) == 50
    assert (task.size_px, task.pixel_size_um, task.in_tissue_only) == (224, 0.5, True)
    assert task.gene_selection["criterion"] == "log1p-variance"
    assert task.gene_selection["n_spots"] == {"MOB1": 379, "MOB2": 407}  # spots under tissue of each section


def test_task_from_metadata_scopes_patients_by_dataset() -> None:
    csv = shared("hest", "HEST_v1_1_0.csv")
    # TENX99 and MEND162 are both "patient 1" in the CSV, of different studies: two patients
    task = task_from_metadata("mixed", csv, ["TENX99", "TENX95", "MEND162", "MEND139", "MEND140"])
    patients = {s.id: s.patient for s in task.samples}
    assert patients["TENX99"] != patients["MEND162"]
    assert patients["MEND139"] == patients["MEND140"]
    assert len(set(patients.values())) == 4
    assert len(task.folds) == 4
    assert task.sample("TENX95").url == "TENX95.zarr"
    with pytest.raises(InputError, match="no sample 'NOPE'"):
        task_from_metadata("bad", csv, ["NOPE"])
