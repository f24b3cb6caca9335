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
import glob
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from hest_zarr.errors import HestZarrError
from hest_zarr.schemas import Keys
from hest_zarr.store._location import ROOT_METADATA, Location, StorageOptions, locate, network_errors

#: Root attribute of a patch store (``store._patches``).
PATCH_ATTRIBUTES = "hest_zarr_patches"


#: What each kind of store carries in its root attributes: a write only ever replaces a store of its own kind.
STORE_KINDS: dict[str, str] = {"sample": Keys.ROOT_ATTRS, "patches": PATCH_ATTRIBUTES}
StoreKind = Literal["sample", "patches"]


def prepare_target(
    url: str | Path,
    overwrite: bool,
    storage_options: StorageOptions,
    *,
    kind: StoreKind,
    inputs: Sequence[str | Path] = (),
    input_storage_options: StorageOptions = None,
) -> tuple[Location, bool]:
    """Locate a store to write and tell whether one exists there; refuse what the write must not replace.

    Refused: an existing target without ``overwrite``; one of the write's own ``inputs``; anything that is not a
    zarr store holding a store of the same ``kind`` (``overwrite=True`` on a mistyped path, a data folder or a
    sample store given as a patch store's output must not delete it).
    """
    location = locate(url, storage_options)
    if location.is_local:
        remove_leftovers(Path(location.path))
    for source in inputs:
        if _same_place(location, locate(source, input_storage_options)):
            raise HestZarrError(f"{location.url}: is this write's own input; write to another path")
    with network_errors(location.url):
        exists = location.fs.exists(location.path)
    if not exists:
        return location, False
    if not overwrite:
        raise HestZarrError(f"{location.url}: already exists (pass overwrite=True to replace it)")
    found = _kind_at(location)
    if found is None:
        raise HestZarrError(
            f"{location.url}: exists and is not a zarr store written by hest-zarr (no {ROOT_METADATA} with its "
            "record); not replacing it (delete it yourself if it is what you meant)"
        )
    if found != kind:
        raise HestZarrError(
            f"{location.url}: holds a {found} store, and this write makes a {kind} store; not replacing it "
            "(write to another path, or delete it yourself if it is what you meant)"
        )
    return location, True


def _same_place(a: Location, b: Location) -> bool:
    if a.is_local and b.is_local:
        return Path(a.path).resolve() == Path(b.path).resolve()
    return type(a.fs) is type(b.fs) and a.path.rstrip("/") == b.path.rstrip("/")


def _kind_at(location: Location) -> str | None:
    """Return the kind of hest-zarr store at ``location`` (from its root attributes), or ``None``."""
    with network_errors(location.url):
        try:
            document = json.loads(location.fs.cat_file(location.join(ROOT_METADATA)))
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError, json.JSONDecodeError):
            return None
    attributes = document.get("attributes", {}) if isinstance(document, dict) else {}
    return next((name for name, key in STORE_KINDS.items() if key in attributes), None)


def check_target(
    url: str | Path,
    overwrite: bool,
    storage_options: StorageOptions = None,
    *,
    kind: StoreKind,
    inputs: Sequence[str | Path] = (),
    input_storage_options: StorageOptions = None,
) -> bool:
    """Refuse a target that a write could not replace (see :func:`prepare_target`); return whether it exists.

    Writers call it before long work, so that an existing target is refused before the work, not after it.
    """
    return prepare_target(
        url, overwrite, storage_options, kind=kind, inputs=inputs, input_storage_options=input_storage_options
    )[1]


@contextlib.contextmanager
def staging_directory(location: Location) -> Iterator[Path]:
    """Yield a fresh (not yet created) local directory to stage a write to ``location`` in; remove it after.

    A local target is staged beside it; a marker file holding this process's id says the staging is alive, so
    that the next write to the same target removes what a killed write left behind (:func:`remove_leftovers`).
    """
    if location.is_local:
        target = Path(location.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target)
        staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}{PARTIAL}"
        marker = staging.with_name(staging.name + WRITER)
        marker.write_text(str(os.getpid()))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            marker.unlink(missing_ok=True)
        return
    with tempfile.TemporaryDirectory(prefix="hest-zarr-") as tmp:
        yield Path(tmp) / "store.zarr"


PARTIAL = ".partial"
RETIRED = ".old"
WRITER = ".writer"


def remove_leftovers(target: Path) -> list[Path]:
    """Remove the staging a killed write to ``target`` left beside it, restore a store it had moved aside; warn.

    A staging directory is a leftover when the process its marker names is gone (or it has no marker). A retired
    old store (``.<name>.<id>.old``) is put back when the target is missing (the write died between its two
    renames), else removed.
    """
    cleaned = []
    for staging in sorted(target.parent.glob(f".{glob.escape(target.name)}.*{PARTIAL}")):
        marker = staging.with_name(staging.name + WRITER)
        if marker.exists() and _alive(marker):
            continue
        shutil.rmtree(staging, ignore_errors=True)
        marker.unlink(missing_ok=True)
        cleaned.append(staging)
    for marker in sorted(target.parent.glob(f".{glob.escape(target.name)}.*{PARTIAL}{WRITER}")):
        if not marker.with_name(marker.name.removesuffix(WRITER)).exists() and not _alive(marker):
            marker.unlink(missing_ok=True)  # a writer killed before it made its staging directory
    for retired in sorted(target.parent.glob(f".{glob.escape(target.name)}.*{RETIRED}")):
        if not target.exists():
            retired.rename(target)
            warnings.warn(
                f"{target}: restored the store an interrupted write had moved to {retired.name}", stacklevel=3
            )
            continue
        shutil.rmtree(retired, ignore_errors=True)
        cleaned.append(retired)
    if cleaned:
        warnings.warn(
            f"{target}: removed what an interrupted write left behind: {', '.join(p.name for p in cleaned)}",
            stacklevel=3,
        )
    return cleaned


def _alive(marker: Path) -> bool:
    try:
        os.kill(int(marker.read_text().strip()), 0)
    except PermissionError:  # alive, another user's
        return True
    except (ValueError, OSError):
        return False
    return True


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
    retired = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}{RETIRED}"
    target.rename(retired)
    try:
        staging.rename(target)
    except BaseException:
        retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
