"""Validate and describe a store: the sample's layout and record, its manifest, then the stored data itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from spatialdata import SpatialData
from spatialdata.transformations import get_transformation

from hest_zarr.elements import Problem, get_record, image_levels, validate_sample
from hest_zarr.errors import HestZarrError, redact
from hest_zarr.store._location import Location, StorageOptions, locate, open_zarr_group
from hest_zarr.store._manifest import checksum_problems, presence_problems, read_manifest, summary_problems
from hest_zarr.store._read import open, read_elements, read_root_attributes  # noqa: A004


def validate(url: str | Path, storage_options: StorageOptions = None, *, check_data: bool = True) -> list[Problem]:
    """Check a store against the schema and its manifest, and report every problem found.

    Parameters
    ----------
    url
        Store path or URL.
    storage_options
        fsspec options for a remote URL.
    check_data
        Also read every object and compare its crc32c with the manifest, and decode every chunk of every image,
        labels and table array and every row group of every points and shapes element (reads the whole store).
        Without it (``--quick``), objects are checked against the manifest by listing only: missing or truncated
        chunks are found, bytes changed in place are not.

    Returns
    -------
    The problems; an empty list means the store is valid.

    Examples
    --------
    >>> for problem in hest_zarr.validate("sample.zarr"):  # doctest: +SKIP
    ...     print(problem)

    """
    location = locate(url, storage_options)
    try:
        attributes = read_root_attributes(location)
        manifest = read_manifest(location, attributes)
    except HestZarrError as err:
        return [Problem("store", "open", str(err))]
    problems = []
    if manifest is not None:  # one problem per damaged object: the first check that fails it
        problems.extend(presence_problems(location, manifest))
        if check_data:
            absent = {problem.field for problem in problems}
            problems.extend(checksum_problems(location, manifest, set(manifest.objects) - absent))
    try:
        sdata = read_elements(location, attributes, None)
    except HestZarrError as err:
        if manifest is not None and not check_data:  # name the object that stopped the read, if its bytes changed
            read_whole = [key for key in manifest.objects if key.split("/")[0] in ("tables", "shapes")]
            damaged = checksum_problems(location, manifest, read_whole)
            if damaged:
                return [*problems, *damaged]
        return [*problems, Problem("store", "open", str(err))]
    problems.extend(validate_sample(sdata))
    if manifest is not None:
        problems.extend(summary_problems(sdata, manifest, kinds=("tables", "shapes", "points")))
    if check_data:
        reported = {problem.field for problem in problems}
        problems.extend(problem for problem in _decode_everything(location, sdata) if problem.field not in reported)
    return problems


def _decode_everything(location: Location, sdata: SpatialData) -> list[Problem]:
    """Decode every chunk of every zarr array (images, labels, tables) and every points row group."""
    root = open_zarr_group(location)
    problems = []
    for kind in ("images", "labels", "tables"):
        if kind not in root:
            continue
        for name, group in root[kind].groups():
            for path, array in _arrays(group):
                for block in np.ndindex(*array.cdata_shape):
                    try:
                        array.get_block_selection(block)
                    except Exception as err:
                        key = "/".join([kind, name, path, "c", *map(str, block)])
                        problems.append(Problem(name, key, f"cannot be decoded ({type(err).__name__}: {err})"))
    for name, points in sdata.points.items():
        try:
            for partition in range(points.npartitions):
                points.get_partition(partition).compute()
        except Exception as err:
            problems.append(Problem(name, "points.parquet", f"cannot be read ({type(err).__name__}: {err})"))
    return problems


def _arrays(group: zarr.Group, prefix: str = "") -> Iterator[tuple[str, zarr.Array]]:
    for name, member in group.members():
        path = f"{prefix}{name}"
        if isinstance(member, zarr.Array):
            yield path, member
        else:
            yield from _arrays(member, path + "/")


def info(url: str | Path, storage_options: StorageOptions = None) -> dict[str, Any]:
    """Summarise a store: schema version, metadata and, for every element, its kind, size and coordinate systems.

    Examples
    --------
    >>> hest_zarr.info("sample.zarr")["elements"]["spot_expression"]["n_obs"]  # doctest: +SKIP
    2898

    """
    sdata = open(url, storage_options)
    record = get_record(sdata)
    elements: dict[str, dict[str, Any]] = {}
    for kind, name, element in sdata.gen_elements():
        entry: dict[str, Any] = {"kind": kind, "name": name}
        if kind == "tables":
            entry.update(n_obs=int(element.n_obs), n_vars=int(element.n_vars))
            entry["region"] = element.uns.get("spatialdata_attrs", {}).get("region")
        else:
            entry["coordinate_systems"] = sorted(get_transformation(element, get_all=True))
            if kind in ("images", "labels"):
                levels = image_levels(element)
                entry["shape"] = [int(n) for n in levels[0].shape]
                entry["levels"] = [[int(n) for n in level.shape] for level in levels]
                entry["dtype"] = str(levels[0].dtype)
            elif kind == "points":
                entry["n_rows"] = len(element)
            else:
                entry["n_rows"] = len(element)
                entry["geometry"] = sorted(set(element.geom_type.astype(str)))
        elements[name] = entry
    return {
        "url": redact(str(url)),
        "schema_version": record.schema_version,
        "pixel_size_um": record.pixel_size_um,
        "metadata": record.metadata.model_dump(mode="json", exclude_none=True),
        "elements": elements,
    }
