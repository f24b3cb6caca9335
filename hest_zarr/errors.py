"""Exceptions raised by hest-zarr.

Every error names the file, URL or element concerned and says what was expected and what was
found, so that the CLI can print it as one line.
"""

from __future__ import annotations

import re

#: ``scheme://user:password@`` in a URL.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][\w+.-]*://)[^/\s@]+@")
#: Query-string credentials: presigned S3/GCS URLs, Azure SAS signatures, bearer tokens.
_QUERY_SECRET = re.compile(
    r"(?i)(?P<key>\b(?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Goog-Signature|X-Goog-Credential"
    r"|sig|signature|token|access_token|sas)=)[^&\s#'\"]+"
)


def redact(text: str) -> str:
    """Hide the credentials of every URL in ``text``: ``user:password@`` and query-string secrets.

    Used for every message, log line, provenance entry and attribute that names a URL.

    Examples
    --------
    >>> redact("https://me:pw@host/a.zarr?X-Amz-Signature=abc&x=1: no such store")
    'https://***@host/a.zarr?X-Amz-Signature=***&x=1: no such store'

    """
    return _QUERY_SECRET.sub(r"\g<key>***", _USERINFO.sub(r"\g<scheme>***@", text))


class HestZarrError(Exception):
    """Base class of every error this package raises on purpose; its message never shows URL credentials."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(redact(str(message)), *args)


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


class ChunkChecksumError(CorruptStoreError, ValueError):
    """A chunk's bytes do not match the crc32c stored with them."""


class RemoteUnreachableError(HestZarrError, ConnectionError):
    """A remote store's server could not be reached."""


class AccessDeniedError(HestZarrError, PermissionError):
    """The server (or the file system) refused access: wrong or missing credentials, or no permission."""


class InputError(HestZarrError, ValueError):
    """A converter's input file is missing, malformed or inconsistent."""


class AlignmentError(HestZarrError):
    """A Visium image could not be aligned to its slide layout (no frame, too few corners, a poor fit)."""
