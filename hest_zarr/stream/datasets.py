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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from hest_zarr.elements import Elements
from hest_zarr.errors import InputError
from hest_zarr.ops.patch import DEFAULT_PIXEL_SIZE_UM, DEFAULT_SIZE_PX
from hest_zarr.store import StorageOptions
from hest_zarr.stream.patches import SamplePatches

Transform = Callable[[torch.Tensor], torch.Tensor]


class _Items:
    """The stores' patch plans and how cut patches become items (shared by both datasets; see their parameters)."""

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

    def __init__(self, stores: str | Path | Sequence[str | Path] | Sequence[SamplePatches], **options: Any) -> None:
        super().__init__(stores, **options)
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
            for batch in sample.read(local, batch_size=len(local)):
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
        shuffle: bool = False,
        seed: int = 0,
        bands_per_unit: int = 4,
        rank: int = 0,
        world_size: int = 1,
        **options: Any,
    ) -> None:
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is not in [0, world_size={world_size})")
        super().__init__(stores, **options)
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
            for batch in sample.read(indices, batch_size=len(indices)):
                positions = rng.permutation(len(batch.indices)) if self.shuffle else range(len(batch.indices))
                for position in positions:
                    within = batch.indices[position]
                    yield self._item(sample, int(indices[within]), batch.images[position])
