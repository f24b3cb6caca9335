"""hest-zarr: HEST-1k samples as cloud-native SpatialData stores, and the HEST workflows on them."""

from __future__ import annotations

from hest_zarr.schemas import HEST_ZARR_VERSION as __version__
from hest_zarr.store import add_elements, get_record, info, open, set_record, validate, write  # noqa: A004

__all__ = ["__version__", "add_elements", "get_record", "info", "open", "set_record", "validate", "write"]
