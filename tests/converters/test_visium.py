"""The Visium converter on real Space Ranger outputs (1.x, 2.x, CytAssist), h5ad counts, Loupe alignments, bad input."""

from __future__ import annotations

import gzip
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from anndata import AnnData
from PIL import Image
from spatialdata.transformations import get_transformation

from hest_zarr.converters import read_visium
from hest_zarr.converters.visium import LATTICE_COLUMNS, read_counts, spot_lattice_pixel_size
from hest_zarr.elements import get_record
from hest_zarr.errors import InputError
from hest_zarr.ops.pixel_size import PixelSizeDisagreementWarning
from hest_zarr.schemas import SampleMetadata
from tests.conftest import shared


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
        InputError,
        match=r"outs: no count matrix found \(expected filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix or "
        r"raw_feature_bc_matrix.h5 or raw_feature_bc_matrix, or a \*.h5ad\)",
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


# ------------------------------------------------------------------------------------------ h5ad counts
def counts_as_h5ad(perik: Path, target: Path, where: str) -> AnnData:
    """Write the real perik counts into an h5ad the way processed files hold them; return the raw counts.

    ``where``: ``X`` (raw counts as floats), ``raw.X`` (``X`` = log-normalised first 2,000 genes, ``raw`` = all genes)
    or ``layers['counts']`` (``X`` = log-normalised).
    """
    counts = sc.read_10x_h5(perik / "filtered_feature_bc_matrix.h5")
    counts.var_names_make_unique()
    processed = counts.copy()
    if where != "X":
        sc.pp.normalize_total(processed, target_sum=1e4)
        sc.pp.log1p(processed)
    if where == "raw.X":
        processed.raw = counts
        processed = processed[:, :2000].copy()
    elif where == "layers['counts']":
        processed.layers["counts"] = counts.X
    processed.write_h5ad(target)
    return counts


@pytest.mark.parametrize("where", ["X", "raw.X", "layers['counts']"])
def test_h5ad_counts_equal_h5_counts(where: str, perik_visium: Path, tmp_path: Path) -> None:
    outs = outs_copy(perik_visium, tmp_path, skip=("filtered_feature_bc_matrix",))
    reference = counts_as_h5ad(perik_visium, outs / "processed.h5ad", where)
    sdata = read_visium(outs)
    table = sdata["spot_expression"]
    assert table.shape == (2898, 19465)
    assert list(table.obs_names) == list(reference.obs_names)
    assert list(table.var_names) == list(reference.var_names)
    assert table.X.dtype == np.int32
    assert (table.X != reference.X.astype(np.int32)).nnz == 0
    assert int(table.X.sum()) == 3_085_005
    assert get_record(sdata).elements["spots"].provenance.inputs[0] == str(outs / "processed.h5ad")


def test_log_normalised_h5ad_is_refused(perik_visium: Path, tmp_path: Path) -> None:
    outs = outs_copy(perik_visium, tmp_path, skip=("filtered_feature_bc_matrix",))
    counts = sc.read_10x_h5(perik_visium / "filtered_feature_bc_matrix.h5")
    sc.pp.normalize_total(counts, target_sum=1e4)
    sc.pp.log1p(counts)
    counts.write_h5ad(outs / "normalised.h5ad")
    with pytest.raises(
        InputError,
        match=r"normalised.h5ad: no raw integer counts .*found no layers\['counts'\]; X holds \d+\.\d+; no raw.X\)"
        r": log-normalised",
    ):
        read_visium(outs)


# ------------------------------------------------------------------------------------------ Loupe alignment
def loupe_fixture(perik: Path, tmp_path: Path) -> tuple[Path, Path, pd.DataFrame]:
    """Perik without positions, plus a Loupe JSON and Space Ranger-style barcode coordinates.

    The Loupe JSON is HEST's real 6.5 mm Visium template (``spot_templates/template65.json``), which has the layout of
    a Loupe manual alignment (``oligo`` entries with row, col, imageX, imageY, dia, tissue); its spots are not this
    sample's, so the image is left out. The coordinates file (barcode, 1-based column, 1-based row, as
    ``visium-v1_coordinates.txt``) is derived from perik's real positions.
    """
    outs = outs_copy(perik, tmp_path, skip=("spatial/tissue_positions.csv",))
    os.symlink(shared("hest", "spot_templates", "template65.json"), outs / "V10M24-003-B1.json")
    positions = pd.read_csv(perik / "spatial" / "tissue_positions.csv", index_col="barcode")
    coordinates = pd.DataFrame(
        {"col": positions["array_col"].to_numpy() + 1, "row": positions["array_row"].to_numpy() + 1},
        index=positions.index.str.removesuffix("-1"),
    )
    coordinates_path = tmp_path / "visium-v2_coordinates.txt"
    coordinates.to_csv(coordinates_path, sep="\t", header=False)
    return outs, coordinates_path, positions


def test_loupe_alignment_places_the_spots(perik_visium: Path, tmp_path: Path) -> None:
    outs, coordinates_path, positions = loupe_fixture(perik_visium, tmp_path)
    oligos = pd.DataFrame(json.loads(shared("hest", "spot_templates", "template65.json").read_text())["oligo"])
    oligos = oligos.set_index(["row", "col"])
    sdata = read_visium(outs, barcode_coordinates=coordinates_path, include_image=False)

    spots = sdata["spots"]
    grid = positions.loc[spots.index, ["array_row", "array_col"]]
    expected = oligos.loc[pd.MultiIndex.from_frame(grid)]
    assert len(spots) == 2898
    assert np.array_equal(spots.geometry.x, expected["imageX"]) and np.array_equal(spots.geometry.y, expected["imageY"])
    table = sdata["spot_expression"]
    assert table.obs["in_tissue"].tolist() == expected["tissue"].eq(True).astype(int).tolist()
    assert table.obs["array_row"].tolist() == grid["array_row"].tolist()
    record = get_record(sdata)
    provenance = record.elements["spots"].provenance
    assert provenance.method == "loupe alignment"
    # the pixel size is fitted on all 4,992 spots of the alignment; the template's dia spans 65 um (measured 4e-11)
    assert provenance.parameters["pixel_size_method"] == "spot lattice"
    assert provenance.parameters["pixel_size_fit"]["n_spots"] == 4992
    assert record.pixel_size_um == pytest.approx(65 / 256.96118, rel=1e-6)
    assert np.allclose(spots["radius"], 55 / record.pixel_size_um / 2)
    assert set(sdata.images) == set()

    # the array positions may come from the counts' obs instead of the coordinates file
    with_grid = sc.read_10x_h5(perik_visium / "filtered_feature_bc_matrix.h5")
    with_grid.obs[["array_row", "array_col"]] = positions.loc[with_grid.obs_names, ["array_row", "array_col"]]
    with_grid.write_h5ad(tmp_path / "with_grid.h5ad")
    from_obs = read_visium(outs, counts=tmp_path / "with_grid.h5ad", include_image=False)["spots"]
    assert from_obs.geometry.equals(spots.geometry)


def test_loupe_alignment_without_barcode_positions(perik_visium: Path, tmp_path: Path) -> None:
    outs, _, _ = loupe_fixture(perik_visium, tmp_path)
    with pytest.raises(InputError, match=r"V10M24-003-B1.json: a Loupe alignment places spots by array row/column"):
        read_visium(outs, include_image=False)


def test_no_positions_and_no_loupe_alignment(perik_visium: Path, tmp_path: Path) -> None:
    outs = outs_copy(perik_visium, tmp_path, skip=("spatial/tissue_positions.csv",))
    with pytest.raises(InputError, match=r"outs: no spot positions found .*or a Loupe alignment \*.json"):
        read_visium(outs)


def test_lattice_columns_that_are_not_numbers_or_not_a_plane_are_refused() -> None:
    rows, cols = np.divmod(np.arange(40), 8)
    spots = pd.DataFrame({"array_row": rows.astype(object), "array_col": 2 * cols + rows % 2})
    spots[["pxl_col_in_fullres", "pxl_row_in_fullres"]] = 0.0  # every spot at one pixel
    with pytest.raises(InputError, match=r"positions.csv: the spots' pixel positions do not span a plane"):
        spot_lattice_pixel_size(spots[LATTICE_COLUMNS], 130.0, "positions.csv")
    spots.loc[3, "array_row"] = "x"
    with pytest.raises(InputError, match=r"positions.csv: array_row, .* must be numbers"):
        spot_lattice_pixel_size(spots[LATTICE_COLUMNS], 130.0, "positions.csv")


# ------------------------------------------------------------------------------------------ Space Ranger 2.x
def test_space_ranger_2_layout_with_plain_mex(tmp_path: Path) -> None:
    """SFE's real Space Ranger 2.x layout: header positions, MEX not gzipped, a hires image cropped to the spots."""
    outs = shared("SFE", "visium_v2_sample01", "outs")
    with pytest.raises(InputError, match=r"tissue_hires_image.png: image covers \d+ x \d+ full-resolution px but 12"):
        read_visium(outs)  # the crop cannot be placed: its offset in the slide is not recorded
    sdata = read_visium(outs, include_image=False)

    gzipped = tmp_path / "mex"  # scanpy 1.11 reads a v3 MEX only gzipped
    gzipped.mkdir()
    for path in (outs / "filtered_feature_bc_matrix").iterdir():
        (gzipped / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
    reference = sc.read_10x_mtx(gzipped)
    table = sdata["spot_expression"]
    assert table.shape == (12, 5)
    assert list(table.obs_names) == list(reference.obs_names)
    assert list(table.var_names) == list(reference.var_names) == ["ACPP", "KLK3", "MSMB", "TGM4", "TAGLN"]
    assert (table.X != reference.X.astype(np.int32)).nnz == 0
    assert int(table.X.sum()) == int(reference.X.sum()) == 2_951

    positions = pd.read_csv(outs / "spatial" / "tissue_positions.csv", index_col="barcode").loc[table.obs_names]
    spots = sdata["spots"].loc[table.obs_names]
    assert np.array_equal(spots.geometry.x, positions["pxl_col_in_fullres"])
    assert np.array_equal(spots.geometry.y, positions["pxl_row_in_fullres"])
    # the 12 spots' lattice gives the pixel size; Space Ranger's spot_diameter_fullres (188.56909 px = 65 um) agrees
    assert get_record(sdata).pixel_size_um == pytest.approx(65 / 188.56909, rel=1e-3)
    assert np.allclose(spots["radius"], 55 / get_record(sdata).pixel_size_um / 2)
    for column in ("array_row", "array_col", "in_tissue"):
        assert table.obs[column].tolist() == positions[column].tolist()
    assert get_record(sdata).metadata.spots_under_tissue == 12


# ------------------------------------------------------------------------------------------ pixel size
def scale_factors(outs: Path) -> dict:
    return json.loads((outs / "spatial" / "scalefactors_json.json").read_text())


@pytest.mark.parametrize(
    ("folder", "n_spots"),
    [(("scanpy", "visium_data", "1.0.0"), 4992), (("SFE", "visium_v2_sample01", "outs"), 12)],
)
def test_lattice_pixel_size_agrees_with_spot_diameter_fullres(folder: tuple[str, ...], n_spots: int) -> None:
    """Space Ranger 1.0 (scanpy) and 2.x (SFE): the lattice and 65 um / spot_diameter_fullres agree within 0.1 %."""
    outs = shared(*folder)
    factors = scale_factors(outs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PixelSizeDisagreementWarning)
        sdata = read_visium(outs, include_image=False)
    record = get_record(sdata)
    from_diameter = 65 / factors["spot_diameter_fullres"]
    assert abs(record.pixel_size_um / from_diameter - 1) < 1e-3  # measured 1.4e-7 (scanpy), -6.3e-4 (SFE)
    parameters = record.elements["spots"].provenance.parameters
    assert parameters["pixel_size_method"] == "spot lattice"
    assert parameters["pixel_size_fit"]["n_spots"] == n_spots  # every positioned spot, not only the counts' barcodes
    assert parameters["difference_vs_spot_diameter"] == pytest.approx(record.pixel_size_um / from_diameter - 1)
    assert parameters["fiducial_diameter_fullres_um"] == pytest.approx(105.0, rel=1e-3)  # the slide layouts' fiducial
    assert record.metadata.pixel_size_um_estimated == record.pixel_size_um
    np.testing.assert_allclose(sdata["spots"]["radius"], 55 / record.pixel_size_um / 2)


def test_cytassist_pixel_size_is_the_lattice_not_spot_diameter_fullres(perik_visium: Path) -> None:
    """Space Ranger 3.0 CytAssist: spot_diameter_fullres spans 70 um, so 65 um over it would be 7.7 % low; the
    lattice agrees with the 105 um fiducials of the slide layouts."""
    factors = scale_factors(perik_visium)
    with pytest.warns(
        PixelSizeDisagreementWarning,
        match=r"tissue_positions.csv: the spot lattice gives 4\.678 um/px, \+7\.7% against 65 um / "
        r"spot_diameter_fullres \(4\.344 um/px\): spot_diameter_fullres spans 70\.0 um here",
    ):
        sdata = read_visium(perik_visium)
    record = get_record(sdata)
    assert abs(record.pixel_size_um / (105 / factors["fiducial_diameter_fullres"]) - 1) < 1e-3  # measured 2e-16
    assert record.metadata.pixel_size_um_estimated == record.pixel_size_um
    parameters = record.elements["spots"].provenance.parameters
    assert parameters["pixel_size_method"] == "spot lattice"
    assert parameters["pixel_size_um_from_spot_diameter"] == pytest.approx(65 / factors["spot_diameter_fullres"])
    assert parameters["difference_vs_spot_diameter"] == pytest.approx(70 / 65 - 1, abs=1e-4)
    assert parameters["spot_diameter_fullres_um"] == pytest.approx(70.0, rel=1e-4)
    fit = parameters["pixel_size_fit"]
    assert (fit["n_spots"], fit["n_outliers"]) == (4992, 0)
    assert fit["uncertainty_um"] < 1e-9 and fit["residual_rms_px"] < 1e-6  # Space Ranger's positions: exact lattice
    # the spots keep Space Ranger's pixels; their micrometres follow the lattice
    spots = sdata["spots"]
    positions = pd.read_csv(perik_visium / "spatial" / "tissue_positions.csv", index_col="barcode").loc[spots.index]
    assert np.array_equal(spots.geometry.x, positions["pxl_col_in_fullres"])
    np.testing.assert_allclose(spots["radius"] * 2 * record.pixel_size_um, 55.0)
    to_um = get_transformation(spots, "um").to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    np.testing.assert_allclose(np.diag(to_um)[:2], record.pixel_size_um)


def test_too_few_spots_fall_back_to_spot_diameter_fullres(tmp_path: Path) -> None:
    """SFE's real Space Ranger 2.x output cut to its first 2 spots (positions and counts): no lattice to fit."""
    source = shared("SFE", "visium_v2_sample01", "outs")
    outs = outs_copy(source, tmp_path, skip=("spatial/tissue_positions.csv", "filtered_feature_bc_matrix"))
    positions = pd.read_csv(source / "spatial" / "tissue_positions.csv").iloc[:2]
    positions.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    read_counts(source / "filtered_feature_bc_matrix")[positions["barcode"]].write_h5ad(outs / "counts.h5ad")
    with pytest.warns(
        UserWarning,
        match=r"tissue_positions.csv: 2 spot\(s\) with a position, too few or on one line to fit the spot lattice; "
        r"the pixel size falls back to 65 um / spot_diameter_fullres = 0\.3447 um/px",
    ):
        sdata = read_visium(outs, include_image=False)
    record = get_record(sdata)
    assert len(sdata["spots"]) == 2
    assert record.pixel_size_um == pytest.approx(65 / scale_factors(source)["spot_diameter_fullres"])
    parameters = record.elements["spots"].provenance.parameters
    assert parameters["pixel_size_method"] == "65 um / spot_diameter_fullres (too few spots)"
    assert "pixel_size_fit" not in parameters


def test_spots_of_one_row_fall_back(perik_visium: Path) -> None:
    """Real perik positions of one array row are on one line: the lattice is undetermined."""
    positions = pd.read_csv(perik_visium / "spatial" / "tissue_positions.csv")
    one_row = positions[positions["array_row"] == 40]
    assert len(one_row) == 64
    with pytest.warns(UserWarning, match=r"row40: 64 spot\(s\) with a position, too few or on one line"):
        pixel_size, parameters = spot_lattice_pixel_size(one_row, 14.964878633873417, "row40")
    assert pixel_size == 65 / 14.964878633873417
    assert parameters["pixel_size_method"] == "65 um / spot_diameter_fullres (too few spots)"


def test_a_non_finite_spot_position_is_refused_naming_the_positions_file(tmp_path, scanpy_visium) -> None:
    """A copy of the real scanpy sample whose positions file has one empty pixel column (read as NaN)."""
    import shutil

    copy = tmp_path / "outs"
    shutil.copytree(scanpy_visium, copy)
    positions = copy / "spatial" / "tissue_positions_list.csv"
    barcode = str(read_visium(scanpy_visium, include_image=False)["spots"].index[0])
    lines = positions.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.split(",")[0] == barcode)
    fields = lines[row].split(",")
    fields[5] = ""  # pxl_col_in_fullres
    lines[row] = ",".join(fields)
    positions.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        InputError, match=r"tissue_positions_list\.csv: 1 of \d+ spots have a non-finite position"
    ) as raised:
        read_visium(copy)
    assert repr(barcode) in str(raised.value)
