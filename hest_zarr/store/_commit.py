"""The one staged commit: everything a store write makes is staged on local disk, then moved in or uploaded.

- A local target is staged in ``.<name>.<id>.partial`` beside it and moved in with one ``rename`` (the old
  store, if any, is renamed aside first and restored if the move fails).
- A new remote target is staged in a local temporary directory and uploaded with its root ``zarr.json`` last,
  under a journal (``hest_zarr_commit.json``) that marks it unfinished: an interrupted upload leaves no root
  metadata, :func:`hest_zarr.store.open` refuses it as incomplete and the next write replaces it.
- Replacing a remote store, and adding elements to any store, is journaled (:func:`_commit_journaled`): the new
  data is complete beside the target before anything of the old one is touched, and every later step can be
  redone by ``hest-zarr repair`` (or the next write to the target), so an interruption at any point leaves the
  complete old store, the complete new one, or a store that names the command that finishes it.

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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from hest_zarr.errors import HestZarrError, IncompleteStoreError
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
    else:
        _require_bucket(location)
        recover_remote(location)
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


def _require_bucket(location: Location) -> None:
    """Refuse a remote target whose bucket (the first part of its path) does not exist, before any work."""
    bucket = location.path.split("/", 1)[0]
    with network_errors(location.url):
        exists = location.fs.exists(bucket)
    if not exists:
        raise HestZarrError(
            f"{location.url}: the bucket '{bucket}' does not exist (or these credentials cannot see it); create it "
            "first"
        )


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
            # a journal that names the staging makes it the only complete copy of the new data: keep it for repair
            if (read_journal(location) or {}).get("partial") != str(staging):
                shutil.rmtree(staging, ignore_errors=True)
            marker.unlink(missing_ok=True)
        return
    with tempfile.TemporaryDirectory(prefix="hest-zarr-") as tmp:
        yield Path(tmp) / "store.zarr"


PARTIAL = ".partial"
#: Journal of an unfinished commit, inside the target store.
JOURNAL = "hest_zarr_commit.json"
RETIRED = ".old"
WRITER = ".writer"


def remove_leftovers(target: Path) -> list[Path]:
    """Remove the staging a killed write to ``target`` left beside it, restore a store it had moved aside; warn.

    A staging directory is a leftover when the process its marker names is gone (or it has no marker). A retired
    old store (``.<name>.<id>.old``) is put back when the target is missing (the write died between its two
    renames), else removed.
    """
    cleaned = []
    if (target / JOURNAL).exists():
        location = locate(target, None)
        if (read_journal(location) or {}).get("kind") == "move":
            finish_commit(location)
            warnings.warn(f"{target}: finished the commit an interrupted write had left", stacklevel=3)
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
    """Move a whole staged store to ``location``.

    Locally: one rename (the old store renamed aside first). Remotely, a new store is uploaded under a journal
    that marks it unfinished, with its root metadata last; a replaced one goes through :func:`_commit_journaled`,
    so that an interruption never leaves less than the complete old or new store, or a command that finishes it.
    """
    if location.is_local:
        _replace_local(staging, Path(location.path))
        return
    if replace:
        _commit_journaled(staging, location, elements=None)
        return
    fs = location.fs
    with network_errors(location.url):
        fs.pipe_file(location.join(JOURNAL), json.dumps({"kind": "upload"}).encode())
        files = sorted(p for p in staging.rglob("*") if p.is_file() and p != staging / ROOT_METADATA)
        _put(fs, files, staging, location.join)
        fs.put_file(str(staging / ROOT_METADATA), location.join(ROOT_METADATA))
        fs.rm_file(location.join(JOURNAL))


def commit_elements(staging: Path, location: Location, elements: Sequence[str]) -> None:
    """Move staged element groups (``"kind/name"``) and the staged root metadata into an existing store.

    ``staging`` holds the new element groups, the store's new manifest and root ``zarr.json`` (its record and
    consolidated metadata merged with the old ones); every element of the same name is replaced.
    """
    _commit_journaled(staging, location, elements=list(elements))


def _commit_journaled(staging: Path, location: Location, *, elements: list[str] | None) -> None:
    """Commit through a journal: the new data complete beside the target first, then moved or copied in.

    1. The staged store is complete in a ``partial`` beside the target (locally the staging itself; remotely
       uploaded to a hidden sibling prefix).
    2. A journal naming it and the element groups it replaces (all of the store: ``None``) is written into the
       target; from then on every step is repeatable, and :func:`finish_commit` (``hest-zarr repair``) redoes
       them after an interruption.
    3. :func:`finish_commit`: the old root metadata is removed first (the store now refuses to open and names
       the repair command), the new objects moved or copied in, stale ones deleted, the root metadata last.
    """
    fs = location.fs
    with network_errors(location.url):
        if location.is_local:
            partial = str(staging)
        else:
            parent, name = location.path.rstrip("/").rsplit("/", 1)
            partial = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}{PARTIAL}"
            files = sorted(p for p in staging.rglob("*") if p.is_file())
            _put(fs, files, staging, lambda *parts: "/".join([partial, *parts]))
        journal = {"kind": "move", "partial": partial, "elements": elements}
        fs.pipe_file(location.join(JOURNAL), json.dumps(journal).encode())
        finish_commit(location)


def read_journal(location: Location) -> dict[str, Any] | None:
    """Return the journal an unfinished commit left in the store at ``location``, or ``None``."""
    with network_errors(location.url):
        try:
            raw = location.fs.cat_file(location.join(JOURNAL))
        except (FileNotFoundError, NotADirectoryError):
            return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"kind": "unknown"}


def finish_commit(location: Location) -> None:
    """Redo the steps of the journaled commit left in ``location`` (each one can be repeated), then end it."""
    journal = read_journal(location)
    if journal is None or journal.get("kind") != "move":
        raise HestZarrError(f"{location.url}: no interrupted commit to finish")
    fs, partial, elements = location.fs, journal["partial"], journal["elements"]
    with network_errors(location.url):
        if not fs.exists(partial):
            raise IncompleteStoreError(
                f"{location.url}: an interrupted commit cannot be finished: its new data ({partial}) is gone; "
                "write the store again"
            )
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(location.join(ROOT_METADATA))
        if location.is_local:
            _move_in_local(Path(partial), Path(location.path), elements)
        else:
            _copy_in_remote(location, partial, elements)
        fs.rm_file(location.join(JOURNAL))
        fs.rm(partial, recursive=True)


def _move_in_local(partial: Path, target: Path, elements: list[str] | None) -> None:
    for element in elements or []:
        source = partial / element
        if source.exists():
            shutil.rmtree(target / element, ignore_errors=True)
            (target / element).parent.mkdir(parents=True, exist_ok=True)
            source.rename(target / element)
    loose = sorted(p for p in partial.rglob("*") if p.is_file() and p != partial / ROOT_METADATA)
    for path in loose:
        destination = target / path.relative_to(partial)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    if (partial / ROOT_METADATA).exists():
        os.replace(partial / ROOT_METADATA, target / ROOT_METADATA)


def _copy_in_remote(location: Location, partial: str, elements: list[str] | None) -> None:
    fs = location.fs
    prefix = partial.rstrip("/") + "/"
    new = sorted(path.removeprefix(prefix) for path in fs.find(partial))
    body = [key for key in new if key != ROOT_METADATA]
    if body:
        fs.copy([prefix + key for key in body], [location.join(key) for key in body])
    target_prefix = location.path.rstrip("/") + "/"
    scopes = None if elements is None else tuple(element.rstrip("/") + "/" for element in elements)
    keep = set(new) | {JOURNAL, ROOT_METADATA}
    stale = [
        path
        for path in fs.find(location.path)
        if (key := path.removeprefix(target_prefix)) not in keep and (scopes is None or key.startswith(scopes))
    ]
    if stale:
        fs.rm(stale)
    fs.copy(prefix + ROOT_METADATA, location.join(ROOT_METADATA))


def repair(url: str | Path, storage_options: StorageOptions = None) -> bool:
    """Finish a write that was interrupted while moving a new store (or new elements) into ``url``.

    Returns ``True`` when a commit was finished, ``False`` when there was none to finish.

    Raises
    ------
    IncompleteStoreError
        The interrupted write's new data is not complete anywhere (it was cut during its upload): the store cannot
        be finished, only written again.

    Examples
    --------
    >>> hest_zarr.store.repair("s3://bucket/sample.zarr")  # doctest: +SKIP
    True

    """
    location = locate(url, storage_options)
    journal = read_journal(location)
    if journal is None:
        return False
    if journal.get("kind") != "move":
        raise IncompleteStoreError(
            f"{location.url}: the write that made this store was cut before its data was complete; write it again"
        )
    finish_commit(location)
    return True


def recover_remote(location: Location) -> None:
    """Before writing to a remote target: finish or clear what an interrupted write left there, and say so."""
    fs = location.fs
    journal = read_journal(location)
    if journal is not None:
        if journal.get("kind") == "move":
            finish_commit(location)
            warnings.warn(f"{location.url}: finished the commit an interrupted write had left", stacklevel=4)
        else:
            with network_errors(location.url):
                if fs.exists(location.join(ROOT_METADATA)):
                    fs.rm_file(location.join(JOURNAL))
                else:
                    fs.rm(location.path, recursive=True)
                    warnings.warn(
                        f"{location.url}: removed the incomplete store an interrupted write had left", stacklevel=4
                    )
    parent, name = location.path.rstrip("/").rsplit("/", 1)
    with network_errors(location.url):
        orphans = fs.glob(f"{parent}/.{glob.escape(name)}.*{PARTIAL}")
        for orphan in orphans:
            fs.rm(orphan, recursive=True)
    if orphans:
        warnings.warn(
            f"{location.url}: removed what an interrupted write left behind: "
            f"{', '.join(Path(p).name for p in orphans)}",
            stacklevel=4,
        )


def _put(fs: Any, files: Sequence[Path], staging: Path, join: Callable[..., str]) -> None:
    """Upload staged files to the keys ``join(*relative parts)``, concurrently."""
    if files:
        fs.put([str(p) for p in files], [join(*p.relative_to(staging).parts) for p in files])


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
