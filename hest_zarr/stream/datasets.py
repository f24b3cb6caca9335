"""PyTorch datasets of patches around spots, read from one or many sample stores.

Two datasets over the same per-sample plans (:func:`hest_zarr.ops.patch.plan_patches`):

- :class:`PatchDataset` (map-style): ``dataset[i]`` is one patch; ``DataLoader`` batches go through
  ``__getitems__``, which reads the batch's chunks once. Random access costs one to four chunk decodes
  per patch, so shuffled map-style loading is slower than the iterable form.
- :class:`IterablePatchDataset`: bands of patches (patches whose windows start in the same chunk row),
  grouped into work units and split between ``DataLoader`` workers (and distributed ranks) without
  duplicates; every worker decodes each of its chunks once. ``shuffle=True`` permutes the units every
  epoch (:meth:`IterablePatchDataset.set_epoch`) and shuffles patches inside a unit.

Items are dicts: ``image`` (``uint8`` tensor ``3 x H x W``, after ``transform``), ``expression``
(``float32`` tensor of the chosen genes' raw counts, after ``target_transform``; absent without genes),
``id`` (spot id) and ``sample`` (sample id). Both datasets pickle (plans are numpy arrays; chunk readers
are opened lazily in each process), so they work with ``num_workers > 0`` and the spawn start method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

import hest_zarr
from hest_zarr._constants import Elements
from hest_zarr.errors import InputError
from hest_zarr.ops._chunks import ChunkReader
from hest_zarr.ops.patch import (
    DEFAULT_PIXEL_SIZE_UM,
    DEFAULT_SIZE_PX,
    PatchPlan,
    default_workers,
    open_levels,
    plan_bands,
    plan_patches,
    read_patches,
)
from hest_zarr.schemas import annotated_region
from hest_zarr.store import StorageOptions

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SamplePatches:
    """One store's patch plan, expression rows and (per process, lazily) its chunk reader."""

    url: str
    sample_id: str
    plan: PatchPlan
    expression: np.ndarray | None
    storage_options: dict[str, Any] = field(default_factory=dict)
    workers: int = 0
    _reader: ChunkReader | None = field(default=None, repr=False)

    @classmethod
    def from_store(
        cls,
        url: str | Path,
        *,
        genes: Sequence[str] | None = None,
        element: str = Elements.SPOTS,
        size_px: int = DEFAULT_SIZE_PX,
        pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM,
        in_tissue_only: bool = False,
        storage_options: StorageOptions = None,
        workers: int | None = None,
    ) -> SamplePatches:
        """Plan a store's patches and load the chosen genes' counts of its spots."""
        sdata = hest_zarr.open(url, storage_options)
        plan = plan_patches(
            sdata, element=element, size_px=size_px, pixel_size_um=pixel_size_um, in_tissue_only=in_tissue_only
        )
        expression = _expression_rows(sdata, str(url), element, plan.ids, genes) if genes is not None else None
        return cls(
            url=str(url),
            sample_id=hest_zarr.get_record(sdata).metadata.id,
            plan=plan,
            expression=expression,
            storage_options=dict(storage_options or {}),
            workers=workers or default_workers(url, storage_options),
        )

    @property
    def reader(self) -> ChunkReader:
        """Chunk reader of the plan's level, opened in each process on first use."""
        if self._reader is None:
            level = open_levels(self.url, storage_options=self.storage_options or None)[self.plan.level]
            self._reader = ChunkReader(level, workers=self.workers)
        return self._reader

    def bands(self) -> list[np.ndarray]:
        """Patch indices of every band (see :func:`hest_zarr.ops.patch.plan_bands`)."""
        return plan_bands(self.plan, self.reader.level)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None  # thread pools do not pickle; each process opens its own
        return state


def _expression_rows(sdata: Any, url: str, element: str, ids: np.ndarray, genes: Sequence[str]) -> np.ndarray:
    """Return the rows of ``ids`` in the expression table of ``element`` (not any other table annotating it)."""
    names = [name for name in sdata.tables if annotated_region(name) == element]
    if not names:
        raise InputError(f"{url}: genes were asked for, but no expression table annotates '{element}'")
    table = sdata.tables[names[0]]
    missing = [gene for gene in genes if gene not in table.var_names]
    if missing:
        raise InputError(f"{url}: genes {missing[:5]} ({len(missing)} in all) are not in '{names[0]}'")
    spot_ids = pd.Index(table.obs[table.uns["spatialdata_attrs"]["instance_key"]].astype(str))
    if spot_ids.has_duplicates:
        raise InputError(f"{url}: '{names[0]}' has spot {spot_ids[spot_ids.duplicated()][0]!r} twice")
    rows = spot_ids.get_indexer(ids)
    if (rows < 0).any():
        absent = np.asarray(ids)[rows < 0]
        raise InputError(f"{url}: {len(absent)} patches have no row in '{names[0]}' (e.g. {absent[0]!r})")
    matrix = table.X[rows][:, table.var_names.get_indexer(list(genes))]
    return np.asarray(matrix.todense() if hasattr(matrix, "todense") else matrix, dtype=np.float32)


class _Items:
    """Turn cut patches into dataset items (shared by both datasets)."""

    samples: list[SamplePatches]
    transform: Transform | None
    target_transform: Transform | None

    def _item(self, sample: SamplePatches, index: int, pixels: np.ndarray) -> dict[str, Any]:
        image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        item: dict[str, Any] = {
            "image": self.transform(image) if self.transform is not None else image,
            "id": str(sample.plan.ids[index]),
            "sample": sample.sample_id,
        }
        if sample.expression is not None:
            expression = torch.from_numpy(sample.expression[index])
            item["expression"] = self.target_transform(expression) if self.target_transform else expression
        return item


def _samples(
    stores: str | Path | Sequence[str | Path] | Sequence[SamplePatches], options: dict[str, Any]
) -> list[SamplePatches]:
    if isinstance(stores, (str, Path)):
        stores = [stores]
    return [
        store if isinstance(store, SamplePatches) else SamplePatches.from_store(store, **options) for store in stores
    ]


class PatchDataset(_Items, Dataset):
    """Map-style dataset of the patches of one or many stores.

    Parameters
    ----------
    stores
        Store URLs (local or remote), or prepared :class:`SamplePatches`.
    genes
        Genes whose raw counts are returned as ``expression`` (``None``: no expression).
    transform, target_transform
        Applied to the ``uint8`` image tensor and to the expression tensor.
    element, size_px, pixel_size_um, in_tissue_only, storage_options
        As in :func:`hest_zarr.ops.patch.plan_patches`, for every store.

    Examples
    --------
    >>> from torch.utils.data import DataLoader
    >>> dataset = PatchDataset(["s3://bucket/A.zarr", "s3://bucket/B.zarr"], genes=["GAPDH", "ACTB"])  # doctest: +SKIP
    >>> loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=2)  # doctest: +SKIP
    >>> batch = next(iter(loader))  # batch["image"]: 64 x 3 x 224 x 224 uint8  # doctest: +SKIP

    """

    def __init__(
        self,
        stores: str | Path | Sequence[str | Path] | Sequence[SamplePatches],
        *,
        genes: Sequence[str] | None = None,
        transform: Transform | None = None,
        target_transform: Transform | None = None,
        element: str = Elements.SPOTS,
        size_px: int = DEFAULT_SIZE_PX,
        pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM,
        in_tissue_only: bool = False,
        storage_options: StorageOptions = None,
    ) -> None:
        options = {
            "genes": genes,
            "element": element,
            "size_px": size_px,
            "pixel_size_um": pixel_size_um,
            "in_tissue_only": in_tissue_only,
            "storage_options": storage_options,
        }
        self.samples = _samples(stores, options)
        self.transform, self.target_transform = transform, target_transform
        self._offsets = np.cumsum([0] + [len(sample.plan) for sample in self.samples])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"patch {index} out of range ({len(self)} patches)")
        sample = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return sample, index - int(self._offsets[sample])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Read a batch: the chunks under its patches are fetched and decoded once."""
        located = [self._locate(int(index)) for index in indices]
        items: list[dict[str, Any] | None] = [None] * len(located)
        by_sample: dict[int, list[tuple[int, int]]] = {}
        for position, (sample, local) in enumerate(located):
            by_sample.setdefault(sample, []).append((position, local))
        for sample_number, wanted in by_sample.items():
            sample = self.samples[sample_number]
            local = np.array([index for _, index in wanted])
            for batch in read_patches(sample.plan.subset(local), sample.reader, batch_size=len(local)):
                for within, pixels in zip(batch.indices, batch.images, strict=True):
                    items[wanted[within][0]] = self._item(sample, int(local[within]), pixels)
        return items  # type: ignore[return-value]


class IterablePatchDataset(_Items, IterableDataset):
    """Iterable dataset: bands of patches split between workers and ranks, each chunk decoded once.

    Parameters
    ----------
    stores, genes, transform, target_transform, element, size_px, pixel_size_um, in_tissue_only, storage_options
        As in :class:`PatchDataset`.
    shuffle
        Permute the work units every epoch and shuffle patches inside each unit.
    seed
        Seed of the shuffling (the epoch is added, see :meth:`set_epoch`).
    bands_per_unit
        Consecutive bands per work unit; larger units share more chunks between their bands.
    rank, world_size
        Distributed training: this process's rank and the number of ranks (each gets a disjoint share).

    Examples
    --------
    >>> dataset = IterablePatchDataset("TENX95.zarr", genes=["GAPDH"], shuffle=True)  # doctest: +SKIP
    >>> loader = DataLoader(dataset, batch_size=64, num_workers=2)  # doctest: +SKIP

    """

    def __init__(
        self,
        stores: str | Path | Sequence[str | Path] | Sequence[SamplePatches],
        *,
        genes: Sequence[str] | None = None,
        transform: Transform | None = None,
        target_transform: Transform | None = None,
        element: str = Elements.SPOTS,
        size_px: int = DEFAULT_SIZE_PX,
        pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM,
        in_tissue_only: bool = False,
        storage_options: StorageOptions = None,
        shuffle: bool = False,
        seed: int = 0,
        bands_per_unit: int = 4,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        options = {
            "genes": genes,
            "element": element,
            "size_px": size_px,
            "pixel_size_um": pixel_size_um,
            "in_tissue_only": in_tissue_only,
            "storage_options": storage_options,
        }
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is not in [0, world_size={world_size})")
        self.samples = _samples(stores, options)
        self.transform, self.target_transform = transform, target_transform
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.bands_per_unit, self.rank, self.world_size = max(1, bands_per_unit), rank, world_size

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffling for a new epoch (call before iterating, as with ``DistributedSampler``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(sample.plan) for sample in self.samples)

    def _units(self) -> list[tuple[int, np.ndarray]]:
        units = []
        for number, sample in enumerate(self.samples):
            bands = sample.bands()
            for start in range(0, len(bands), self.bands_per_unit):
                units.append((number, np.concatenate(bands[start : start + self.bands_per_unit])))
        return units

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        units = self._units()
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(len(units)) if self.shuffle else np.arange(len(units))
        share = order[self.rank * workers + worker :: self.world_size * workers]
        for unit in share:
            number, indices = units[unit]
            sample = self.samples[number]
            # one batch per unit, so that shuffling mixes the whole unit, not neighbours 16 at a time
            for batch in read_patches(sample.plan.subset(indices), sample.reader, batch_size=len(indices)):
                positions = rng.permutation(len(batch.indices)) if self.shuffle else range(len(batch.indices))
                for position in positions:
                    within = batch.indices[position]
                    yield self._item(sample, int(indices[within]), batch.images[position])
