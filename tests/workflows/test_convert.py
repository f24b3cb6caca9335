from __future__ import annotations

import numpy as np
import pytest

import hest_zarr
from hest_zarr.errors import InputError
from hest_zarr.workflows.convert import convert
from hest_zarr.workflows.demo import demo_sample_path
from tests.conftest import shared

MOB1 = demo_sample_path()


def test_convert_writes_the_bundled_st_section_with_every_count(tmp_path) -> None:
    url = convert(
        MOB1 / "MOB1.tsv.gz",
        tmp_path / "mob1.zarr",
        technology="st",
        alignment=MOB1 / "alignment_table_MOB1.tsv.gz",
        image=MOB1 / "MOB1.jpg",
        sample_id="MOB1",
        chunk_size=256,
    )
    sdata = hest_zarr.open(url)
    table = sdata.tables["spot_expression"]
    assert int(np.asarray(table.X.sum())) == 1_586_645
    assert hest_zarr.get_record(sdata).metadata.id == "MOB1"
    assert hest_zarr.validate(url) == []


def test_a_metadata_csv_without_the_sample_is_refused_before_anything_is_written(tmp_path) -> None:
    csv = shared("hest", "HEST_v1_1_0.csv")
    with pytest.raises(InputError, match=r"HEST_v1_1_0\.csv: no row with id 'MOB1'"):
        convert(MOB1 / "MOB1.tsv.gz", tmp_path / "mob1.zarr", technology="st", sample_id="MOB1", metadata_csv=csv)
    assert not (tmp_path / "mob1.zarr").exists()
