"""Stream patches (with expression) from sample stores, local or remote, into PyTorch training.

:class:`SamplePatches` (:mod:`hest_zarr.stream.patches`) is the one patch reader, torch-free; the datasets
(:mod:`hest_zarr.stream.datasets`) need the ``ml`` extra (torch) and are imported on first use.
"""

from __future__ import annotations

from typing import Any

from hest_zarr.stream.patches import SamplePatches, extract_patches

_DATASETS = ("IterablePatchDataset", "PatchDataset")


def __getattr__(name: str) -> Any:
    if name in _DATASETS:
        from hest_zarr.stream import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["IterablePatchDataset", "PatchDataset", "SamplePatches", "extract_patches"]
