"""HEST-1k samples as released, into a sample store, and a store back out to that layout.

A HEST-1k download holds, per sample id ``ID`` (layout described in the HEST-1k dataset card):

- ``st/ID.h5ad``: spots x genes AnnData, raw counts in ``X``, spot positions in full-resolution pixels in
  ``obs['pxl_col_in_fullres', 'pxl_row_in_fullres']``, ``array_row/array_col/in_tissue`` where known;
- ``wsis/ID.tif``: the pyramidal H&E;
- ``metadata/ID.json``: the sample's metadata (the CSV's columns and more);
- ``tissue_seg/ID_contours.geojson``: tissue contours with holes;
- ``cellvit_seg/ID_cellvit_seg.geojson`` (or ``.geojson.zip`` / ``.parquet``): CellViT nuclei;
- ``transcripts/ID_transcripts.parquet``: Xenium molecules with H&E pixel columns ``he_x, he_y``;
- ``patches/ID.h5``: 224 px patches around spots (derived data: not imported; export it from a store
  with the patching operator).

The pixel size comes from the metadata's ``pixel_size_um_estimated``, never from the TIFF's resolution
tags, which the HEST release wrote 10x off (px/cm read as px/mm).
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import anndata
import geopandas
import numpy as np
import pandas as pd
from spatialdata import SpatialData
from spatialdata.models import PointsModel, ShapesModel

from hest_zarr._constants import Elements, Keys
from hest_zarr.converters._common import (
    build_sample,
    circle_spots,
    expression_table,
    frame_transformations,
    square_spots,
)
from hest_zarr.errors import InputError
from hest_zarr.schemas import SampleMetadata, magnification_from_pixel_size

#: Technologies whose HEST spots are squares (pseudo-spots, bins) rather than circles.
SQUARE_SPOT_TECHNOLOGIES = ("Xenium", "Visium HD")
POSITION_COLUMNS = ("pxl_col_in_fullres", "pxl_row_in_fullres")


def hest_paths(root: str | Path, sample_id: str) -> dict[str, Path]:
    """Return the paths of a sample's files in a HEST-1k download (whether or not they exist).

    Examples
    --------
    >>> hest_paths("hest_data", "TENX95")["st"].as_posix()
    'hest_data/st/TENX95.h5ad'

    """
    root = Path(root)
    return {
        "st": root / "st" / f"{sample_id}.h5ad",
        "wsi": root / "wsis" / f"{sample_id}.tif",
        "metadata": root / "metadata" / f"{sample_id}.json",
        "tissue": root / "tissue_seg" / f"{sample_id}_contours.geojson",
        "cellvit_geojson": root / "cellvit_seg" / f"{sample_id}_cellvit_seg.geojson",
        "cellvit_zip": root / "cellvit_seg" / f"{sample_id}_cellvit_seg.geojson.zip",
        "cellvit_parquet": root / "cellvit_seg" / f"{sample_id}_cellvit_seg.parquet",
        "transcripts": root / "transcripts" / f"{sample_id}_transcripts.parquet",
        "patches": root / "patches" / f"{sample_id}.h5",
    }


def _read_metadata(path: Path) -> tuple[SampleMetadata, dict[str, Any]]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise InputError(f"{path}: no such file (expected the sample's HEST metadata JSON)") from err
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    known = {key: value for key, value in raw.items() if key in SampleMetadata.model_fields}
    extra = {key: value for key, value in raw.items() if key not in SampleMetadata.model_fields}
    try:
        return SampleMetadata(**known), extra
    except ValueError as err:
        raise InputError(f"{path}: invalid metadata ({err})") from err


def _read_contours(path: Path, pixel_size_um: float) -> geopandas.GeoDataFrame:
    try:
        frame = geopandas.read_file(path)
    except Exception as err:  # pyogrio raises its own DataSourceError types
        raise InputError(f"{path}: not a readable GeoJSON ({err})") from err
    polygons = frame[frame.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if polygons.empty:
        raise InputError(f"{path}: no polygon among its {len(frame)} features (expected tissue contours)")
    tissue = geopandas.GeoDataFrame(geometry=polygons.geometry.to_numpy(), index=pd.RangeIndex(len(polygons)))
    tissue.index = tissue.index.astype(str)
    return ShapesModel.parse(tissue, transformations=frame_transformations(pixel_size_um))


def _read_cellvit(paths: dict[str, Path], pixel_size_um: float) -> tuple[geopandas.GeoDataFrame, Path] | None:
    from hest_zarr.converters.nuclei import read_segmentation

    for key in ("cellvit_geojson", "cellvit_zip", "cellvit_parquet"):
        path = paths[key]
        if not path.is_file():
            continue
        if key == "cellvit_zip":
            with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory() as tmp:
                names = [n for n in archive.namelist() if n.endswith(".geojson")]
                if not names:
                    raise InputError(f"{path}: no .geojson inside the archive")
                extracted = Path(archive.extract(names[0], tmp))
                return read_segmentation(extracted, format="cellvit", pixel_size_um=pixel_size_um), path
        if key == "cellvit_parquet":
            frame = geopandas.read_parquet(path)
            frame.index = frame.index.astype(str)
            return ShapesModel.parse(frame, transformations=frame_transformations(pixel_size_um)), path
        return read_segmentation(path, format="cellvit", pixel_size_um=pixel_size_um), path
    return None


def _read_transcripts(path: Path, pixel_size_um: float) -> Any:
    frame = pd.read_parquet(path)
    missing = [c for c in ("he_x", "he_y") if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing} (expected H&E-aligned transcripts)")
    gene_column = next((c for c in ("feature_name", "gene") if c in frame.columns), None)
    frame = frame.assign(x=frame["he_x"] * pixel_size_um, y=frame["he_y"] * pixel_size_um)
    if gene_column is not None:
        frame[gene_column] = frame[gene_column].astype(str).astype("category")
    return PointsModel.parse(
        frame,
        coordinates={"x": "x", "y": "y"},
        feature_key=gene_column,
        transformations=frame_transformations(1.0, to_global=_um_to_pixels(pixel_size_um)),
    )


def _um_to_pixels(pixel_size_um: float) -> Any:
    from spatialdata.transformations import Scale

    return Scale([1 / pixel_size_um] * 2, axes=("x", "y"))


def read_hest(root: str | Path, sample_id: str) -> SpatialData:
    """Read one sample of a HEST-1k download into a sample (SpatialData with its record).

    Parameters
    ----------
    root
        The download's root folder (holding ``st/``, ``wsis/``, ``metadata/``...).
    sample_id
        The HEST-1k id, e.g. ``"TENX95"``.

    Returns
    -------
    The sample: ``spots`` + ``spot_expression`` always; ``he``, ``tissue``, ``nuclei`` and ``transcripts``
    when their files exist.

    Examples
    --------
    >>> sdata = read_hest("hest_data", "TENX95")  # doctest: +SKIP
    >>> hest_zarr.write(sdata, "s3://bucket/TENX95.zarr")  # doctest: +SKIP

    """
    paths = hest_paths(root, sample_id)
    metadata, extra_metadata = _read_metadata(paths["metadata"])
    pixel_size = metadata.pixel_size_um_estimated
    if pixel_size is None:
        raise InputError(f"{paths['metadata']}: no pixel_size_um_estimated (needed to place the spots)")
    if not paths["st"].is_file():
        raise InputError(f"{paths['st']}: no such file (expected the sample's expression AnnData)")
    try:
        adata = anndata.read_h5ad(paths["st"])
    except Exception as err:  # h5py raises OSError/KeyError on damaged files
        raise InputError(f"{paths['st']}: not a readable h5ad ({type(err).__name__}: {err})") from err
    missing = [c for c in POSITION_COLUMNS if c not in adata.obs]
    if missing:
        raise InputError(f"{paths['st']}: obs lacks {missing} (expected spot positions in full-resolution pixels)")

    ids = adata.obs_names.astype(str)
    centres = adata.obs[list(POSITION_COLUMNS)].to_numpy(dtype=np.float64)
    diameter_um = metadata.spot_diameter or 55.0
    if metadata.st_technology in SQUARE_SPOT_TECHNOLOGIES:
        spots = square_spots(centres, diameter_um / pixel_size, ids, pixel_size)
    else:
        spots = circle_spots(centres, diameter_um / pixel_size / 2, ids, pixel_size)
    obs_columns = {
        c: adata.obs[c].to_numpy() for c in (Keys.ARRAY_ROW, Keys.ARRAY_COL, Keys.IN_TISSUE) if c in adata.obs
    }
    table = expression_table(adata.X, ids, adata.var, obs_columns=obs_columns, source=str(paths["st"]))

    inputs: dict[str, list[str]] = {Elements.SPOTS: [str(paths["st"])], Elements.SPOT_EXPRESSION: [str(paths["st"])]}
    images: dict[str, Any] = {}
    shapes: dict[str, Any] = {Elements.SPOTS: spots}
    points: dict[str, Any] = {}
    if paths["wsi"].is_file():
        from hest_zarr.converters.slides import he_element, slide_image

        images[Elements.HE] = he_element(slide_image(paths["wsi"]), pixel_size_um=pixel_size)
        inputs[Elements.HE] = [str(paths["wsi"])]
    if paths["tissue"].is_file():
        shapes[Elements.TISSUE] = _read_contours(paths["tissue"], pixel_size)
        inputs[Elements.TISSUE] = [str(paths["tissue"])]
    cellvit = _read_cellvit(paths, pixel_size)
    if cellvit is not None:
        shapes[Elements.NUCLEI], source = cellvit
        inputs[Elements.NUCLEI] = [str(source)]
    if paths["transcripts"].is_file():
        points[Elements.TRANSCRIPTS] = _read_transcripts(paths["transcripts"], pixel_size)
        inputs[Elements.TRANSCRIPTS] = [str(paths["transcripts"])]

    return build_sample(
        converter="hest",
        metadata={"id": sample_id, "st_technology": metadata.st_technology},
        pixel_size_um=pixel_size,
        inputs=inputs,
        known_metadata=metadata,
        images=images,
        shapes=shapes,
        points=points,
        tables={Elements.SPOT_EXPRESSION: table},
        parameters={Elements.SPOTS: {"unused_metadata_keys": sorted(extra_metadata)}},
    )


def _tiles(level: Any, tile: int) -> Any:
    """Yield ``tile x tile x c`` tiles of a ``c, y, x`` dask level row by row (one strip in memory)."""
    _, height, width = level.shape
    for top in range(0, height, tile):
        strip = np.asarray(level[:, top : top + tile, :]).transpose(1, 2, 0)
        for left in range(0, width, tile):
            block = strip[:, left : left + tile]
            if block.shape[:2] != (tile, tile):
                padded = np.zeros((tile, tile, block.shape[2]), dtype=block.dtype)
                padded[: block.shape[0], : block.shape[1]] = block
                block = padded
            yield block


def write_pyramidal_tiff(
    levels: list[Any], path: str | Path, *, pixel_size_um: float, tile: int = 512, jpeg_quality: int | None = 90
) -> Path:
    """Write ``c, y, x`` uint8 pyramid levels as a tiled pyramidal (Big)TIFF, level 0 first, the rest as SubIFDs.

    The resolution tags are written in pixels per centimetre with ``ResolutionUnit = CENTIMETER``
    (1e4 / um-per-pixel), so readers that honour the unit get the right pixel size.

    Parameters
    ----------
    levels
        Dask (or numpy) arrays, each half the size of the previous one.
    path
        Output file.
    pixel_size_um
        Micrometres per level-0 pixel.
    tile
        Tile side in pixels.
    jpeg_quality
        JPEG quality, or ``None`` for lossless (zlib).

    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if jpeg_quality is not None:
        compression: dict[str, Any] = {"compression": "jpeg", "compressionargs": {"level": jpeg_quality}}
    else:
        compression = {"compression": "zlib"}
    pixels_per_cm = 1e4 / pixel_size_um
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, level in enumerate(levels):
            channels, height, width = level.shape
            scale = 2**index
            tif.write(
                _tiles(level, tile),
                shape=(height, width, channels),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb" if channels == 3 else "minisblack",
                **compression,
                resolution=(pixels_per_cm / scale, pixels_per_cm / scale),
                resolutionunit="CENTIMETER",
                subifds=len(levels) - 1 if index == 0 else None,
                subfiletype=1 if index else 0,
            )
    return path


def export_hest(
    url: str | Path,
    root: str | Path,
    *,
    sample_id: str | None = None,
    storage_options: dict[str, Any] | None = None,
    jpeg_quality: int | None = 90,
) -> dict[str, Path]:
    """Export a sample store to the HEST-1k layout (``st/``, ``wsis/``, ``metadata/``, ``tissue_seg/``...).

    Spot positions and contours are written in the exported WSI's pixels, and ``pixel_size_um_estimated``
    in the metadata is that WSI's pixel size, so a HEST reader finds everything aligned.

    Parameters
    ----------
    url
        The store.
    root
        Output folder (created).
    sample_id
        File name stem (default: the store's sample id).
    storage_options
        fsspec options for a remote store.
    jpeg_quality
        JPEG quality of the WSI tiles, or ``None`` for lossless.

    Returns
    -------
    The files written, by kind.

    Examples
    --------
    >>> export_hest("TENX95.zarr", "hest_data")["st"]  # doctest: +SKIP
    PosixPath('hest_data/st/TENX95.h5ad')

    """
    from spatialdata.transformations import get_transformation

    import hest_zarr
    from hest_zarr._raster import _levels

    sdata = hest_zarr.open(url, storage_options)
    record = hest_zarr.get_record(sdata)
    sample_id = sample_id or record.metadata.id
    paths = hest_paths(root, sample_id)
    written: dict[str, Path] = {}

    # the exported WSI's pixels: the he image's own frame (hires images keep their scale to global)
    to_image = np.eye(3)
    image_pixel_size = record.pixel_size_um
    if Elements.HE in sdata.images:
        he = sdata[Elements.HE]
        he_to_global = get_transformation(he, "global").to_affine_matrix(("x", "y"), ("x", "y"))
        to_image = np.linalg.inv(he_to_global)
        image_pixel_size = record.pixel_size_um * float(np.sqrt(abs(np.linalg.det(he_to_global[:2, :2]))))
        levels = _levels(he) or [he.data]
        written["wsi"] = write_pyramidal_tiff(
            levels, paths["wsi"], pixel_size_um=image_pixel_size, jpeg_quality=jpeg_quality
        )

    table = sdata[Elements.SPOT_EXPRESSION]
    spots = sdata[Elements.SPOTS].loc[table.obs[Keys.SPOT_ID]]
    centroids = np.column_stack([spots.geometry.centroid.x, spots.geometry.centroid.y, np.ones(len(spots))])
    spots_to_global = get_transformation(sdata[Elements.SPOTS], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    in_image = (to_image @ spots_to_global @ centroids.T).T
    obs = table.obs.drop(columns=[Keys.SPOT_ID, Keys.REGION]).copy()
    obs["pxl_col_in_fullres"] = in_image[:, 0]
    obs["pxl_row_in_fullres"] = in_image[:, 1]
    st = anndata.AnnData(X=table.X, obs=obs, var=table.var.copy())
    paths["st"].parent.mkdir(parents=True, exist_ok=True)
    st.write_h5ad(paths["st"])
    written["st"] = paths["st"]

    metadata = record.metadata.model_dump(mode="json", exclude_none=True)
    metadata["pixel_size_um_estimated"] = image_pixel_size
    metadata["magnification"] = magnification_from_pixel_size(image_pixel_size)
    if "wsi" in written:
        metadata["fullres_px_height"], metadata["fullres_px_width"] = (int(n) for n in levels[0].shape[1:])
    paths["metadata"].parent.mkdir(parents=True, exist_ok=True)
    paths["metadata"].write_text(json.dumps(metadata, indent=2))
    written["metadata"] = paths["metadata"]

    if Elements.TISSUE in sdata.shapes:
        tissue = sdata[Elements.TISSUE]
        tissue_to_image = to_image @ get_transformation(tissue, "global").to_affine_matrix(("x", "y"), ("x", "y"))
        matrix = [*tissue_to_image[0, :2], *tissue_to_image[1, :2], tissue_to_image[0, 2], tissue_to_image[1, 2]]
        contours = geopandas.GeoDataFrame(
            {"tissue_id": np.arange(len(tissue))}, geometry=tissue.geometry.affine_transform(matrix).to_numpy()
        )
        paths["tissue"].parent.mkdir(parents=True, exist_ok=True)
        contours.to_file(paths["tissue"], driver="GeoJSON")
        written["tissue"] = paths["tissue"]
    return written
