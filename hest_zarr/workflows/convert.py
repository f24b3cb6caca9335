"""Convert a source (Space Ranger, Xenium, ST v1, legacy tables, a HEST-1k download) into a sample store."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from hest_zarr.converters import Technology, read_sample
from hest_zarr.errors import InputError
from hest_zarr.schemas import metadata_by_id, read_hest_metadata_csv
from hest_zarr.store import DEFAULT_CHUNK_SIZE, DEFAULT_JPEG_QUALITY, ImageCodec, StorageOptions, write


def convert(
    source: str | Path,
    output: str | Path,
    *,
    technology: Technology | Literal["auto"] = "auto",
    image: str | Path | None = None,
    alignment: str | Path | None = None,
    coordinates: str | Path | None = None,
    sample_id: str | None = None,
    metadata_csv: str | Path | None = None,
    image_codec: ImageCodec = "zstd",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
    storage_options: StorageOptions = None,
) -> str:
    """Read a source with its converter (:func:`hest_zarr.converters.read_sample`) and write it as a store.

    Parameters
    ----------
    source, technology, image, alignment, coordinates, sample_id
        As :func:`~hest_zarr.converters.read_sample`.
    output
        Store path or URL to write.
    metadata_csv
        A HEST-1k metadata CSV whose row of the sample (by ``sample_id``, else the source's name) fills the metadata.
    image_codec, jpeg_quality, chunk_size, overwrite, storage_options
        As :func:`hest_zarr.store.write`.

    Returns
    -------
    The URL written.

    Examples
    --------
    >>> convert("outs/", "s3://bucket/TENX95.zarr", image="slide.tif", sample_id="TENX95")  # doctest: +SKIP

    """
    known = None
    if metadata_csv is not None:
        wanted = sample_id or Path(source).name
        known = metadata_by_id(read_hest_metadata_csv(metadata_csv)[0]).get(wanted)
        if known is None:
            raise InputError(f"{metadata_csv}: no row with id {wanted!r}")
    sdata = read_sample(
        source,
        technology=technology,
        image=image,
        alignment=alignment,
        coordinates=coordinates,
        sample_id=sample_id,
        metadata=known,
    )
    return write(
        sdata,
        output,
        overwrite=overwrite,
        image_codec=image_codec,
        jpeg_quality=jpeg_quality,
        chunk_size=chunk_size,
        storage_options=storage_options,
    )
