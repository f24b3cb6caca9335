"""Store manifests: what a write put in a store, so that a damaged store is never read as a sound one.

Zarr reads a missing chunk as its fill value and parquet may decode a garbled page; neither says so. Every write
therefore records, in ``hest_zarr_manifest.json`` at the store root:

- ``objects``: every object it wrote (store-relative key -> size in bytes and crc32c), except the root
  ``zarr.json``, which holds the manifest's own size and crc32c in its ``hest_zarr_manifest`` attribute (the root
  is committed last, so a manifest is only ever seen with the root it belongs to);
- ``arrays``: per zarr array, its shape, chunk grid and the number of chunk objects written;
- ``elements``: per table its rows, columns, non-zeros and total counts; per shapes or points element its rows.

Reads check presence against it by listing (cheap), and the crc32c of each chunk as it is decoded (image and
table chunks carry the zarr v3 ``crc32c`` codec); :func:`~hest_zarr.store.validate` checks every object.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from hest_zarr.elements import Problem
from hest_zarr.errors import CorruptStoreError
from hest_zarr.store._location import ROOT_METADATA, Location, network_errors

MANIFEST = "hest_zarr_manifest.json"
#: Root attribute naming the manifest's size and crc32c.
MANIFEST_ATTRIBUTE = "hest_zarr_manifest"
MANIFEST_FORMAT = 1
#: Objects checksummed per remote request batch.
_REMOTE_BATCH = 64
_BLOCK = 1 << 24
_warned_unlisted: set[str] = set()


def crc32c_of_file(path: str | Path) -> int:
    """Return the crc32c of a local file, read in 16 MiB blocks."""
    checksum = 0
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            checksum = google_crc32c.extend(checksum, block)
    return checksum


@dataclass
class Manifest:
    """What a write put in a store (see the module docstring)."""

    objects: dict[str, tuple[int, int]] = field(default_factory=dict)
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)
    elements: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        document = {
            "format": MANIFEST_FORMAT,
            "elements": self.elements,
            "arrays": self.arrays,
            "objects": {key: list(value) for key, value in sorted(self.objects.items())},
        }
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        document = json.loads(raw)
        return cls(
            objects={key: (int(size), int(crc)) for key, (size, crc) in document["objects"].items()},
            arrays=dict(document.get("arrays", {})),
            elements=dict(document.get("elements", {})),
        )

    def without(self, prefixes: Iterable[str]) -> Manifest:
        """Return the manifest less everything under the element groups ``prefixes`` (``"tables/x"``...)."""
        prefixes = tuple(prefix.rstrip("/") + "/" for prefix in prefixes)
        names = {prefix.split("/")[1] for prefix in prefixes}
        return Manifest(
            objects={key: value for key, value in self.objects.items() if not key.startswith(prefixes)},
            arrays={key: value for key, value in self.arrays.items() if not key.startswith(prefixes)},
            elements={key: value for key, value in self.elements.items() if key not in names},
        )

    def merged(self, other: Manifest) -> Manifest:
        return Manifest(
            {**self.objects, **other.objects}, {**self.arrays, **other.arrays}, {**self.elements, **other.elements}
        )


def element_of(key: str) -> str:
    """Name the element a store-relative key belongs to (``images/he/s0/c/0/1/2`` -> ``he``)."""
    parts = key.split("/")
    return parts[1] if len(parts) > 2 else key


def build_manifest(staging: Path, elements: Mapping[str, tuple[str, Any]]) -> Manifest:
    """Record every object of a staged store, its arrays, and the summaries of ``elements`` (name -> kind, data)."""
    manifest = Manifest()
    for directory, _, files in os.walk(staging):
        for name in files:
            path = Path(directory, name)
            key = path.relative_to(staging).as_posix()
            if key in (ROOT_METADATA, MANIFEST):
                continue
            manifest.objects[key] = (path.stat().st_size, crc32c_of_file(path))
    for key in manifest.objects:
        if not key.endswith(ROOT_METADATA):
            continue
        document = json.loads((staging / key).read_bytes())
        if document.get("node_type") != "array":
            continue
        array = key.removesuffix(ROOT_METADATA).rstrip("/")
        chunk_prefix = f"{array}/c/" if array else "c/"
        manifest.arrays[array] = {
            "shape": document["shape"],
            "chunks": document["chunk_grid"]["configuration"]["chunk_shape"],
            "n_chunks": sum(1 for other in manifest.objects if other.startswith(chunk_prefix)),
        }
    for name, (kind, element) in elements.items():
        manifest.elements[name] = {"kind": kind, **_summary(staging, kind, name, element)}
    return manifest


def _summary(staging: Path, kind: str, name: str, element: Any) -> dict[str, Any]:
    if kind == "tables":
        return table_summary(element)
    if kind == "shapes":
        return {"n_rows": len(element)}
    if kind == "points":
        import pyarrow.parquet as pq

        parts = sorted((staging / kind / name).rglob("*.parquet"))
        return {"n_rows": sum(pq.read_metadata(part).num_rows for part in parts if part.is_file())}
    return {}


def table_summary(table: Any) -> dict[str, Any]:
    """Rows, columns, non-zeros and total counts of an AnnData table (what a damaged chunk would change)."""
    import scipy.sparse

    matrix = table.X
    if matrix is None:
        nnz, total = 0, 0.0
    elif scipy.sparse.issparse(matrix):
        nnz, total = int(matrix.nnz), float(matrix.sum(dtype=np.float64))
    else:
        values = np.asarray(matrix)
        nnz, total = int(np.count_nonzero(values)), float(values.sum(dtype=np.float64))
    return {"n_obs": int(table.n_obs), "n_vars": int(table.n_vars), "nnz": nnz, "total_counts": total}


def write_manifest(staging: Path, manifest: Manifest) -> dict[str, Any]:
    """Write the manifest into a staged store; return the root attribute that names it."""
    raw = manifest.to_json()
    (staging / MANIFEST).write_bytes(raw)
    return {"format": MANIFEST_FORMAT, "size": len(raw), "crc32c": google_crc32c.value(raw)}


def seal_store(staging: Path, manifest: Manifest, *, consolidate: bool = True) -> None:
    """Write a staged store's manifest, name it in the root attributes, and consolidate the metadata."""
    import zarr

    reference = write_manifest(staging, manifest)
    root = zarr.open_group(str(staging), mode="r+", zarr_format=3)
    root.attrs[MANIFEST_ATTRIBUTE] = reference
    if consolidate:
        zarr.consolidate_metadata(str(staging))


def read_manifest(location: Location, attributes: Mapping[str, Any]) -> Manifest | None:
    """Read and verify the manifest the root attributes name; ``None`` (with one warning) for a store without one."""
    reference = attributes.get(MANIFEST_ATTRIBUTE)
    if reference is None:
        if location.url not in _warned_unlisted:
            _warned_unlisted.add(location.url)
            warnings.warn(
                f"{location.url}: written without a manifest (before hest-zarr 0.3): missing or damaged chunks "
                "cannot be told from sound ones; write the store again to add one",
                stacklevel=3,
            )
        return None
    where = f"{location.url}: {MANIFEST}"
    with network_errors(location.url):
        try:
            raw = location.fs.cat_file(location.join(MANIFEST))
        except FileNotFoundError:
            raise CorruptStoreError(f"{where} is missing (the root metadata lists it); the store is damaged") from None
    if len(raw) != reference["size"] or google_crc32c.value(raw) != reference["crc32c"]:
        raise CorruptStoreError(
            f"{where} fails its checksum ({len(raw)} bytes, {reference['size']} recorded); the store is damaged"
        )
    return Manifest.from_json(raw)


def list_objects(location: Location) -> dict[str, int] | None:
    """Return every object of a store (key -> size) by listing; ``None`` where the filesystem cannot list (HTTP)."""
    if location.is_local:
        root = Path(location.path)
        found = {}
        for directory, _, files in os.walk(root):
            for name in files:
                path = Path(directory, name)
                found[path.relative_to(root).as_posix()] = path.stat().st_size
        return found
    protocols = (location.fs.protocol,) if isinstance(location.fs.protocol, str) else tuple(location.fs.protocol)
    if {"http", "https"} & set(protocols):
        return None
    prefix = location.path.rstrip("/") + "/"
    with network_errors(location.url):
        listing = location.fs.find(location.path, detail=True)
    return {path.removeprefix(prefix): int(entry.get("size") or 0) for path, entry in listing.items()}


def presence_problems(location: Location, manifest: Manifest, keys: Iterable[str] | None = None) -> list[Problem]:
    """Compare the store's objects with the manifest, by listing (or by asking each object's size over HTTP)."""
    wanted = sorted(manifest.objects if keys is None else keys)
    found = list_objects(location)
    if found is None:
        with network_errors(location.url):
            sizes = location.fs.sizes([location.join(key) for key in wanted]) if wanted else []
        found = {key: size for key, size in zip(wanted, sizes, strict=True) if size is not None}
    problems = []
    for key in wanted:
        size = manifest.objects[key][0]
        if key not in found:
            problems.append(Problem(element_of(key), key, "missing (the store's manifest lists it)"))
        elif found[key] != size:
            problems.append(Problem(element_of(key), key, f"{found[key]} bytes, the manifest records {size}"))
    return problems


def checksum_problems(location: Location, manifest: Manifest, keys: Iterable[str] | None = None) -> list[Problem]:
    """Read objects and compare their crc32c with the manifest (every object when ``keys`` is ``None``)."""
    wanted = sorted(manifest.objects if keys is None else keys)
    problems = []

    def compare(key: str, checksum: int | None) -> None:
        if checksum is not None and checksum != manifest.objects[key][1]:
            problems.append(Problem(element_of(key), key, "fails its crc32c checksum (its bytes changed)"))

    if location.is_local:
        for key in wanted:
            try:
                compare(key, crc32c_of_file(location.join(key)))
            except FileNotFoundError:
                pass  # reported by presence_problems
        return problems
    for start in range(0, len(wanted), _REMOTE_BATCH):
        batch = wanted[start : start + _REMOTE_BATCH]
        with network_errors(location.url):
            answers = location.fs.cat([location.join(key) for key in batch], on_error="return")
        for key in batch:
            answer = answers.get(location.join(key))
            if isinstance(answer, bytes):
                compare(key, google_crc32c.value(answer))
            elif answer is not None and not isinstance(answer, FileNotFoundError):
                raise answer
    return problems


def summary_problems(sdata: Any, manifest: Manifest, *, kinds: Iterable[str] = ("tables", "shapes")) -> list[Problem]:
    """Compare what was read (tables' counts, shapes' and points' rows) with the manifest's element summaries."""
    kinds = set(kinds)
    problems = []
    for kind, name, element in sdata.gen_elements():
        recorded = manifest.elements.get(name)
        if recorded is None or kind not in kinds:
            continue
        if kind == "tables":
            found = table_summary(element)
            for key in ("n_obs", "n_vars", "nnz"):
                if found[key] != recorded[key]:
                    problems.append(Problem(name, key, f"{found[key]} read, the manifest records {recorded[key]}"))
            if not np.isclose(found["total_counts"], recorded["total_counts"], rtol=1e-9, atol=1e-6):
                problems.append(
                    Problem(
                        name,
                        "total_counts",
                        f"{found['total_counts']:.6g} read, the manifest records {recorded['total_counts']:.6g}",
                    )
                )
        elif len(element) != recorded["n_rows"]:
            problems.append(Problem(name, "n_rows", f"{len(element)} read, the manifest records {recorded['n_rows']}"))
    return problems


def raise_problems(url: str, problems: list[Problem]) -> None:
    """Raise one :class:`CorruptStoreError` naming the first problem and how many there are."""
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CorruptStoreError(
            f"{url}: damaged store: {problems[0]}{more}; run `hest-zarr validate {url}` to list every problem"
        )
