"""Nuclei and cell segmentation readers, the sample element they add, and the QuPath export.

Real data: the CryoNuSeg ImageJ RoiSets (59 and 117 hand-traced nuclei on two 512 x 512 H&E tiles) and the
instance masks rasterised from them. The expected vertices are decoded in this file straight from ImageJ's
binary ROI layout, not with the reader's library. No real CellViT, HoVer-Net or QuPath file exists in the shared
data: those fixtures are written by the tests in each tool's layout (see ``hest_zarr/converters/nuclei.py``) from
the real CryoNuSeg polygons, with classes assigned round-robin, and each test says so.
"""

from __future__ import annotations

import json
import re
import struct
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from PIL import Image
from skimage.draw import polygon as rasterise_polygon
from spatialdata.models import Image2DModel
from spatialdata.transformations import Scale, get_transformation

import hest_zarr
from hest_zarr.converters.nuclei import add_segmentation, read_segmentation, to_qupath_geojson
from hest_zarr.elements import build_sample, frame_transformations, get_record
from hest_zarr.errors import HestZarrError, InputError
from tests.conftest import shared

TILES = {"TCGA-DE-A4MA": 59, "TCGA-S4-A8RO": 117}
PIXEL_SIZE_UM = 0.25  # CryoNuSeg tiles are 40x scans; the value only scales the 'um' system here
PANNUKE = ["Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial"]
FREEHAND_ROI_TYPE = 7
SUBPIXEL_OPTION = 128


def roiset(tile: str) -> Path:
    return shared("CryoNuSeg_early", tile, "RoiSet.zip")


def raw_rois(path: Path) -> dict[str, np.ndarray]:
    """Each ROI's vertices, decoded from ImageJ's big-endian ROI layout: 64-byte header, then x[n], y[n] (int16)."""
    vertices = {}
    with zipfile.ZipFile(path) as archive:
        for entry in archive.namelist():
            data = archive.read(entry)
            assert data[:4] == b"Iout" and data[6] == FREEHAND_ROI_TYPE
            top, left = struct.unpack(">hh", data[8:12])
            (count,) = struct.unpack(">H", data[16:18])
            (options,) = struct.unpack(">H", data[50:52])
            assert not options & SUBPIXEL_OPTION
            xs = np.frombuffer(data, ">i2", count, 64).astype(np.float64)
            ys = np.frombuffer(data, ">i2", count, 64 + 2 * count).astype(np.float64)
            vertices[Path(entry).stem] = np.column_stack([xs + left, ys + top])
    return vertices


def closed(ring: np.ndarray) -> np.ndarray:
    return ring if np.array_equal(ring[0], ring[-1]) else np.vstack([ring, ring[:1]])


def valid_rois(tile: str = "TCGA-S4-A8RO") -> dict[str, np.ndarray]:
    """The real ROIs that are valid polygons as traced (read back vertex for vertex)."""
    return {name: v for name, v in raw_rois(roiset(tile)).items() if shapely.Polygon(v).is_valid}


def exterior(frame, object_id: str) -> np.ndarray:
    return np.asarray(frame.geometry[object_id].exterior.coords)


# --------------------------------------------------------------------------------------------- ImageJ (real)
@pytest.mark.parametrize(("tile", "count"), TILES.items())
def test_imagej_roisets_keep_every_nucleus_and_its_vertices(tile: str, count: int) -> None:
    raw = raw_rois(roiset(tile))
    invalid = {name for name, vertices in raw.items() if not shapely.Polygon(vertices).is_valid}
    assert len(invalid) in (33, 53)  # hand tracing retraces its own outline
    with pytest.warns(UserWarning, match=rf"{len(invalid)} of {count} polygons were invalid and repaired"):
        nuclei = read_segmentation(roiset(tile), pixel_size_um=PIXEL_SIZE_UM)
    assert len(raw) == len(nuclei) == count
    assert nuclei.index.tolist() == list(raw)  # zip entry names (the S4 set has two ROIs both named 0280-0058)
    assert set(nuclei["source"]) == {"imagej"} and nuclei["class"].isna().all()
    assert set(nuclei.geom_type) == {"Polygon"} and nuclei.geometry.is_valid.all()
    for name in raw.keys() - invalid:
        np.testing.assert_array_equal(exterior(nuclei, name), closed(raw[name]))
    transformations = get_transformation(nuclei, get_all=True)
    assert sorted(transformations) == ["global", "um"]
    assert transformations["um"].to_affine_matrix(("x", "y"), ("x", "y"))[0, 0] == PIXEL_SIZE_UM


def test_a_single_imagej_roi_file(tmp_path: Path) -> None:
    """One real ``.roi`` taken out of the CryoNuSeg RoiSet, as ImageJ saves a lone ROI."""
    name, vertices = next(iter(valid_rois().items()))
    with zipfile.ZipFile(roiset("TCGA-S4-A8RO")) as archive:
        (tmp_path / f"{name}.roi").write_bytes(archive.read(f"{name}.roi"))
    nucleus = read_segmentation(tmp_path / f"{name}.roi", pixel_size_um=PIXEL_SIZE_UM)
    assert nucleus.index.tolist() == [name]
    np.testing.assert_array_equal(exterior(nucleus, name), closed(vertices))


@pytest.mark.parametrize(("tile", "count"), TILES.items())
def test_imagej_polygons_match_the_instance_mask_drawn_from_them(tile: str, count: int) -> None:
    mask = np.asarray(Image.open(shared("CryoNuSeg_early", tile, "instance_mask_derived.png"))).astype(np.int64)
    with pytest.warns(UserWarning):
        nuclei = read_segmentation(roiset(tile), pixel_size_um=PIXEL_SIZE_UM)
    drawn = np.zeros((len(nuclei), *mask.shape), dtype=bool)
    for row, polygon in enumerate(nuclei.geometry):
        xy = np.asarray(polygon.exterior.coords)
        rows, cols = rasterise_polygon(xy[:, 1], xy[:, 0], shape=mask.shape)
        drawn[row, rows, cols] = True
    # the S4 set traces one nucleus twice (ROIs 0280-0058-1 and, later, 0280-0058 cover the same pixels): count it once
    _, first = np.unique(drawn.reshape(len(drawn), -1), axis=0, return_index=True)
    duplicates = sorted(set(nuclei.index) - set(nuclei.index[first]))
    assert duplicates == ([] if count == 59 else ["0280-0058"])
    drawn = drawn[np.sort(first)]
    shared_pixels = drawn.sum(axis=0) > 1  # where nuclei overlap, the mask kept the one painted last
    matched, ious = [], []
    for pixels in drawn:
        own = pixels & ~shared_pixels
        labels, counts = np.unique(mask[own], return_counts=True)
        label = labels[labels > 0][np.argmax(counts[labels > 0])]
        truth = (mask == label) & ~shared_pixels
        matched.append(label)
        ious.append((truth & own).sum() / (truth | own).sum())
    assert min(ious) > 0.9, sorted(ious)[:3]
    assert len(set(matched)) == len(matched) == len(np.unique(mask)) - 1 == count - len(duplicates)


# --------------------------------------------------------------------------------------------- CellViT
def test_cellvit_geojson_multipolygons_become_one_nucleus_per_part(tmp_path: Path) -> None:
    """CellViT ``cells.geojson`` layout (one MultiPolygon Feature per type; CellViT++ writes a Polygon for a type
    with one cell), built here from the real CryoNuSeg polygons with round-robin PanNuke classes.
    """
    rois = list(valid_rois().items())
    by_class: dict[str, list[tuple[str, np.ndarray]]] = {name: [] for name in PANNUKE}
    by_class["Dead"] = [rois[0]]
    for position, roi in enumerate(rois[1:]):
        by_class[PANNUKE[[0, 1, 2, 4][position % 4]]].append(roi)
    features, expected = [], {}
    for colour, (name, members) in enumerate(by_class.items()):
        feature_id = str(uuid.uuid4())
        rings = [[closed(vertices).tolist()] for _, vertices in members]
        geometry = (
            {"type": "Polygon", "coordinates": rings[0]}
            if len(rings) == 1
            else {"type": "MultiPolygon", "coordinates": rings}
        )
        properties = {"objectType": "annotation", "classification": {"name": name, "color": [colour, 0, 0]}}
        features.append({"type": "Feature", "id": feature_id, "geometry": geometry, "properties": properties})
        for part, (_, vertices) in enumerate(members):
            expected[feature_id if len(members) == 1 else f"{feature_id}_{part}"] = (name, closed(vertices))
    path = tmp_path / "TCGA-S4-A8RO_cellvit_seg.geojson"
    path.write_text(json.dumps(features))

    nuclei = read_segmentation(path, pixel_size_um=PIXEL_SIZE_UM)
    assert len(nuclei) == len(rois) == 64
    assert set(nuclei["source"]) == {"cellvit"} and "object_type" not in nuclei.columns
    assert nuclei["class"].value_counts().to_dict() == {name: len(m) for name, m in by_class.items()}
    assert set(nuclei.index) == set(expected)
    for object_id, (name, ring) in expected.items():
        assert nuclei.loc[object_id, "class"] == name
        np.testing.assert_array_equal(exterior(nuclei, object_id), ring)


def cellvit_cells(rois: list[tuple[str, np.ndarray]]) -> list[dict]:
    """CellViT ``cells.json`` cell records (open contours, [x, y]) from real polygons, types 1..5 round-robin."""
    cells = []
    for position, (_, vertices) in enumerate(rois):
        (xmin, ymin), (xmax, ymax) = vertices.min(axis=0), vertices.max(axis=0)
        cells.append(
            {
                "bbox": [[ymin, xmin], [ymax, xmax]],
                "centroid": vertices.mean(axis=0).tolist(),
                "contour": vertices.astype(int).tolist(),
                "type_prob": 0.5 + position / 1000,
                "type": position % 5 + 1,
                "patch_coordinates": [0, 0],
                "cell_status": 0,
                "offset_global": [0, 0],
            }
        )
    return cells


@pytest.mark.parametrize(
    "type_map",
    [
        {"Background": 0, **{name: k + 1 for k, name in enumerate(PANNUKE)}},  # CellViT: name -> id
        {"0": "Background", **{str(k + 1): name for k, name in enumerate(PANNUKE)}},  # CellViT++: id -> name
    ],
)
def test_cellvit_cells_json_types_probabilities_and_contours(tmp_path: Path, type_map: dict) -> None:
    """CellViT ``cells.json`` layout (both type_map directions), built here from the real CryoNuSeg polygons."""
    rois = list(valid_rois().items())
    cells = cellvit_cells(rois)
    path = tmp_path / "cells.json"
    path.write_text(json.dumps({"wsi_metadata": {"base_mpp": 0.25}, "type_map": type_map, "cells": cells}))

    nuclei = read_segmentation(path, pixel_size_um=PIXEL_SIZE_UM)
    assert nuclei.index.tolist() == [str(k) for k in range(len(cells))]
    assert nuclei["class"].tolist() == [PANNUKE[cell["type"] - 1] for cell in cells]
    np.testing.assert_array_equal(nuclei["probability"].to_numpy(), [cell["type_prob"] for cell in cells])
    for position, (_, vertices) in enumerate(rois):
        np.testing.assert_array_equal(exterior(nuclei, str(position)), closed(vertices))
    assert set(nuclei["source"]) == {"cellvit"}


# --------------------------------------------------------------------------------------------- HoVer-Net
def test_hovernet_json_with_and_without_type_info(tmp_path: Path) -> None:
    """HoVer-Net ``{"mag", "nuc"}`` layout and its PanNuke ``type_info.json``, built here from real polygons."""
    rois = list(valid_rois("TCGA-DE-A4MA").items())
    nuc = {}
    for position, (_, vertices) in enumerate(rois):
        (xmin, ymin), (xmax, ymax) = vertices.min(axis=0), vertices.max(axis=0)
        nuc[str(position + 1)] = {
            "bbox": [[int(ymin), int(xmin)], [int(ymax), int(xmax)]],
            "centroid": vertices.mean(axis=0).tolist(),
            "contour": vertices.astype(int).tolist(),
            "type_prob": 0.25 + position / 100,
            "type": position % 6,
        }
    path = tmp_path / "tile.json"
    path.write_text(json.dumps({"mag": 40, "nuc": nuc}))
    names = ["nolabe", "neopla", "inflam", "connec", "necros", "no-neo"]
    type_info = tmp_path / "type_info.json"
    type_info.write_text(json.dumps({str(k): [name, [k, k, k]] for k, name in enumerate(names)}))

    named = read_segmentation(path, pixel_size_um=PIXEL_SIZE_UM, type_info=type_info)
    assert len(named) == len(rois) == 26
    assert named.index.tolist() == list(nuc)
    assert named["class"].tolist() == [names[n["type"]] for n in nuc.values()]
    np.testing.assert_array_equal(named["probability"].to_numpy(), [n["type_prob"] for n in nuc.values()])
    for key, (_, vertices) in zip(nuc, rois, strict=True):
        np.testing.assert_array_equal(exterior(named, key), closed(vertices))
    assert set(named["source"]) == {"hovernet"}

    unnamed = read_segmentation(path, pixel_size_um=PIXEL_SIZE_UM)
    assert unnamed["class"].tolist() == [str(n["type"]) for n in nuc.values()]

    nuc["1"].update(type=None, type_prob=None)  # HoVer-Net without a type branch
    path.write_text(json.dumps({"mag": 40, "nuc": nuc}))
    untyped = read_segmentation(path, pixel_size_um=PIXEL_SIZE_UM, type_info=type_info)
    assert untyped.loc["1", "class"] is np.nan and np.isnan(untyped.loc["1", "probability"])


# --------------------------------------------------------------------------------------------- QuPath
def qupath_features(rois: list[tuple[str, np.ndarray]]) -> tuple[list[dict], dict[str, tuple]]:
    """QuPath GeoJSON features (detections, a cell with its nucleus, a two-part annotation, a polygon with a hole,
    a point) from real polygons; returns them and, per expected id, (class, object type, shell, holes).
    """
    features, expected = [], {}
    for position, (_, vertices) in enumerate(rois[:10]):
        feature_id = str(uuid.uuid4())
        name = ["Tumor", "Stroma"][position % 2]
        features.append(
            {
                "type": "Feature",
                "id": feature_id,
                "geometry": {"type": "Polygon", "coordinates": [closed(vertices).tolist()]},
                "properties": {"objectType": "detection", "classification": {"name": name, "color": [200, 0, 0]}},
            }
        )
        expected[feature_id] = (name, "detection", closed(vertices), [])
    nucleus = closed(rois[10][1])
    cell = np.asarray(shapely.Polygon(nucleus).buffer(4, quad_segs=2).exterior.coords)
    features.append(
        {
            "type": "Feature",
            "id": "cell-1",
            "geometry": {"type": "Polygon", "coordinates": [cell.tolist()]},
            "nucleusGeometry": {"type": "Polygon", "coordinates": [nucleus.tolist()]},
            "properties": {
                "objectType": "cell",
                "classification": {"names": ["Tumor", "Positive"], "color": [1, 2, 3]},
            },
        }
    )
    expected["cell-1"] = ("Tumor: Positive", "cell", cell, [])
    parts = [closed(rois[11][1]), closed(rois[12][1])]
    features.append(
        {
            "type": "Feature",
            "id": "region",
            "geometry": {"type": "MultiPolygon", "coordinates": [[part.tolist()] for part in parts]},
            "properties": {"objectType": "annotation"},
        }
    )
    expected["region_0"] = (None, "annotation", parts[0], [])
    expected["region_1"] = (None, "annotation", parts[1], [])
    hole = closed(rois[13][1])
    (xmin, ymin), (xmax, ymax) = hole.min(axis=0) - 5, hole.max(axis=0) + 5
    shell = np.array([[xmin, ymin], [xmax, ymin], [xmax, ymax], [xmin, ymax], [xmin, ymin]])
    features.append(
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [shell.tolist(), hole[::-1].tolist()]},
            "properties": {"objectType": "detection", "classification": {"name": "Stroma"}},
        }
    )
    expected[str(len(features) - 1)] = ("Stroma", "detection", shell, [hole[::-1]])
    features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [1.0, 2.0]}, "properties": {}})
    return features, expected


@pytest.mark.parametrize("layout", ["FeatureCollection", "list"])
def test_qupath_geojson_objects_classes_nuclei_and_holes(tmp_path: Path, layout: str) -> None:
    """QuPath GeoJSON (FeatureCollection and bare Feature list), built here from the real CryoNuSeg polygons."""
    rois = list(valid_rois().items())
    features, expected = qupath_features(rois)
    content = {"type": "FeatureCollection", "features": features} if layout == "FeatureCollection" else features
    path = tmp_path / "objects.geojson"
    path.write_text(json.dumps(content))

    with pytest.warns(UserWarning, match=r"1 objects skipped as not polygons \(Point: 1\)"):
        cells = read_segmentation(path, pixel_size_um=PIXEL_SIZE_UM)
    assert cells.index.tolist() == list(expected)
    assert set(cells["source"]) == {"qupath"}
    for object_id, (name, object_type, shell, holes) in expected.items():
        row = cells.loc[object_id]
        assert (row["class"] if isinstance(row["class"], str) else None) == name
        assert row["object_type"] == object_type
        np.testing.assert_array_equal(exterior(cells, object_id), shell)
        interiors = [np.asarray(ring.coords) for ring in cells.geometry[object_id].interiors]
        assert len(interiors) == len(holes)
        for found, hole in zip(interiors, holes, strict=True):
            np.testing.assert_array_equal(found, hole)

    with pytest.warns(UserWarning):
        nuclei = read_segmentation(path, pixel_size_um=PIXEL_SIZE_UM, nucleus_geometry=True)
    np.testing.assert_array_equal(exterior(nuclei, "cell-1"), closed(rois[10][1]))
    first = next(iter(expected))
    np.testing.assert_array_equal(exterior(nuclei, first), expected[first][2])


def test_invalid_polygons_are_repaired_and_degenerate_ones_dropped_with_a_count(tmp_path: Path) -> None:
    """A QuPath-layout file written here: a real polygon, a bow-tie, a 2-vertex ring and a collinear triangle."""
    real = closed(next(iter(valid_rois().values())))
    rings = {
        "real": real.tolist(),
        "bowtie": [[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]],
        "segment": [[0, 0], [5, 5], [0, 0]],
        "collinear": [[0, 0], [1, 1], [2, 2], [0, 0]],
    }
    features = [
        {"type": "Feature", "id": key, "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}}
        for key, ring in rings.items()
    ]
    path = tmp_path / "mixed.geojson"
    path.write_text(json.dumps(features))
    message = (
        r"1 of 4 polygons were invalid and repaired \(shapely.make_valid, largest part kept\); "
        r"2 of 4 polygons dropped \(fewer than 3 vertices or no area\)"
    )
    with pytest.warns(UserWarning, match=message):
        shapes = read_segmentation(path, pixel_size_um=PIXEL_SIZE_UM)
    assert shapes.index.tolist() == ["real", "bowtie"]
    bowtie = shapes.geometry["bowtie"]
    assert bowtie.is_valid and bowtie.geom_type == "Polygon" and bowtie.area == 25.0
    np.testing.assert_array_equal(exterior(shapes, "real"), real)


# --------------------------------------------------------------------------------------------- QuPath export
def test_qupath_export_round_trip_keeps_every_vertex_and_class(tmp_path: Path) -> None:
    """Real ImageJ nuclei (repaired ones included), then the CellViT-layout fixture with classes, each exported
    to QuPath GeoJSON and read back.
    """
    with pytest.warns(UserWarning):
        imagej = read_segmentation(roiset("TCGA-S4-A8RO"), pixel_size_um=PIXEL_SIZE_UM)
    written = to_qupath_geojson(imagej, tmp_path / "nuclei.geojson")
    back = read_segmentation(written, pixel_size_um=PIXEL_SIZE_UM)
    assert back.index.tolist() == imagej.index.tolist()
    assert all(a.equals_exact(b, tolerance=0) for a, b in zip(imagej.geometry, back.geometry, strict=True))
    assert back["class"].isna().all() and set(back["object_type"]) == {"detection"}

    rois = list(valid_rois().items())
    path = tmp_path / "cells.json"
    path.write_text(json.dumps({"type_map": {"0": "Background", "1": "Neoplastic", "2": "Inflammatory"}, "cells": [
        {"contour": v.astype(int).tolist(), "type": k % 2 + 1, "type_prob": 0.9} for k, (_, v) in enumerate(rois)
    ]}))  # fmt: skip
    classified = read_segmentation(path, pixel_size_um=PIXEL_SIZE_UM)
    written = to_qupath_geojson(classified, tmp_path / "classified.geojson", object_type="annotation")
    raw = json.loads(written.read_text())
    assert raw["type"] == "FeatureCollection" and len(raw["features"]) == len(rois)
    first = raw["features"][0]["properties"]
    assert first["objectType"] == "annotation" and first["classification"]["name"] == "Neoplastic"
    assert len(first["classification"]["color"]) == 3
    back = read_segmentation(written, pixel_size_um=PIXEL_SIZE_UM)
    assert back["class"].tolist() == classified["class"].tolist()
    assert all(a.equals_exact(b, tolerance=0) for a, b in zip(classified.geometry, back.geometry, strict=True))


def test_qupath_export_applies_the_element_transformation(tmp_path: Path) -> None:
    """Real ImageJ nuclei declared at half resolution (x2 to ``global``): the export is in full-resolution pixels."""
    raw = valid_rois()
    with pytest.warns(UserWarning):
        half = read_segmentation(
            roiset("TCGA-S4-A8RO"), pixel_size_um=PIXEL_SIZE_UM, to_global=Scale([2.0, 2.0], axes=("x", "y"))
        )
    for system, factor in (("global", 2.0), ("um", 2.0 * PIXEL_SIZE_UM)):
        written = to_qupath_geojson(half, tmp_path / f"{system}.geojson", coordinate_system=system)
        features = {f["id"]: f for f in json.loads(written.read_text())["features"]}
        for name, vertices in raw.items():
            np.testing.assert_allclose(features[name]["geometry"]["coordinates"][0], closed(vertices) * factor)
    with pytest.raises(InputError, match=r"no transformation to 'aligned'"):
        to_qupath_geojson(half, tmp_path / "x.geojson", coordinate_system="aligned")


# --------------------------------------------------------------------------------------------- sample
def test_sample_with_nuclei_writes_validates_and_reopens(tmp_path: Path) -> None:
    """The real CryoNuSeg tile as H&E with its real nuclei; st_technology is a placeholder the schema requires."""
    tile = shared("CryoNuSeg_early", "TCGA-S4-A8RO")
    tif = next(tile.glob("*.tif"))
    he = Image2DModel.parse(
        np.moveaxis(tifffile.imread(tif), -1, 0),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations=frame_transformations(PIXEL_SIZE_UM),
    )
    sample = build_sample(
        converter="test",
        metadata={"id": "TCGA-S4-A8RO", "st_technology": "Visium"},
        pixel_size_um=PIXEL_SIZE_UM,
        inputs={"he": [str(tif)]},
        images={"he": he},
    )
    with pytest.warns(UserWarning, match="53 of 117 polygons were invalid"):
        add_segmentation(sample, tile / "RoiSet.zip")
    provenance = get_record(sample).elements["nuclei"].provenance
    assert (provenance.converter, provenance.method, provenance.inputs) == (
        "nuclei",
        "imagej",
        [str(tile / "RoiSet.zip")],
    )
    assert provenance.parameters == {"polygons": 117, "repaired": 53, "dropped": 0, "holes_dropped": 0, "skipped": {}}
    with pytest.raises(HestZarrError, match=r"already holds 'nuclei' \(pass overwrite=True"):
        add_segmentation(sample, tile / "RoiSet.zip")

    url = hest_zarr.write(sample, tmp_path / "sample.zarr")
    assert hest_zarr.validate(url) == []
    reopened = hest_zarr.open(url)
    nuclei = reopened["nuclei"]
    assert nuclei.index.tolist() == sample["nuclei"].index.tolist()
    assert all(a.equals_exact(b, tolerance=0) for a, b in zip(sample["nuclei"].geometry, nuclei.geometry, strict=True))
    assert set(nuclei["source"].astype(str)) == {"imagej"}
    assert get_record(reopened).elements["nuclei"].provenance.method == "imagej"

    cellvit = tmp_path / "cells.json"
    cellvit.write_text(json.dumps({"cells": cellvit_cells(list(valid_rois().items()))}))
    add_segmentation(sample, cellvit, overwrite=True)
    assert len(sample["nuclei"]) == 64 and get_record(sample).elements["nuclei"].provenance.method == "cellvit"


# --------------------------------------------------------------------------------------------- bad input
def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, dict, str]]:
    files = {
        "other.json": json.dumps({"foo": 1}),
        "empty.geojson": json.dumps(
            {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": None, "properties": {}}] * 2}
        ),
        "notes.txt": "not json",
        "cells.geojson": json.dumps([{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[1, 2]]}}]),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with zipfile.ZipFile(tmp_path / "nothing.zip", "w") as archive:
        archive.writestr("readme.txt", "no ROIs")
    return {
        "missing": (tmp_path / "absent.json", {}, "no such file"),
        "none of the formats": (tmp_path / "other.json", {}, r"not a segmentation this package reads .*keys \['foo'\]"),
        "no geometries": (tmp_path / "empty.geojson", {}, r"no Polygon or MultiPolygon .* 2 features .*no geometry: 2"),
        "not json": (tmp_path / "notes.txt", {}, "neither JSON nor an ImageJ ROI set"),
        "wrong format": (tmp_path / "empty.geojson", {"format": "hovernet"}, "expected a HoVer-Net json"),
        "bad ring": (tmp_path / "cells.geojson", {}, r"feature 0 part 0: expected a ring of \[x, y\] vertices"),
        "zip without rois": (tmp_path / "nothing.zip", {}, "a zip without .roi entries"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "none of the formats", "no geometries", "not json", "wrong format", "bad ring", "zip without rois"],
)
def test_bad_input_names_the_file(tmp_path: Path, case: str) -> None:
    path, options, message = bad_inputs(tmp_path)[case]
    with pytest.raises(InputError, match=re.escape(str(path)) + ": " + message):
        read_segmentation(path, pixel_size_um=PIXEL_SIZE_UM, **options)
