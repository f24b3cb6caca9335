"""The one patch reader: a store's patch plan with its chunk reader, used by the datasets and the benchmark.

:class:`SamplePatches` plans the patches of one store (:func:`hest_zarr.ops.patch.plan_patches`), loads the
chosen genes' counts of their spots, and opens the chunk reader of the plan's level lazily in each process
(:class:`hest_zarr.store.ChunkReader`), so it pickles into ``DataLoader`` workers. :meth:`SamplePatches.read`
cuts any subset of the plan (:func:`hest_zarr.ops.patch.read_patches`). Needs no torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hest_zarr.elements import Elements, annotated_region, get_record
from hest_zarr.errors import InputError
from hest_zarr.ops.patch import DEFAULT_PIXEL_SIZE_UM, DEFAULT_SIZE_PX, PatchBatch, PatchPlan, plan_bands, plan_patches
from hest_zarr.ops.patch import read_patches as cut_patches
from hest_zarr.store import ChunkReader, StorageOptions, chunk_workers, open_levels
from hest_zarr.store import open as open_store


@dataclass
class SamplePatches:
    """One store's patch plan, expression rows and (per process, lazily) its chunk reader.

    Examples
    --------
    >>> sample = SamplePatches.from_store("s3://bucket/TENX95.zarr", storage_options={"anon": True})  # doctest: +SKIP
    >>> for batch in sample.read(batch_size=64):  # doctest: +SKIP
    ...     batch.images.shape  # (64, 224, 224, 3)

    """

    url: str
    sample_id: str
    plan: PatchPlan
    expression: np.ndarray | None
    image: str = Elements.HE
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
        image: str = Elements.HE,
        size_px: int = DEFAULT_SIZE_PX,
        pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM,
        in_tissue_only: bool = False,
        allow_upsample: bool = True,
        storage_options: StorageOptions = None,
        workers: int | None = None,
    ) -> SamplePatches:
        """Plan a store's patches (see :func:`~hest_zarr.ops.patch.plan_patches`) and load the genes' counts."""
        sdata = open_store(url, storage_options)
        plan = plan_patches(
            sdata,
            element=element,
            image=image,
            size_px=size_px,
            pixel_size_um=pixel_size_um,
            in_tissue_only=in_tissue_only,
            allow_upsample=allow_upsample,
        )
        expression = _expression_rows(sdata, str(url), element, plan.ids, genes) if genes is not None else None
        return cls(
            url=str(url),
            sample_id=get_record(sdata).metadata.id,
            plan=plan,
            expression=expression,
            image=image,
            storage_options=dict(storage_options or {}),
            workers=workers or chunk_workers(url, storage_options),
        )

    @property
    def reader(self) -> ChunkReader:
        """Chunk reader of the plan's level, opened in each process on first use."""
        if self._reader is None:
            levels = open_levels(self.url, self.image, storage_options=self.storage_options or None)
            self._reader = ChunkReader(levels[self.plan.level], workers=self.workers)
        return self._reader

    def bands(self) -> list[np.ndarray]:
        """Patch indices of every band (see :func:`hest_zarr.ops.patch.plan_bands`)."""
        return plan_bands(self.plan, self.reader.level)

    def read(
        self, indices: np.ndarray | None = None, *, batch_size: int = 16, pad_value: int = 255
    ) -> Iterator[PatchBatch]:
        """Cut the plan's patches, or only those at ``indices`` in it (see :func:`hest_zarr.ops.patch.read_patches`).

        With ``indices``, a batch's ``indices`` are positions in ``indices``: ``indices[batch.indices]`` are plan
        positions.
        """
        plan = self.plan if indices is None else self.plan.subset(indices)
        return cut_patches(plan, self.reader, batch_size=batch_size, pad_value=pad_value)

    def close(self) -> None:
        """Stop this process's chunk reader (a later read opens a new one)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None  # thread pools do not pickle; each process opens its own
        return state


def extract_patches(
    url: str | Path,
    *,
    element: str = Elements.SPOTS,
    image: str = Elements.HE,
    size_px: int = DEFAULT_SIZE_PX,
    pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM,
    in_tissue_only: bool = False,
    allow_upsample: bool = True,
    batch_size: int = 16,
    pad_value: int = 255,
    workers: int | None = None,
    storage_options: StorageOptions = None,
) -> tuple[PatchPlan, Iterator[PatchBatch]]:
    """Plan the patches of a store and return the plan with an iterator over the cut batches.

    Parameters
    ----------
    url
        Local path or fsspec URL of a sample store.
    element, image, size_px, pixel_size_um, in_tissue_only, allow_upsample
        See :func:`~hest_zarr.ops.patch.plan_patches`.
    batch_size
        Patches per yielded batch.
    pad_value
        Fill of the parts of a patch outside the image.
    workers
        Concurrent chunk reads (default :func:`hest_zarr.store.chunk_workers`).
    storage_options
        fsspec options for a remote URL.

    Examples
    --------
    >>> plan, batches = extract_patches("s3://bucket/TENX95.zarr", storage_options={"anon": True})  # doctest: +SKIP
    >>> for batch in batches:  # doctest: +SKIP
    ...     batch.images.shape  # (n, 224, 224, 3)

    """
    sample = SamplePatches.from_store(
        url,
        element=element,
        image=image,
        size_px=size_px,
        pixel_size_um=pixel_size_um,
        in_tissue_only=in_tissue_only,
        allow_upsample=allow_upsample,
        storage_options=storage_options,
        workers=workers,
    )
    reader = sample.reader  # opened now, as the plan is: a store that goes away later fails on its chunks

    def batches() -> Iterator[PatchBatch]:
        try:
            yield from sample.read(batch_size=batch_size, pad_value=pad_value)
        finally:
            reader.close()

    return sample.plan, batches()


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
