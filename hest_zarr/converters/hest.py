"""HEST-1k samples as released, into a sample store, and a store back out to that layout.

A HEST-1k download holds, per sample id ``ID`` (layout described in the HEST-1k dataset card):

- ``st/ID.h5ad``: spots x genes AnnData, raw counts in ``X``, spot positions in full-resolution pixels in
  ``obs['pxl_col_in_fullres', 'pxl_row_in_fullres']``, ``array_row/array_col/in_tissue`` where known;
- ``wsis/ID.tif``: the pyramidal H&E;
- ``metadata/ID.json``: the sample's metadata (the CSV's columns and more);
- ``tissue_seg/ID_contours.geojson``: tissue contours with holes;
- ``cellvit_seg/ID_cellvit_seg.geojson`` (or ``.geojson.zip`` / ``.parquet``): CellViT nuclei;
- ``transcripts/ID_transcripts.parquet``: Xenium molecules with H&E pixel columns ``he_x, he_y``;
- ``xenium_seg/ID_xenium_cell_seg.parquet`` / ``ID_xenium_nucleus_seg.parquet`` (or ``.geojson.zip``): the Xenium
  cell and nucleus polygons in H&E pixels (see :func:`xenium_seg_paths`);
- ``patches/ID.h5``: 224 px patches around spots at 0.5 um/px (derived data: :func:`read_hest` does not
  import them; :func:`hest_zarr.converters.hest_patches.import_hest_h5` turns the file into a patch store, and
  :func:`hest_zarr.workflows.hest.export_hest` with ``patches=True`` cuts them from a store).

The pixel size comes from the metadata's ``pixel_size_um_estimated``, never from the TIFF's resolution
tags, which the HEST release wrote 10x off (px/cm read as px/mm).
"""

from __future__ import annotations

import json
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import anndata
import geopandas
import numpy as np
import pandas as pd
from spatialdata import SpatialData
from spatialdata.models import PointsModel, ShapesModel

from hest_zarr.elements import (
    CoordinateSystems,
    Elements,
    Keys,
    affine_xy,
    build_sample,
    circle_spots,
    expression_table,
    frame_transformations,
    get_record,
    image_levels,
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
            return _read_zipped_geojson(path, "cellvit", pixel_size_um), path
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


# --------------------------------------------------------------------------------------------- xenium_seg
#: HEST-1k's ``xenium_seg/`` files: element -> the word in ``ID_xenium_<word>_seg.parquet`` / ``.geojson.zip``.
XENIUM_SEG_KINDS = {Elements.CELLS: "cell", Elements.NUCLEI: "nucleus"}
XENIUM_SEG_SOURCE = "xenium"


def xenium_seg_paths(root: str | Path, sample_id: str) -> dict[str, tuple[Path, Path]]:
    """Return, for ``cells`` and ``nuclei``, the GeoParquet and the zipped GeoJSON of HEST-1k's ``xenium_seg/``.

    HEST-1k releases, for Xenium samples, the Xenium cell and nucleus boundaries warped onto the H&E, in its
    pixels: ``xenium_seg/ID_xenium_cell_seg.parquet`` (and ``_nucleus_``), a GeoParquet (WKB ``geometry``, one
    Polygon per cell, the Xenium cell id as index), and the same polygons as QuPath-style GeoJSON in
    ``ID_xenium_cell_seg.geojson.zip`` (Features grouped by class, without the cell ids). Layout read from the
    HEST-Library's writer and its ``load_hest`` (mahmoodlab/HEST ``HESTData.py``, ``utils.py``).

    Examples
    --------
    >>> xenium_seg_paths("hest_data", "NCBI784")["cells"][0].as_posix()
    'hest_data/xenium_seg/NCBI784_xenium_cell_seg.parquet'

    """
    folder = Path(root) / "xenium_seg"
    return {
        name: (folder / f"{sample_id}_xenium_{word}_seg.parquet", folder / f"{sample_id}_xenium_{word}_seg.geojson.zip")
        for name, word in XENIUM_SEG_KINDS.items()
    }


def _read_seg_parquet(path: Path, pixel_size_um: float) -> geopandas.GeoDataFrame:
    """Read a HEST ``xenium_seg`` GeoParquet: polygons in H&E pixels indexed by cell id."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    try:
        table = pq.read_table(path)
        metadata = table.schema.metadata or {}
        frame = table.to_pandas()
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"{path}: not a readable parquet file (truncated or not parquet? {err})") from err
    column = json.loads(metadata.get(b"geo", b"{}")).get("primary_column", "geometry")
    if column not in frame.columns:
        raise InputError(f"{path}: no '{column}' column (expected WKB polygons); found {list(frame.columns)}")
    try:
        geometry = shapely.from_wkb(frame.pop(column).to_numpy())
    except (shapely.errors.GEOSException, TypeError) as err:
        raise InputError(f"{path}: the '{column}' column is not WKB geometry ({err})") from err
    kinds = geopandas.GeoSeries(geometry).geom_type
    polygonal = kinds.isin(["Polygon", "MultiPolygon"]).to_numpy()
    if not polygonal.all():
        found = kinds[~polygonal].fillna("empty").value_counts().to_dict()
        raise InputError(
            f"{path}: {int((~polygonal).sum())} of {len(geometry)} geometries are not polygons ({found}); "
            "expected cell or nucleus polygons"
        )
    index = frame.index
    if isinstance(index, pd.RangeIndex) and "cell_id" in frame.columns:
        index = pd.Index(frame.pop("cell_id"))
    index = pd.Index([i.decode() if isinstance(i, bytes) else str(i) for i in index], name="cell_id")
    if index.has_duplicates:
        raise InputError(f"{path}: repeated cell id(s), e.g. {index[index.duplicated()][0]!r}")
    frame.index = index
    if "source" not in frame.columns:
        frame["source"] = pd.Categorical([XENIUM_SEG_SOURCE] * len(frame))
    polygons = geopandas.GeoDataFrame(frame, geometry=geometry)
    return ShapesModel.parse(polygons, transformations=frame_transformations(pixel_size_um))


def _read_zipped_geojson(path: Path, layout: str, pixel_size_um: float) -> geopandas.GeoDataFrame:
    """Read the first ``.geojson`` of a zip archive with :func:`~hest_zarr.converters.nuclei.read_segmentation`."""
    from hest_zarr.converters.nuclei import read_segmentation

    try:
        with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory() as tmp:
            names = [n for n in archive.namelist() if n.endswith(".geojson")]
            if not names:
                raise InputError(f"{path}: no .geojson inside the archive")
            return read_segmentation(archive.extract(names[0], tmp), format=layout, pixel_size_um=pixel_size_um)
    except zipfile.BadZipFile as err:
        raise InputError(f"{path}: not a readable zip archive ({err})") from err


def _read_seg_geojson_zip(path: Path, pixel_size_um: float) -> geopandas.GeoDataFrame:
    """Read a HEST ``xenium_seg`` ``.geojson.zip`` (its Features carry no cell ids: polygons get part ids)."""
    polygons = _read_zipped_geojson(path, "qupath", pixel_size_um)
    polygons["source"] = pd.Categorical([XENIUM_SEG_SOURCE] * len(polygons))
    return polygons.drop(columns=["object_type"], errors="ignore")


def read_xenium_seg(root: str | Path, sample_id: str, pixel_size_um: float) -> dict[str, tuple[Any, Path]]:
    """Read a HEST-1k sample's ``xenium_seg/`` files into ``cells`` and ``nuclei`` polygons (H&E pixels).

    The GeoParquet is preferred (it keeps the Xenium cell ids); the ``.geojson.zip`` is read when it is the only
    file (ids are then ``<feature>_<part>``). Polygons keep their vertices as written, with ``source = "xenium"``.

    Parameters
    ----------
    root
        The HEST-1k download's root folder.
    sample_id
        The sample id.
    pixel_size_um
        Micrometres per H&E pixel.

    Returns
    -------
    Element name -> (polygons, the file read), for the files that exist.

    Raises
    ------
    InputError
        An unreadable file, geometries that are not polygons, or repeated cell ids.

    Examples
    --------
    >>> read_xenium_seg("hest_data", "NCBI784", 0.2738)["cells"][0].shape  # doctest: +SKIP

    """
    found = {}
    for name, (parquet, archive) in xenium_seg_paths(root, sample_id).items():
        if parquet.is_file():
            found[name] = (_read_seg_parquet(parquet, pixel_size_um), parquet)
        elif archive.is_file():
            found[name] = (_read_seg_geojson_zip(archive, pixel_size_um), archive)
    return found


def write_xenium_seg(
    sdata: SpatialData, root: str | Path, sample_id: str, global_to_image: np.ndarray
) -> dict[str, Path]:
    """Write the store's Xenium ``cells`` and ``nuclei`` as HEST-1k ``xenium_seg/`` GeoParquet files.

    Only elements whose ``source`` is ``xenium`` in every row are written (CellViT nuclei belong to
    ``cellvit_seg/``). Vertices are mapped to the exported WSI's pixels (``global_to_image`` after the element's
    own transformation to ``global``; left untouched when that is the identity); the index (cell ids) is written as
    ``cell_id`` (``nucleus_id`` when the frame already has a ``cell_id`` column); the ``source`` column is dropped,
    as HEST's files have none.

    Examples
    --------
    >>> write_xenium_seg(hest_zarr.open("NCBI784.zarr"), "hest_data", "NCBI784", np.eye(3))  # doctest: +SKIP
    {'xenium_cell_seg': PosixPath('hest_data/xenium_seg/NCBI784_xenium_cell_seg.parquet'), ...}

    """
    written = {}
    for name, (parquet, _) in xenium_seg_paths(root, sample_id).items():
        if name not in sdata.shapes or "source" not in sdata.shapes[name].columns:
            continue
        polygons = sdata.shapes[name]
        if not (polygons["source"].astype(str) == XENIUM_SEG_SOURCE).all():
            continue
        to_image = global_to_image @ affine_xy(polygons, CoordinateSystems.GLOBAL)
        geometry = polygons.geometry
        if not np.array_equal(to_image, np.eye(3)):
            geometry = geometry.affine_transform([*to_image[0, :2], *to_image[1, :2], to_image[0, 2], to_image[1, 2]])
        frame = geopandas.GeoDataFrame(
            polygons.drop(columns=["source", polygons.geometry.name]), geometry=geometry.to_numpy()
        )
        # nuclei of multi-nucleate cells carry their cell in a cell_id column: their own ids name the index then
        index_name = "nucleus_id" if "cell_id" in frame.columns else "cell_id"
        frame.index = pd.Index(polygons.index.astype(str), name=index_name)
        frame.attrs = {}  # the element's transformations: HEST's files are in image pixels, without them
        parquet.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(parquet)
        written[f"xenium_{XENIUM_SEG_KINDS[name]}_seg"] = parquet
    return written


def _add_xenium_seg(
    root: str | Path,
    sample_id: str,
    pixel_size_um: float,
    elements: tuple[dict[str, Any], dict[str, list[str]], dict[str, dict[str, Any]]],
    nuclei: str,
) -> None:
    """Put the ``xenium_seg/`` polygons in ``shapes`` (with their inputs); ``nuclei`` says who keeps ``nuclei``."""
    shapes, inputs, parameters = elements
    if nuclei not in ("cellvit", "xenium"):
        raise InputError(f"{root}: nuclei must be 'cellvit' or 'xenium', not {nuclei!r}")
    for name, (polygons, source) in read_xenium_seg(root, sample_id, pixel_size_um).items():
        if name in shapes and nuclei == "cellvit":
            warnings.warn(
                f"{source}: not imported, '{name}' holds the CellViT nuclei (nuclei='xenium' imports it instead)",
                UserWarning,
                stacklevel=3,
            )
            parameters.setdefault(name, {})["not_imported"] = [str(source)]
            continue
        replaced = inputs.get(name) if name in shapes else None
        if replaced:
            warnings.warn(
                f"{replaced[0]}: not imported, '{name}' holds the Xenium nuclei (nuclei='cellvit' keeps these)",
                UserWarning,
                stacklevel=3,
            )
        shapes[name], inputs[name] = polygons, [str(source)]
        parameters.pop(name, None)
        if replaced:
            parameters[name] = {"not_imported": replaced}


def read_hest(root: str | Path, sample_id: str, *, nuclei: str = "cellvit") -> SpatialData:
    """Read one sample of a HEST-1k download into a sample (SpatialData with its record).

    Parameters
    ----------
    root
        The download's root folder (holding ``st/``, ``wsis/``, ``metadata/``...).
    sample_id
        The HEST-1k id, e.g. ``"TENX95"``.
    nuclei
        Which file fills ``nuclei`` when a Xenium sample has both: ``"cellvit"`` (``cellvit_seg/``) or ``"xenium"``
        (``xenium_seg/``); the other is not imported, with a warning.

    Returns
    -------
    The sample: ``spots`` + ``spot_expression`` always; ``he``, ``tissue``, ``nuclei``, ``cells`` (Xenium,
    ``xenium_seg/``, see :func:`read_xenium_seg`) and ``transcripts`` when their files exist.

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
    parameters: dict[str, dict[str, Any]] = {Elements.SPOTS: {"unused_metadata_keys": sorted(extra_metadata)}}
    _add_xenium_seg(root, sample_id, pixel_size, (shapes, inputs, parameters), nuclei)
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
        parameters=parameters,
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
    sdata: SpatialData,
    root: str | Path,
    *,
    sample_id: str | None = None,
    jpeg_quality: int | None = 90,
) -> dict[str, Path]:
    """Export a sample to the HEST-1k layout (``st/``, ``wsis/``, ``metadata/``, ``tissue_seg/``...).

    Spot positions and contours are written in the exported WSI's pixels, and ``pixel_size_um_estimated``
    in the metadata is that WSI's pixel size, so a HEST reader finds everything aligned.

    Parameters
    ----------
    sdata
        The sample (e.g. :func:`hest_zarr.open` of a store; images are read level by level).
    root
        Output folder (created).
    sample_id
        File name stem (default: the store's sample id).
    jpeg_quality
        JPEG quality of the WSI tiles, or ``None`` for lossless.

    Returns
    -------
    The files written, by kind.

    Examples
    --------
    >>> export_hest(hest_zarr.open("TENX95.zarr"), "hest_data")["st"]  # doctest: +SKIP
    PosixPath('hest_data/st/TENX95.h5ad')

    """
    record = get_record(sdata)
    sample_id = sample_id or record.metadata.id
    paths = hest_paths(root, sample_id)
    written: dict[str, Path] = {}

    # the exported WSI's pixels: the he image's own frame (hires images keep their scale to global)
    to_image = np.eye(3)
    image_pixel_size = record.pixel_size_um
    if Elements.HE in sdata.images:
        he = sdata[Elements.HE]
        he_to_global = affine_xy(he, CoordinateSystems.GLOBAL)
        to_image = np.linalg.inv(he_to_global)
        image_pixel_size = record.pixel_size_um * float(np.sqrt(abs(np.linalg.det(he_to_global[:2, :2]))))
        levels = image_levels(he)
        written["wsi"] = write_pyramidal_tiff(
            levels, paths["wsi"], pixel_size_um=image_pixel_size, jpeg_quality=jpeg_quality
        )

    table = sdata[Elements.SPOT_EXPRESSION]
    spots = sdata[Elements.SPOTS].loc[table.obs[Keys.SPOT_ID]]
    centroids = np.column_stack([spots.geometry.centroid.x, spots.geometry.centroid.y, np.ones(len(spots))])
    in_image = (to_image @ affine_xy(sdata[Elements.SPOTS], CoordinateSystems.GLOBAL) @ centroids.T).T
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
        tissue_to_image = to_image @ affine_xy(tissue, CoordinateSystems.GLOBAL)
        matrix = [*tissue_to_image[0, :2], *tissue_to_image[1, :2], tissue_to_image[0, 2], tissue_to_image[1, 2]]
        contours = geopandas.GeoDataFrame(
            {"tissue_id": np.arange(len(tissue))}, geometry=tissue.geometry.affine_transform(matrix).to_numpy()
        )
        paths["tissue"].parent.mkdir(parents=True, exist_ok=True)
        contours.to_file(paths["tissue"], driver="GeoJSON")
        written["tissue"] = paths["tissue"]
    written.update(write_xenium_seg(sdata, root, sample_id, to_image))
    return written
