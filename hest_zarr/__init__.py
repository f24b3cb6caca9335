"""hest-zarr: HEST-1k samples as cloud-native SpatialData stores, and the HEST workflows on them."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hest-zarr")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from hest_zarr import codecs as codecs  # registers the JPEG codec with zarr on import
from hest_zarr.store import add_elements, get_record, info, open, set_record, validate, write  # noqa: A004

__all__ = ["__version__", "add_elements", "get_record", "info", "open", "set_record", "validate", "write"]
