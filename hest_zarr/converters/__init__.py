"""Converters: one module per source technology or format, each returning a sample (SpatialData + record).

:func:`read_sample` picks the converter from the files (:func:`detect_technology`) and is what
``hest-zarr convert`` calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from spatialdata import SpatialData

from hest_zarr.converters.hest import export_hest, read_hest
from hest_zarr.converters.legacy import read_legacy
from hest_zarr.converters.nuclei import add_segmentation, read_segmentation, to_qupath_geojson
from hest_zarr.converters.slides import SlideImage, he_element, slide_image
from hest_zarr.converters.st_v1 import looks_like_st_table, read_st_v1, st_count_tables
from hest_zarr.converters.visium import read_visium
from hest_zarr.converters.visium_hd import read_visium_hd
from hest_zarr.converters.xenium import read_xenium
from hest_zarr.errors import InputError
from hest_zarr.schemas import SampleMetadata

Technology = Literal["visium", "visium-hd", "xenium", "st", "legacy", "hest"]
TECHNOLOGIES: tuple[str, ...] = ("visium", "visium-hd", "xenium", "st", "legacy", "hest")


def detect_technology(path: str | Path) -> Technology:
    """Tell the technology of a source from its files.

    Parameters
    ----------
    path
        A Space Ranger ``outs/`` folder, a Visium HD folder (``binned_outputs/``), a Xenium output folder,
        a HEST-1k download root, or an ST v1 count table (gzipped or not) or a folder holding one.

    Raises
    ------
    InputError
        When the layout matches none of them; the message lists what was looked for.

    Examples
    --------
    >>> detect_technology("../shared/data/perik_visium_cytassist_mouse_placenta")  # doctest: +SKIP
    'visium'

    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() in (".tsv", ".csv", ".txt", ".gz") and looks_like_st_table(path):
            return "st"
        raise InputError(
            f"{path}: cannot tell the technology of this file (an ST v1 table has XxY spot ids); pass --technology"
        )
    names = {p.name for p in path.iterdir()}
    if "binned_outputs" in names:
        return "visium-hd"
    if names & {"transcripts.parquet", "transcripts.csv.gz", "transcripts.zarr.zip"}:
        return "xenium"
    if names & {"cell_feature_matrix.h5", "cell_feature_matrix"} and names & {"cells.parquet", "cells.csv.gz"}:
        return "xenium"  # a minimal Xenium bundle (e.g. SpatialExperimentIO's Xenium_small): matrix and cell summary
    if {"st", "metadata"} <= names:
        return "hest"
    if "spatial" in names:
        return "visium"
    if st_count_tables(path):
        return "st"
    raise InputError(
        f"{path}: unknown folder layout (expected a Space Ranger outs/ with spatial/, binned_outputs/ for "
        "Visium HD, transcripts.parquet for Xenium, st/ + metadata/ for a HEST-1k download, or an ST v1 count "
        "table with XxY spot ids)"
    )


def read_sample(
    source: str | Path,
    *,
    technology: Technology | Literal["auto"] = "auto",
    image: str | Path | None = None,
    alignment: str | Path | None = None,
    coordinates: str | Path | None = None,
    sample_id: str | None = None,
    metadata: SampleMetadata | None = None,
) -> SpatialData:
    """Read any supported source into a sample.

    Parameters
    ----------
    source
        Folder or file of the source (see :func:`detect_technology`).
    technology
        The converter to use, or ``"auto"``.
    image
        Full-resolution H&E image (Visium, Visium HD, Xenium, ST v1, legacy tables).
    alignment
        ST v1 spot-detector table, or Xenium H&E alignment (3x3 affine or keypoints CSV).
    coordinates
        Coordinate table for legacy expression tables.
    sample_id
        Sample id (HEST-1k id for ``hest``; default: the folder name).
    metadata
        Known metadata (e.g. the HEST-1k CSV row).

    Examples
    --------
    >>> sdata = read_sample("outs/", image="slide.tif", sample_id="TENX95")  # doctest: +SKIP

    """
    source = Path(source)
    chosen = detect_technology(source) if technology == "auto" else technology
    common: dict[str, Any] = {"sample_id": sample_id, "metadata": metadata}
    if chosen == "visium":
        return read_visium(source, image=image, alignment=alignment, **common)
    if chosen == "visium-hd":
        return read_visium_hd(source, image=image, **common)
    if chosen == "xenium":
        return read_xenium(source, he_image=image, alignment=alignment, **common)
    if chosen == "st":
        return read_st_v1(source, alignment=alignment, image=image, **common)
    if chosen == "legacy":
        if coordinates is None:
            raise InputError(f"{source}: legacy expression tables need a coordinate table (--coordinates)")
        return read_legacy(source, coordinates, image=image, **common)
    if chosen == "hest":
        if sample_id is None:
            raise InputError(f"{source}: a HEST-1k download holds many samples; pass the sample id (--sample-id)")
        return read_hest(source, sample_id)
    raise InputError(f"unknown technology {chosen!r}; expected one of {TECHNOLOGIES}")


__all__ = [
    "TECHNOLOGIES",
    "SlideImage",
    "Technology",
    "add_segmentation",
    "detect_technology",
    "export_hest",
    "he_element",
    "read_hest",
    "read_legacy",
    "read_sample",
    "read_segmentation",
    "read_st_v1",
    "read_visium",
    "read_visium_hd",
    "read_xenium",
    "slide_image",
    "to_qupath_geojson",
]
