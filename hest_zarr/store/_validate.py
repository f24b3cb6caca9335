"""Validate and describe a store: the sample's layout and record, then the stored data itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from spatialdata.transformations import get_transformation

from hest_zarr.elements import Problem, get_record, image_levels, validate_sample
from hest_zarr.errors import HestZarrError, redact
from hest_zarr.store._location import StorageOptions, locate, open_zarr_group
from hest_zarr.store._read import open  # noqa: A004


def validate(url: str | Path, storage_options: StorageOptions = None, *, check_data: bool = True) -> list[Problem]:
    """Check a store against the schema and report every problem found.

    Parameters
    ----------
    url
        Store path or URL.
    storage_options
        fsspec options for a remote URL.
    check_data
        Also decode every image chunk, to find corrupt or missing chunks (reads the whole image).

    Returns
    -------
    The problems; an empty list means the store is valid.

    Examples
    --------
    >>> for problem in hest_zarr.validate("sample.zarr"):  # doctest: +SKIP
    ...     print(problem)

    """
    try:
        sdata = open(url, storage_options)
    except HestZarrError as err:
        return [Problem("store", "open", str(err))]
    problems = validate_sample(sdata)
    if check_data:
        problems.extend(_check_chunks(url, storage_options))
    return problems


def _check_chunks(url: str | Path, storage_options: StorageOptions) -> list[Problem]:
    location = locate(url, storage_options)
    root = open_zarr_group(location)
    problems = []
    for kind in ("images", "labels"):
        if kind not in root:
            continue
        for name, group in root[kind].groups():
            for level_name, array in group.arrays():
                for block in np.ndindex(*array.cdata_shape):
                    try:
                        array.get_block_selection(block)
                    except Exception as err:
                        key = "/".join(["c", *map(str, block)])
                        problems.append(
                            Problem(
                                name, f"{level_name} chunk {key}", f"cannot be decoded ({type(err).__name__}: {err})"
                            )
                        )
    return problems


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
