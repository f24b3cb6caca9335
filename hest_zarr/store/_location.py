"""Where a store lives: the fsspec filesystem and path of a URL, network errors, the zarr group on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import zarr

from hest_zarr.errors import HestZarrError, RemoteUnreachableError

StorageOptions = dict[str, Any] | None
ROOT_METADATA = "zarr.json"


@dataclass(frozen=True)
class Location:
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


def locate(url: str | Path, storage_options: StorageOptions) -> Location:
    url = str(url)
    options = dict(storage_options or {})
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as err:
        raise HestZarrError(f"{url}: cannot open this URL ({err})") from err
    return Location(url=url, fs=fs, path=path.rstrip("/") or path, storage_options=options)


@contextlib.contextmanager
def network_errors(url: str) -> Iterator[None]:
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


def chunk_read_options(location: Location) -> dict[str, Any]:
    """Fsspec options for reading many small objects (chunks) of a store."""
    options = dict(location.storage_options)
    if "s3" in _protocols(location.fs):
        # s3fs sends a HEAD before every whole-object GET when it may split large objects into
        # concurrent ranges; chunks are small and fetched concurrently already, so that HEAD only
        # doubles the requests (and the latency) of every chunk read.
        options.setdefault("max_concurrency", 1)
    return options


def chunk_location(url: str | Path, storage_options: StorageOptions = None) -> Location:
    """Locate a store with the filesystem options suited to fetching its chunks one by one."""
    location = locate(url, storage_options)
    return locate(url, chunk_read_options(location)) if not location.is_local else location


def open_zarr_group(location: Location, mode: str = "r") -> zarr.Group:
    """Open the store's root zarr group (local paths directly, remote URLs through zarr's ``FsspecStore``)."""
    if location.is_local:
        return zarr.open_group(location.path, mode=mode, zarr_format=3)
    options = chunk_read_options(location)
    store = zarr.storage.FsspecStore.from_url(location.url, storage_options=options or None, read_only=(mode == "r"))
    return zarr.open_group(store, mode=mode, zarr_format=3)


def output_storage_options(
    out: str | Path, source: str | Path, storage_options: StorageOptions, out_storage_options: StorageOptions
) -> StorageOptions:
    """Return a command's output options: its own when given, else the input's when both share the protocol.

    So ``--storage-options`` reaches every URL of a command that shares the input's filesystem (an output on the
    same S3 endpoint goes there, not to whatever endpoint the environment's credentials would pick), and never a
    local output path, which takes no such options.

    Examples
    --------
    >>> output_storage_options("s3://b/p.zarr", "s3://b/s.zarr", {"anon": True}, None)
    {'anon': True}
    >>> output_storage_options("p.zarr", "s3://b/s.zarr", {"anon": True}, None) is None
    True

    """
    if out_storage_options is not None:
        return out_storage_options
    same = fsspec.core.split_protocol(str(out))[0] == fsspec.core.split_protocol(str(source))[0]
    return storage_options if same else None
