"""HEST-1k layout: import a released-style sample, export a store back, and round-trip between them.

No HEST-1k sample is available offline, so the released-style folder is built in the test from real data
(the ST v1 section MOB1: its H&E JPG, count table and spot-detector alignment table), laid out as the
HEST-1k dataset card describes; the tissue contour is a synthetic polygon around the selected spots.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import anndata
import geopandas
import numpy as np
import pandas as pd
import pytest
import shapely
import tifffile
from PIL import Image
from shapely import MultiPoint
from spatialdata import transform
from xarray import DataArray, DataTree

import hest_zarr
from hest_zarr.converters.hest import export_hest, read_hest, write_pyramidal_tiff
from hest_zarr.converters.slides import slide_image
from hest_zarr.converters.visium import read_visium
from hest_zarr.errors import InputError
from tests.conftest import shared


def level0(image: DataArray | DataTree) -> np.ndarray:
    return (image["scale0"]["image"] if isinstance(image, DataTree) else image).values


@pytest.fixture
def mob1_hest(tmp_path: Path) -> tuple[Path, pd.DataFrame, pd.DataFrame, float]:
    counts = pd.read_csv(shared("STUtility_ST_v1", "MOB1.tsv"), sep="\t", index_col=0)
    alignment = pd.read_csv(shared("STUtility_ST_v1", "alignment_table_MOB1.tsv"), sep="\t")
    alignment.index = [f"{x}x{y}" for x, y in zip(alignment["x"], alignment["y"], strict=True)]
    counts = counts.loc[counts.index.isin(alignment.index)]
    positions = alignment.loc[counts.index]
    # MOB uses the ST "2k" array: one array unit is 100 um; pixels per unit from the alignment table itself
    step_px = np.median(np.diff(np.sort(alignment.groupby("x")["pixel_x"].mean().to_numpy())))
    pixel_size = 100.0 / step_px
    root = tmp_path / "hest"
    pixels = np.asarray(Image.open(shared("STUtility_ST_v1", "MOB1.jpg")).convert("RGB")).transpose(2, 0, 1)
    write_pyramidal_tiff([pixels], root / "wsis" / "MOB1.tif", pixel_size_um=pixel_size * 10, jpeg_quality=None)
    obs = pd.DataFrame(
        {
            "pxl_col_in_fullres": positions["pixel_x"].to_numpy(),
            "pxl_row_in_fullres": positions["pixel_y"].to_numpy(),
            "array_col": positions["x"].to_numpy(),
            "array_row": positions["y"].to_numpy(),
            "in_tissue": positions["selected"].to_numpy(),
        },
        index=counts.index,
    )
    (root / "st").mkdir()
    anndata.AnnData(X=counts.to_numpy(dtype=np.float32), obs=obs, var=pd.DataFrame(index=counts.columns)).write_h5ad(
        root / "st" / "MOB1.h5ad"
    )
    (root / "metadata").mkdir()
    metadata = {
        "id": "MOB1",
        "st_technology": "Spatial Transcriptomics",
        "species": "Mus musculus",
        "spot_diameter": 100.0,
        "inter_spot_dist": 200.0,
        "pixel_size_um_estimated": pixel_size,
        "pixel_size_um_embedded": pixel_size * 10,
        "dataset_title": "Mouse olfactory bulb (STUtility example)",
        "some_future_key": 1,
    }
    (root / "metadata" / "MOB1.json").write_text(json.dumps(metadata))
    selected = positions[positions["selected"] == 1]
    hull = MultiPoint(selected[["pixel_x", "pixel_y"]].to_numpy()).convex_hull
    (root / "tissue_seg").mkdir()
    geopandas.GeoDataFrame({"tissue_id": [0]}, geometry=[hull]).to_file(root / "tissue_seg" / "MOB1_contours.geojson")
    return root, counts, positions, pixel_size


def test_import_released_layout(mob1_hest) -> None:
    root, counts, positions, pixel_size = mob1_hest
    sdata = read_hest(root, "MOB1")
    table = sdata["spot_expression"]
    assert table.shape == counts.shape
    assert (table.X.toarray() == counts.to_numpy()).all()
    spots = sdata["spots"].loc[counts.index]
    np.testing.assert_array_equal(spots.geometry.x, positions["pixel_x"])
    np.testing.assert_array_equal(spots.geometry.y, positions["pixel_y"])
    np.testing.assert_allclose(spots["radius"], 50.0 / pixel_size)
    record = hest_zarr.get_record(sdata)
    assert record.pixel_size_um == pytest.approx(pixel_size)  # the metadata's, not the 10x-off TIFF tag
    assert record.metadata.dataset_title.startswith("Mouse olfactory bulb")
    assert record.elements["spots"].provenance.parameters["unused_metadata_keys"] == ["some_future_key"]
    jpg = np.asarray(Image.open(shared("STUtility_ST_v1", "MOB1.jpg")).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(level0(sdata["he"]), jpg)
    assert sdata["tissue"].geometry.iloc[0].contains(spots.geometry[positions["selected"].to_numpy() == 1]).sum() > 0


def test_store_exports_to_hest_and_imports_back(perik_visium: Path, tmp_path: Path) -> None:
    url = hest_zarr.write(read_visium(perik_visium, sample_id="PERIK"), tmp_path / "perik.zarr")
    original = hest_zarr.open(url)
    written = export_hest(original, tmp_path / "hest", jpeg_quality=None)
    assert sorted(written) == ["metadata", "st", "wsi"]
    exported_pixel_size = json.loads(written["metadata"].read_text())["pixel_size_um_estimated"]
    assert exported_pixel_size == pytest.approx(hest_zarr.get_record(original).pixel_size_um / 0.2)  # lowres
    assert slide_image(written["wsi"]).pixel_size_um == pytest.approx(exported_pixel_size, rel=1e-6)

    back = read_hest(tmp_path / "hest", "PERIK")
    assert (back["spot_expression"].X != original["spot_expression"].X).nnz == 0
    ids = original["spot_expression"].obs_names
    original_um = np.column_stack([original["spots"].loc[ids].geometry.x, original["spots"].loc[ids].geometry.y])
    original_um *= hest_zarr.get_record(original).pixel_size_um
    back_um = (
        np.column_stack([back["spots"].loc[ids].geometry.x, back["spots"].loc[ids].geometry.y]) * exported_pixel_size
    )
    np.testing.assert_allclose(back_um, original_um, rtol=1e-9)
    np.testing.assert_array_equal(level0(back["he"]), level0(original["he"]))
    with tifffile.TiffFile(written["wsi"]) as tif:
        assert tif.pages[0].tags["ResolutionUnit"].value == 3  # centimetre, as the tag values are px/cm


def test_an_in_memory_sample_exports_as_its_store_does(perik_visium: Path, tmp_path: Path) -> None:
    """The converter's output, never written, exports the same files as the store written from it."""
    sdata = read_visium(perik_visium, sample_id="PERIK")
    url = hest_zarr.write(sdata, tmp_path / "perik.zarr")
    from_memory = export_hest(sdata, tmp_path / "memory", jpeg_quality=None)
    from_store = export_hest(hest_zarr.open(url), tmp_path / "store", jpeg_quality=None)
    assert sorted(from_memory) == sorted(from_store) == ["metadata", "st", "wsi"]
    memory_st, store_st = anndata.read_h5ad(from_memory["st"]), anndata.read_h5ad(from_store["st"])
    pd.testing.assert_frame_equal(memory_st.obs, store_st.obs)
    assert (memory_st.X != store_st.X).nnz == 0 and memory_st.shape == (2898, store_st.shape[1])
    assert json.loads(from_memory["metadata"].read_text()) == json.loads(from_store["metadata"].read_text())
    np.testing.assert_array_equal(tifffile.imread(from_memory["wsi"]), tifffile.imread(from_store["wsi"]))


def test_bad_hest_folders(mob1_hest, tmp_path: Path) -> None:
    root, *_ = mob1_hest
    with pytest.raises(InputError, match=r"metadata/MOB2.json: no such file"):
        read_hest(root, "MOB2")
    (root / "st" / "MOB1.h5ad").rename(root / "st" / "other.h5ad")
    with pytest.raises(InputError, match=r"st/MOB1.h5ad: no such file"):
        read_hest(root, "MOB1")
    anndata.AnnData(X=np.zeros((2, 2), dtype=np.float32)).write_h5ad(root / "st" / "MOB1.h5ad")
    with pytest.raises(InputError, match=r"obs lacks \['pxl_col_in_fullres', 'pxl_row_in_fullres'\]"):
        read_hest(root, "MOB1")


def test_zipped_cellvit_nuclei_are_imported_without_leaving_files(mob1_hest) -> None:
    """HEST ships CellViT nuclei as ``ID_cellvit_seg.geojson.zip``; the CellViT-style content is synthetic:
    two nuclei drawn around real MOB1 spot positions (no CellViT output exists offline)."""
    import zipfile

    root, _, positions, _ = mob1_hest
    (x0, y0), (x1, y1) = positions[["pixel_x", "pixel_y"]].to_numpy()[:2]
    square = lambda x, y: [[[x - 5, y - 5], [x + 5, y - 5], [x + 5, y + 5], [x - 5, y + 5], [x - 5, y - 5]]]  # noqa: E731
    feature = {
        "type": "Feature",
        "geometry": {"type": "MultiPolygon", "coordinates": [square(x0, y0), square(x1, y1)]},
        "properties": {"classification": {"name": "Neoplastic", "color": [255, 0, 0]}},
    }
    (root / "cellvit_seg").mkdir()
    archive_path = root / "cellvit_seg" / "MOB1_cellvit_seg.geojson.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("MOB1_cellvit_seg.geojson", json.dumps([feature]))
    nuclei = read_hest(root, "MOB1")["nuclei"]
    assert len(nuclei) == 2 and set(nuclei["class"]) == {"Neoplastic"}
    np.testing.assert_allclose(nuclei.geometry.centroid.x.sort_values(), sorted([x0, x1]))
    assert sorted(p.name for p in archive_path.parent.iterdir()) == [archive_path.name]


# ----------------------------------------------------------------------------------------------- xenium_seg
#: The real SFE Xenium crop laid out as a HEST-1k Xenium sample (no HEST Xenium sample is available offline): its
#: cell and nucleus boundaries put on a synthetic H&E frame (0.5 um/px, origin at (900, 900) um) and written as
#: HEST's xenium_seg/ GeoParquet (WKB geometry, cell id index); st/ holds 100 um pseudo-spots binned from the real
#: transcripts; metadata/ the pixel size.
SFE_HEST_PIXEL_UM = 0.5
SFE_HEST_ORIGIN_UM = 900.0
SFE_CELLS = 526


def sfe_polygons(kind: str) -> geopandas.GeoDataFrame:
    """The real SFE ``<kind>_boundaries.parquet`` as H&E-pixel polygons indexed by cell id, as HEST writes them."""
    vertices = pd.read_parquet(shared("SFE", "xenium", f"{kind}_boundaries.parquet"))
    vertices["cell_id"] = vertices["cell_id"].str.decode("utf-8")
    rings = {
        cell_id: shapely.Polygon((group[["vertex_x", "vertex_y"]].to_numpy() - SFE_HEST_ORIGIN_UM) / SFE_HEST_PIXEL_UM)
        for cell_id, group in vertices.groupby("cell_id", sort=False)
    }
    return geopandas.GeoDataFrame(geometry=list(rings.values()), index=pd.Index(list(rings), name="cell_id"))


@pytest.fixture
def sfe_hest(tmp_path: Path) -> Path:
    root = tmp_path / "hest"
    transcripts = pd.read_parquet(shared("SFE", "xenium", "transcripts.parquet"))
    bins = ((transcripts[["x_location", "y_location"]] - SFE_HEST_ORIGIN_UM) // 100).astype(int)
    spot = bins["x_location"].astype(str) + "x" + bins["y_location"].astype(str)
    counts = pd.crosstab(spot, transcripts["feature_name"].astype(str))
    centres = counts.index.to_series().str.split("x", expand=True).astype(int) * 100 + 50
    obs = pd.DataFrame(
        {
            "pxl_col_in_fullres": centres[0].to_numpy() / SFE_HEST_PIXEL_UM,
            "pxl_row_in_fullres": centres[1].to_numpy() / SFE_HEST_PIXEL_UM,
        },
        index=counts.index,
    )
    (root / "st").mkdir(parents=True)
    anndata.AnnData(X=counts.to_numpy(dtype=np.float32), obs=obs, var=pd.DataFrame(index=counts.columns)).write_h5ad(
        root / "st" / "SFEX.h5ad"
    )
    (root / "metadata").mkdir()
    metadata = {"id": "SFEX", "st_technology": "Xenium", "spot_diameter": 100.0, "pixel_size_um_estimated": 0.5}
    (root / "metadata" / "SFEX.json").write_text(json.dumps(metadata))
    (root / "xenium_seg").mkdir()
    sfe_polygons("cell").to_parquet(root / "xenium_seg" / "SFEX_xenium_cell_seg.parquet")
    sfe_polygons("nucleus").to_parquet(root / "xenium_seg" / "SFEX_xenium_nucleus_seg.parquet")
    return root


def assert_same_polygons(actual: geopandas.GeoDataFrame, expected: geopandas.GeoDataFrame) -> None:
    assert actual.index.astype(str).tolist() == expected.index.tolist()
    np.testing.assert_array_equal(
        shapely.get_coordinates(actual.geometry.to_numpy()), shapely.get_coordinates(expected.geometry.to_numpy())
    )


def test_xenium_seg_is_imported_in_he_pixels(sfe_hest: Path) -> None:
    sdata = read_hest(sfe_hest, "SFEX")
    for name, kind in (("cells", "cell"), ("nuclei", "nucleus")):
        polygons = sdata[name]
        assert len(polygons) == SFE_CELLS
        assert_same_polygons(polygons, sfe_polygons(kind))
        assert set(polygons["source"]) == {"xenium"}
        # 'um' is the H&E frame in micrometres: the Xenium micrometres minus the synthetic origin
        raw = pd.read_parquet(shared("SFE", "xenium", f"{kind}_boundaries.parquet"))
        in_um = shapely.get_coordinates(transform(polygons, to_coordinate_system="um").geometry.to_numpy())
        np.testing.assert_allclose(in_um, raw[["vertex_x", "vertex_y"]].to_numpy() - SFE_HEST_ORIGIN_UM, atol=1e-9)
        provenance = hest_zarr.get_record(sdata).elements[name].provenance
        assert provenance.inputs == [str(sfe_hest / "xenium_seg" / f"SFEX_xenium_{kind}_seg.parquet")]


def test_xenium_seg_round_trips_exactly(sfe_hest: Path, tmp_path: Path) -> None:
    url = hest_zarr.write(read_hest(sfe_hest, "SFEX"), tmp_path / "sfex.zarr")
    assert hest_zarr.validate(url) == []
    written = export_hest(hest_zarr.open(url), tmp_path / "exported")
    assert sorted(written) == ["metadata", "st", "xenium_cell_seg", "xenium_nucleus_seg"]
    for kind in ("cell", "nucleus"):
        original = geopandas.read_parquet(sfe_hest / "xenium_seg" / f"SFEX_xenium_{kind}_seg.parquet")
        exported = geopandas.read_parquet(written[f"xenium_{kind}_seg"])
        assert_same_polygons(exported, original)
        assert list(exported.columns) == ["geometry"] and exported.index.name == "cell_id"
    back = read_hest(tmp_path / "exported", "SFEX")
    assert_same_polygons(back["cells"], sfe_polygons("cell"))
    assert_same_polygons(back["nuclei"], sfe_polygons("nucleus"))


def test_xenium_seg_geojson_zip_when_no_parquet(sfe_hest: Path) -> None:
    """HEST's .geojson.zip holds the same polygons as QuPath-style Features grouped by class, without cell ids; built
    here from the real SFE cells (one MultiPolygon Feature)."""
    cells = sfe_polygons("cell")
    (sfe_hest / "xenium_seg" / "SFEX_xenium_cell_seg.parquet").unlink()
    feature = {
        "type": "Feature",
        "id": "cells",
        "geometry": json.loads(shapely.to_geojson(shapely.MultiPolygon(list(cells.geometry)))),
        "properties": {"objectType": "annotation", "classification": {"name": "cell", "color": [0, 0, 255]}},
    }
    with zipfile.ZipFile(sfe_hest / "xenium_seg" / "SFEX_xenium_cell_seg.geojson.zip", "w") as archive:
        archive.writestr("SFEX_xenium_cell_seg.geojson", json.dumps([feature]))
    polygons = read_hest(sfe_hest, "SFEX")["cells"]
    assert len(polygons) == SFE_CELLS and set(polygons["source"]) == {"xenium"}
    np.testing.assert_array_equal(
        shapely.get_coordinates(polygons.geometry.to_numpy()), shapely.get_coordinates(cells.geometry.to_numpy())
    )


def test_cellvit_keeps_nuclei_unless_asked(sfe_hest: Path) -> None:
    """A synthetic CellViT file (two squares) beside the real-derived Xenium nuclei: CellViT keeps ``nuclei`` by
    default, with a warning naming the Xenium file left out; ``nuclei='xenium'`` swaps them."""
    square = [[[10, 10], [20, 10], [20, 20], [10, 20], [10, 10]]]
    feature = {
        "type": "Feature",
        "geometry": {"type": "MultiPolygon", "coordinates": [square, [[[x + 50, y] for x, y in square[0]]]]},
        "properties": {"classification": {"name": "Neoplastic", "color": [255, 0, 0]}},
    }
    (sfe_hest / "cellvit_seg").mkdir()
    (sfe_hest / "cellvit_seg" / "SFEX_cellvit_seg.geojson").write_text(json.dumps([feature]))
    with pytest.warns(UserWarning, match=r"SFEX_xenium_nucleus_seg.parquet: not imported, 'nuclei' holds the CellViT"):
        sdata = read_hest(sfe_hest, "SFEX")
    assert len(sdata["nuclei"]) == 2 and len(sdata["cells"]) == SFE_CELLS
    parameters = hest_zarr.get_record(sdata).elements["nuclei"].provenance.parameters
    assert parameters["not_imported"][0].endswith("SFEX_xenium_nucleus_seg.parquet")
    with pytest.warns(UserWarning, match=r"SFEX_cellvit_seg.geojson: not imported, 'nuclei' holds the Xenium"):
        swapped = read_hest(sfe_hest, "SFEX", nuclei="xenium")
    assert len(swapped["nuclei"]) == SFE_CELLS
    parameters = hest_zarr.get_record(swapped).elements["nuclei"].provenance.parameters
    assert parameters["not_imported"][0].endswith("SFEX_cellvit_seg.geojson")


def test_bad_xenium_seg_files(sfe_hest: Path) -> None:
    path = sfe_hest / "xenium_seg" / "SFEX_xenium_cell_seg.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"SFEX_xenium_cell_seg.parquet: not a readable parquet file"):
        read_hest(sfe_hest, "SFEX")
    points = sfe_polygons("cell")
    points.geometry = points.geometry.centroid
    points.to_parquet(path)
    with pytest.raises(
        InputError, match=r"SFEX_xenium_cell_seg.parquet: 526 of 526 geometries are not polygons \(\{'Point': 526\}\)"
    ):
        read_hest(sfe_hest, "SFEX")
