"""Stream patches (with expression) from sample stores, local or remote, into PyTorch training.

Needs the ``ml`` extra (torch). See :mod:`hest_zarr.stream.datasets`.
"""

from __future__ import annotations

from hest_zarr.stream.datasets import IterablePatchDataset, PatchDataset, SamplePatches

__all__ = ["IterablePatchDataset", "PatchDataset", "SamplePatches"]
