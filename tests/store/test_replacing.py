"""Replacing writes are safe: a write replaces only a store of its own kind, never its input, and cleans up after
killed writes. Real samples (the bundled MOB1 section); the leftovers a killed write leaves are made in the test."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

import hest_zarr
from hest_zarr.cli import app
from hest_zarr.converters.st_v1 import read_st_v1
from hest_zarr.elements import circle_spots
from hest_zarr.errors import HestZarrError, InputError
from hest_zarr.store import open_patches
from hest_zarr.workflows.demo import demo_sample_path
from hest_zarr.workflows.patch import write_patches

MOB1 = demo_sample_path()


@pytest.fixture(scope="module")
def mob1():
    return read_st_v1(
        MOB1 / "MOB1.tsv.gz", alignment=MOB1 / "alignment_table_MOB1.tsv.gz", image=MOB1 / "MOB1.jpg", sample_id="MOB1"
    )


def _counts(url) -> int:
    return int(np.asarray(hest_zarr.open(url).tables["spot_expression"].X.sum()))


def test_patch_overwrite_refuses_its_own_input_and_any_sample_store(tmp_path, mob1) -> None:
    sample = hest_zarr.write(mob1, tmp_path / "mob1.zarr", chunk_size=256)
    other = hest_zarr.write(mob1, tmp_path / "other.zarr", chunk_size=256)
    runner = CliRunner()
    result = runner.invoke(app, ["patch", sample, sample, "--overwrite", "--size", "26", "--pixel-size", "4.3"])
    assert result.exit_code == 1
    assert "is this write's own input" in result.output
    result = runner.invoke(app, ["patch", sample, other, "--overwrite", "--size", "26", "--pixel-size", "4.3"])
    assert result.exit_code == 1
    assert "holds a sample store" in result.output
    assert _counts(sample) == _counts(other) == 1_586_645  # both samples intact
    assert hest_zarr.validate(sample) == [] and hest_zarr.validate(other) == []


def test_patch_overwrite_replaces_a_patch_store_only(tmp_path, mob1) -> None:
    sample = hest_zarr.write(mob1, tmp_path / "mob1.zarr", chunk_size=256)
    patches = write_patches(sample, tmp_path / "p.zarr", size_px=26, pixel_size_um=4.3, progress=False)
    again = write_patches(
        sample, patches, size_px=13, pixel_size_um=8.6, overwrite=True, progress=False, in_tissue_only=True
    )
    assert open_patches(again).img.shape[1:] == (13, 13, 3)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "keep.txt").write_text("not a store")
    with pytest.raises(HestZarrError, match="is not a zarr store"):
        write_patches(sample, folder, overwrite=True, progress=False)
    assert (folder / "keep.txt").read_text() == "not a store"
    with pytest.raises(HestZarrError, match="holds a patches store"):
        hest_zarr.write(mob1, patches, overwrite=True)
    assert len(open_patches(patches)) == len(open_patches(again))


def test_non_finite_spots_are_refused_by_the_builder_and_by_validate(tmp_path, mob1) -> None:
    centres = np.array([[10.0, 20.0], [np.nan, 5.0]])
    with pytest.raises(InputError, match=r"positions\.csv: 1 of 2 spots have a non-finite position.*'b'"):
        circle_spots(centres, 5.0, ["a", "b"], 1.0, source="positions.csv")
    with pytest.raises(InputError, match="size that is not a positive number"):
        circle_spots(centres[:1], 0.0, ["a"], 1.0)
    # a store written by other means (here: a NaN planted in the spots' GeoParquet) is reported by validate
    url = hest_zarr.write(mob1, tmp_path / "mob1.zarr", chunk_size=256)
    import geopandas

    path = tmp_path / "mob1.zarr" / "shapes" / "spots" / "shapes.parquet"
    shapes = geopandas.read_parquet(path)
    shapes.loc[shapes.index[0], "radius"] = np.nan
    shapes.to_parquet(path)
    problems = [str(p) for p in hest_zarr.validate(url, check_data=False)]
    # the rewritten file no longer matches the manifest either (its size changed: no decoding needed to see it)
    assert len(problems) == 2
    assert problems[0].startswith("spots: shapes/spots/shapes.parquet: ") and "the manifest records" in problems[0]
    assert problems[1] == f"spots: radius: 1 radii not finite and positive (e.g. {shapes.index[0]!r})"


def test_the_next_write_removes_what_a_killed_write_left_and_says_so(tmp_path, mob1) -> None:
    target = tmp_path / "mob1.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / ".mob1.zarr.deadbeef.partial"
    (killed / "images").mkdir(parents=True)
    (killed / "images" / "chunk").write_bytes(b"x" * 4096)
    (tmp_path / ".mob1.zarr.deadbeef.partial.writer").write_text(dead.stdout.strip())
    unmarked = tmp_path / ".mob1.zarr.0badf00d.partial"  # an older writer's staging, without a marker
    unmarked.mkdir()
    alive = tmp_path / ".mob1.zarr.a11ve000.partial"  # a write still running (this process)
    alive.mkdir()
    (tmp_path / ".mob1.zarr.a11ve000.partial.writer").write_text(str(__import__("os").getpid()))
    (tmp_path / ".mob1.zarr.0rphan00.partial.writer").write_text(dead.stdout.strip())  # killed before staging
    with pytest.warns(UserWarning, match=r"removed what an interrupted write left behind: \.mob1\.zarr\.0badf00d"):
        hest_zarr.write(mob1, target, chunk_size=256)
    assert not killed.exists() and not unmarked.exists() and alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".mob1.zarr.a11ve000.partial",
        ".mob1.zarr.a11ve000.partial.writer",
        "mob1.zarr",
    ]


def test_a_store_moved_aside_by_a_killed_replace_is_restored(tmp_path, mob1) -> None:
    target = tmp_path / "mob1.zarr"
    hest_zarr.write(mob1, target, chunk_size=256)
    retired = tmp_path / ".mob1.zarr.12345678.old"
    target.rename(retired)  # what a write killed between its two renames leaves
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(HestZarrError, match="already exists"):
            hest_zarr.write(mob1, target, chunk_size=256)
    assert any("restored the store" in str(w.message) for w in caught)
    assert _counts(target) == 1_586_645
