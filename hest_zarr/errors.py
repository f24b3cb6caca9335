"""Exceptions raised by hest-zarr.

Every error names the file, URL or element concerned and says what was expected and what was
found, so that the CLI can print it as one line.
"""

from __future__ import annotations


class HestZarrError(Exception):
    """Base class of every error this package raises on purpose."""


class StoreNotFoundError(HestZarrError, FileNotFoundError):
    """Nothing exists at the given path or URL."""


class NotAStoreError(HestZarrError):
    """Something exists at the URL but it is not a hest-zarr sample store."""


class IncompleteStoreError(NotAStoreError):
    """A store whose write did not finish (no root metadata was committed)."""


class SchemaVersionError(HestZarrError):
    """The store records a schema version this package cannot read."""


class CorruptStoreError(HestZarrError):
    """A chunk or an element of the store cannot be decoded."""


class RemoteUnreachableError(HestZarrError, ConnectionError):
    """A remote store's server could not be reached."""


class InputError(HestZarrError, ValueError):
    """A converter's input file is missing, malformed or inconsistent."""


class AlignmentError(HestZarrError):
    """A Visium image could not be aligned to its slide layout (no frame, too few corners, a poor fit)."""
