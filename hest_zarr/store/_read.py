"""Read a sample store lazily, from a local path or any fsspec URL (see the package docstring for why by hand)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from spatialdata import SpatialData

from hest_zarr.errors import (
    CorruptStoreError,
    HestZarrError,
    IncompleteStoreError,
    NotAStoreError,
    SchemaVersionError,
    StoreNotFoundError,
)
from hest_zarr.schemas import ELEMENT_GROUPS, SUPPORTED_SCHEMA_VERSIONS, Keys
from hest_zarr.store._commit import JOURNAL
from hest_zarr.store._location import ROOT_METADATA, Location, StorageOptions, locate, network_errors, open_zarr_group
from hest_zarr.store._manifest import (
    Manifest,
    checksum_problems,
    presence_problems,
    raise_problems,
    read_manifest,
    summary_problems,
)
from hest_zarr.store._raster import read_image_element


def read_root_attributes(location: Location) -> dict[str, Any]:
    """Return the root group's attributes, or raise the error that says what the URL holds instead."""
    fs, url = location.fs, location.url
    with network_errors(url):
        try:
            raw = fs.cat_file(location.join(ROOT_METADATA))
        except (FileNotFoundError, NotADirectoryError):
            raw = None
        if raw is None:
            _refuse_unfinished(location)
            if not fs.exists(location.path):
                raise StoreNotFoundError(f"{url}: no such store (nothing exists at this path)")
            if fs.isfile(location.path):
                raise NotAStoreError(f"{url}: is a file, not a store (expected a zarr directory)")
            children = {Path(p.rstrip("/")).name for p in fs.ls(location.path, detail=False)}
            if children & set(ELEMENT_GROUPS):
                raise IncompleteStoreError(
                    f"{url}: incomplete store: element data is present but the root {ROOT_METADATA} is missing "
                    "(the write that made it did not finish); write it again"
                )
            raise NotAStoreError(f"{url}: not a zarr store (no {ROOT_METADATA}; found {sorted(children)[:5]})")
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptStoreError(f"{location.join(ROOT_METADATA)}: not valid JSON ({err})") from err
    attributes = document.get("attributes", {}) if isinstance(document, dict) else {}
    if document.get("zarr_format") != 3 or document.get("node_type") != "group":
        raise NotAStoreError(f"{url}: not a zarr v3 group (hest-zarr stores are zarr v3)")
    if Keys.ROOT_ATTRS not in attributes:
        raise NotAStoreError(f"{url}: a zarr group but not a hest-zarr sample store (no '{Keys.ROOT_ATTRS}' record)")
    version = attributes[Keys.ROOT_ATTRS].get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise SchemaVersionError(
            f"{url}: schema version {version!r} is not supported "
            f"(this hest-zarr reads {list(SUPPORTED_SCHEMA_VERSIONS)})"
        )
    return attributes


def _refuse_unfinished(location: Location) -> None:
    """Raise the error that says how to finish or redo a commit whose journal is still in the store."""
    fs = location.fs
    try:
        raw = fs.cat_file(location.join(JOURNAL))
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        kind = json.loads(raw).get("kind")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        kind = None
    if kind == "move":
        raise IncompleteStoreError(
            f"{location.url}: an interrupted write left this store half-replaced (the new version is complete "
            f"beside it); finish it with `hest-zarr repair {location.url}`"
        )
    raise IncompleteStoreError(
        f"{location.url}: incomplete store: the write that made it did not finish; write it again (the next write "
        "to this URL replaces it)"
    )


def open(url: str | Path, storage_options: StorageOptions = None) -> SpatialData:  # noqa: A001
    """Open a sample store lazily, from a local path or any fsspec URL.

    Parameters
    ----------
    url
        Local path, or ``s3://``, ``gs://``, ``https://``... URL of the store.
    storage_options
        Options of the fsspec filesystem (credentials, ``client_kwargs={"endpoint_url": ...}``...).

    Returns
    -------
    A SpatialData object. Images are dask-backed: no pixel is fetched until computed, and then only the
    chunks touched.

    Raises
    ------
    StoreNotFoundError, NotAStoreError, IncompleteStoreError, SchemaVersionError, CorruptStoreError,
    RemoteUnreachableError
        With a message naming the URL and the problem.

    Examples
    --------
    >>> import hest_zarr
    >>> sdata = hest_zarr.open("s3://bucket/TENX95.zarr", storage_options={"anon": True})  # doctest: +SKIP
    >>> sdata["he"]["scale0"]["image"][:, :256, :256].values  # fetches one chunk  # doctest: +SKIP

    """
    location = locate(url, storage_options)
    attributes = read_root_attributes(location)
    manifest = read_manifest(location, attributes)
    if manifest is not None:
        raise_problems(location.url, presence_problems(location, manifest))
    sdata = read_elements(location, attributes, manifest)
    if manifest is not None:
        raise_problems(location.url, summary_problems(sdata, manifest))
    return sdata


def read_elements(location: Location, attributes: dict[str, Any], manifest: Manifest | None) -> SpatialData:
    """Read a store whose root attributes were read; a failure names the damaged object when the manifest can."""
    try:
        if location.is_local:
            import spatialdata

            return spatialdata.read_zarr(location.path)
        return _read_remote(location, attributes)
    except Exception as err:
        if manifest is not None:  # name the object whose bytes changed, if one did
            loaded = [key for key in manifest.objects if key.split("/")[0] in ("tables", "shapes")]
            raise_problems(location.url, checksum_problems(location, manifest, loaded))
        if isinstance(err, HestZarrError):
            raise
        with network_errors(location.url):
            raise CorruptStoreError(f"{location.url}: cannot read the store ({type(err).__name__}: {err})") from err
        raise  # pragma: no cover  (unreachable: the context manager re-raises)


def _read_remote(location: Location, attributes: dict[str, Any]) -> SpatialData:
    """Build the SpatialData object of a remote store (see the module docstring for why)."""
    import dask.dataframe as dd
    import geopandas
    from anndata import read_zarr as read_anndata_zarr
    from spatialdata._io._utils import _get_transformations_from_ngff_dict
    from spatialdata._io.format import PointsFormats
    from spatialdata.transformations._utils import _set_transformations

    root = open_zarr_group(location)
    elements: dict[str, dict[str, Any]] = {kind: {} for kind in ELEMENT_GROUPS}
    for kind in ELEMENT_GROUPS:
        if kind not in root:
            continue
        for name, group in root[kind].groups():
            where = f"{location.url}/{kind}/{name}"
            try:
                if kind in ("images", "labels"):
                    elements[kind][name] = read_image_element(group)
                elif kind == "shapes":
                    shapes = geopandas.read_parquet(location.join(kind, name, "shapes.parquet"), filesystem=location.fs)
                    _set_transformations(
                        shapes, _get_transformations_from_ngff_dict(group.attrs["coordinateTransformations"])
                    )
                    elements[kind][name] = shapes
                elif kind == "points":
                    points = dd.read_parquet(
                        f"{location.url.rstrip('/')}/{kind}/{name}/points.parquet",
                        storage_options=location.storage_options or None,
                    )
                    _set_transformations(
                        points, _get_transformations_from_ngff_dict(group.attrs["coordinateTransformations"])
                    )
                    version = group.attrs["spatialdata_attrs"]["version"]
                    points.attrs["spatialdata_attrs"] = PointsFormats[version].attrs_from_dict(group.attrs.asdict())
                    elements[kind][name] = points
                else:
                    table = read_anndata_zarr(group)
                    _normalise_table_attrs(table)
                    elements[kind][name] = table
            except Exception as err:
                with network_errors(where):
                    raise CorruptStoreError(f"{where}: cannot read this element ({type(err).__name__}: {err})") from err
    root_attrs = {key: value for key, value in attributes.items() if key != "spatialdata_attrs"}
    return SpatialData(**elements, attrs=root_attrs)


def _normalise_table_attrs(table: Any) -> None:
    """Fill the table attributes spatialdata's reader fills (None for omitted keys, region as list)."""
    from spatialdata.models import TableModel

    attrs = table.uns.get(TableModel.ATTRS_KEY)
    if attrs is None:
        return
    for key in ("region", "region_key", "instance_key"):
        attrs.setdefault(key, None)
    if isinstance(attrs["region"], np.ndarray):
        attrs["region"] = attrs["region"].tolist()
