"""Converters: one module per source technology or format, each returning a sample (SpatialData + record)."""

from __future__ import annotations

from hest_zarr.converters.visium import read_visium

__all__ = ["read_visium"]
