"""Open, write, validate and describe sample stores, on local disk or any fsspec URL.

This is the only module that knows about paths, URLs and fsspec. A sample store is a zarr v3 group
that ``spatialdata.read_zarr`` opens unchanged, whose root attributes carry a ``hest_zarr`` record
(:class:`~hest_zarr.schemas.StoreRecord`).

- Local stores are read with spatialdata itself.
- Remote stores (``s3://``, ``gs://``, ``https://``, any fsspec URL) are read here, on zarr's
  ``FsspecStore``: spatialdata 0.7's ``read_zarr`` resolves remote element paths as local ones and fails.
  Images stay dask-backed and fetch only the chunks a computation touches; shapes, points and tables
  load as spatialdata loads them (GeoParquet, dask Parquet, AnnData).
- Writes are atomic. Everything is first written to a staging directory next to the target (local) or
  in a temporary directory (remote). A local store is then moved into place with one ``rename``; a
  remote store is uploaded with its root ``zarr.json`` last, so an interrupted upload leaves no root
  metadata and :func:`open` refuses it as incomplete.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr
from pydantic import ValidationError
from spatialdata import SpatialData
from spatialdata.transformations import get_transformation

from hest_zarr import _raster
from hest_zarr._constants import ELEMENT_GROUPS, CoordinateSystems, Keys
from hest_zarr.codecs import DEFAULT_JPEG_QUALITY, ImageCodec
from hest_zarr.errors import (
    CorruptStoreError,
    HestZarrError,
    IncompleteStoreError,
    NotAStoreError,
    RemoteUnreachableError,
    SchemaVersionError,
    StoreNotFoundError,
)
from hest_zarr.schemas import (
    REQUIRED_COORDINATE_SYSTEMS,
    SUPPORTED_SCHEMA_VERSIONS,
    ElementRecord,
    Provenance,
    SampleMetadata,
    StoreRecord,
    annotated_region,
    expected_kind,
    magnification_from_pixel_size,
)

StorageOptions = dict[str, Any] | None
ROOT_METADATA = "zarr.json"


# --------------------------------------------------------------------------------------------- locations
@dataclass(frozen=True)
class _Location:
    url: str
    fs: fsspec.AbstractFileSystem
    path: str
    storage_options: dict[str, Any]

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _locate(url: str | Path, storage_options: StorageOptions) -> _Location:
    url = str(url)
    options = dict(storage_options or {})
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as err:
        raise HestZarrError(f"{url}: cannot open this URL ({err})") from err
    return _Location(url=url, fs=fs, path=path.rstrip("/") or path, storage_options=options)


@contextlib.contextmanager
def _network_errors(url: str) -> Iterator[None]:
    """Turn the many ways a server can be unreachable into one :class:`RemoteUnreachableError`."""
    try:
        yield
    except (FileNotFoundError, HestZarrError):
        raise
    except Exception as err:  # aiohttp, botocore and gcsfs each raise their own types
        if _is_connection_error(err):
            raise RemoteUnreachableError(f"{url}: cannot reach the server ({type(err).__name__}: {err})") from err
        raise


def _is_connection_error(err: BaseException) -> bool:
    for exc in _causes(err):
        name = type(exc).__name__
        module = type(exc).__module__
        if isinstance(exc, ConnectionError | TimeoutError) or name in {
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ClientConnectorError",
            "ServerDisconnectedError",
            "ClientOSError",
        }:
            return True
        if module.startswith("aiohttp") and "Connect" in name:
            return True
    return False


def _causes(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# --------------------------------------------------------------------------------------------- reading
def _read_root_attributes(location: _Location) -> dict[str, Any]:
    """Return the root group's attributes, or raise the error that says what the URL holds instead."""
    fs, url = location.fs, location.url
    with _network_errors(url):
        try:
            raw = fs.cat_file(location.join(ROOT_METADATA))
        except FileNotFoundError:
            raw = None
        if raw is None:
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
    location = _locate(url, storage_options)
    attributes = _read_root_attributes(location)
    try:
        if location.is_local:
            import spatialdata

            return spatialdata.read_zarr(location.path)
        return _read_remote(location, attributes)
    except HestZarrError:
        raise
    except Exception as err:
        with _network_errors(location.url):
            raise CorruptStoreError(f"{location.url}: cannot read the store ({type(err).__name__}: {err})") from err
        raise  # pragma: no cover  (unreachable: the context manager re-raises)


def _chunk_read_options(location: _Location) -> dict[str, Any]:
    """Fsspec options for reading many small objects (chunks) of a store."""
    options = dict(location.storage_options)
    if "s3" in _protocols(location.fs):
        # s3fs sends a HEAD before every whole-object GET when it may split large objects into
        # concurrent ranges; chunks are small and fetched concurrently already, so that HEAD only
        # doubles the requests (and the latency) of every chunk read.
        options.setdefault("max_concurrency", 1)
    return options


def chunk_location(url: str | Path, storage_options: StorageOptions = None) -> _Location:
    """Locate a store with the filesystem options suited to fetching its chunks one by one."""
    location = _locate(url, storage_options)
    return _locate(url, _chunk_read_options(location)) if not location.is_local else location


def _open_zarr_group(location: _Location, mode: str = "r") -> zarr.Group:
    options = _chunk_read_options(location)
    store = zarr.storage.FsspecStore.from_url(location.url, storage_options=options or None, read_only=(mode == "r"))
    return zarr.open_group(store, mode=mode, zarr_format=3)


def _read_remote(location: _Location, attributes: dict[str, Any]) -> SpatialData:
    """Build the SpatialData object of a remote store (see the module docstring for why)."""
    import dask.dataframe as dd
    import geopandas
    from anndata import read_zarr as read_anndata_zarr
    from spatialdata._io._utils import _get_transformations_from_ngff_dict
    from spatialdata._io.format import PointsFormats
    from spatialdata.transformations._utils import _set_transformations

    root = _open_zarr_group(location)
    elements: dict[str, dict[str, Any]] = {kind: {} for kind in ELEMENT_GROUPS}
    for kind in ELEMENT_GROUPS:
        if kind not in root:
            continue
        for name, group in root[kind].groups():
            where = f"{location.url}/{kind}/{name}"
            try:
                if kind in ("images", "labels"):
                    elements[kind][name] = _raster.read_image_element(group)
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
                with _network_errors(where):
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


# --------------------------------------------------------------------------------------------- the record
def get_record(sdata: SpatialData) -> StoreRecord:
    """Return the validated ``hest_zarr`` record of a SpatialData object.

    Raises
    ------
    NotAStoreError
        When the object carries no record or an invalid one.

    """
    raw = sdata.attrs.get(Keys.ROOT_ATTRS)
    if raw is None:
        raise NotAStoreError(f"this SpatialData object carries no '{Keys.ROOT_ATTRS}' record (use set_record)")
    try:
        return StoreRecord.model_validate(raw)
    except ValidationError as err:
        raise NotAStoreError(f"invalid '{Keys.ROOT_ATTRS}' record: {err}") from err


def set_record(sdata: SpatialData, record: StoreRecord) -> None:
    """Attach a record to a SpatialData object (stored in its root attributes on write)."""
    sdata.attrs[Keys.ROOT_ATTRS] = record.model_dump(mode="json")


# --------------------------------------------------------------------------------------------- writing
def write(
    sdata: SpatialData,
    url: str | Path,
    *,
    overwrite: bool = False,
    image_codec: ImageCodec = "zstd",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    chunk_size: int = _raster.DEFAULT_CHUNK_SIZE,
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
    location = _locate(url, storage_options)
    with _network_errors(location.url):
        exists = location.fs.exists(location.path)
    if exists:
        _check_replaceable(location, overwrite)

    if location.is_local:
        target = Path(location.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.partial"
        try:
            _write_staged(sdata, staging, image_codec=image_codec, jpeg_quality=jpeg_quality, chunk_size=chunk_size)
            _replace_local(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        with tempfile.TemporaryDirectory(prefix="hest-zarr-") as tmp:
            staging = Path(tmp) / "store.zarr"
            _write_staged(sdata, staging, image_codec=image_codec, jpeg_quality=jpeg_quality, chunk_size=chunk_size)
            with _network_errors(location.url):
                _upload(staging, location, replace=exists)
    return location.url


def _write_staged(
    sdata: SpatialData, staging: Path, *, image_codec: ImageCodec, jpeg_quality: int, chunk_size: int
) -> None:
    """Write every element into a fresh local directory, then consolidate its metadata."""
    SpatialData(attrs=sdata.attrs).write(staging, consolidate_metadata=False)
    non_raster = SpatialData(
        shapes=sdata.shapes, points=sdata.points, tables=sdata.tables, labels=sdata.labels, attrs=sdata.attrs
    )
    non_raster.path = staging
    for kind, name, element in sdata.gen_elements():
        _write_element(non_raster, staging, kind, name, element, image_codec, jpeg_quality, chunk_size)
    zarr.consolidate_metadata(str(staging))


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
        _raster.write_image_element(
            images, name, element, codec=image_codec, jpeg_quality=jpeg_quality, chunk_size=chunk_size
        )
    else:
        non_raster.write_element(name)


def _check_replaceable(location: _Location, overwrite: bool) -> None:
    """Refuse to replace an existing target unless asked to, and never one that is not a zarr store.

    ``overwrite=True`` on a mistyped path (a home folder, a data folder) must not delete it.
    """
    if not overwrite:
        raise HestZarrError(f"{location.url}: already exists (pass overwrite=True to replace it)")
    with _network_errors(location.url):
        is_zarr = location.fs.exists(location.join(ROOT_METADATA))
    if not is_zarr:
        raise HestZarrError(
            f"{location.url}: exists and is not a zarr store (no {ROOT_METADATA}); not replacing it "
            "(delete it yourself if it is what you meant)"
        )


def _replace_local(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    retired = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
    target.rename(retired)
    try:
        staging.rename(target)
    except BaseException:
        retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _upload(staging: Path, location: _Location, *, replace: bool) -> None:
    fs = location.fs
    if replace:
        # un-commit first: without its root metadata the old store no longer opens
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(location.join(ROOT_METADATA))
        fs.rm(location.path, recursive=True)
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p != staging / ROOT_METADATA)
    if files:
        fs.put([str(p) for p in files], [location.join(*p.relative_to(staging).parts) for p in files])
    fs.put_file(str(staging / ROOT_METADATA), location.join(ROOT_METADATA))


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
    location = _locate(url, storage_options)
    attributes = _read_root_attributes(location)
    record = StoreRecord.model_validate(attributes[Keys.ROOT_ATTRS])
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

    moves = [(kind, name) for name, kind in kinds.items()]
    if location.is_local:
        target = Path(location.path)
        staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.partial"
        try:
            _write_staged(
                new,
                staging,
                image_codec=image_codec,
                jpeg_quality=DEFAULT_JPEG_QUALITY,
                chunk_size=_raster.DEFAULT_CHUNK_SIZE,
            )
            for kind, name in moves:
                (target / kind).mkdir(exist_ok=True)
                if not (target / kind / ROOT_METADATA).exists():
                    shutil.copy(staging / kind / ROOT_METADATA, target / kind / ROOT_METADATA)
                _replace_local(staging / kind / name, target / kind / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        with tempfile.TemporaryDirectory(prefix="hest-zarr-") as tmp:
            staging = Path(tmp) / "store.zarr"
            _write_staged(
                new,
                staging,
                image_codec=image_codec,
                jpeg_quality=DEFAULT_JPEG_QUALITY,
                chunk_size=_raster.DEFAULT_CHUNK_SIZE,
            )
            with _network_errors(location.url):
                for kind, name in moves:
                    destination = location.join(kind, name)
                    if location.fs.exists(destination):
                        location.fs.rm(destination, recursive=True)
                    files = sorted(p for p in (staging / kind).rglob("*") if p.is_file())
                    location.fs.put(
                        [str(p) for p in files], [location.join(*p.relative_to(staging).parts) for p in files]
                    )
    with _network_errors(location.url):
        root = _open_zarr_group(location, mode="r+")
        root.attrs[Keys.ROOT_ATTRS] = updated.model_dump(mode="json")
        zarr.consolidate_metadata(root.store)
    return location.url


# --------------------------------------------------------------------------------------------- validate / info
@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store: the element (or ``record``), the field and what is wrong."""

    element: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.element}: {self.field}: {self.message}"


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
    problems: list[Problem] = []
    raw_record = sdata.attrs.get(Keys.ROOT_ATTRS, {})
    try:
        record = StoreRecord.model_validate(raw_record)
    except ValidationError as err:
        for error in err.errors():
            problems.append(Problem("record", ".".join(str(p) for p in error["loc"]), error["msg"]))
        record = None
    present = {name: kind for kind, name, _ in sdata.gen_elements()}
    for name, kind in present.items():
        wanted = expected_kind(name)
        if wanted is None:
            problems.append(Problem(name, "name", "not an element name of the store layout"))
        elif wanted != kind:
            problems.append(Problem(name, "kind", f"expected {wanted}, found {kind}"))
        if kind != "tables":
            problems.extend(_check_transformations(sdata, name, record))
    recorded = raw_record.get("elements", {}) if isinstance(raw_record, dict) else {}
    for name in sorted(set(present) - set(recorded)):
        problems.append(Problem(name, "provenance", "element has no record in the root attributes"))
    for name in sorted(set(recorded) - set(present)):
        problems.append(Problem(name, "presence", "recorded in the root attributes but missing from the store"))
    for name, entry in recorded.items():
        if name in present and isinstance(entry, dict) and entry.get("kind") != present[name]:
            problems.append(Problem(name, "kind", f"record says {entry.get('kind')}, store holds {present[name]}"))
    for name, table in sdata.tables.items():
        problems.extend(_check_table(sdata, name, table))
    if check_data:
        problems.extend(_check_chunks(url, storage_options))
    return problems


def _check_transformations(sdata: SpatialData, name: str, record: StoreRecord | None) -> list[Problem]:
    transformations = get_transformation(sdata[name], get_all=True)
    problems = [
        Problem(name, "coordinate_systems", f"no transformation to '{system}'")
        for system in REQUIRED_COORDINATE_SYSTEMS
        if system not in transformations
    ]
    if problems or record is None or record.pixel_size_um is None:
        return problems
    xy = ("x", "y")
    to_global = transformations[CoordinateSystems.GLOBAL].to_affine_matrix(input_axes=xy, output_axes=xy)
    to_um = transformations[CoordinateSystems.UM].to_affine_matrix(input_axes=xy, output_axes=xy)
    scale = np.diag([record.pixel_size_um, record.pixel_size_um, 1.0])
    if not np.allclose(to_um, scale @ to_global, rtol=1e-9, atol=1e-9):
        problems.append(
            Problem(name, "coordinate_systems", f"'um' is not 'global' scaled by pixel_size_um={record.pixel_size_um}")
        )
    return problems


def _check_table(sdata: SpatialData, name: str, table: Any) -> list[Problem]:
    from spatialdata.models import TableModel

    problems = []
    attrs = table.uns.get(TableModel.ATTRS_KEY, {})
    region = annotated_region(name)
    if region is not None:
        if attrs.get("region") != region:
            problems.append(Problem(name, "region", f"must annotate '{region}', annotates {attrs.get('region')!r}"))
        elif region not in sdata.shapes:
            problems.append(Problem(name, "region", f"annotates '{region}', which the store does not hold"))
        else:
            ids = table.obs[attrs["instance_key"]]
            unknown = ~ids.isin(sdata.shapes[region].index)
            if unknown.any():
                problems.append(Problem(name, "instance_key", f"{int(unknown.sum())} rows name no '{region}' shape"))
        if not np.issubdtype(table.X.dtype, np.integer):
            problems.append(Problem(name, "X", f"raw counts must be integers, found {table.X.dtype}"))
    return problems


def _check_chunks(url: str | Path, storage_options: StorageOptions) -> list[Problem]:
    location = _locate(url, storage_options)
    root = _open_zarr_group(location)
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
                levels = _raster._levels(element) or [element.data]
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
        "url": str(url),
        "schema_version": record.schema_version,
        "pixel_size_um": record.pixel_size_um,
        "metadata": record.metadata.model_dump(mode="json", exclude_none=True),
        "elements": elements,
    }
