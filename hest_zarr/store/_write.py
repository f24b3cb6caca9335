"""Write sample stores and add elements to them, through the one staged commit (:mod:`._commit`)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zarr
from pydantic import ValidationError
from spatialdata import SpatialData

from hest_zarr.elements import ElementUpdate, get_record, set_record
from hest_zarr.errors import HestZarrError, redact
from hest_zarr.schemas import (
    ElementRecord,
    Keys,
    Provenance,
    SampleMetadata,
    StoreRecord,
    expected_kind,
    magnification_from_pixel_size,
)
from hest_zarr.store._commit import (
    commit_elements,
    commit_store,
    prepare_target,
    recover_remote,
    remove_leftovers,
    staging_directory,
)
from hest_zarr.store._location import ROOT_METADATA, StorageOptions, locate, network_errors
from hest_zarr.store._manifest import Manifest, build_manifest, read_manifest, seal_store
from hest_zarr.store._raster import DEFAULT_CHUNK_SIZE, write_image_element
from hest_zarr.store._read import read_root_attributes
from hest_zarr.store.codecs import DEFAULT_JPEG_QUALITY, TABLE_COMPRESSORS, ImageCodec


def write(
    sdata: SpatialData,
    url: str | Path,
    *,
    overwrite: bool = False,
    image_codec: ImageCodec = "zstd",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    storage_options: StorageOptions = None,
) -> str:
    """Write a sample to a store, locally or remotely, atomically.

    Parameters
    ----------
    sdata
        The sample; it must carry a record (:func:`set_record`).
    url
        Local path or fsspec URL of the new store.
    overwrite
        Replace an existing store. Without it an existing target is an error.
    image_codec
        ``"zstd"`` (lossless, default) or ``"jpeg"`` for image arrays.
    jpeg_quality
        JPEG quality when ``image_codec="jpeg"``.
    chunk_size
        Image chunk side in pixels.
    storage_options
        fsspec options for a remote URL.

    Returns
    -------
    The URL written.

    Examples
    --------
    >>> hest_zarr.write(sdata, "s3://bucket/sample.zarr", image_codec="jpeg", jpeg_quality=90)  # doctest: +SKIP

    """
    record = get_record(sdata)
    missing = [name for _, name, _ in sdata.gen_elements() if name not in record.elements]
    if missing:
        raise HestZarrError(f"elements {missing} have no provenance in the record; add an ElementRecord for each")
    location, exists = prepare_target(url, overwrite, storage_options, kind="sample")
    with staging_directory(location) as staging:
        manifest = _write_staged(
            sdata, staging, image_codec=image_codec, jpeg_quality=jpeg_quality, chunk_size=chunk_size
        )
        seal_store(staging, manifest)
        commit_store(staging, location, replace=exists)
    return location.url


def _write_staged(
    sdata: SpatialData, staging: Path, *, image_codec: ImageCodec, jpeg_quality: int, chunk_size: int
) -> Manifest:
    """Write every element into a fresh local directory; return its manifest (the caller seals the store)."""
    SpatialData(attrs=sdata.attrs).write(staging, consolidate_metadata=False)
    non_raster = SpatialData(shapes=sdata.shapes, points=sdata.points, attrs=sdata.attrs)
    non_raster.path = staging
    for kind, name, element in sdata.gen_elements():
        _write_element(non_raster, staging, kind, name, element, image_codec, jpeg_quality, chunk_size)
    return build_manifest(staging, {name: (kind, element) for kind, name, element in sdata.gen_elements()})


def _write_table(staging: Path, name: str, table: Any) -> None:
    """Write a table as spatialdata does, with every array chunk checksummed (zstd then crc32c)."""
    from anndata.io import write_elem
    from spatialdata._io.format import CurrentTablesFormat
    from spatialdata.models import TableModel, get_table_keys

    region = region_key = instance_key = None
    if TableModel.ATTRS_KEY in table.uns:
        region, region_key, instance_key = get_table_keys(table)
        TableModel.validate(table)
    tables = zarr.open_group(str(staging), mode="r+").require_group("tables")
    write_elem(tables, name, table, dataset_kwargs={"compressors": TABLE_COMPRESSORS})
    attributes = tables[name].attrs
    attributes.update(
        {
            "spatialdata-encoding-type": "ngff:regions_table",
            "region": region,
            "region_key": region_key,
            "instance_key": instance_key,
            "version": CurrentTablesFormat().spatialdata_format_version,
        }
    )


def _write_element(
    non_raster: SpatialData,
    staging: Path,
    kind: str,
    name: str,
    element: Any,
    image_codec: ImageCodec,
    jpeg_quality: int,
    chunk_size: int,
) -> None:
    if kind in ("images", "labels"):
        root = zarr.open_group(str(staging), mode="r+")
        images = root.require_group(kind)
        write_image_element(images, name, element, codec=image_codec, jpeg_quality=jpeg_quality, chunk_size=chunk_size)
    elif kind == "tables":
        _write_table(staging, name, element)
    else:
        non_raster.write_element(name)


def add_elements(
    url: str | Path,
    elements: Mapping[str, Any],
    provenance: Mapping[str, Provenance],
    *,
    metadata_updates: Mapping[str, Any] | None = None,
    pixel_size_um: float | None = None,
    replace: bool = False,
    image_codec: ImageCodec = "zstd",
    storage_options: StorageOptions = None,
) -> str:
    """Add elements to an existing store (or replace some), and update its record.

    Operators write their results with this: tissue polygons, new spot positions, pooled tables,
    embeddings. Everything is staged first; then each element is moved in (local) or uploaded (remote),
    and the root record, with the new provenance and metadata, is written last and the metadata
    re-consolidated.

    Parameters
    ----------
    url
        Local path or fsspec URL of an existing store.
    elements
        Element name -> spatialdata element (parsed by its model, transformations set). May be empty to
        update only the metadata.
    provenance
        Element name -> where it came from; one entry for every element. An entry for an element of the store
        that is not in ``elements`` updates its record only (its data is not rewritten).
    metadata_updates
        :class:`~hest_zarr.schemas.SampleMetadata` fields to set (e.g. ``pixel_size_um_estimated``).
    pixel_size_um
        New scale from ``global`` to ``um`` for the record (keep the old one when ``None``).
    replace
        Replace elements of the same name; without it an existing name is an error.
    image_codec
        Codec of new image or label elements.
    storage_options
        fsspec options for a remote URL.

    Returns
    -------
    The URL of the store.

    Examples
    --------
    >>> add_elements(  # doctest: +SKIP
    ...     "sample.zarr", {"tissue": polygons}, {"tissue": Provenance(converter="ops.tissue", method="threshold")}
    ... )

    """
    location = locate(url, storage_options)
    if location.is_local:
        remove_leftovers(Path(location.path))
    else:
        recover_remote(location)
    attributes = read_root_attributes(location)
    record = StoreRecord.model_validate(attributes[Keys.ROOT_ATTRS])
    old_manifest = read_manifest(location, attributes)
    with network_errors(location.url):
        old_root = json.loads(location.fs.cat_file(location.join(ROOT_METADATA)))
    missing = sorted(set(elements) - set(provenance))
    if missing:
        raise HestZarrError(f"elements {missing} have no provenance; pass a Provenance for each")
    with warnings.catch_warnings():  # a table may annotate shapes the store already holds
        warnings.filterwarnings("ignore", message="The table is annotating", category=UserWarning)
        new = SpatialData.init_from_elements(dict(elements)) if elements else SpatialData()
    kinds = {name: kind for kind, name, _ in new.gen_elements()}
    for name, kind in kinds.items():
        wanted = expected_kind(name)
        if wanted != kind:
            raise HestZarrError(f"{location.url}: '{name}' must be {wanted or 'a layout name'}, got {kind}")
        if name in record.elements and not replace:
            raise HestZarrError(f"{location.url}: already holds '{name}' (pass replace=True to replace it)")
        if name in record.elements and record.elements[name].kind != kind:
            raise HestZarrError(f"{location.url}: '{name}' is {record.elements[name].kind}, cannot replace by {kind}")
    updated = record.model_copy(deep=True)
    for name, kind in kinds.items():
        updated.elements[name] = ElementRecord(kind=kind, provenance=provenance[name])
    for name in sorted(set(provenance) - set(kinds)):  # provenance only: the element's data is left untouched
        if name not in record.elements:
            raise HestZarrError(f"{location.url}: provenance for '{name}', which is neither given nor in the store")
        updated.elements[name] = record.elements[name].model_copy(update={"provenance": provenance[name]})
    if metadata_updates:
        metadata = {**record.metadata.model_dump(exclude_none=True), **metadata_updates}
        estimated = metadata_updates.get("pixel_size_um_estimated")
        if estimated is not None and "magnification" not in metadata_updates:
            metadata["magnification"] = magnification_from_pixel_size(estimated)
        try:
            updated.metadata = SampleMetadata.model_validate(metadata)
        except ValidationError as err:
            raise HestZarrError(f"{location.url}: invalid metadata update {dict(metadata_updates)}: {err}") from err
    if pixel_size_um is not None:
        updated.pixel_size_um = pixel_size_um
    updated = StoreRecord.model_validate(updated.model_dump())
    set_record(new, updated)

    replaced = [f"{kind}/{name}" for name, kind in kinds.items()]
    with staging_directory(location) as staging:
        manifest = _write_staged(
            new, staging, image_codec=image_codec, jpeg_quality=DEFAULT_JPEG_QUALITY, chunk_size=DEFAULT_CHUNK_SIZE
        )
        if old_manifest is not None:
            manifest = old_manifest.without(replaced).merged(manifest)
        seal_store(staging, manifest)
        _merge_root(staging, old_root, replaced)
        commit_elements(staging, location, replaced)
    return location.url


def _merge_root(staging: Path, old_root: dict[str, Any], replaced: list[str]) -> None:
    """Make the staged root ``zarr.json`` the store's new one: old attributes and consolidated metadata, updated.

    Consolidated entries of the replaced element groups are dropped, those of the staged groups added; root
    attributes other than the ones staged (the record, the manifest) are kept.
    """
    staged = json.loads((staging / ROOT_METADATA).read_bytes())
    scopes = tuple(replaced)
    old_entries = (old_root.get("consolidated_metadata") or {}).get("metadata", {})
    entries = {
        key: value
        for key, value in old_entries.items()
        if not any(key == scope or key.startswith(scope + "/") for scope in scopes)
    }
    entries.update((staged.get("consolidated_metadata") or {}).get("metadata", {}))
    staged["attributes"] = {**old_root.get("attributes", {}), **staged.get("attributes", {})}
    # sorted by path, as zarr writes them: its reader groups the entries of one parent only when they are adjacent
    staged["consolidated_metadata"] = {
        "kind": "inline",
        "must_understand": False,
        "metadata": dict(sorted(entries.items())),
    }
    (staging / ROOT_METADATA).write_text(json.dumps(staged))


def apply_update(url: str | Path, update: ElementUpdate, *, storage_options: StorageOptions = None) -> ElementUpdate:
    """Write an operator's result into the store it was computed from; return the update as written.

    Its store-relative provenance inputs are anchored under ``url`` (:meth:`ElementUpdate.read_from`), then
    everything goes through :func:`add_elements`.

    Examples
    --------
    >>> sdata = hest_zarr.open("perik.zarr")  # doctest: +SKIP
    >>> apply_update("perik.zarr", segment_sample(sdata).update)  # doctest: +SKIP

    """
    written = update.read_from(redact(str(url)))  # provenance never records URL credentials
    with warnings.catch_warnings():  # tables may annotate shapes that stay in the store, not in the update
        warnings.filterwarnings("ignore", message=".*is annotating '.*', which is not present", category=UserWarning)
        add_elements(
            url,
            written.elements,
            written.provenance,
            metadata_updates=written.metadata_updates,
            pixel_size_um=written.pixel_size_um,
            replace=written.replace,
            storage_options=storage_options,
        )
    return written
