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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import shapely
from geopandas import GeoDataFrame
from spatialdata import SpatialData, transform
from spatialdata.models import ShapesModel
from spatialdata.transformations import BaseTransformation, get_transformation

from hest_zarr.converters._nuclei_formats import Objects, SegmentationFormat, TypeInfo, parse_segmentation
from hest_zarr.elements import CoordinateSystems, Elements, frame_transformations, get_record, set_record
from hest_zarr.errors import HestZarrError, InputError
from hest_zarr.schemas import ElementRecord, Provenance

QUPATH_OBJECT_TYPES: tuple[str, ...] = ("detection", "cell", "annotation")
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
    objects, source = parse_segmentation(path, format=format, type_info=type_info, nucleus_geometry=nucleus_geometry)
    return _to_frame(path, objects, source=source, pixel_size_um=pixel_size_um, to_global=to_global)


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
    path: Path, objects: Objects, *, source: str, pixel_size_um: float, to_global: BaseTransformation | None
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
