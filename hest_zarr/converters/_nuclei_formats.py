"""The segmentation formats read by :mod:`.nuclei`: each file parsed into objects (id, rings, label, extra columns).

:func:`parse_segmentation` tells the format (or takes the one given) and parses CellViT ``cells.geojson`` /
``cells.json``, HoVer-Net json, QuPath GeoJSON or ImageJ ROI sets into :class:`Objects`; the layouts are described in
:mod:`.nuclei`. Polygons are built from the rings, and repaired, by :mod:`.nuclei`.
"""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hest_zarr.errors import InputError

SegmentationFormat = Literal["auto", "cellvit", "hovernet", "qupath", "imagej"]
TypeInfo = Mapping[Any, Any] | str | Path
FORMATS: tuple[str, ...] = ("cellvit", "hovernet", "qupath", "imagej")
#: QuPath v0.2 wrote the object's Java class as the feature id.
_QUPATH_V02_TYPE_IDS = {
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathAnnotationObject": "annotation",
    "PathTileObject": "tile",
}
_IMAGEJ_AREA_TYPES = ("POLYGON", "FREEHAND", "TRACED", "RECT", "OVAL")


@dataclass
class Objects:
    """Segmented objects as parsed: per object its id, rings (shell first, then holes), label and extra columns."""

    ids: list[str] = field(default_factory=list)
    rings: list[list[np.ndarray]] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    columns: dict[str, list[Any]] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)

    def add(self, object_id: str, rings: list[np.ndarray], label: str | None, **columns: Any) -> None:
        """Append one object; ``columns`` are its values of the extra columns (``probability``, ``object_type``)."""
        self.ids.append(object_id)
        self.rings.append(rings)
        self.labels.append(label)
        for name, value in columns.items():
            self.columns.setdefault(name, []).append(value)


def parse_segmentation(
    path: Path,
    *,
    format: str,  # noqa: A002
    type_info: TypeInfo | None,
    nucleus_geometry: bool,
) -> tuple[Objects, str]:
    """Parse a segmentation file into objects; return them and the format they were read as.

    Parameters
    ----------
    path
        The segmentation file.
    format
        ``"auto"`` or one of :data:`FORMATS` (see :func:`hest_zarr.converters.nuclei.read_segmentation`).
    type_info
        Type id -> name for HoVer-Net and CellViT ``cells.json``.
    nucleus_geometry
        For QuPath cell objects, read their ``nucleusGeometry`` instead of the cell boundary.

    Raises
    ------
    InputError
        An unknown format, a missing file, a file in none of the formats or malformed for its own.

    Examples
    --------
    >>> objects, source = parse_segmentation(  # doctest: +SKIP
    ...     Path("RoiSet.zip"), format="auto", type_info=None, nucleus_geometry=False
    ... )
    >>> source, len(objects.ids)  # doctest: +SKIP
    ('imagej', 12)

    """
    if format not in ("auto", *FORMATS):
        raise InputError(f"{path}: unknown segmentation format {format!r} (expected 'auto' or one of {FORMATS})")
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected a CellViT, HoVer-Net, QuPath or ImageJ segmentation)")
    if format == "imagej" or (format == "auto" and _looks_like_imagej(path)):
        return _parse_imagej(path), "imagej"
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
    return objects, source


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
) -> Objects:
    """CellViT and QuPath GeoJSON: one object per Polygon, one per part of a MultiPolygon."""
    objects = Objects()
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


def _parse_cellvit_json(path: Path, content: dict[str, Any], type_info: TypeInfo | None) -> Objects:
    cells = content["cells"]
    if not isinstance(cells, list) or not all(isinstance(cell, dict) and "contour" in cell for cell in cells):
        raise InputError(f"{path}: expected 'cells' to be a list of objects with a 'contour'")
    names = _type_names(path, type_info) if type_info is not None else _cellvit_type_map(path, content.get("type_map"))
    objects = Objects()
    for position, cell in enumerate(cells):
        objects.add(
            str(position),
            [_ring(path, cell["contour"], f"cell {position}")],
            _type_label(cell.get("type"), names),
            probability=_probability(cell.get("type_prob")),
        )
    return objects


def _parse_hovernet(path: Path, content: dict[str, Any], type_info: TypeInfo | None) -> Objects:
    nuclei = content["nuc"]
    if not isinstance(nuclei, dict) or not all(isinstance(n, dict) and "contour" in n for n in nuclei.values()):
        raise InputError(f"{path}: expected 'nuc' to map instance ids to objects with a 'contour'")
    names = _type_names(path, type_info) if type_info is not None else {}
    objects = Objects()
    for instance_id, nucleus in nuclei.items():
        objects.add(
            str(instance_id),
            [_ring(path, nucleus["contour"], f"nucleus {instance_id}")],
            _type_label(nucleus.get("type"), names),
            probability=_probability(nucleus.get("type_prob")),
        )
    return objects


def _parse_imagej(path: Path) -> Objects:
    """ImageJ ``RoiSet.zip`` or ``.roi``: area ROIs become polygons; line, point and composite ROIs are skipped."""
    import roifile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            entries = [(Path(n).stem, archive.read(n)) for n in archive.namelist() if n.lower().endswith(".roi")]
        if not entries:
            raise InputError(f"{path}: a zip without .roi entries (expected an ImageJ RoiSet.zip)")
    else:
        entries = [(path.stem, path.read_bytes())]
    objects = Objects()
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
