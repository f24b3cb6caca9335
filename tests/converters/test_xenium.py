"""The Xenium converter on real Xenium Onboard Analysis files (SFE crop, spatialdata-io manifests), and its errors.

Expectations are computed in each test from the raw files with pandas, pyarrow, scanpy, tifffile or numpy,
never with the converter's own helpers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scanpy as sc
import shapely
import tifffile
from PIL import Image
from spatialdata import transform
from spatialdata.transformations import Identity, get_transformation

import hest_zarr
from hest_zarr.converters.xenium import (
    XeniumFrame,
    decode_cell_ids,
    read_alignment,
    read_boundaries,
    read_cell_feature_matrix,
    read_cells,
    read_experiment,
    read_morphology,
    read_transcripts,
    read_xenium,
)
from hest_zarr.elements import get_record
from hest_zarr.errors import InputError
from tests.conftest import shared

SFE_CELLS = 526
SFE_TRANSCRIPTS = 5260
COVERAGE_WARNING = r"morphology_focus.ome.tif: the image spans x 0-50.4, y 0-50.4 um"


@pytest.fixture
def sfe() -> Path:
    return shared("SFE", "xenium")


def folder_copy(source: Path, tmp_path: Path, *, skip: tuple[str, ...] = ()) -> Path:
    """A writable copy of a Xenium folder (symlinks), without the files named in ``skip``."""
    target = tmp_path / source.name
    target.mkdir()
    for path in source.iterdir():
        if path.name not in skip:
            os.symlink(path, target / path.name)
    return target


def read_sfe(folder: Path, **kwargs):
    """Read the SFE crop, whose 237 px morphology image is downscaled: the converter must say so."""
    with pytest.warns(UserWarning, match=COVERAGE_WARNING):
        return read_xenium(folder, **kwargs)


def raw_boundaries(path: Path) -> pd.DataFrame:
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if isinstance(frame["cell_id"].iloc[0], bytes):
        frame["cell_id"] = frame["cell_id"].map(bytes.decode)
    return frame


# ----------------------------------------------------------------------------------------------- transcripts
@pytest.mark.parametrize("name", ["transcripts.parquet", "transcripts.csv.gz"])
def test_every_transcript_is_kept(sfe: Path, name: str) -> None:
    raw = pd.read_parquet(sfe / name) if name.endswith("parquet") else pd.read_csv(sfe / name)
    points = read_transcripts(sfe / name).compute()
    assert len(points) == len(raw) == SFE_TRANSCRIPTS
    assert isinstance(points["gene"].dtype, pd.CategoricalDtype)
    assert (
        points["gene"].astype(str).value_counts().sort_index().equals(raw["feature_name"].value_counts().sort_index())
    )
    assert {"BLANK_0070", "BLANK_0464", "NegControlProbe_00003"} <= set(points["gene"].cat.categories)
    by_id = points.set_index("transcript_id").loc[raw["transcript_id"]]
    np.testing.assert_array_equal(by_id["x"], raw["x_location"])
    np.testing.assert_array_equal(by_id["y"], raw["y_location"])
    np.testing.assert_array_equal(by_id["qv"], raw["qv"])
    np.testing.assert_array_equal(by_id["z_location"], raw["z_location"])
    assert (by_id["cell_id"].astype(str).to_numpy() == raw["cell_id"].astype(str).to_numpy()).all()
    assert int((by_id["cell_id"] == "UNASSIGNED").sum()) == 9


def test_transcripts_are_read_by_row_group(sfe: Path, tmp_path: Path) -> None:
    """The real transcripts rewritten in 1,000-row groups: each group is one lazy partition."""
    raw = pd.read_parquet(sfe / "transcripts.parquet")
    raw.to_parquet(tmp_path / "transcripts.parquet", row_group_size=1000)
    points = read_transcripts(tmp_path / "transcripts.parquet", blocksize=1)
    assert points.npartitions == 6
    assert len(points) == SFE_TRANSCRIPTS


# ----------------------------------------------------------------------------------------------- boundaries
@pytest.mark.parametrize("kind", ["cell", "nucleus"])
@pytest.mark.parametrize("suffix", [".parquet", ".csv.gz"])
def test_boundaries_keep_every_cell_and_vertex(sfe: Path, kind: str, suffix: str) -> None:
    path = sfe / f"{kind}_boundaries{suffix}"
    raw = raw_boundaries(path)
    polygons = read_boundaries(path)
    assert len(polygons) == raw["cell_id"].nunique() == SFE_CELLS
    assert polygons.index.tolist() == raw["cell_id"].drop_duplicates().tolist()
    np.testing.assert_array_equal(shapely.get_coordinates(polygons.geometry.values), raw[["vertex_x", "vertex_y"]])
    assert set(polygons.geom_type) == {"Polygon"}
    assert (polygons["source"] == "xenium").all()


def test_polygon_rows_must_be_contiguous(sfe: Path, tmp_path: Path) -> None:
    shuffled = raw_boundaries(sfe / "cell_boundaries.parquet").sample(frac=1, random_state=0)
    shuffled.to_parquet(tmp_path / "cell_boundaries.parquet")
    with pytest.raises(InputError, match=r"cell_boundaries.parquet: the vertices of each polygon must be contiguous"):
        read_boundaries(tmp_path / "cell_boundaries.parquet")


def test_multinucleate_cells_keep_every_nucleus(sfe: Path, tmp_path: Path) -> None:
    """Synthetic XOA >= 2 layout: the real nuclei get a ``label_id`` each, and one cell a second (shifted) nucleus."""
    nuclei = raw_boundaries(sfe / "nucleus_boundaries.parquet")
    nuclei["label_id"] = nuclei.groupby("cell_id", sort=False).ngroup() + 1
    first = nuclei[nuclei["cell_id"] == nuclei["cell_id"].iloc[0]].assign(label_id=len(nuclei) + 1)
    first[["vertex_x", "vertex_y"]] += 3.0
    pd.concat([nuclei, first]).to_parquet(tmp_path / "nucleus_boundaries.parquet")
    polygons = read_boundaries(tmp_path / "nucleus_boundaries.parquet")
    assert len(polygons) == SFE_CELLS + 1
    owner = nuclei["cell_id"].iloc[0]
    assert polygons.loc[[f"{owner}_0", f"{owner}_1"], "cell_id"].tolist() == [owner, owner]
    assert polygons["cell_id"].nunique() == SFE_CELLS
    assert not polygons.index.has_duplicates


def test_polygon_of_two_vertices(sfe: Path, tmp_path: Path) -> None:
    vertices = raw_boundaries(sfe / "cell_boundaries.csv.gz")
    second = vertices["cell_id"].drop_duplicates().iloc[1]
    keep = (vertices["cell_id"] != second) | (vertices.groupby("cell_id").cumcount() < 2)
    vertices[keep].to_csv(tmp_path / "cell_boundaries.csv.gz", index=False)
    with pytest.raises(
        InputError, match=rf"cell_boundaries.csv.gz: 1 polygon\(s\) with fewer than 3 vertices .*{second}"
    ):
        read_boundaries(tmp_path / "cell_boundaries.csv.gz")


def test_byte_string_columns_are_decoded(sfe: Path, tmp_path: Path) -> None:
    """XOA 1.x parquet stores names and ids as binary: the real transcripts rewritten that way."""
    raw = pd.read_parquet(sfe / "transcripts.parquet")
    binary = raw.assign(
        feature_name=raw["feature_name"].str.encode("utf-8"), cell_id=raw["cell_id"].str.encode("utf-8")
    )
    binary.to_parquet(tmp_path / "transcripts.parquet")
    assert pq.read_schema(tmp_path / "transcripts.parquet").field("feature_name").type == pa.binary()
    points = read_transcripts(tmp_path / "transcripts.parquet").compute()
    assert (
        points["gene"].astype(str).value_counts().sort_index().equals(raw["feature_name"].value_counts().sort_index())
    )
    assert sorted(points["cell_id"].astype(str)) == sorted(raw["cell_id"])


def test_morphology_focus_of_xoa_3_from_the_manifest(sfe: Path, tmp_path: Path) -> None:
    """XOA 3 layout (``morphology_focus/morphology_focus_0000.ome.tif``, named by the real 3.0.0 manifest) holding
    the real SFE focus image."""
    folder = folder_copy(sfe, tmp_path, skip=("morphology_focus.ome.tif", "morphology_mip.ome.tif"))
    (folder / "morphology_focus").mkdir()
    os.symlink(sfe / "morphology_focus.ome.tif", folder / "morphology_focus" / "morphology_focus_0000.ome.tif")
    os.symlink(
        shared("spatialdata-io_experiment_xenium", "xenium-3.0.0", "experiment.xenium"), folder / "experiment.xenium"
    )
    with pytest.warns(UserWarning, match=r"morphology_focus_0000.ome.tif: the image spans"):
        sdata = read_xenium(folder)
    np.testing.assert_array_equal(sdata["dapi"].values[0], tifffile.imread(sfe / "morphology_focus.ome.tif"))
    assert get_record(sdata).elements["transcripts"].provenance.parameters["panel_design_id"] == "mAtlas_v1"


def test_z_stack_is_projected_by_its_maximum(sfe: Path, tmp_path: Path) -> None:
    """A two-plane ``morphology.ome.tif`` (z-stack) built from the real focus and MIP images."""
    planes = np.stack(
        [tifffile.imread(sfe / "morphology_focus.ome.tif"), tifffile.imread(sfe / "morphology_mip.ome.tif")]
    )
    planes[1, :10] = 65535  # make the planes differ
    tifffile.imwrite(tmp_path / "morphology.ome.tif", planes, ome=True, metadata={"axes": "ZYX"})
    dapi = read_morphology(tmp_path / "morphology.ome.tif")
    assert dapi.shape == (1, 237, 237)
    np.testing.assert_array_equal(dapi.values[0], planes.max(axis=0))


# ----------------------------------------------------------------------------------------------- the sample
def test_cell_expression_equals_scanpy_and_flags_controls(sfe: Path) -> None:
    sdata = read_sfe(sfe)
    table = sdata["cell_expression"]
    reference = sc.read_10x_h5(sfe / "cell_feature_matrix.h5", gex_only=False)
    assert table.shape == reference.shape == (SFE_CELLS, 30)
    assert table.var_names.tolist() == reference.var_names.tolist()
    assert (table.X != reference.X).nnz == 0
    assert int(table.X.sum()) == int(reference.X.sum()) == 45_729
    assert table.obs["spot_id"].tolist() == reference.obs_names.tolist()
    assert table.obs["spot_id"].isin(sdata["cells"].index).all()
    expected_controls = reference.var_names[reference.var["feature_types"] != "Gene Expression"]
    assert sorted(table.var_names[table.var["is_control"]]) == sorted(expected_controls)
    assert {"BLANK_0070", "BLANK_0464", "NegControlProbe_00003"} == set(expected_controls)
    summary = pd.read_parquet(sfe / "cells.parquet").set_index("cell_id").loc[reference.obs_names]
    np.testing.assert_array_equal(table.obs["transcript_counts"], summary["transcript_counts"])
    np.testing.assert_array_equal(table.obs["x_centroid"], summary["x_centroid"])
    record = get_record(sdata)
    assert record.metadata.nb_genes == 27
    assert record.metadata.st_technology == "Xenium"


def test_store_writes_validates_and_reopens(sfe: Path, tmp_path: Path) -> None:
    sdata = read_sfe(sfe, sample_id="SFE_crop")
    url = hest_zarr.write(sdata, tmp_path / "sample.zarr")
    assert hest_zarr.validate(url) == []
    reopened = hest_zarr.open(url)
    assert len(reopened["transcripts"]) == SFE_TRANSCRIPTS
    assert len(reopened["cells"]) == len(reopened["nuclei"]) == SFE_CELLS
    assert reopened["cell_expression"].shape == (SFE_CELLS, 30)
    dapi = reopened["dapi"]
    dapi = dapi["scale0"].image if hasattr(dapi, "children") else dapi
    assert dapi.dtype == np.uint16
    assert dapi.coords["c"].values.tolist() == ["DAPI"]
    np.testing.assert_array_equal(dapi.values[0], tifffile.imread(sfe / "morphology_focus.ome.tif"))
    transformations = get_transformation(reopened["transcripts"], get_all=True)
    assert isinstance(transformations["um"], Identity)
    np.testing.assert_allclose(
        transformations["global"].to_affine_matrix(("x", "y"), ("x", "y")).diagonal()[:2], 1 / 0.2125
    )
    record = get_record(reopened)
    assert record.pixel_size_um == 0.2125
    assert record.metadata.id == "SFE_crop"
    assert "no experiment.xenium" in record.elements["transcripts"].provenance.parameters["pixel_size_note"]
    assert record.elements["dapi"].provenance.parameters["covers_cells"] is False


def test_mip_and_csv_files_when_focus_and_parquet_are_absent(sfe: Path, tmp_path: Path) -> None:
    folder = folder_copy(
        sfe,
        tmp_path,
        skip=("morphology_focus.ome.tif", "transcripts.parquet", "cell_boundaries.parquet", "cells.parquet"),
    )
    with pytest.warns(UserWarning, match=r"morphology_mip.ome.tif: the image spans"):
        sdata = read_xenium(folder)
    np.testing.assert_array_equal(sdata["dapi"].values[0], tifffile.imread(sfe / "morphology_mip.ome.tif"))
    assert len(sdata["transcripts"]) == len(pd.read_csv(sfe / "transcripts.csv.gz"))
    assert sdata["cells"].index.tolist() == pd.read_csv(sfe / "cells.csv.gz")["cell_id"].tolist()
    inputs = get_record(sdata).elements
    assert inputs["transcripts"].provenance.inputs[0].endswith("transcripts.csv.gz")
    assert inputs["cell_expression"].provenance.inputs[1].endswith("cells.csv.gz")


# ----------------------------------------------------------------------------------------------- experiment.xenium
@pytest.mark.parametrize(
    ("version", "panel"),
    [("xenium-1.0.2", "Xenium Mouse Brain GEX"), ("xenium-3.0.0", "Xenium Mouse 5K Pan Tissue & Pathways Panel")],
)
def test_experiment_manifest_is_parsed(version: str, panel: str) -> None:
    folder = shared("spatialdata-io_experiment_xenium", version)
    experiment = read_experiment(folder)
    assert experiment.pixel_size_um == json.loads((folder / "experiment.xenium").read_text())["pixel_size"] == 0.2125
    assert experiment.note is None
    assert experiment.source == str(folder / "experiment.xenium")
    assert experiment.species == "Mus musculus"
    assert experiment.preservation_method == "Fresh Frozen"
    assert experiment.provenance()["panel_name"] == panel


def test_pixel_size_comes_from_the_manifest(sfe: Path, tmp_path: Path) -> None:
    """The real XOA 3.0.0 manifest with its pixel size edited to 0.5 um: the converter must use the file's value."""
    specs = json.loads(shared("spatialdata-io_experiment_xenium", "xenium-3.0.0", "experiment.xenium").read_text())
    specs["pixel_size"] = 0.5
    folder = folder_copy(sfe, tmp_path)
    (folder / "experiment.xenium").write_text(json.dumps(specs))
    with pytest.warns(UserWarning, match=r"the image spans x 0-118.5, y 0-118.5 um at 0.5 um/px"):
        sdata = read_xenium(folder)
    record = get_record(sdata)
    assert record.pixel_size_um == 0.5
    assert record.metadata.species == "Mus musculus"
    assert "pixel_size_note" not in record.elements["cells"].provenance.parameters
    np.testing.assert_allclose(
        get_transformation(sdata["cells"], "global").to_affine_matrix(("x", "y"), ("x", "y")), np.diag([2.0, 2.0, 1.0])
    )


def test_bad_manifest(tmp_path: Path) -> None:
    (tmp_path / "experiment.xenium").write_text('{"pixel_size": "0.2125"}')
    with pytest.raises(
        InputError, match=r"experiment.xenium: pixel_size must be a positive number of um, found '0.2125'"
    ):
        read_experiment(tmp_path)


# ----------------------------------------------------------------------------------------------- H&E alignment
#: The synthetic alignment below: H&E pixels -> Xenium um, 0.45 um/px, rotated 8 degrees, offset to the crop.
HE_PIXEL_SIZE_UM = 0.45
_ANGLE = np.deg2rad(8.0)
HE_TO_UM = np.array(
    [
        [HE_PIXEL_SIZE_UM * np.cos(_ANGLE), -HE_PIXEL_SIZE_UM * np.sin(_ANGLE), 1000.0],
        [HE_PIXEL_SIZE_UM * np.sin(_ANGLE), HE_PIXEL_SIZE_UM * np.cos(_ANGLE), 950.0],
        [0.0, 0.0, 1.0],
    ]
)


def he_tile() -> Path:
    return shared("tiatoolbox", "target_image.png")


def write_matrix(path: Path, he_to_um: np.ndarray) -> Path:
    """Xenium Explorer's convention: the matrix maps H&E pixels to Xenium pixels (um / 0.2125)."""
    np.savetxt(path, np.diag([1 / 0.2125, 1 / 0.2125, 1.0]) @ he_to_um, delimiter=",")
    return path


def write_keypoints(path: Path, he_px: np.ndarray, fixed_um: np.ndarray) -> Path:
    frame = pd.DataFrame(np.column_stack([fixed_um, he_px]), columns=["fixedX", "fixedY", "alignmentX", "alignmentY"])
    frame.to_csv(path, index=False)
    return path


def test_he_alignment_matrix_places_molecules_on_the_he(sfe: Path, tmp_path: Path) -> None:
    """Synthetic alignment: no Xenium H&E exists in the shared data, so a real H&E tile (tiatoolbox, 1000 px) is
    placed on the real SFE crop by a known affine written as Xenium Explorer's matrix. Every molecule must land
    where the inverse of that affine says, and the store must keep its frames consistent.
    """
    matrix = write_matrix(tmp_path / "he_alignment.csv", HE_TO_UM)
    sdata = read_sfe(sfe, he_image=he_tile(), alignment=matrix)
    record = get_record(sdata)
    assert record.pixel_size_um == pytest.approx(HE_PIXEL_SIZE_UM, rel=1e-12)
    assert (record.metadata.fullres_px_width, record.metadata.fullres_px_height) == (1000, 1000)
    assert record.metadata.pixel_size_um_estimated == pytest.approx(HE_PIXEL_SIZE_UM)
    assert record.elements["transcripts"].provenance.method == "xenium_explorer_matrix"

    raw = pd.read_parquet(sfe / "transcripts.parquet")
    expected = np.linalg.solve(HE_TO_UM, np.vstack([raw["x_location"], raw["y_location"], np.ones(len(raw))]))[:2].T
    placed = transform(sdata["transcripts"], to_coordinate_system="global").compute()
    placed = placed.set_index("transcript_id").loc[raw["transcript_id"]]
    np.testing.assert_allclose(placed[["x", "y"]].to_numpy(), expected, atol=1e-6)

    he_pixels = np.asarray(Image.open(he_tile()).convert("RGB"))
    np.testing.assert_array_equal(np.moveaxis(sdata["he"].values, 0, -1), he_pixels)
    assert isinstance(get_transformation(sdata["he"], "global"), Identity)
    dapi_to_global = get_transformation(sdata["dapi"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(dapi_to_global, np.linalg.inv(HE_TO_UM) @ np.diag([0.2125, 0.2125, 1.0]), atol=1e-12)
    url = hest_zarr.write(sdata, tmp_path / "aligned.zarr")
    assert hest_zarr.validate(url) == []


def test_he_as_an_array(sfe: Path, tmp_path: Path) -> None:
    """The real H&E tile passed as a (3, y, x) array with the synthetic matrix (see above)."""
    pixels = np.moveaxis(np.asarray(Image.open(he_tile()).convert("RGB")), -1, 0)
    matrix = write_matrix(tmp_path / "he_alignment.csv", HE_TO_UM)
    sdata = read_sfe(sfe, he_image=pixels, alignment=matrix)
    np.testing.assert_array_equal(sdata["he"].values, pixels)
    assert get_record(sdata).metadata.fullres_px_width == 1000
    with pytest.raises(InputError, match=r"he_image array: expected \(3, y, x\) uint8 RGB, found \(1000, 1000, 3\)"):
        read_xenium(sfe, he_image=np.moveaxis(pixels, 0, -1), alignment=matrix)


def test_keypoints_fit_the_affine_by_least_squares(tmp_path: Path) -> None:
    """Synthetic keypoints from the known affine; one fixed point moved by (2, -1) um to give a residual.

    With the moved point the fit must satisfy the least-squares normal equations (residuals orthogonal to the
    H&E coordinates and to the constant), and the recorded error must be the root-mean-square residual in um.
    """
    he_px = np.array([[0, 0], [900, 40], [120, 880], [950, 960], [500, 500]], dtype=float)
    fixed_um = (HE_TO_UM[:2, :2] @ he_px.T).T + HE_TO_UM[:2, 2]
    exact = read_alignment(write_keypoints(tmp_path / "exact.csv", he_px, fixed_um))
    np.testing.assert_allclose(exact.he_to_um, HE_TO_UM, atol=1e-9)
    assert exact.estimated_error_um == pytest.approx(0, abs=1e-6)  # CSV round-off only
    assert exact.he_pixel_size_um == pytest.approx(HE_PIXEL_SIZE_UM)

    fixed_um[3] += [2.0, -1.0]
    noisy_path = write_keypoints(tmp_path / "noisy.csv", he_px, fixed_um)
    noisy = read_alignment(noisy_path)
    written = pd.read_csv(noisy_path)
    design = np.column_stack([written[["alignmentX", "alignmentY"]], np.ones(len(written))])
    residuals = written[["fixedX", "fixedY"]].to_numpy() - design @ noisy.he_to_um[:2].T
    np.testing.assert_allclose(design.T @ residuals, 0, atol=1e-8)
    assert np.abs(residuals).max() > 0.5
    rms = float(np.sqrt(np.mean(np.sum(residuals**2, axis=1))))
    assert noisy.estimated_error_um == pytest.approx(rms, rel=1e-9)
    assert noisy.n_keypoints == 5


def test_keypoints_error_is_recorded_in_the_sample(sfe: Path, tmp_path: Path) -> None:
    """Synthetic keypoints (see above) placing the real tiatoolbox H&E tile on the real SFE crop."""
    he_px = np.array([[0, 0], [900, 40], [120, 880], [950, 960]], dtype=float)
    fixed_um = (HE_TO_UM[:2, :2] @ he_px.T).T + HE_TO_UM[:2, 2]
    fixed_um[0] += [1.5, 0.0]
    keypoints = write_keypoints(tmp_path / "keypoints.csv", he_px, fixed_um)
    error = read_alignment(keypoints).estimated_error_um
    assert error > 0.1
    record = get_record(read_sfe(sfe, he_image=he_tile(), alignment=keypoints))
    for name in ("transcripts", "cells", "nuclei", "dapi"):
        provenance = record.elements[name].provenance
        assert provenance.estimated_error_um == pytest.approx(error)
        assert provenance.method == "keypoints_least_squares_affine"
        assert provenance.parameters["n_keypoints"] == 4
    assert record.elements["he"].provenance.estimated_error_um is None


# ----------------------------------------------------------------------------------------------- bad input
def test_truncated_transcripts_parquet(sfe: Path, tmp_path: Path) -> None:
    folder = folder_copy(sfe, tmp_path, skip=("transcripts.parquet",))
    data = (sfe / "transcripts.parquet").read_bytes()
    (folder / "transcripts.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"transcripts.parquet: not a readable parquet file"):
        read_xenium(folder)


def test_alignment_matrix_that_is_not_3x3(sfe: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad_alignment.csv"
    np.savetxt(bad, np.eye(3)[:2], delimiter=",")
    with pytest.raises(InputError, match=r"bad_alignment.csv: expected a 3x3 alignment matrix, found shape \(2, 3\)"):
        read_xenium(sfe, he_image=he_tile(), alignment=bad)


def test_keypoints_fewer_than_three(tmp_path: Path) -> None:
    path = write_keypoints(tmp_path / "two.csv", np.array([[0.0, 0.0], [10.0, 5.0]]), np.array([[1.0, 2.0], [9, 4]]))
    with pytest.raises(InputError, match=r"two.csv: found 2 keypoints, need at least 3"):
        read_alignment(path)


def test_collinear_keypoints(tmp_path: Path) -> None:
    he_px = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    path = write_keypoints(tmp_path / "line.csv", he_px, he_px * 0.5)
    with pytest.raises(InputError, match=r"line.csv: the 3 H&E keypoints lie on one line"):
        read_alignment(path)


def test_inverted_matrix_puts_no_cell_on_the_he(sfe: Path, tmp_path: Path) -> None:
    """Synthetic: the known matrix written the wrong way round (Xenium pixels -> H&E pixels)."""
    inverted = tmp_path / "inverted.csv"
    np.savetxt(inverted, np.linalg.inv(np.diag([1 / 0.2125, 1 / 0.2125, 1.0]) @ HE_TO_UM), delimiter=",")
    with pytest.raises(InputError, match=r"inverted.csv: the alignment places all 526 cells outside the H&E image"):
        read_sfe(sfe, he_image=he_tile(), alignment=inverted)


def test_he_needs_its_alignment(sfe: Path) -> None:
    with pytest.raises(InputError, match=r"he_image given without alignment"):
        read_xenium(sfe, he_image=he_tile())


def test_frame_without_he_is_the_morphology_image() -> None:
    frame = XeniumFrame.morphology(0.2125)
    np.testing.assert_allclose(frame.to_global(np.array([[212.5, 425.0]])), [[1000.0, 2000.0]])
    assert isinstance(frame.micrometre_transformations()["um"], Identity)


# ----------------------------------------------------------------------------------------------- cells.zarr.zip
#: The SFE crop has no cells.zarr.zip: the tests below build one from its real cell and nucleus polygons, rasterised
#: at Xenium's 0.2125 um/px over the whole morphology frame (from the origin, as XOA writes the masks), in the layout
#: 10x documents ("Overview of Xenium Zarr Output Files"): a zarr v2 store zipped, masks/0 nuclei, masks/1 cells,
#: cell_id as (prefix, suffix) uint32 pairs, polygon_sets/<mask>/cell_index (XOA >= 2) or seg_mask_value (XOA 1.3).
XENIUM_PIXEL_UM = 0.2125


def encode_cell_ids(ids: list[str]) -> np.ndarray:
    """Xenium's (prefix, suffix) uint32 pairs of ``aaaaaaaa-1``-style ids: eight letters a-p, one hex digit each."""
    prefix = [int("".join(f"{ord(letter) - ord('a'):x}" for letter in text.split("-")[0]), 16) for text in ids]
    suffix = [int(text.split("-")[1]) for text in ids]
    return np.column_stack([prefix, suffix]).astype(np.uint32)


def rasterise(vertices: pd.DataFrame, order: list[str], shape: tuple[int, int]) -> np.ndarray:
    """Label image of the polygons of ``order`` (value k + 1 for the k-th), pixel centres inside the polygon."""
    from skimage.draw import polygon as filled

    raster = np.zeros(shape, dtype=np.uint32)
    groups = vertices.groupby("cell_id", sort=False)
    for value, cell_id in enumerate(order, start=1):
        ring = groups.get_group(cell_id)
        rows, cols = filled(
            ring["vertex_y"].to_numpy() / XENIUM_PIXEL_UM - 0.5, ring["vertex_x"].to_numpy() / XENIUM_PIXEL_UM - 0.5
        )
        raster[rows, cols] = value
    return raster


@pytest.fixture(scope="module")
def sfe_masks() -> dict:
    """The real SFE polygons rasterised: cells in cells.parquet order, nuclei in a shuffled order (as polygon_sets
    allows), with the cell row of every nucleus polygon."""
    folder = shared("SFE", "xenium")
    cell_ids = pd.read_parquet(folder / "cells.parquet")["cell_id"].tolist()
    cells = raw_boundaries(folder / "cell_boundaries.parquet")
    nuclei = raw_boundaries(folder / "nucleus_boundaries.parquet")
    shape = (
        int(np.ceil(max(cells["vertex_y"].max(), nuclei["vertex_y"].max()) / XENIUM_PIXEL_UM)) + 8,
        int(np.ceil(max(cells["vertex_x"].max(), nuclei["vertex_x"].max()) / XENIUM_PIXEL_UM)) + 8,
    )
    nucleus_index = np.random.default_rng(3).permutation(len(cell_ids))
    return {
        "cell_ids": cell_ids,
        "cells": rasterise(cells, cell_ids, shape),
        "nuclei": rasterise(nuclei, [cell_ids[i] for i in nucleus_index], shape),
        "nucleus_index": nucleus_index,
    }


def write_cells_zarr(path: Path, masks: dict, *, layout: str = "polygon_sets", skip: tuple[str, ...] = ()) -> Path:
    """Write ``masks`` as a zipped zarr v2 store in the cells.zarr.zip layout (``skip``: arrays to leave out)."""
    import zipfile

    import zarr

    folder = path.with_suffix(".dir")
    root = zarr.open_group(zarr.storage.LocalStore(folder), mode="w", zarr_format=2)
    arrays = {"cell_id": encode_cell_ids(masks["cell_ids"])}
    if layout == "polygon_sets":
        arrays |= {
            "masks/0": masks["nuclei"],
            "masks/1": masks["cells"],
            "polygon_sets/0/cell_index": masks["nucleus_index"].astype(np.uint32),
            "polygon_sets/1/cell_index": np.arange(len(masks["cell_ids"]), dtype=np.uint32),
        }
    else:  # XOA 1.3: one value per cell, shared by its nucleus
        values = np.arange(len(masks["cell_ids"]), dtype=np.uint32) * 3 + 5
        nucleus_values = np.r_[0, values[masks["nucleus_index"]]].astype(np.uint32)
        arrays |= {
            "masks/0": nucleus_values[masks["nuclei"]],
            "masks/1": np.r_[0, values].astype(np.uint32)[masks["cells"]],
            "seg_mask_value": values,
        }
    arrays["masks/homogeneous_transform"] = np.diag([1 / XENIUM_PIXEL_UM, 1 / XENIUM_PIXEL_UM, 1, 1]).astype("f4")
    for key, data in arrays.items():
        if key not in skip:
            root.create_array(key, data=data, chunks=(1024, 1024) if key.startswith("masks/") else "auto")
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, file.relative_to(folder).as_posix())
    return path


def label_centres(raster: np.ndarray, transformation) -> pd.DataFrame:
    """Centroid of every label region, by label value, placed by ``transformation`` (from label pixels)."""
    rows, cols = np.nonzero(raster)
    values = raster[rows, cols]
    frame = pd.DataFrame({"label": values, "x": cols + 0.5, "y": rows + 0.5}).groupby("label").mean()
    matrix = transformation.to_affine_matrix(("x", "y"), ("x", "y"))
    xy = frame[["x", "y"]].to_numpy() @ matrix[:2, :2].T + matrix[:2, 2]
    return pd.DataFrame(xy, index=frame.index, columns=["x", "y"])


@pytest.mark.parametrize("layout", ["polygon_sets", "seg_mask_value"])
def test_cells_zarr_labels_map_to_their_cells(sfe: Path, sfe_masks: dict, tmp_path: Path, layout: str) -> None:
    folder = folder_copy(sfe, tmp_path)
    write_cells_zarr(folder / "cells.zarr.zip", sfe_masks, layout=layout)
    sdata = read_sfe(folder)
    cells, nuclei = sdata["cells"], sdata["nuclei"]
    mapping = sdata["label_cell_ids"].obs
    assert sdata["label_cell_ids"].uns["spatialdata_attrs"]["instance_key"] == "label"
    for name, polygons in (("cell_labels", cells), ("nucleus_labels", nuclei)):
        raster = sdata[name].values
        assert raster.dtype == np.uint32 and raster.shape == sfe_masks["cells"].shape
        rows = mapping[mapping["region"] == name].set_index("label")
        present = np.unique(raster[raster > 0])
        assert len(present) == len(rows) == SFE_CELLS
        assert set(present) == set(rows.index)
        centres = label_centres(raster, get_transformation(sdata[name], "um"))
        owners = polygons.loc[rows.loc[centres.index, "cell_id"]].geometry.to_numpy()
        inside = shapely.contains_xy(owners, centres["x"].to_numpy(), centres["y"].to_numpy())
        assert inside.all(), f"{name}: {int((~inside).sum())} label centroids outside their cell's polygon"
    # the label table joins cell_expression by cell id
    assert set(mapping["cell_id"]) == set(sdata["cell_expression"].obs["spot_id"])
    provenance = get_record(sdata).elements["cell_labels"].provenance
    assert provenance.parameters["cells_zarr_layout"] == layout
    assert provenance.inputs[0].endswith("cells.zarr.zip")
    np.testing.assert_allclose(provenance.parameters["homogeneous_transform"][0][0], 1 / XENIUM_PIXEL_UM, rtol=1e-6)


def test_labels_are_written_lossless_with_a_nearest_pyramid(sfe: Path, sfe_masks: dict, tmp_path: Path) -> None:
    """Without the morphology images (no uint16 DAPI), the store is written with the JPEG image codec: the labels
    must still be stored with zstd, value for value, and their pyramid must subsample, never average."""
    import zarr

    folder = folder_copy(sfe, tmp_path, skip=("morphology_focus.ome.tif", "morphology_mip.ome.tif"))
    write_cells_zarr(folder / "cells.zarr.zip", sfe_masks)
    url = hest_zarr.write(read_xenium(folder), tmp_path / "sample.zarr", image_codec="jpeg")
    assert hest_zarr.validate(url) == []
    reopened = hest_zarr.open(url)
    for name, expected in (("cell_labels", sfe_masks["cells"]), ("nucleus_labels", sfe_masks["nuclei"])):
        tree = reopened[name]
        np.testing.assert_array_equal(tree["scale0"]["image"].values, expected)
        np.testing.assert_array_equal(
            tree["scale1"]["image"].values,
            expected[0 : expected.shape[0] // 2 * 2 : 2, 0 : expected.shape[1] // 2 * 2 : 2],
        )
        to_um = get_transformation(tree, "um").to_affine_matrix(("x", "y"), ("x", "y"))
        np.testing.assert_allclose(to_um, np.diag([XENIUM_PIXEL_UM, XENIUM_PIXEL_UM, 1.0]), rtol=1e-12)
        array = zarr.open_group(str(tmp_path / "sample.zarr"), mode="r")[f"labels/{name}/s0"]
        assert [codec["name"] for codec in array.metadata.to_dict()["codecs"]] == ["bytes", "zstd", "crc32c"]
    table = reopened["label_cell_ids"]
    assert table.n_obs == 2 * SFE_CELLS
    assert zarr.open_group(str(tmp_path / "sample.zarr"), mode="r")["labels"].attrs["ome"]["labels"] == [
        "cell_labels",
        "nucleus_labels",
    ]


def test_labels_follow_the_he_alignment(sfe: Path, sfe_masks: dict, tmp_path: Path) -> None:
    """With the synthetic H&E alignment above, every cell label lands in ``global`` (H&E pixels) on its cell polygon,
    each placed by its own transformation."""
    folder = folder_copy(sfe, tmp_path)
    write_cells_zarr(folder / "cells.zarr.zip", sfe_masks)
    sdata = read_sfe(folder, he_image=he_tile(), alignment=write_matrix(tmp_path / "he_alignment.csv", HE_TO_UM))
    assert get_record(sdata).elements["cell_labels"].provenance.method == "xenium_explorer_matrix"
    mapping = sdata["label_cell_ids"].obs.query("region == 'cell_labels'").set_index("label")
    centres = label_centres(sdata["cell_labels"].values, get_transformation(sdata["cell_labels"], "global"))
    polygons = transform(sdata["cells"], to_coordinate_system="global").loc[mapping.loc[centres.index, "cell_id"]]
    inside = shapely.contains_xy(polygons.geometry.to_numpy(), centres["x"].to_numpy(), centres["y"].to_numpy())
    assert inside.all()


def test_truncated_cells_zarr_zip(sfe: Path, sfe_masks: dict, tmp_path: Path) -> None:
    folder = folder_copy(sfe, tmp_path)
    data = write_cells_zarr(tmp_path / "whole.zarr.zip", sfe_masks).read_bytes()
    (folder / "cells.zarr.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cells.zarr.zip: not a readable zipped zarr store \(truncated"):
        read_xenium(folder)


def test_cells_zarr_without_the_cell_mask(sfe: Path, sfe_masks: dict, tmp_path: Path) -> None:
    folder = folder_copy(sfe, tmp_path)
    write_cells_zarr(folder / "cells.zarr.zip", sfe_masks, skip=("masks/1",))
    with pytest.raises(InputError, match=r"cells.zarr.zip: no 'masks/1' array \(expected the cell label raster\)"):
        read_xenium(folder)


def test_labels_can_be_left_out(sfe: Path, sfe_masks: dict, tmp_path: Path) -> None:
    folder = folder_copy(sfe, tmp_path)
    write_cells_zarr(folder / "cells.zarr.zip", sfe_masks)
    sdata = read_sfe(folder, labels=False)
    assert not sdata.labels and "label_cell_ids" not in sdata.tables


def test_cell_ids_decode_as_xenium_writes_them() -> None:
    """The real SFE ids, encoded as (prefix, suffix) pairs, decode back; integer ids (XOA < 1.3) stay decimal."""
    ids = pd.read_parquet(shared("SFE", "xenium", "cells.parquet"))["cell_id"].tolist()
    assert decode_cell_ids(encode_cell_ids(ids)).tolist() == ids
    assert decode_cell_ids(np.array([[7], [12]], dtype=np.uint32)).tolist() == ["7", "12"]


# ----------------------------------------------------------------------------------------------- Xenium Protein
#: The SFE matrix has no protein rows: the tests below append three protein features with synthetic values to a copy
#: of the real cell_feature_matrix.h5, stored as Xenium Protein stores them (feature_type "Protein Expression",
#: integers = intensity x protein_scaling_factor, the factor an attribute of the file's root).
PROTEINS = ["CD45", "PanCK", "Vimentin"]


def write_protein_matrix(source: Path, target: Path, *, scaling_factor: float | None) -> np.ndarray:
    """Copy the real h5 and append the protein rows; return the stored (integer) protein values, cells x proteins."""
    import h5py
    from scipy import sparse

    with h5py.File(source, "r") as h5:
        group = h5["matrix"]
        n_features, n_cells = group["shape"][:]
        matrix = sparse.csc_matrix((group["data"][:], group["indices"][:], group["indptr"][:]), (n_features, n_cells))
        features = {key: group["features"][key][:] for key in ("id", "name", "feature_type", "genome")}
        barcodes, tag_keys, attributes = group["barcodes"][:], group["features"]["_all_tag_keys"][:], dict(h5.attrs)
    stored = np.random.default_rng(5).integers(0, 4000, size=(n_cells, len(PROTEINS))).astype(np.float64)
    stored[::7, 1] = 0  # some cells without signal
    combined = sparse.vstack([matrix, sparse.csc_matrix(stored.T)]).tocsc()
    features["id"] = np.r_[features["id"], [f"protein_{p}".encode() for p in PROTEINS]]
    features["name"] = np.r_[features["name"], [p.encode() for p in PROTEINS]]
    features["feature_type"] = np.r_[features["feature_type"], [b"Protein Expression"] * len(PROTEINS)]
    features["genome"] = np.r_[features["genome"], [b"unknown"] * len(PROTEINS)]
    with h5py.File(target, "w") as h5:
        h5.attrs.update(attributes)
        if scaling_factor is not None:
            h5.attrs["protein_scaling_factor"] = scaling_factor
        group = h5.create_group("matrix")
        group["data"], group["indices"], group["indptr"] = combined.data, combined.indices, combined.indptr
        group["shape"] = np.array(combined.shape, dtype=np.int32)
        group["barcodes"] = barcodes
        feature_group = group.create_group("features")
        for key, values in features.items():
            feature_group[key] = values
        feature_group["_all_tag_keys"] = tag_keys
    return stored


def test_protein_features_go_to_their_own_scaled_table(sfe: Path, tmp_path: Path) -> None:
    folder = folder_copy(sfe, tmp_path, skip=("cell_feature_matrix.h5",))
    stored = write_protein_matrix(
        sfe / "cell_feature_matrix.h5", folder / "cell_feature_matrix.h5", scaling_factor=10.0
    )
    sdata = read_sfe(folder)
    reference = sc.read_10x_h5(sfe / "cell_feature_matrix.h5", gex_only=False)
    genes = sdata["cell_expression"]
    assert genes.var_names.tolist() == reference.var_names.tolist()
    assert (genes.X != reference.X).nnz == 0 and genes.X.dtype == np.int32
    protein = sdata["cell_protein"]
    assert protein.var_names.tolist() == PROTEINS
    assert (protein.var["feature_types"] == "Protein Expression").all()
    assert protein.obs["spot_id"].tolist() == reference.obs_names.tolist()
    assert protein.X.dtype == np.float32
    np.testing.assert_array_equal(protein.X.toarray(), (stored / 10.0).astype(np.float32))
    assert protein.uns["protein_scaling_factor"] == 10.0
    record = get_record(sdata)
    assert record.metadata.nb_genes == 27
    assert record.elements["cell_protein"].provenance.parameters["protein_scaling_factor"] == 10.0
    url = hest_zarr.write(sdata, tmp_path / "sample.zarr")
    assert hest_zarr.validate(url) == []
    np.testing.assert_array_equal(hest_zarr.open(url)["cell_protein"].X.toarray(), protein.X.toarray())


def test_protein_without_scaling_factor_is_kept_as_stored(sfe: Path, tmp_path: Path) -> None:
    folder = folder_copy(sfe, tmp_path, skip=("cell_feature_matrix.h5",))
    stored = write_protein_matrix(
        sfe / "cell_feature_matrix.h5", folder / "cell_feature_matrix.h5", scaling_factor=None
    )
    with pytest.warns(UserWarning, match=r"cell_feature_matrix.h5: 3 protein features but no protein_scaling_factor"):
        sdata = read_sfe(folder)
    np.testing.assert_array_equal(sdata["cell_protein"].X.toarray(), stored)
    assert "protein_scaling_factor" not in sdata["cell_protein"].uns
    assert get_record(sdata).elements["cell_protein"].provenance.parameters["protein_values"] == "as stored"


# ----------------------------------------------------------------------------------------------- minimal bundle
XENIUM_SMALL_CELLS = ["1", "2", "3", "4", "5", "6"]


@pytest.fixture
def xenium_small() -> Path:
    """The real SpatialExperimentIO Xenium_small export: cell_feature_matrix.h5 (written by R's rhdf5, float
    shape/indptr/indices/data) and cells.csv.gz; no transcripts, boundaries or images."""
    return shared("SpatialExperimentIO", "Xenium_small")


def h5_arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as h5:
        return {key: h5[f"matrix/{key}"][()] for key in ("data", "indices", "indptr", "shape", "barcodes")} | {
            "names": h5["matrix/features/name"][()]
        }


def test_xenium_small_counts_equal_the_h5(xenium_small: Path) -> None:
    """Every one of the 15 stored values of the features x barcodes CSC lands in its (barcode, feature) cell."""
    raw = h5_arrays(xenium_small / "cell_feature_matrix.h5")
    assert raw["indices"].dtype == raw["indptr"].dtype == raw["shape"].dtype == np.float64
    assert raw["shape"].tolist() == [4.0, 6.0] and len(raw["indptr"]) == 7 and len(raw["data"]) == 15
    expected = np.zeros((6, 4), dtype=np.int64)  # barcodes x features
    stored = []
    for barcode in range(6):
        for k in range(int(raw["indptr"][barcode]), int(raw["indptr"][barcode + 1])):
            expected[barcode, int(raw["indices"][k])] = int(raw["data"][k])
            stored.append((barcode, int(raw["indices"][k]), int(raw["data"][k])))
    assert len(stored) == 15 and sum(value == 0 for *_, value in stored) == 3  # three explicit zeros

    sdata = read_xenium(xenium_small)
    table = sdata["cell_expression"]
    assert table.shape == (6, 4)
    assert table.X.dtype == np.int32
    np.testing.assert_array_equal(table.X.toarray(), expected)
    assert [int(table.X[barcode, feature]) for barcode, feature, _ in stored] == [value for *_, value in stored]
    assert int(table.X.sum()) == int(raw["data"].sum()) == 21
    assert table.var_names.tolist() == [name.decode() for name in raw["names"]] == ["ABCC11", "ACTA2", "ACTG2", "ADAM9"]
    assert table.var["gene_ids"].tolist()[0] == "ENSG00000121270"
    assert not table.var["is_control"].any()
    cells_csv = pd.read_csv(xenium_small / "cells.csv.gz")
    barcodes = [barcode.decode() for barcode in raw["barcodes"]]
    assert table.obs["spot_id"].tolist() == barcodes == cells_csv["cell_id"].astype(str).tolist() == XENIUM_SMALL_CELLS
    np.testing.assert_array_equal(table.obs["transcript_counts"], cells_csv["transcript_counts"])
    assert get_record(sdata).metadata.nb_genes == 4


def test_xenium_small_readers(xenium_small: Path) -> None:
    """The cell summary drops R's row-number column; the R-written matrix reads with float arrays made integers."""
    cells = read_cells(xenium_small / "cells.csv.gz")
    raw = pd.read_csv(xenium_small / "cells.csv.gz")
    assert cells.index.tolist() == raw["cell_id"].astype(str).tolist() == XENIUM_SMALL_CELLS
    assert cells["transcript_counts"].tolist() == raw["transcript_counts"].tolist()
    assert not any(c.startswith("Unnamed") for c in cells.columns)
    counts = read_cell_feature_matrix(xenium_small / "cell_feature_matrix.h5")
    assert counts.shape == (6, 4) and counts.X.dtype == np.int32
    assert counts.obs_names.tolist() == XENIUM_SMALL_CELLS
    assert counts.var["feature_types"].unique().tolist() == ["Gene Expression"]
    assert counts.var["genome"].unique().tolist() == ["Unknown"]


def test_xenium_small_cells_are_circles_at_the_centroids(xenium_small: Path) -> None:
    sdata = read_xenium(xenium_small)
    assert set(sdata.shapes) == {"cells"} and not sdata.points and not sdata.images
    cells = sdata["cells"]
    cells_csv = pd.read_csv(xenium_small / "cells.csv.gz")
    assert cells.index.tolist() == cells_csv["cell_id"].astype(str).tolist() == XENIUM_SMALL_CELLS
    np.testing.assert_array_equal(cells.geometry.x, cells_csv["x_centroid"])
    np.testing.assert_array_equal(cells.geometry.y, cells_csv["y_centroid"])
    np.testing.assert_allclose(np.pi * cells["radius"] ** 2, cells_csv["cell_area"], rtol=1e-12)
    assert cells["radius"].round(4).tolist() == [9.8566, 7.4977, 9.1659, 11.6695, 11.6256, 11.5195]
    transformations = get_transformation(cells, get_all=True)
    assert isinstance(transformations["um"], Identity)
    global_xy = transform(cells, to_coordinate_system="global").geometry
    np.testing.assert_allclose(global_xy.x, cells_csv["x_centroid"] / 0.2125)
    provenance = get_record(sdata).elements["cells"].provenance
    assert provenance.method == "centroid_circles"
    assert provenance.inputs == [str(xenium_small / "cells.csv.gz")]
    assert "sqrt(cell_area / pi)" in provenance.parameters["cell_geometry"]
    absent = get_record(sdata).elements["cell_expression"].provenance.parameters["absent_inputs"]
    assert [entry.split(" (")[0] for entry in absent] == [
        "transcripts",
        "cell boundaries",
        "nucleus boundaries",
        "morphology image",
    ]


def test_full_bundle_records_no_absent_inputs(sfe: Path) -> None:
    record = get_record(read_sfe(sfe))
    assert record.elements["cells"].provenance.method is None
    assert all("absent_inputs" not in element.provenance.parameters for element in record.elements.values())


def test_convert_auto_detects_the_minimal_bundle(xenium_small: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hest_zarr.cli import app
    from hest_zarr.converters import detect_technology

    assert detect_technology(xenium_small) == "xenium"
    out = tmp_path / "xenium_small.zarr"
    result = CliRunner().invoke(app, ["convert", str(xenium_small), str(out)])
    assert result.exit_code == 0, result.output
    assert hest_zarr.validate(str(out)) == []
    reopened = hest_zarr.open(str(out))
    assert reopened["cell_expression"].shape == (6, 4)
    assert int(reopened["cell_expression"].X.sum()) == 21
    assert reopened["cells"].index.tolist() == XENIUM_SMALL_CELLS
    assert get_record(reopened).metadata.st_technology == "Xenium"


def small_copy(xenium_small: Path, tmp_path: Path) -> Path:
    """A writable copy of Xenium_small (the h5 copied, the cell summary linked)."""
    folder = folder_copy(xenium_small, tmp_path, skip=("cell_feature_matrix.h5",))
    (folder / "cell_feature_matrix.h5").write_bytes((xenium_small / "cell_feature_matrix.h5").read_bytes())
    return folder


def test_truncated_xenium_small_h5(xenium_small: Path, tmp_path: Path) -> None:
    folder = small_copy(xenium_small, tmp_path)
    h5 = folder / "cell_feature_matrix.h5"
    h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
    with pytest.raises(
        InputError,
        match=r"cell_feature_matrix.h5: not a readable 10x feature-barcode matrix \(not a readable HDF5 file",
    ):
        read_xenium(folder)


@pytest.mark.parametrize(
    ("key", "position", "value"),
    [("matrix/indices", 2, 2.5), ("matrix/indptr", 3, 7.25), ("matrix/data", 0, 1.5), ("matrix/shape", 0, 4.000001)],
)
def test_non_integral_h5_value(xenium_small: Path, tmp_path: Path, key: str, position: int, value: float) -> None:
    """The real file with one value made fractional in the test (synthetic damage)."""
    folder = small_copy(xenium_small, tmp_path)
    with h5py.File(folder / "cell_feature_matrix.h5", "r+") as h5:
        h5[key][position] = value
    with pytest.raises(
        InputError,
        match=rf"cell_feature_matrix.h5: .*'{key}' must hold integers, found {value} at position {position}",
    ):
        read_xenium(folder)


def test_shape_that_does_not_fit_the_arrays(xenium_small: Path, tmp_path: Path) -> None:
    """``matrix/shape`` swapped to barcodes x features (in the test): indptr no longer has n_barcodes + 1 entries."""
    folder = small_copy(xenium_small, tmp_path)
    with h5py.File(folder / "cell_feature_matrix.h5", "r+") as h5:
        h5["matrix/shape"][:] = [6.0, 4.0]
    with pytest.raises(
        InputError, match=r"cell_feature_matrix.h5: .*'matrix/indptr' must rise from 0 to the 15 values"
    ):
        read_xenium(folder)


def test_summary_without_cell_area(xenium_small: Path, tmp_path: Path) -> None:
    folder = folder_copy(xenium_small, tmp_path, skip=("cells.csv.gz",))
    pd.read_csv(xenium_small / "cells.csv.gz").drop(columns="cell_area").to_csv(folder / "cells.csv.gz", index=False)
    with pytest.raises(InputError, match=r"cells.csv.gz: missing column\(s\) \['cell_area'\]"):
        read_xenium(folder)


def test_matrix_without_cells(xenium_small: Path, tmp_path: Path) -> None:
    folder = folder_copy(xenium_small, tmp_path, skip=("cells.csv.gz",))
    with pytest.raises(InputError, match=r"no cell boundaries nor cell summary found"):
        read_xenium(folder)
