"""The Visium HD converter on the real VisiumIO HD folder (10 bins of 2 um), a multi-bin fixture, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse
from spatialdata.transformations import get_transformation

import hest_zarr
from hest_zarr.converters.visium_hd import read_visium_hd
from hest_zarr.elements import get_record
from hest_zarr.errors import InputError
from tests.conftest import shared

BIN_002 = Path("binned_outputs/square_002um")


@pytest.fixture
def visium_hd() -> Path:
    return shared("VisiumIO_visiumhd")


def hd_copy(source: Path, tmp_path: Path, *, skip: tuple[str, ...] = ()) -> Path:
    """A writable copy of the HD folder (symlinks to the real files), without the entries named in ``skip``."""
    target = tmp_path / "hd"
    for path in source.rglob("*"):
        relative = path.relative_to(source)
        if path.is_dir() or any(str(relative).startswith(s) for s in skip):
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path, target / relative)
    return target


def write_10x_h5(path: Path, counts: sparse.csr_matrix, barcodes: list[str], genes: pd.DataFrame) -> None:
    """Write a barcodes x genes matrix in Space Ranger's h5 layout (``matrix/``: CSC of genes x barcodes)."""
    with h5py.File(path, "w") as handle:
        matrix = handle.create_group("matrix")
        matrix["barcodes"] = np.array(barcodes, dtype="S")
        matrix["data"] = counts.data.astype(np.int32)
        matrix["indices"] = counts.indices.astype(np.int64)
        matrix["indptr"] = counts.indptr.astype(np.int64)
        matrix["shape"] = np.array([counts.shape[1], counts.shape[0]], dtype=np.int32)
        features = matrix.create_group("features")
        features["id"] = genes["gene_ids"].to_numpy(dtype="S")
        features["name"] = genes.index.to_numpy(dtype="S")
        features["feature_type"] = np.array([b"Gene Expression"] * len(genes))
        features["genome"] = np.array([b"mm10"] * len(genes))
        features["_all_tag_keys"] = np.array([b"genome"])


def add_synthetic_008um_bin(root: Path, source: Path, *, rng_seed: int = 8) -> sparse.csr_matrix:
    """Add ``square_008um``: the real 2 um positions and scale factors relabelled as 8 um bins, with generated counts.

    Synthetic: no real HD file with non-zero counts exists in the shared data. Barcodes ``s_002um_*`` become
    ``s_008um_*``; the scale factors are those of an 8 um bin (``bin_size_um`` 8, ``spot_diameter_fullres`` x 4) and
    lose ``microns_per_pixel``, so the pixel size comes from the fallback (bin size / spot diameter). The counts are
    Poisson(2) draws written with h5py in the 10x layout, barcodes in reverse order of the positions file.
    """
    folder = root / "binned_outputs" / "square_008um"
    (folder / "spatial").mkdir(parents=True)
    positions = pd.read_parquet(source / BIN_002 / "spatial" / "tissue_positions.parquet")
    positions["barcode"] = positions["barcode"].str.replace("s_002um", "s_008um")
    positions.to_parquet(folder / "spatial" / "tissue_positions.parquet")
    factors = json.loads((source / BIN_002 / "spatial" / "scalefactors_json.json").read_text())
    factors.update(bin_size_um=8.0, spot_diameter_fullres=4 * factors["spot_diameter_fullres"])
    del factors["microns_per_pixel"]
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(factors))
    genes = sc.read_10x_h5(source / BIN_002 / "filtered_feature_bc_matrix.h5").var
    counts = sparse.csr_matrix(np.random.default_rng(rng_seed).poisson(2.0, size=(len(positions), len(genes))))
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, positions["barcode"].tolist()[::-1], genes)
    return counts


def test_real_bins_are_squares_centred_on_the_parquet_positions(visium_hd: Path) -> None:
    sdata = read_visium_hd(visium_hd, sample_id="hd")
    positions = pd.read_parquet(visium_hd / BIN_002 / "spatial" / "tissue_positions.parquet").set_index("barcode")
    factors = json.loads((visium_hd / BIN_002 / "spatial" / "scalefactors_json.json").read_text())
    reference = sc.read_10x_h5(visium_hd / BIN_002 / "filtered_feature_bc_matrix.h5")
    assert set(sdata.shapes) == {"spots_square_002um"} and set(sdata.tables) == {"spot_expression_square_002um"}

    spots = sdata["spots_square_002um"]
    assert list(spots.index) == list(reference.obs_names) and len(spots) == 10
    bounds = spots.bounds.to_numpy()
    side = 2.0 / factors["microns_per_pixel"]  # 7.304 px, Space Ranger's spot_diameter_fullres
    np.testing.assert_allclose(bounds[:, 2] - bounds[:, 0], side, rtol=1e-12)
    np.testing.assert_allclose(bounds[:, 3] - bounds[:, 1], side, rtol=1e-12)
    np.testing.assert_allclose(side, factors["spot_diameter_fullres"], rtol=1e-9)
    expected = positions.loc[spots.index, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    np.testing.assert_allclose((bounds[:, :2] + bounds[:, 2:]) / 2, expected, rtol=0, atol=1e-9)

    table = sdata["spot_expression_square_002um"]
    assert table.shape == reference.shape == (10, 10)
    assert (table.X != reference.X.astype(np.int32)).nnz == 0  # this real h5 holds only zeros
    assert list(table.var["gene_ids"]) == list(reference.var["gene_ids"])
    for column in ("array_row", "array_col", "in_tissue"):
        assert table.obs[column].tolist() == positions.loc[table.obs_names, column].tolist()

    record = get_record(sdata)
    assert record.pixel_size_um == factors["microns_per_pixel"]
    metadata = record.metadata
    assert (metadata.st_technology, metadata.spot_diameter, metadata.inter_spot_dist) == ("Visium HD", 2.0, 2.0)
    assert (metadata.species, metadata.spots_under_tissue, metadata.nb_genes) == ("Mus musculus", 10, 10)
    assert record.elements["he"].provenance.inputs == [str(visium_hd / BIN_002 / "spatial" / "tissue_lowres_image.png")]
    to_global = get_transformation(sdata["he"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(np.diag(to_global)[:2], 1 / factors["tissue_lowres_scalef"])
    assert sdata["he"].shape == (3, 600, 473)


def test_several_bin_sizes_with_counts_write_validate_reopen(visium_hd: Path, tmp_path: Path) -> None:
    root = hd_copy(visium_hd, tmp_path)
    generated = add_synthetic_008um_bin(root, visium_hd)
    sdata = read_visium_hd(root)
    assert set(sdata.shapes) == {"spots_square_002um", "spots_square_008um"}

    h5 = root / "binned_outputs" / "square_008um" / "filtered_feature_bc_matrix.h5"
    reference = sc.read_10x_h5(h5)
    table = sdata["spot_expression_square_008um"]
    positions = pd.read_parquet(root / "binned_outputs" / "square_008um" / "spatial" / "tissue_positions.parquet")
    assert list(table.obs_names) == list(reference.obs_names) == positions["barcode"].tolist()[::-1]
    assert (table.X != reference.X.astype(np.int32)).nnz == 0
    assert int(table.X.sum()) == int(generated.sum()) > 0
    assert table.uns["spatialdata_attrs"]["region"] == "spots_square_008um"

    factors = json.loads((visium_hd / BIN_002 / "spatial" / "scalefactors_json.json").read_text())
    side_8um = sdata["spots_square_008um"].bounds.eval("maxx - minx").to_numpy()
    np.testing.assert_allclose(side_8um, 8.0 / factors["microns_per_pixel"], rtol=1e-9)  # 29.2 px
    centroids = sdata["spots_square_008um"].centroid.loc[positions["barcode"]]
    np.testing.assert_allclose(centroids.x, positions["pxl_col_in_fullres"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(centroids.y, positions["pxl_row_in_fullres"], rtol=0, atol=1e-9)

    url = hest_zarr.write(sdata, tmp_path / "hd.zarr")
    assert hest_zarr.validate(url) == []
    reopened = hest_zarr.open(url)
    for size in ("002", "008"):
        assert reopened[f"spots_square_{size}um"].geometry.equals(sdata[f"spots_square_{size}um"].geometry)
        assert (reopened[f"spot_expression_square_{size}um"].X != sdata[f"spot_expression_square_{size}um"].X).nnz == 0

    only_8um = read_visium_hd(root, bin_sizes=[8])
    assert set(only_8um.shapes) == {"spots_square_008um"}
    assert get_record(only_8um).metadata.spot_diameter == 8.0


def test_spatial_folder_at_the_sample_root(visium_hd: Path, tmp_path: Path) -> None:
    root = hd_copy(visium_hd, tmp_path, skip=(str(BIN_002 / "spatial"),))
    (root / "spatial").mkdir()
    for path in (visium_hd / BIN_002 / "spatial").iterdir():
        os.symlink(path, root / "spatial" / path.name)
    sdata = read_visium_hd(root)
    record = get_record(sdata)
    assert record.elements["spots_square_002um"].provenance.inputs[1] == str(
        root / "spatial" / "tissue_positions.parquet"
    )
    assert record.elements["he"].provenance.inputs == [str(root / "spatial" / "tissue_lowres_image.png")]
    assert sdata["spots_square_002um"].geometry.equals(read_visium_hd(visium_hd)["spots_square_002um"].geometry)


def test_missing_counts_file(visium_hd: Path, tmp_path: Path) -> None:
    root = hd_copy(visium_hd, tmp_path, skip=(str(BIN_002 / "filtered_feature_bc_matrix"),))
    with pytest.raises(
        InputError,
        match=r"square_002um: no count matrix found \(expected filtered_feature_bc_matrix.h5 or filtered_feature",
    ):
        read_visium_hd(root)


def test_positions_of_another_sample(visium_hd: Path, tmp_path: Path) -> None:
    positions = str(BIN_002 / "spatial" / "tissue_positions.parquet")
    root = hd_copy(visium_hd, tmp_path, skip=(positions,))
    os.symlink(visium_hd / "VisiumHD_01a79ad" / "spatial" / "tissue_positions.parquet", root / positions)
    with pytest.raises(
        InputError,
        match=r"square_002um/spatial/tissue_positions.parquet: 10 of the 10 barcodes of "
        r"filtered_feature_bc_matrix.h5 have no position",
    ):
        read_visium_hd(root)


def test_truncated_h5(visium_hd: Path, tmp_path: Path) -> None:
    h5 = BIN_002 / "filtered_feature_bc_matrix.h5"
    root = hd_copy(visium_hd, tmp_path, skip=(str(h5),))
    (root / h5).write_bytes((visium_hd / h5).read_bytes()[:10_000])
    with pytest.raises(InputError, match=r"filtered_feature_bc_matrix.h5: not a readable 10x feature-barcode matrix"):
        read_visium_hd(root)


def test_image_smaller_than_the_bins(visium_hd: Path) -> None:
    lowres = visium_hd / BIN_002 / "spatial" / "tissue_lowres_image.png"  # passed as if full resolution
    with pytest.raises(
        InputError, match=r"tissue_lowres_image.png: image covers 473 x 600 full-resolution px but 10 spots lie"
    ):
        read_visium_hd(visium_hd, image=lowres)


def test_pixel_sizes_that_disagree_between_bins(visium_hd: Path, tmp_path: Path) -> None:
    root = hd_copy(visium_hd, tmp_path)
    add_synthetic_008um_bin(root, visium_hd)
    factors_path = root / "binned_outputs" / "square_008um" / "spatial" / "scalefactors_json.json"
    factors = json.loads(factors_path.read_text())
    factors["microns_per_pixel"] = 0.5
    factors_path.write_text(json.dumps(factors))
    with pytest.raises(InputError, match=r"square_008um/spatial/scalefactors_json.json: 0.5 um/px, but .* gives 0.27"):
        read_visium_hd(root)


def test_unknown_layouts_and_absent_bin_sizes(visium_hd: Path, tmp_path: Path) -> None:
    (tmp_path / "outs" / "spatial").mkdir(parents=True)
    with pytest.raises(
        InputError, match=r"outs: unknown folder layout \(expected a Visium HD outs/ with binned_outputs"
    ):
        read_visium_hd(tmp_path / "outs")
    (tmp_path / "outs" / "binned_outputs" / "square_2um").mkdir(parents=True)
    with pytest.raises(InputError, match=r"binned_outputs: no bin folder .*found \['square_2um'\]"):
        read_visium_hd(tmp_path / "outs")
    with pytest.raises(InputError, match=r"asked for bin size\(s\) \[16\] um; found \['square_002um'\]"):
        read_visium_hd(visium_hd, bin_sizes=[2, 16])
