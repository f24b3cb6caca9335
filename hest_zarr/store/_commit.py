"""The one staged commit: everything a store write makes is staged on local disk, then moved in or uploaded.

- A local target is staged in ``.<name>.<id>.partial`` beside it and moved in with one ``rename`` (the old
  store, if any, is renamed aside first and restored if the move fails).
- A remote target is staged in a local temporary directory and uploaded with its root ``zarr.json`` last, so
  an interrupted upload leaves no root metadata and :func:`hest_zarr.store.open` refuses it as incomplete.

Sample stores (:func:`~hest_zarr.store.write`), element updates (:func:`~hest_zarr.store.add_elements`) and
patch stores (:func:`~hest_zarr.store.write_patch_store`) all commit through here.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from hest_zarr.errors import HestZarrError
from hest_zarr.store._location import ROOT_METADATA, Location, StorageOptions, locate, network_errors


def prepare_target(url: str | Path, overwrite: bool, storage_options: StorageOptions) -> tuple[Location, bool]:
    """Locate a store to write and tell whether one exists there; refuse an existing one unless ``overwrite``.

    ``overwrite=True`` on a mistyped path (a home folder, a data folder) must not delete it: only a zarr store
    (one with a root ``zarr.json``) is ever replaced.
    """
    location = locate(url, storage_options)
    with network_errors(location.url):
        exists = location.fs.exists(location.path)
    if not exists:
        return location, False
    if not overwrite:
        raise HestZarrError(f"{location.url}: already exists (pass overwrite=True to replace it)")
    with network_errors(location.url):
        is_zarr = location.fs.exists(location.join(ROOT_METADATA))
    if not is_zarr:
        raise HestZarrError(
            f"{location.url}: exists and is not a zarr store (no {ROOT_METADATA}); not replacing it "
            "(delete it yourself if it is what you meant)"
        )
    return location, True


def check_target(url: str | Path, overwrite: bool, storage_options: StorageOptions = None) -> bool:
    """Refuse a target that a write could not replace (see :func:`prepare_target`); return whether it exists.

    Writers call it before long work, so that an existing target is refused before the work, not after it.
    """
    return prepare_target(url, overwrite, storage_options)[1]


@contextlib.contextmanager
def staging_directory(location: Location) -> Iterator[Path]:
    """Yield a fresh (not yet created) local directory to stage a write to ``location`` in; remove it after."""
    if location.is_local:
        target = Path(location.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.partial"
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory(prefix="hest-zarr-") as tmp:
        yield Path(tmp) / "store.zarr"


def commit_store(staging: Path, location: Location, *, replace: bool) -> None:
    """Move a whole staged store to ``location``: one rename locally, an upload with the root metadata last."""
    if location.is_local:
        _replace_local(staging, Path(location.path))
        return
    fs = location.fs
    with network_errors(location.url):
        if replace:
            # un-commit first: without its root metadata the old store no longer opens
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(location.join(ROOT_METADATA))
            fs.rm(location.path, recursive=True)
        files = sorted(p for p in staging.rglob("*") if p.is_file() and p != staging / ROOT_METADATA)
        _put(files, staging, location)
        fs.put_file(str(staging / ROOT_METADATA), location.join(ROOT_METADATA))


def commit_elements(staging: Path, location: Location, elements: Sequence[tuple[str, str]]) -> None:
    """Move the staged ``(kind, name)`` element groups into an existing store, replacing any of the same name.

    The root metadata is not touched: the caller writes the new record last.
    """
    if location.is_local:
        target = Path(location.path)
        for kind, name in elements:
            (target / kind).mkdir(exist_ok=True)
            if not (target / kind / ROOT_METADATA).exists():
                shutil.copy(staging / kind / ROOT_METADATA, target / kind / ROOT_METADATA)
            _replace_local(staging / kind / name, target / kind / name)
        return
    with network_errors(location.url):
        for kind, name in elements:
            destination = location.join(kind, name)
            if location.fs.exists(destination):
                location.fs.rm(destination, recursive=True)
            _put(sorted(p for p in (staging / kind).rglob("*") if p.is_file()), staging, location)


def _put(files: Sequence[Path], staging: Path, location: Location) -> None:
    if files:
        location.fs.put([str(p) for p in files], [location.join(*p.relative_to(staging).parts) for p in files])


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
