"""The minimal Visium converter on real Space Ranger outputs, and its errors on bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from PIL import Image

from hest_zarr.converters import read_visium
from hest_zarr.errors import InputError
from hest_zarr.schemas import SampleMetadata
from hest_zarr.store import get_record


def outs_copy(source: Path, tmp_path: Path, *, skip: tuple[str, ...] = ()) -> Path:
    """A writable copy of a Space Ranger folder (symlinks), without the entries named in ``skip``."""
    target = tmp_path / "outs"
    (target / "spatial").mkdir(parents=True)
    for path in source.rglob("*"):
        relative = path.relative_to(source)
        if path.is_dir() or any(str(relative).startswith(s) for s in skip):
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path, target / relative)
    return target


def test_mex_counts_equal_h5_counts(perik_visium: Path, tmp_path: Path) -> None:
    outs = outs_copy(perik_visium, tmp_path, skip=("filtered_feature_bc_matrix.h5",))
    from_mex = read_visium(outs)["spot_expression"]
    reference = sc.read_10x_mtx(perik_visium / "filtered_feature_bc_matrix")
    assert from_mex.shape == (2898, 19465)
    assert (from_mex.X != reference.X.astype(np.int32)).nnz == 0
    assert int(from_mex.X.sum()) == 3_085_005


def test_old_headerless_positions_and_metadata(scanpy_visium: Path) -> None:
    sdata = read_visium(scanpy_visium, sample_id="V1")
    record = get_record(sdata)
    assert record.metadata.species == "Homo sapiens"
    assert record.metadata.id == "V1"
    assert record.metadata.nb_genes == 100
    assert record.metadata.magnification == "20x"  # 55 um / 89.43 px = 0.615 um/px
    table = sdata["spot_expression"]
    assert table.obs.loc["AAACAAGTATCTCCCA-1", ["array_row", "array_col", "in_tissue"]].tolist() == [50, 102, 1]
    assert record.elements["he"].provenance.inputs[0].endswith("tissue_hires_image.png")


def test_known_metadata_wins_over_measured(scanpy_visium: Path) -> None:
    known = SampleMetadata(id="TENX95", st_technology="Visium", organ="Breast", species="Homo sapiens")
    record = get_record(read_visium(scanpy_visium, metadata=known))
    assert (record.metadata.id, record.metadata.organ, record.metadata.nb_genes) == ("TENX95", "Breast", 100)


def test_missing_counts_file(perik_visium: Path, tmp_path: Path) -> None:
    outs = outs_copy(perik_visium, tmp_path, skip=("filtered_feature_bc_matrix",))
    with pytest.raises(
        InputError, match=r"outs: no count matrix found \(expected one of filtered_feature_bc_matrix.h5"
    ):
        read_visium(outs)


def test_positions_that_do_not_match_the_barcodes(perik_visium: Path, scanpy_visium: Path, tmp_path: Path) -> None:
    outs = outs_copy(perik_visium, tmp_path, skip=("spatial/tissue_positions.csv",))
    os.symlink(scanpy_visium / "spatial" / "tissue_positions_list.csv", outs / "spatial" / "tissue_positions_list.csv")
    with pytest.raises(
        InputError,
        match=r"tissue_positions_list.csv: \d+ of the 2898 barcodes of filtered_feature_bc_matrix.h5 have no position",
    ):
        read_visium(outs)


def test_truncated_h5(perik_visium: Path, tmp_path: Path) -> None:
    outs = outs_copy(perik_visium, tmp_path, skip=("filtered_feature_bc_matrix",))
    h5 = perik_visium / "filtered_feature_bc_matrix.h5"
    truncated = outs / "filtered_feature_bc_matrix.h5"
    truncated.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
    with pytest.raises(InputError, match=r"filtered_feature_bc_matrix.h5: not a readable 10x feature-barcode matrix"):
        read_visium(outs)


def test_image_smaller_than_the_spots(perik_visium: Path, tmp_path: Path) -> None:
    small = tmp_path / "small.png"
    Image.open(perik_visium / "spatial" / "tissue_lowres_image.png").save(small)  # lowres passed as full-res
    with pytest.raises(
        InputError, match=r"small.png: image covers 600 x 600 full-resolution px but \d+ spots lie outside it"
    ):
        read_visium(perik_visium, image=small)


def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such directory"):
        read_visium(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no count matrix found"):
        read_visium(tmp_path / "empty")


def test_positions_parquet_equals_csv(perik_visium: Path, tmp_path: Path) -> None:
    outs = outs_copy(perik_visium, tmp_path, skip=("spatial/tissue_positions.csv",))
    pd.read_csv(perik_visium / "spatial" / "tissue_positions.csv").to_parquet(
        outs / "spatial" / "tissue_positions.parquet"
    )
    from_parquet = read_visium(outs)["spots"]
    from_csv = read_visium(perik_visium)["spots"]
    assert from_parquet.geometry.equals(from_csv.geometry)
