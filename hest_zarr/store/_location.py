"""Where a store lives: the fsspec filesystem and path of a URL, network errors, the zarr group on it."""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import zarr

from hest_zarr.errors import AccessDeniedError, HestZarrError, RemoteUnreachableError

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
    check_storage_options(url, options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as err:
        raise HestZarrError(f"{url}: cannot open this URL ({err})") from err
    except TypeError as err:  # a filesystem whose __init__ names every option it takes
        raise HestZarrError(f"{url}: storage options not understood ({err})") from err
    return Location(url=url, fs=fs, path=path.rstrip("/") or path, storage_options=options)


#: Options every fsspec filesystem takes (instance cache, listings cache, event loop, docs).
_FSSPEC_OPTIONS = frozenset(
    {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths", "asynchronous", "loop"}
    | {"batch_size", "add_docs", "add_aliases"}
)


def _named_parameters(function: Callable[..., Any]) -> set[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds} - {"self"}


def _passed_on(fs_class: type) -> tuple[set[str], dict[str, set[str]]] | None:
    """Return where a filesystem sends the options its ``__init__`` does not name (where they fail later).

    Returns the names those options may have, and per option holding a dict (``client_kwargs``) the keys it takes;
    ``None`` for a filesystem that ignores unknown options (local, memory) or one not known here.
    """
    names = {f"{k.__module__}.{k.__qualname__}" for k in fs_class.__mro__}
    if "s3fs.core.S3FileSystem" in names:  # the rest goes to aiobotocore's session, client_kwargs to its client
        from aiobotocore.session import AioSession
        from botocore.session import Session

        client = _named_parameters(Session.create_client) - {"service_name"}  # AioSession's takes *args, **kwargs
        return _named_parameters(AioSession.__init__), {"client_kwargs": client} if client else {}
    if "fsspec.implementations.http.HTTPFileSystem" in names:  # the rest goes to every aiohttp request
        from aiohttp import ClientSession

        return _named_parameters(ClientSession._request) - {"method", "str_or_url"}, {}
    return None


@functools.cache
def _accepted_options(fs_class: type) -> tuple[frozenset[str], frozenset[str], dict[str, frozenset[str]]] | None:
    """Return the options a filesystem names, those it passes on, and the keys of its dict options (or ``None``)."""
    passed_on = _passed_on(fs_class)
    if passed_on is None:
        return None
    extra, nested = passed_on
    inits = [vars(k)["__init__"] for k in fs_class.__mro__[:-1] if "__init__" in vars(k)]
    own = frozenset().union(*(_named_parameters(init) for init in inits))
    return own, frozenset(extra), {key: frozenset(keys) for key, keys in nested.items()}


def check_storage_options(url: str, options: dict[str, Any]) -> None:
    """Refuse an option the URL's filesystem does not take, before it fails as a ``TypeError`` on the first call.

    Raises
    ------
    HestZarrError
        One line naming the option, the filesystem, the closest option it takes and every option it takes.

    Examples
    --------
    >>> check_storage_options("s3://b/x.zarr", {"endpoint": "http://127.0.0.1:9000"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    hest_zarr.errors.HestZarrError: s3://b/x.zarr: storage option 'endpoint' is not understood by s3fs ...

    """
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    if "::" in url or not options:
        return
    try:
        fs_class = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        return  # url_to_fs says what is missing
    accepted = _accepted_options(fs_class)
    if accepted is None:
        return
    own, extra, nested = accepted
    where = f"{fs_class.__module__.split('.')[0]} ({fs_class.__name__})"
    for key, value in options.items():
        if key not in own | extra | _FSSPEC_OPTIONS:
            raise HestZarrError(f"{url}: storage option {key!r} is not understood by {where}: {_takes(key, own)}")
        if key in nested and isinstance(value, dict):
            for inner in value:
                if inner not in nested[key]:
                    raise HestZarrError(
                        f"{url}: storage option {key}[{inner!r}] is not understood by {where}: "
                        f"{_takes(inner, nested[key])}"
                    )


def _takes(key: str, accepted: frozenset[str]) -> str:
    close = difflib.get_close_matches(key, sorted(accepted), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}it takes {', '.join(sorted(accepted))}"


@contextlib.contextmanager
def network_errors(url: str) -> Iterator[None]:
    """Turn the many ways a server can be unreachable into one :class:`RemoteUnreachableError`.

    Refused access (no credentials, wrong ones, no permission) becomes one :class:`AccessDeniedError` line.
    """
    try:
        yield
    except (FileNotFoundError, HestZarrError):
        raise
    except Exception as err:  # aiohttp, botocore and gcsfs each raise their own types
        denied = _access_problem(err, url)
        if denied is not None:
            raise AccessDeniedError(f"{url}: {denied}") from err
        if _is_connection_error(err):
            raise RemoteUnreachableError(f"{url}: cannot reach the server ({type(err).__name__}: {err})") from err
        raise


#: S3 error codes that mean the credentials are wrong, missing, expired or not allowed to do this.
_DENIED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
    | {"TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "InvalidClientTokenId"}
    | {"UnrecognizedClientException", "403", "401"}
)
_CHECK_CREDENTIALS = "check the credentials in --storage-options or the environment"


def _access_problem(err: BaseException, url: str) -> str | None:
    """Say how access was refused (no credentials, wrong ones, no permission), or ``None`` when it was not.

    Examples
    --------
    >>> from botocore.exceptions import NoCredentialsError
    >>> _access_problem(NoCredentialsError(), "s3://b/x.zarr")  # doctest: +ELLIPSIS
    'no credentials found (give key and secret in --storage-options, ...'

    """
    remote = "://" in url and not url.startswith("file://")
    causes = list(_causes(err))
    for exc in causes:  # the most specific first: what botocore or aiohttp said, then what s3fs made of it
        name = type(exc).__name__
        if name in {"NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"}:
            return (
                f"no credentials found (give key and secret in --storage-options, set AWS_ACCESS_KEY_ID and "
                f'AWS_SECRET_ACCESS_KEY, or pass {{"anon": true}} for a public bucket; {name})'
            )
        response = getattr(exc, "response", None)
        if name == "ClientError" and isinstance(response, dict):
            error = response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _DENIED_CODES:
                detail = " ".join(dict.fromkeys(part for part in (code, str(error.get("Message", ""))) if part))
                return f"access denied ({detail}; {_CHECK_CREDENTIALS})"
        status = getattr(exc, "status", None)
        if type(exc).__module__.startswith("aiohttp") and status in (401, 403):
            return f"access denied (HTTP {status} {getattr(exc, 'message', '')}; check the URL's credentials)"
    for exc in causes:
        if isinstance(exc, PermissionError):
            return f"access denied ({exc}; {_CHECK_CREDENTIALS})" if remote else f"permission denied ({exc})"
    return None


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
