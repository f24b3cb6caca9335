"""Chunk codecs for image arrays: lossless zstd, or lossy JPEG through imagecodecs.

Every chain ends with zarr v3's standard ``crc32c`` codec, so that any zarr v3 reader detects a damaged chunk. In
a process that imports ``hest_zarr`` the ``crc32c`` codec is :class:`CheckedCrc32c`: the same bytes, and a
:class:`~hest_zarr.errors.ChunkChecksumError` (a ``ValueError``) instead of a bare one on a mismatch.

Zarr v3 has no JPEG codec of its own. imagecodecs ships a numcodecs JPEG codec
(``imagecodecs_jpeg``); zarr wraps numcodecs codecs for v3 under the name ``numcodecs.<id>``, but only
for the codecs numcodecs itself ships. This module registers the same wrapper for imagecodecs' JPEG, so
that a store's arrays read ``{"name": "numcodecs.imagecodecs_jpeg"}`` and decode in any zarr-python 3
process that imports ``hest_zarr`` (or registers the class the same way). Images are stored ``c, y, x``;
JPEG needs pixels interleaved, so a transpose filter puts each chunk ``y, x, c`` before encoding.
"""

from __future__ import annotations

import asyncio
import warnings
from typing import Any, Literal

import imagecodecs.numcodecs
import numpy as np
import zarr.registry
from zarr.codecs import BytesCodec, Crc32cCodec, TransposeCodec, ZstdCodec
from zarr.codecs.numcodecs._codecs import _NumcodecsArrayBytesCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.errors import ZarrUserWarning

from hest_zarr.errors import ChunkChecksumError

ImageCodec = Literal["zstd", "jpeg"]
IMAGE_CODECS: tuple[str, ...] = ("zstd", "jpeg")
DEFAULT_JPEG_QUALITY = 90
DEFAULT_ZSTD_LEVEL = 3


class ImagecodecsJpeg(_NumcodecsArrayBytesCodec, codec_name="imagecodecs_jpeg"):
    """Zarr v3 array-to-bytes codec wrapping ``imagecodecs.numcodecs.Jpeg``."""

    def __init__(self, **codec_config: Any) -> None:
        with warnings.catch_warnings():
            # zarr warns that numcodecs codecs are outside the v3 spec; we document that above
            warnings.simplefilter("ignore", ZarrUserWarning)
            super().__init__(**codec_config)

    async def _encode_single(self, chunk_data: NDBuffer, chunk_spec: ArraySpec) -> Buffer:
        # the transpose filter hands over a strided view; libjpeg needs contiguous rows
        pixels = np.ascontiguousarray(chunk_data.as_ndarray_like())
        encoded = await asyncio.to_thread(self._codec.encode, pixels)
        return chunk_spec.prototype.buffer.from_bytes(encoded)


class CheckedCrc32c(Crc32cCodec):
    """Zarr's ``crc32c`` codec, raising :class:`~hest_zarr.errors.ChunkChecksumError` on a mismatch."""

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer:
        try:
            return super()._decode_sync(chunk_bytes, chunk_spec)
        except ValueError as err:
            raise ChunkChecksumError(
                f"a chunk fails its crc32c checksum ({err}): the store is damaged; `hest-zarr validate` names it"
            ) from err


#: Checksum codec ending every chain this package writes.
CHECKSUM = CheckedCrc32c()
#: Compressors of table arrays (anndata's, then a checksum).
TABLE_COMPRESSORS = (ZstdCodec(level=DEFAULT_ZSTD_LEVEL), CHECKSUM)

zarr.registry.register_codec("crc32c", CheckedCrc32c)
zarr.config.set({"codecs.crc32c": f"{CheckedCrc32c.__module__}.{CheckedCrc32c.__qualname__}"})
imagecodecs.numcodecs.register_codecs(codecs=["imagecodecs_jpeg"], verbose=False)
zarr.registry.register_codec(ImagecodecsJpeg.codec_name, ImagecodecsJpeg)


def image_array_codecs(
    codec: ImageCodec, *, n_channels: int, dtype: Any, jpeg_quality: int = DEFAULT_JPEG_QUALITY
) -> dict[str, Any]:
    """Return the ``filters``, ``serializer`` and ``compressors`` for ``zarr.create_array`` of a ``c, y, x`` image.

    Parameters
    ----------
    codec
        ``"zstd"`` (lossless) or ``"jpeg"`` (lossy; uint8 with 1 or 3 channels only).
    n_channels
        Size of the ``c`` axis.
    dtype
        Data type of the image.
    jpeg_quality
        JPEG quality, 1-100.

    Examples
    --------
    >>> sorted(image_array_codecs("zstd", n_channels=3, dtype="uint8"))
    ['compressors', 'filters', 'serializer']

    """
    if codec == "zstd":
        return {
            "filters": None,
            "serializer": BytesCodec(),
            "compressors": [ZstdCodec(level=DEFAULT_ZSTD_LEVEL), CHECKSUM],
        }
    if codec == "jpeg":
        if np.dtype(dtype) != np.uint8 or n_channels not in (1, 3):
            raise ValueError(
                f"the JPEG codec stores uint8 images with 1 or 3 channels; got {np.dtype(dtype)} with "
                f"{n_channels} channels (use codec='zstd')"
            )
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be within 1-100, got {jpeg_quality}")
        return {
            "filters": [TransposeCodec(order=(1, 2, 0))],
            "serializer": ImagecodecsJpeg(level=int(jpeg_quality)),
            "compressors": [CHECKSUM],
        }
    raise ValueError(f"unknown image codec {codec!r}; expected one of {IMAGE_CODECS}")
