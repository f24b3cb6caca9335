"""Nuclei and cell segmentations (CellViT, HoVer-Net, QuPath, ImageJ) into ``nuclei`` / ``cells`` polygons.

Each reader turns a segmentation file into one shapes element of polygons indexed by a unique id, with a
categorical ``class`` (the label name, missing where the file has none), a categorical ``source``
(``cellvit``, ``hovernet``, ``qupath``, ``imagej``), ``probability`` where the format stores the class
probability and, for QuPath, ``object_type``. :func:`to_qupath_geojson` writes any polygon element back out.

The layouts below were read from the writers' own code and documentation (the formats only; no code taken):

- **CellViT** ``cells.geojson``: TIO-IKIM/CellViT ``cell_segmentation/inference/cell_detection.py``
  (``convert_geojson``) and ``cell_segmentation/utils/template_geojson.py``; CellViT++ TIO-IKIM/CellViT-Inference
  ``cellvit/inference/inference.py``. A bare list of Features, one per cell type, ``properties.objectType``
  ``"annotation"`` and ``classification`` ``{name, color}``; the geometry is a MultiPolygon whose every part is
  one cell (a closed ring), or a Polygon when CellViT++ found a single cell of that type. HEST-1k releases these
  files as ``cellvit_seg/ID_cellvit_seg.geojson``.
- **CellViT** ``cells.json`` (same files): ``{"wsi_metadata", "type_map", "cells": [{"bbox", "centroid",
  "contour", "type_prob", "type", ...}]}``, contours as ``[x, y]`` level-0 pixels; ``type_map`` maps names to
  ids in CellViT and ids to names in CellViT++.
- **HoVer-Net** json: vqdang/hover_net ``infer/tile.py`` and ``infer/base.py`` (``__save_json``):
  ``{"mag", "nuc": {"<id>": {"bbox", "centroid", "contour", "type_prob", "type"}}}``, contours as ``[x, y]``
  pixels; the type names live in a separate ``type_info.json`` (``{"<id>": [name, [r, g, b]]}``).
- **QuPath** GeoJSON: qupath/qupath ``qupath-core/src/main/java/qupath/lib/io/PathObjectTypeAdapters.java`` and
  qupath-docs ``docs/advanced/exporting_annotations.rst``. A FeatureCollection or a bare list of Features;
  ``id`` a UUID since v0.4 (v0.2 wrote the object type there, e.g. ``"PathCellObject"``);
  ``properties.objectType`` (``object_type`` before v0.3) ``detection`` / ``cell`` / ``annotation`` / ``tile``;
  ``properties.classification`` ``{name, color}`` (newer versions ``names`` for derived classes); cell objects
  carry ``nucleusGeometry`` beside ``geometry``. Coordinates are full-resolution pixels, origin top left.
- **ImageJ** ROI sets (``RoiSet.zip``, one ``.roi`` per entry, or a single ``.roi``) are decoded with
  ``roifile``; the id is the entry name, as ImageJ's ROI Manager labels it.

Coordinates are kept as written. ImageJ and QuPath vertices lie on pixel corners, as spatialdata's ``global``
pixels do; CellViT and HoVer-Net contours come from OpenCV's ``findContours`` and run through the centres of
the boundary pixels (half a pixel inside the corner outline), a sub-pixel offset this reader does not change.

A MultiPolygon feature becomes one polygon per part (id ``<feature id>_<part>``): CellViT stores all cells of a
type that way, and a nucleus or cell is one connected region. Invalid polygons (self-intersections, common in
hand-traced ImageJ ROIs) are repaired with ``shapely.make_valid``, keeping the largest polygon part (as CellViT
itself does); rings with fewer than 3 vertices and polygons without area are dropped. Every repair, drop and
skipped feature is counted in one warning, never silently.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import shapely
from geopandas import GeoDataFrame
from spatialdata import SpatialData, transform
from spatialdata.models import ShapesModel
from spatialdata.transformations import BaseTransformation, get_transformation

from hest_zarr.elements import CoordinateSystems, Elements, frame_transformations
from hest_zarr.errors import HestZarrError, InputError
from hest_zarr.schemas import ElementRecord, Provenance
from hest_zarr.store import get_record, set_record

SegmentationFormat = Literal["auto", "cellvit", "hovernet", "qupath", "imagej"]
TypeInfo = Mapping[Any, Any] | str | Path
FORMATS: tuple[str, ...] = ("cellvit", "hovernet", "qupath", "imagej")
QUPATH_OBJECT_TYPES: tuple[str, ...] = ("detection", "cell", "annotation")
#: QuPath v0.2 wrote the object's Java class as the feature id.
_QUPATH_V02_TYPE_IDS = {
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathAnnotationObject": "annotation",
    "PathTileObject": "tile",
}
_IMAGEJ_AREA_TYPES = ("POLYGON", "FREEHAND", "TRACED", "RECT", "OVAL")
_POLYGON_TYPE_ID = 3  # shapely.get_type_id of a Polygon
#: Distinct colours for exported classes, in category order (QuPath >= 0.4 wants a colour per class).
_CLASS_COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


@dataclass
class _Objects:
    """Segmented objects as parsed: per object its id, rings (shell first, then holes), label and extra columns."""

    ids: list[str] = field(default_factory=list)
    rings: list[list[np.ndarray]] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    columns: dict[str, list[Any]] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)

    def add(self, object_id: str, rings: list[np.ndarray], label: str | None, **columns: Any) -> None:
        self.ids.append(object_id)
        self.rings.append(rings)
        self.labels.append(label)
        for name, value in columns.items():
            self.columns.setdefault(name, []).append(value)


@dataclass(frozen=True)
class _Report:
    """What reading a segmentation kept, repaired, dropped and skipped."""

    polygons: int
    repaired: int
    dropped: int
    holes_dropped: int
    skipped: dict[str, int]

    def warning(self, path: Path) -> str | None:
        found = self.polygons + self.dropped
        notes = []
        if self.repaired:
            notes.append(
                f"{self.repaired} of {found} polygons were invalid and repaired (shapely.make_valid, largest part kept)"
            )
        if self.dropped:
            notes.append(f"{self.dropped} of {found} polygons dropped (fewer than 3 vertices or no area)")
        if self.holes_dropped:
            notes.append(f"{self.holes_dropped} holes with fewer than 3 vertices dropped")
        if self.skipped:
            what = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items()))
            notes.append(f"{sum(self.skipped.values())} objects skipped as not polygons ({what})")
        return f"{path}: " + "; ".join(notes) if notes else None

    def parameters(self) -> dict[str, Any]:
        return {
            "polygons": self.polygons,
            "repaired": self.repaired,
            "dropped": self.dropped,
            "holes_dropped": self.holes_dropped,
            "skipped": dict(self.skipped),
        }


# --------------------------------------------------------------------------------------------- public API
def read_segmentation(
    path: str | Path,
    *,
    format: SegmentationFormat = "auto",  # noqa: A002
    pixel_size_um: float,
    to_global: BaseTransformation | None = None,
    type_info: TypeInfo | None = None,
    nucleus_geometry: bool = False,
) -> GeoDataFrame:
    """Read a nuclei or cell segmentation into a shapes element of polygons.

    Parameters
    ----------
    path
        CellViT ``cells.geojson`` / ``*_cellvit_seg.geojson`` / ``cells.json``, HoVer-Net json, QuPath GeoJSON,
        or an ImageJ ``RoiSet.zip`` / ``.roi``.
    format
        ``"auto"`` decides from the content: ``.zip`` / ``.roi`` are ImageJ, ``{"nuc": ...}`` HoVer-Net,
        ``{"cells": [...]}`` CellViT, GeoJSON is CellViT when the file name says so (``cells.geojson``,
        ``*cellvit*``) and QuPath otherwise.
    pixel_size_um
        Micrometres per ``global`` pixel.
    to_global
        From the file's coordinates to ``global`` pixels (default: identity, the file is in full-resolution pixels).
    type_info
        Type id -> name for HoVer-Net (its ``type_info.json`` path, or a mapping to names or to
        ``[name, colour]`` pairs); for CellViT ``cells.json`` it replaces the file's ``type_map``.
        Without names, HoVer-Net classes are the type ids as text.
    nucleus_geometry
        For QuPath cell objects, read their ``nucleusGeometry`` instead of the cell boundary (objects without
        one keep their geometry).

    Returns
    -------
    A ``ShapesModel`` GeoDataFrame with ``global`` and ``um`` transformations.

    Raises
    ------
    InputError
        A missing file, a file in none of the formats, a GeoJSON without polygon geometries, duplicate ids.

    Examples
    --------
    >>> nuclei = read_segmentation("cells.geojson", pixel_size_um=0.25)  # doctest: +SKIP
    >>> nuclei["class"].value_counts()  # doctest: +SKIP

    """
    frame, _, report = _read(
        Path(path),
        format=format,
        pixel_size_um=pixel_size_um,
        to_global=to_global,
        type_info=type_info,
        nucleus_geometry=nucleus_geometry,
    )
    message = report.warning(Path(path))
    if message:
        warnings.warn(message, UserWarning, stacklevel=2)
    return frame


def add_segmentation(
    sdata: SpatialData,
    path: str | Path,
    *,
    element: Literal["nuclei", "cells"] = "nuclei",
    format: SegmentationFormat = "auto",  # noqa: A002
    to_global: BaseTransformation | None = None,
    type_info: TypeInfo | None = None,
    overwrite: bool = False,
) -> SpatialData:
    """Add a segmentation to a sample as its ``nuclei`` or ``cells`` element, with its record entry.

    The sample is changed in place (and returned): the element is added and the record gains an
    ``ElementRecord`` whose provenance names this converter, the file, the format and what was repaired or dropped.

    Parameters
    ----------
    sdata
        A sample carrying a record with a pixel size.
    path
        The segmentation file (see :func:`read_segmentation`).
    element
        ``"nuclei"`` (QuPath cell objects contribute their nucleus) or ``"cells"``.
    format, to_global, type_info
        As in :func:`read_segmentation`.
    overwrite
        Replace an element of that name; without it an existing element is an error.

    Examples
    --------
    >>> sample = hest_zarr.open("sample.zarr")  # doctest: +SKIP
    >>> add_segmentation(sample, "RoiSet.zip", element="nuclei")  # doctest: +SKIP
    >>> hest_zarr.write(sample, "sample_with_nuclei.zarr")  # doctest: +SKIP

    """
    path = Path(path)
    if element not in (Elements.NUCLEI, Elements.CELLS):
        raise InputError(f"{path}: element must be 'nuclei' or 'cells', not {element!r}")
    record = get_record(sdata)
    if record.pixel_size_um is None:
        raise InputError(f"{path}: the sample records no pixel size, so its 'um' coordinate system is unknown")
    if element in sdata and not overwrite:
        raise HestZarrError(f"the sample already holds '{element}' (pass overwrite=True to replace it with {path})")
    frame, source, report = _read(
        path,
        format=format,
        pixel_size_um=record.pixel_size_um,
        to_global=to_global,
        type_info=type_info,
        nucleus_geometry=element == Elements.NUCLEI,
    )
    message = report.warning(path)
    if message:
        warnings.warn(message, UserWarning, stacklevel=2)
    if element in sdata:
        del sdata[element]
    sdata.shapes[element] = frame
    record.elements[element] = ElementRecord(
        kind="shapes",
        provenance=Provenance(
            converter="nuclei",
            inputs=[str(path)],
            method=source,
            parameters=report.parameters(),
        ),
    )
    set_record(sdata, record)
    return sdata


def to_qupath_geojson(
    shapes: GeoDataFrame,
    path: str | Path,
    *,
    object_type: Literal["detection", "cell", "annotation"] = "detection",
    coordinate_system: str = CoordinateSystems.GLOBAL,
) -> Path:
    """Write a polygon shapes element as a GeoJSON FeatureCollection that QuPath imports.

    Geometries are mapped to ``coordinate_system`` (``global``: full-resolution pixels, which QuPath expects)
    with the element's own transformation. Each row becomes a Feature with the row's index as ``id``,
    ``properties.objectType`` and, where the ``class`` column has a value, ``classification`` with a name and a
    colour. Coordinates are written at full float precision, so reading the file back gives the same vertices
    (a MultiPolygon row comes back from :func:`read_segmentation` as one polygon per part).

    Parameters
    ----------
    shapes
        A shapes element of Polygons / MultiPolygons.
    path
        The ``.geojson`` file to write.
    object_type
        QuPath object type of every feature.
    coordinate_system
        Coordinate system to write the vertices in.

    Returns
    -------
    The path written.

    Examples
    --------
    >>> to_qupath_geojson(sdata["nuclei"], "nuclei.geojson")  # doctest: +SKIP

    """
    path = Path(path)
    if object_type not in QUPATH_OBJECT_TYPES:
        raise InputError(f"{path}: object_type must be one of {QUPATH_OBJECT_TYPES}, not {object_type!r}")
    kinds = set(shapes.geom_type.astype(str))
    if not kinds <= {"Polygon", "MultiPolygon"}:
        raise InputError(f"{path}: QuPath export takes polygon shapes; this element holds {sorted(kinds)}")
    systems = get_transformation(shapes, get_all=True)
    if coordinate_system not in systems:
        raise InputError(
            f"{path}: the element has no transformation to '{coordinate_system}' (it has {sorted(systems)})"
        )
    placed = transform(shapes, to_coordinate_system=coordinate_system)
    geometries = shapely.to_geojson(placed.geometry.to_numpy())
    classes = pd.Categorical(shapes["class"]) if "class" in shapes.columns else pd.Categorical([None] * len(shapes))
    rows = zip(shapes.index.astype(str), geometries, classes.codes, strict=True)
    with path.open("w") as handle:
        handle.write('{"type":"FeatureCollection","features":[')
        for position, (object_id, geometry, code) in enumerate(rows):
            properties: dict[str, Any] = {"objectType": object_type}
            if code >= 0:
                colour = _CLASS_COLOURS[code % len(_CLASS_COLOURS)]
                properties["classification"] = {"name": str(classes.categories[code]), "color": list(colour)}
            handle.write(
                f'{"," if position else ""}{{"type":"Feature","id":{json.dumps(object_id)},"geometry":{geometry},'
                f'"properties":{json.dumps(properties)}}}'
            )
        handle.write("]}")
    return path


# --------------------------------------------------------------------------------------------- reading
def _read(
    path: Path,
    *,
    format: str,  # noqa: A002
    pixel_size_um: float,
    to_global: BaseTransformation | None,
    type_info: TypeInfo | None,
    nucleus_geometry: bool,
) -> tuple[GeoDataFrame, str, _Report]:
    if format not in ("auto", *FORMATS):
        raise InputError(f"{path}: unknown segmentation format {format!r} (expected 'auto' or one of {FORMATS})")
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected a CellViT, HoVer-Net, QuPath or ImageJ segmentation)")
    if format == "imagej" or (format == "auto" and _looks_like_imagej(path)):
        return _to_frame(path, _parse_imagej(path), source="imagej", pixel_size_um=pixel_size_um, to_global=to_global)
    content = _load_json(path)
    source = _json_source(path, content) if format == "auto" else format
    features = _geojson_features(path, content)
    if source == "hovernet" and isinstance(content, dict) and "nuc" in content:
        objects = _parse_hovernet(path, content, type_info)
    elif source == "cellvit" and isinstance(content, dict) and "cells" in content:
        objects = _parse_cellvit_json(path, content, type_info)
    elif source in ("cellvit", "qupath") and features is not None:
        objects = _parse_features(
            path, features, nucleus_geometry=nucleus_geometry, with_object_type=source == "qupath"
        )
    else:
        raise InputError(f"{path}: expected {_EXPECTED[source]}; found {_describe(content)}")
    return _to_frame(path, objects, source=source, pixel_size_um=pixel_size_um, to_global=to_global)


_EXPECTED = {
    "cellvit": "CellViT output (a list of GeoJSON Features, or a cells.json object with 'cells')",
    "hovernet": "a HoVer-Net json object with 'nuc'",
    "qupath": "QuPath GeoJSON (a FeatureCollection or a list of Features)",
}


def _looks_like_imagej(path: Path) -> bool:
    return path.suffix.lower() in (".zip", ".roi") or zipfile.is_zipfile(path)


def _describe(content: Any) -> str:
    if isinstance(content, dict):
        return f"a JSON object with keys {sorted(content)[:8]}"
    if isinstance(content, list):
        return f"a JSON list of {len(content)} items"
    return f"a JSON {type(content).__name__}"


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: neither JSON nor an ImageJ ROI set ({err})") from err


def _json_source(path: Path, content: Any) -> str:
    if isinstance(content, dict) and "nuc" in content:
        return "hovernet"
    if isinstance(content, dict) and "cells" in content:
        return "cellvit"
    if _geojson_features(path, content) is not None:
        name = path.name.lower()
        return "cellvit" if name == "cells.geojson" or "cellvit" in name else "qupath"
    raise InputError(
        f"{path}: not a segmentation this package reads (expected a CellViT cells.json {{'cells': [...]}}, "
        f"a HoVer-Net json {{'nuc': {{...}}}} or GeoJSON Features); found {_describe(content)}"
    )


def _geojson_features(path: Path, content: Any) -> list[dict[str, Any]] | None:
    """Return the Features of a FeatureCollection, a single Feature or a bare list; ``None`` for other JSON."""
    if isinstance(content, list):
        features = content
    elif isinstance(content, dict) and content.get("type") == "FeatureCollection":
        features = content.get("features")
    elif isinstance(content, dict) and content.get("type") == "Feature":
        features = [content]
    else:
        return None
    if not isinstance(features, list) or not all(isinstance(feature, dict) for feature in features):
        raise InputError(f"{path}: expected a list of GeoJSON Features; found {_describe(features)}")
    return features


def _ring(path: Path, coordinates: Any, where: str) -> np.ndarray:
    try:
        ring = np.asarray(coordinates, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"{path}: {where}: expected a ring of [x, y] vertices ({err})") from err
    if ring.ndim != 2 or ring.shape[1] < 2:
        raise InputError(f"{path}: {where}: expected a ring of [x, y] vertices, found an array of shape {ring.shape}")
    return ring[:, :2]


def _classification_name(classification: Any) -> str | None:
    if isinstance(classification, str):
        return classification
    if not isinstance(classification, dict):
        return None
    if classification.get("name") is not None:
        return str(classification["name"])
    names = classification.get("names")
    return ": ".join(map(str, names)) if names else None


def _parse_features(
    path: Path, features: list[dict[str, Any]], *, nucleus_geometry: bool, with_object_type: bool
) -> _Objects:
    """CellViT and QuPath GeoJSON: one object per Polygon, one per part of a MultiPolygon."""
    objects = _Objects()
    for position, feature in enumerate(features):
        nucleus = feature.get("nucleusGeometry") if nucleus_geometry else None
        geometry = nucleus if isinstance(nucleus, dict) else feature.get("geometry")
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        if kind not in ("Polygon", "MultiPolygon"):
            objects.skipped[str(kind) if kind else "no geometry"] += 1
            continue
        parts = [geometry.get("coordinates")] if kind == "Polygon" else geometry.get("coordinates")
        if not isinstance(parts, list) or not all(isinstance(part, list) and part for part in parts):
            raise InputError(f"{path}: feature {position}: {kind} without polygon coordinates")
        properties = feature.get("properties") or {}
        feature_id = feature.get("id")
        object_type = properties.get("objectType", properties.get("object_type", properties.get("type")))
        if feature_id in _QUPATH_V02_TYPE_IDS:
            object_type = object_type or _QUPATH_V02_TYPE_IDS[feature_id]
            feature_id = None
        base_id = str(feature_id) if feature_id is not None else str(position)
        label = _classification_name(properties.get("classification"))
        columns = {"object_type": object_type} if with_object_type else {}
        for part_number, part in enumerate(parts):
            where = f"feature {position} part {part_number}"
            rings = [_ring(path, ring, where) for ring in part]
            object_id = base_id if len(parts) == 1 else f"{base_id}_{part_number}"
            objects.add(object_id, rings, label, **columns)
    if not objects.ids:
        found = ", ".join(f"{reason}: {count}" for reason, count in sorted(objects.skipped.items())) or "none"
        raise InputError(
            f"{path}: no Polygon or MultiPolygon geometry among its {len(features)} features (found {found})"
        )
    return objects


def _type_names(path: Path, type_info: TypeInfo) -> dict[int, str]:
    """Type id -> name from a HoVer-Net ``type_info.json`` path or a mapping (values: names or [name, colour])."""
    source = path
    if isinstance(type_info, str | Path):
        source = Path(type_info)
        try:
            type_info = json.loads(source.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{source}: cannot read the type names ({err})") from err
    if not isinstance(type_info, Mapping):
        raise InputError(f"{source}: type names must map type ids to names; found {type(type_info).__name__}")
    names = {}
    for type_id, value in type_info.items():
        name = value if isinstance(value, str) else value[0] if isinstance(value, Sequence) and value else None
        if name is None or not str(type_id).lstrip("-").isdigit():
            raise InputError(f"{source}: type names must map integer ids to names; found {type_id!r}: {value!r}")
        names[int(type_id)] = str(name)
    return names


def _cellvit_type_map(path: Path, type_map: Any) -> dict[int, str]:
    """CellViT writes ``{name: id}``, CellViT++ ``{id: name}``; return ``{id: name}``."""
    if not isinstance(type_map, Mapping):
        return {}
    if all(isinstance(value, int) for value in type_map.values()):
        return {value: str(name) for name, value in type_map.items()}
    return _type_names(path, type_map)


def _type_label(type_id: Any, names: Mapping[int, str]) -> str | None:
    if type_id is None:
        return None
    try:
        return names.get(int(type_id), str(type_id))
    except (TypeError, ValueError):  # a type written as its name
        return str(type_id)


def _probability(value: Any) -> float:
    return float(value) if value is not None else np.nan


def _parse_cellvit_json(path: Path, content: dict[str, Any], type_info: TypeInfo | None) -> _Objects:
    cells = content["cells"]
    if not isinstance(cells, list) or not all(isinstance(cell, dict) and "contour" in cell for cell in cells):
        raise InputError(f"{path}: expected 'cells' to be a list of objects with a 'contour'")
    names = _type_names(path, type_info) if type_info is not None else _cellvit_type_map(path, content.get("type_map"))
    objects = _Objects()
    for position, cell in enumerate(cells):
        objects.add(
            str(position),
            [_ring(path, cell["contour"], f"cell {position}")],
            _type_label(cell.get("type"), names),
            probability=_probability(cell.get("type_prob")),
        )
    return objects


def _parse_hovernet(path: Path, content: dict[str, Any], type_info: TypeInfo | None) -> _Objects:
    nuclei = content["nuc"]
    if not isinstance(nuclei, dict) or not all(isinstance(n, dict) and "contour" in n for n in nuclei.values()):
        raise InputError(f"{path}: expected 'nuc' to map instance ids to objects with a 'contour'")
    names = _type_names(path, type_info) if type_info is not None else {}
    objects = _Objects()
    for instance_id, nucleus in nuclei.items():
        objects.add(
            str(instance_id),
            [_ring(path, nucleus["contour"], f"nucleus {instance_id}")],
            _type_label(nucleus.get("type"), names),
            probability=_probability(nucleus.get("type_prob")),
        )
    return objects


def _parse_imagej(path: Path) -> _Objects:
    """ImageJ ``RoiSet.zip`` or ``.roi``: area ROIs become polygons; line, point and composite ROIs are skipped."""
    import roifile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            entries = [(Path(n).stem, archive.read(n)) for n in archive.namelist() if n.lower().endswith(".roi")]
        if not entries:
            raise InputError(f"{path}: a zip without .roi entries (expected an ImageJ RoiSet.zip)")
    else:
        entries = [(path.stem, path.read_bytes())]
    objects = _Objects()
    for name, data in entries:
        try:
            roi = roifile.ImagejRoi.frombytes(data)
        except ValueError as err:
            raise InputError(f"{path}: {name}.roi is not an ImageJ ROI ({err})") from err
        if roi.multi_coordinates is not None:
            objects.skipped["composite ROI"] += 1
        elif roi.roitype.name not in _IMAGEJ_AREA_TYPES:
            objects.skipped[f"{roi.roitype.name.lower()} ROI"] += 1
        else:
            objects.add(name, [_ring(path, roi.coordinates(), f"{name}.roi")], None)
    if not objects.ids:
        raise InputError(f"{path}: none of its {len(entries)} ROIs is an area (found {dict(objects.skipped)})")
    return objects


# --------------------------------------------------------------------------------------------- polygons
def _vertex_count(ring: np.ndarray) -> int:
    closed = len(ring) > 1 and np.array_equal(ring[0], ring[-1])
    return len(ring) - int(closed)


def _largest_polygon_parts(geometries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each geometry, its largest polygon with area (looking one collection level deep).

    Returns the positions (into ``geometries``) that have one, and those polygons.
    """
    parts, owner = shapely.get_parts(geometries, return_index=True)
    parts, inner = shapely.get_parts(parts, return_index=True)
    owner = owner[inner]
    area = shapely.area(parts)
    usable = (shapely.get_type_id(parts) == _POLYGON_TYPE_ID) & (area > 0)
    largest = pd.Series(area[usable]).groupby(owner[usable]).idxmax()
    return largest.index.to_numpy(), parts[usable][largest.to_numpy()]


def _to_frame(
    path: Path, objects: _Objects, *, source: str, pixel_size_um: float, to_global: BaseTransformation | None
) -> tuple[GeoDataFrame, str, _Report]:
    """Build validated polygons (vectorised) from parsed rings, repair or drop the bad ones, and parse the element."""
    kept: list[int] = []
    rings: list[np.ndarray] = []
    ring_owner: list[int] = []
    holes_dropped = 0
    for position, (shell, *holes) in enumerate(objects.rings):
        if _vertex_count(shell) < 3:
            continue
        usable_holes = [hole for hole in holes if _vertex_count(hole) >= 3]
        holes_dropped += len(holes) - len(usable_holes)
        for ring in (shell, *usable_holes):
            rings.append(ring)
            ring_owner.append(len(kept))
        kept.append(position)
    if not kept:
        raise InputError(f"{path}: none of its {len(objects.ids)} polygons has 3 or more vertices")
    lengths = np.fromiter(map(len, rings), dtype=np.int64, count=len(rings))
    linear_rings = shapely.linearrings(np.concatenate(rings), indices=np.repeat(np.arange(len(rings)), lengths))
    polygons = shapely.polygons(linear_rings, indices=np.asarray(ring_owner))

    invalid = np.flatnonzero(~shapely.is_valid(polygons))
    usable = np.ones(len(polygons), dtype=bool)
    usable[invalid] = False
    repaired_at, repaired = _largest_polygon_parts(shapely.make_valid(polygons[invalid]))
    polygons[invalid[repaired_at]] = repaired
    usable[invalid[repaired_at]] = True

    rows = np.asarray(kept, dtype=np.int64)[usable]
    report = _Report(
        polygons=len(rows),
        repaired=len(repaired_at),
        dropped=len(objects.ids) - len(rows),
        holes_dropped=holes_dropped,
        skipped=dict(objects.skipped),
    )
    if not len(rows):
        raise InputError(f"{path}: none of its {len(objects.ids)} polygons has an area")
    index = pd.Index(np.asarray(objects.ids, dtype=object)[rows].astype(str))
    if index.has_duplicates:
        raise InputError(f"{path}: object ids are not unique (e.g. {index[index.duplicated()][0]!r})")
    columns: dict[str, Any] = {
        "class": pd.Categorical(np.asarray(objects.labels, dtype=object)[rows]),
        "source": pd.Categorical([source] * len(rows), categories=[source]),
    }
    for name, values in objects.columns.items():
        selected = np.asarray(values, dtype=object)[rows]
        columns[name] = selected.astype(np.float64) if name == "probability" else pd.Categorical(selected)
    frame = GeoDataFrame(columns, geometry=polygons[usable], index=index)
    element = ShapesModel.parse(frame, transformations=frame_transformations(pixel_size_um, to_global))
    return element, source, report
