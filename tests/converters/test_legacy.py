"""The legacy-table converter on every real bare expression + coordinate set in the shared data, and its errors.

Real inputs: GiottoData's Visium (mouse dentate gyrus: genes x spots TXT, id-less pixel locations with y negated)
and Visium_multisample (two human samples in one genes x spots TXT, pixel and array location tables), SFE's tiny
Space Ranger 2 layout (uncompressed MEX + ``tissue_positions.csv``), scanpy's 100-spot h5 with squidpy's matching
headerless ``tissue_positions_list.csv``. squidpy's ``test_data.h5ad`` and stLearn's ``test_data.h5`` hold
normalised values, not counts: they must be refused. Expectations are computed here with pandas, scipy and h5py.
"""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from PIL import Image
from scipy.io import mmread

import hest_zarr
from hest_zarr.converters.legacy import read_legacy
from hest_zarr.elements import get_record
from hest_zarr.errors import InputError
from tests.conftest import shared


def giotto(*parts: str) -> Path:
    return shared("GiottoData", *parts)


def centres(sdata) -> np.ndarray:
    spots = sdata["spots"]
    return np.c_[spots.geometry.x, spots.geometry.y]


def visium_v1_array_positions() -> pd.DataFrame:
    """Barcode -> (array_col, array_row) of Visium v1 slides, read from scanpy's full 4,992-spot position list."""
    path = shared("scanpy", "visium_data", "1.0.0", "spatial", "tissue_positions_list.csv")
    positions = pd.read_csv(path, header=None, index_col=0)
    return positions[[3, 2]].set_axis(["array_col", "array_row"], axis=1)


def lattice_pixel_size(array_col_row: np.ndarray, pixels: np.ndarray) -> float:
    """um/px from a least-squares affine array -> pixel fit: neighbours in a row are 2 columns (100 um) apart."""
    design = np.c_[array_col_row, np.ones(len(array_col_row))]
    affine, *_ = np.linalg.lstsq(design, pixels, rcond=None)
    return float(100 / np.hypot(*(2 * affine[0])))


def test_giotto_dentate_gyrus_counts_and_positions() -> None:
    expression, locations = (
        giotto("Visium", "Raw", "visium_DG_expr.txt.gz"),
        giotto("Visium", "Raw", "visium_DG_locs.txt"),
    )
    expected = pd.read_csv(expression, sep=" ", index_col=0).T  # genes x spots in the file
    sdata = read_legacy(expression, locations, sample_id="DG")
    table, record = sdata["spot_expression"], get_record(sdata)
    assert table.shape == expected.shape == (624, 634)
    assert list(table.obs_names) == list(expected.index)
    assert np.array_equal(table.X.toarray(), expected.to_numpy())
    # the locations have no ids: row i is the i-th spot of the expression; Giotto stores y as -row
    xy = pd.read_csv(locations, sep=r"\s+", header=None).to_numpy(dtype=float)
    assert np.array_equal(centres(sdata)[table.obs_names.get_indexer(expected.index)], xy * [1, -1])
    parameters = record.elements["spots"].provenance.parameters
    assert parameters["y_negated"] is True
    assert parameters["matched_by"].startswith("row order")
    # pixel size: independently, from the Visium v1 barcode -> array position map and an affine fit
    array = visium_v1_array_positions().loc[expected.index].to_numpy(dtype=float)
    assert record.pixel_size_um == pytest.approx(lattice_pixel_size(array, xy * [1, -1]), rel=0.005)  # 0.726 um/px
    assert record.metadata.species == "Mus musculus"


@pytest.mark.parametrize("sample", ["NP", "CP"])
def test_giotto_multisample_one_sample_per_store(sample: str) -> None:
    raw = giotto("Visium_multisample", "Raw")
    expected = pd.read_csv(raw / "expression_matrix.txt.gz", sep=" ", index_col=0).T
    metadata = pd.read_csv(raw / "cell_metadata.txt", sep=" ", index_col="cell_ID")
    locations = pd.read_csv(raw / "spatial_locs.txt", sep=" ", index_col="cell_ID")
    ids = metadata.index[metadata["list_ID"] == sample]
    sdata = read_legacy(raw / "expression_matrix.txt.gz", raw / "spatial_locs.txt", spots=ids, sample_id=sample)
    table = sdata["spot_expression"]
    assert table.shape == (len(ids), 1255)
    assert np.array_equal(table.X.toarray(), expected.loc[ids].to_numpy())
    assert np.array_equal(centres(sdata), locations.loc[ids, ["sdimx", "sdimy"]].to_numpy() * [1, -1])
    record = get_record(sdata)
    assert record.metadata.species == "Homo sapiens"
    # nearest-neighbour spacing against the array positions of the same table
    array = metadata.loc[ids, ["array_col", "array_row"]].to_numpy(dtype=float)
    pixels = locations.loc[ids, ["sdimx", "sdimy"]].to_numpy() * [1, -1]
    assert record.pixel_size_um == pytest.approx(lattice_pixel_size(array, pixels), rel=0.005)


def test_giotto_array_coordinates_in_micrometres() -> None:
    raw = giotto("Visium_multisample", "Raw")
    metadata = pd.read_csv(raw / "cell_metadata.txt", sep=" ", index_col="cell_ID")
    ids = metadata.index[metadata["list_ID"] == "NP"]
    sdata = read_legacy(raw / "expression_matrix.txt.gz", raw / "cell_metadata.txt", spots=ids)
    record, obs = get_record(sdata), sdata["spot_expression"].obs
    # 100 um between neighbours of a row (2 columns); rows 87 um apart on a 6.5 mm capture area (Loupe's template,
    # as the Visium converter places spots), not 100 * sqrt(3) / 2 = 86.6 um
    assert metadata.loc[ids, "array_row"].max() < 78
    expected_um = metadata.loc[ids, ["array_col", "array_row"]].to_numpy() * [50, 87.0]
    assert np.allclose(centres(sdata), expected_um)
    assert np.array_equal(
        obs[["array_row", "array_col", "in_tissue"]].to_numpy(),
        metadata.loc[ids, ["array_row", "array_col", "in_tissue"]].to_numpy(),
    )
    assert record.pixel_size_um == 1.0
    assert record.elements["spots"].provenance.parameters["global_units"] == "um"
    assert np.allclose(sdata["spots"]["radius"], 27.5)


def test_sfe_uncompressed_mex_and_positions_with_header() -> None:
    outs = shared("SFE", "visium_v2_sample01", "outs")
    sdata = read_legacy(outs / "filtered_feature_bc_matrix", outs / "spatial" / "tissue_positions.csv")
    table, record = sdata["spot_expression"], get_record(sdata)
    barcodes = pd.read_csv(outs / "filtered_feature_bc_matrix" / "barcodes.tsv", header=None)[0]
    genes = pd.read_csv(outs / "filtered_feature_bc_matrix" / "features.tsv", sep="\t", header=None)[1]
    counts = mmread(outs / "filtered_feature_bc_matrix" / "matrix.mtx").T.toarray()
    assert list(table.obs_names) == list(barcodes) and list(table.var_names) == list(genes)
    assert np.array_equal(table.X.toarray(), counts)
    positions = pd.read_csv(outs / "spatial" / "tissue_positions.csv", index_col="barcode").loc[barcodes]
    assert np.array_equal(centres(sdata), positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy())
    assert np.array_equal(
        table.obs[["array_row", "array_col"]].to_numpy(), positions[["array_row", "array_col"]].to_numpy()
    )
    array = positions[["array_col", "array_row"]].to_numpy(dtype=float)
    pixels = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=float)
    assert record.pixel_size_um == pytest.approx(lattice_pixel_size(array, pixels), rel=0.005)  # 0.344 um/px
    assert record.elements["spots"].provenance.estimated_error_um < 1


def test_10x_h5_with_headerless_space_ranger_positions() -> None:
    h5 = shared("scanpy", "visium_data", "1.0.0", "filtered_feature_bc_matrix.h5")
    positions_path = shared("squidpy", "spatial", "tissue_positions_list.csv")
    sdata = read_legacy(h5, positions_path)
    reference = sc.read_10x_h5(h5)
    table = sdata["spot_expression"]
    assert table.shape == (100, 100)
    assert (table.X != reference.X.astype(np.int32)).nnz == 0
    positions = pd.read_csv(positions_path, header=None, index_col=0).loc[reference.obs_names]
    assert np.array_equal(centres(sdata), positions[[5, 4]].to_numpy())
    assert np.array_equal(
        table.obs[["in_tissue", "array_row", "array_col"]].to_numpy(), positions[[1, 2, 3]].to_numpy()
    )
    assert get_record(sdata).metadata.species == "Homo sapiens"


def test_h5ad_carrying_its_own_coordinates(tmp_path: Path) -> None:
    """An h5ad built here from the real scanpy h5 and squidpy positions (no real raw-count h5ad is shared)."""
    h5 = shared("scanpy", "visium_data", "1.0.0", "filtered_feature_bc_matrix.h5")
    positions = pd.read_csv(shared("squidpy", "spatial", "tissue_positions_list.csv"), header=None, index_col=0)
    adata = sc.read_10x_h5(h5)
    adata.obsm["spatial"] = positions.loc[adata.obs_names, [5, 4]].to_numpy(dtype=float)
    adata.write_h5ad(tmp_path / "pixels_only.h5ad")
    # 100 spots scattered over 4,992: their spacing is not the lattice's, and the converter says so
    with pytest.raises(InputError, match=r"pixels_only.h5ad: spots too sparse or irregular to measure the pixel size"):
        read_legacy(tmp_path / "pixels_only.h5ad")
    adata.obs["array_row"] = positions.loc[adata.obs_names, 2].to_numpy()
    adata.obs["array_col"] = positions.loc[adata.obs_names, 3].to_numpy()
    adata.write_h5ad(tmp_path / "sample.h5ad")
    sdata = read_legacy(tmp_path / "sample.h5ad")
    assert (sdata["spot_expression"].X != adata.X.astype(np.int32)).nnz == 0
    assert np.array_equal(centres(sdata), adata.obsm["spatial"])
    expected = lattice_pixel_size(adata.obs[["array_col", "array_row"]].to_numpy(float), adata.obsm["spatial"])
    assert get_record(sdata).pixel_size_um == pytest.approx(expected, rel=0.005)


def test_image_with_a_derived_st_coordinate_table(tmp_path: Path) -> None:
    """Real MOB1 counts and H&E; the coordinate table is the real alignment table re-keyed here by XxY id."""
    folder = shared("STUtility_ST_v1")
    alignment = pd.read_csv(folder / "alignment_table_MOB1.tsv", sep="\t")
    alignment.insert(0, "spot_id", alignment["x"].astype(str) + "x" + alignment["y"].astype(str))
    counts = pd.read_csv(folder / "MOB1.tsv", sep="\t", index_col=0)
    aligned = counts.index.intersection(alignment["spot_id"])
    counts.loc[aligned].to_csv(tmp_path / "counts.csv")
    alignment[["spot_id", "pixel_x", "pixel_y", "selected"]].to_csv(tmp_path / "positions.csv", index=False)
    sdata = read_legacy(
        tmp_path / "counts.csv",
        tmp_path / "positions.csv",
        image=folder / "MOB1.jpg",
        technology="Spatial Transcriptomics",
        spot_diameter_um=100.0,
        inter_spot_dist_um=200 / np.sqrt(2),  # 2k array: nearest neighbours are diagonal
    )
    assert sdata["he"].shape == (3, 1905, 1905)
    expected = alignment.set_index("spot_id").loc[aligned]
    assert np.array_equal(centres(sdata), expected[["pixel_x", "pixel_y"]].to_numpy())
    assert np.array_equal(sdata["spot_expression"].obs["in_tissue"].to_numpy(), expected["selected"].to_numpy())
    assert get_record(sdata).pixel_size_um == pytest.approx(4.385, rel=0.01)  # the ST v1 converter's affine fit


@pytest.mark.parametrize("case", ["giotto", "multisample", "sfe", "h5"])
def test_stores_write_validate_and_reopen(case: str, tmp_path: Path) -> None:
    if case == "giotto":
        raw = giotto("Visium", "Raw")
        sdata = read_legacy(raw / "visium_DG_expr.txt.gz", raw / "visium_DG_locs.txt")
    elif case == "multisample":
        raw = giotto("Visium_multisample", "Raw")
        sdata = read_legacy(raw / "expression_matrix.txt.gz", raw / "cell_metadata.txt")
    elif case == "sfe":
        outs = shared("SFE", "visium_v2_sample01", "outs")
        sdata = read_legacy(outs / "filtered_feature_bc_matrix", outs / "spatial" / "tissue_positions.csv")
    else:
        h5 = shared("scanpy", "visium_data", "1.0.0", "filtered_feature_bc_matrix.h5")
        sdata = read_legacy(h5, shared("squidpy", "spatial", "tissue_positions_list.csv"))
    url = hest_zarr.write(sdata, tmp_path / "s.zarr")
    assert hest_zarr.validate(url) == []
    reopened = hest_zarr.open(url)
    assert (reopened["spot_expression"].X != sdata["spot_expression"].X).nnz == 0
    assert reopened["spots"].geometry.equals(sdata["spots"].geometry)


def test_missing_expression_file_leaves_no_store(tmp_path: Path) -> None:
    raw = giotto("Visium", "Raw")
    target = tmp_path / "s.zarr"
    with pytest.raises(InputError, match=r"absent_expr.txt: no such file"):
        hest_zarr.write(read_legacy(raw / "absent_expr.txt", raw / "visium_DG_locs.txt"), target)
    assert not target.exists()


def test_ids_that_do_not_match() -> None:
    h5 = shared("scanpy", "visium_data", "1.0.0", "filtered_feature_bc_matrix.h5")
    other_sample = shared("SFE", "visium_v2_sample01", "outs", "spatial", "tissue_positions.csv")
    with pytest.raises(
        InputError,
        match=r"tissue_positions.csv: 100 of the 100 spots of filtered_feature_bc_matrix.h5 have no coordinates",
    ):
        read_legacy(h5, other_sample)
    raw = giotto("Visium_multisample", "Raw")
    with pytest.raises(
        InputError, match=r"spatial_locs.txt: none of its spot ids .* names a row or a column of visium_DG_expr"
    ):
        read_legacy(giotto("Visium", "Raw", "visium_DG_expr.txt.gz"), raw / "spatial_locs.txt")
    with pytest.raises(InputError, match=r"visium_DG_locs.txt: has no spot ids and its 624 rows match neither"):
        read_legacy(raw / "expression_matrix.txt.gz", giotto("Visium", "Raw", "visium_DG_locs.txt"))


def test_image_smaller_than_the_spots() -> None:
    raw = giotto("Visium", "Raw")
    small = shared("squidpy", "test_img.jpg")  # a 950 x 1717 crop of another section
    with Image.open(small) as image:
        assert image.size == (950, 1717)
    with pytest.raises(InputError, match=r"test_img.jpg: image covers 950 x 1717 full-resolution px but 624 spots lie"):
        read_legacy(raw / "visium_DG_expr.txt.gz", raw / "visium_DG_locs.txt", image=small)


def test_unrecognisable_tables_and_non_counts() -> None:
    raw = giotto("Visium", "Raw")
    annotations = shared("stlearn", "v1_human_breast_cancer_block_a_section_1.csv")
    with pytest.raises(
        InputError, match=r"v1_human_breast_cancer_block_a_section_1.csv: unrecognised expression table"
    ):
        read_legacy(annotations, raw / "visium_DG_locs.txt")
    with pytest.raises(InputError, match=r"visium_DG_meta.txt: unrecognised coordinate table"):
        read_legacy(raw / "visium_DG_expr.txt.gz", raw / "visium_DG_meta.txt")
    with pytest.raises(InputError, match=r"scalefactors_json.json: unknown expression format"):
        read_legacy(raw / "scalefactors_json.json", raw / "visium_DG_locs.txt")
    for normalised in (shared("squidpy", "test_data.h5ad"), shared("stlearn", "test_data.h5")):
        values = anndata.read_h5ad(normalised).X
        values = values.toarray() if hasattr(values, "toarray") else values
        assert not np.array_equal(values, np.round(values)) or values.min() < 0  # the file really holds no counts
        with pytest.raises(InputError, match=rf"{normalised.name}: no raw integer counts"):
            read_legacy(normalised)


def test_array_coordinates_cannot_be_placed_on_an_image() -> None:
    raw = giotto("Visium_multisample", "Raw")
    with pytest.raises(
        InputError, match=r"cell_metadata.txt: holds array coordinates, which cannot be placed on test_img.jpg"
    ):
        read_legacy(
            raw / "expression_matrix.txt.gz", raw / "cell_metadata.txt", image=shared("squidpy", "test_img.jpg")
        )
