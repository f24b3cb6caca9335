"""Xenium's ``cells.zarr.zip``: the nucleus and cell label rasters, and the cell id behind every label value.

The rasters become the labels elements ``nucleus_labels`` and ``cell_labels`` (placed like the morphology image),
the mapping the table ``label_cell_ids`` (see :func:`read_cells_zarr` and :func:`label_cell_ids_table`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
from anndata import AnnData
from geopandas import GeoDataFrame
from scipy import sparse
from spatialdata.models import Labels2DModel, TableModel
from spatialdata_io.readers.xenium import cell_id_str_from_prefix_suffix_uint32
from xarray import DataArray

from hest_zarr.converters._xenium_alignment import XeniumFrame
from hest_zarr.converters._xenium_images import MORPHOLOGY_CHUNK_PX
from hest_zarr.converters._xenium_inputs import CELL_ID
from hest_zarr.errors import InputError

#: Element names of the label rasters of ``cells.zarr.zip`` -> their index under ``masks/``.
NUCLEUS_LABELS = "nucleus_labels"
CELL_LABELS = "cell_labels"
MASK_INDEX = {NUCLEUS_LABELS: 0, CELL_LABELS: 1}
#: Table mapping every label value of both rasters to its cell id.
LABEL_CELL_IDS = "label_cell_ids"


@dataclass(frozen=True)
class XeniumMasks:
    """The segmentation masks of ``cells.zarr.zip`` and the cell behind every label value.

    Attributes
    ----------
    labels
        ``nucleus_labels`` (``masks/0``) and ``cell_labels`` (``masks/1``): lazy ``(y, x)`` label rasters on the
        morphology image's pixels, 0 = background.
    label_cell_ids
        One row per label value: ``region`` (the labels element), ``label`` and ``cell_id`` (the string id of
        ``cells`` and ``cell_expression``). Several nucleus labels may name one cell (multi-nucleate cells).
    layout
        How the file maps labels to cells: ``"polygon_sets"`` (XOA >= 2), ``"seg_mask_value"`` (XOA 1.3-1.x) or
        ``"none"`` (older files carry no mapping).
    source
        Path of the file.
    homogeneous_transform
        ``masks/homogeneous_transform`` as stored (recorded, not used: the masks are placed on the morphology
        pixels, as 10x documents them), ``None`` when absent.

    """

    labels: dict[str, da.Array]
    label_cell_ids: pd.DataFrame
    layout: str
    source: str
    homogeneous_transform: list[list[float]] | None = None

    def provenance(self) -> dict[str, Any]:
        """Parameters recorded in the provenance of the labels and of ``label_cell_ids``."""
        entries: dict[str, Any] = {"cells_zarr_layout": self.layout}
        if self.homogeneous_transform is not None:
            entries["homogeneous_transform"] = self.homogeneous_transform
        return entries


def decode_cell_ids(cell_id: np.ndarray) -> np.ndarray:
    """Decode the ``cell_id`` array of a Xenium zarr file into the string ids of the parquet and h5 files.

    XOA >= 1.3 stores ``(n, 2)`` uint32 pairs: the prefix's eight hexadecimal digits, most significant first,
    each written as a letter (0 -> ``a`` ... 15 -> ``p``), then ``-`` and the dataset suffix (10x Genomics,
    "Xenium Zarr output files", cell ID format; decoded by spatialdata-io's ``cell_id_str_from_prefix_suffix_uint32``).
    Older files store one integer per cell, kept as its decimal text.

    Examples
    --------
    >>> decode_cell_ids(np.array([[0x9222CF34, 1], [0, 2]], dtype=np.uint32)).tolist()
    ['jcccmpde-1', 'aaaaaaaa-2']
    >>> decode_cell_ids(np.array([1, 17], dtype=np.uint32)).tolist()
    ['1', '17']

    """
    cell_id = np.asarray(cell_id)
    if cell_id.ndim == 2 and cell_id.shape[1] == 1:
        cell_id = cell_id[:, 0]
    if cell_id.ndim == 1:
        return cell_id.astype(np.int64).astype(str)
    return cell_id_str_from_prefix_suffix_uint32(cell_id[:, 0], cell_id[:, 1].astype(np.int64))


def _open_zip_group(path: Path) -> Any:
    import zipfile

    import zarr

    try:
        store = zarr.storage.ZipStore(path, mode="r", read_only=True)
        return zarr.open_group(store, mode="r")
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, zarr.errors.BaseZarrError) as err:
        raise InputError(
            f"{path}: not a readable zipped zarr store (truncated, or not a Xenium cells.zarr.zip? "
            f"{type(err).__name__}: {err})"
        ) from err


def _zip_array(path: Path, group: Any, key: str, what: str) -> Any:
    import zarr

    try:
        node = group[key]
    except KeyError as err:
        raise InputError(f"{path}: no '{key}' array (expected {what}); found {sorted(group.keys())}") from err
    if not isinstance(node, zarr.Array):
        raise InputError(f"{path}: '{key}' is a group, expected {what}")
    return node


def _read_whole(path: Path, array: Any, key: str) -> np.ndarray:
    import zipfile

    import zarr

    try:
        return np.asarray(array[...])
    except (zipfile.BadZipFile, OSError, ValueError, zarr.errors.BaseZarrError) as err:
        raise InputError(f"{path}: the '{key}' array cannot be read ({type(err).__name__}: {err})") from err


def _label_rows(region: str, labels: np.ndarray, cell_ids: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"region": region, "label": labels.astype(np.int64), CELL_ID: cell_ids})


def _label_cell_ids(path: Path, group: Any, cell_ids: np.ndarray) -> tuple[pd.DataFrame, str]:
    """Map label values to cell ids: ``polygon_sets/<mask>/cell_index`` (XOA >= 2) or ``seg_mask_value`` (XOA 1.3+)."""
    if "polygon_sets" in group:
        rows = []
        for name, mask in MASK_INDEX.items():
            key = f"polygon_sets/{mask}/cell_index"
            cell_index = _read_whole(path, _zip_array(path, group, key, "the cell of every polygon"), key)
            cell_index = cell_index.astype(np.int64).ravel()
            if len(cell_index) and (cell_index.min() < 0 or cell_index.max() >= len(cell_ids)):
                raise InputError(
                    f"{path}: '{key}' points outside the {len(cell_ids)} cells of 'cell_id' "
                    f"(values {cell_index.min()}-{cell_index.max()})"
                )
            # the raster value of polygon p is p + 1 (0 is background)
            rows.append(_label_rows(name, np.arange(1, len(cell_index) + 1), cell_ids[cell_index]))
        return pd.concat(rows, ignore_index=True), "polygon_sets"
    if "seg_mask_value" in group:
        values = _read_whole(path, _zip_array(path, group, "seg_mask_value", "a label per cell"), "seg_mask_value")
        values = values.ravel()
        if len(values) != len(cell_ids):
            raise InputError(f"{path}: 'seg_mask_value' has {len(values)} values for {len(cell_ids)} cells")
        # XOA 1.3-1.x: one nucleus per cell, drawn with its cell's value in both masks
        rows = [_label_rows(name, values, cell_ids) for name in MASK_INDEX]
        return pd.concat(rows, ignore_index=True), "seg_mask_value"
    return _label_rows(CELL_LABELS, np.array([], dtype=np.int64), np.array([], dtype=str)), "none"


def read_cells_zarr(path: str | Path, *, chunk_size: int = MORPHOLOGY_CHUNK_PX) -> XeniumMasks:
    """Read the nucleus and cell label rasters of ``cells.zarr.zip`` and which cell each label value is.

    The file is a zarr v2 store in a zip (10x Genomics, "Overview of Xenium Zarr Output Files"): ``masks/0``
    (nuclei) and ``masks/1`` (cells) are uint32 rasters of the morphology image's shape, 0 the background;
    ``cell_id`` names the cells (see :func:`decode_cell_ids`); ``polygon_sets/<mask>/cell_index`` (XOA >= 2) gives
    the cell row of every polygon, whose raster value is its position + 1; XOA 1.3-1.x has ``seg_mask_value``
    instead (the raster value of each cell, shared by its one nucleus). The rasters are read lazily, chunk by
    chunk, when computed; only ``cell_id`` and the mapping arrays are read now.

    Why not ``spatialdata_io.xenium``: it reads the labels only inside its whole-folder reader, asserts on the
    XOA version from ``experiment.xenium`` and raises no error that names the file.

    Parameters
    ----------
    path
        ``cells.zarr.zip``.
    chunk_size
        Chunk side (pixels) of the lazy rasters.

    Raises
    ------
    InputError
        A missing, truncated or corrupt zip, missing ``masks/0``, ``masks/1`` or ``cell_id``, masks that are not
        2D integer rasters of one shape, or a mapping that points outside ``cell_id``.

    Examples
    --------
    >>> masks = read_cells_zarr("xenium_outs/cells.zarr.zip")  # doctest: +SKIP
    >>> masks.label_cell_ids.query("region == 'cell_labels'").head()  # doctest: +SKIP

    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected Xenium's cells.zarr.zip)")
    group = _open_zip_group(path)
    labels = {}
    for name, mask in MASK_INDEX.items():
        key = f"masks/{mask}"
        raster = _zip_array(path, group, key, f"the {name.split('_')[0]} label raster")
        if raster.ndim != 2 or not np.issubdtype(raster.dtype, np.integer):
            raise InputError(f"{path}: '{key}' must be a 2D integer raster, found {raster.ndim}D {raster.dtype}")
        labels[name] = da.from_zarr(raster).rechunk((chunk_size, chunk_size))
    shapes = {name: raster.shape for name, raster in labels.items()}
    if len(set(shapes.values())) > 1:
        raise InputError(f"{path}: the nucleus and cell masks differ in shape ({shapes})")
    cell_ids = _read_whole(path, _zip_array(path, group, CELL_ID, "the cell ids"), CELL_ID)
    if not (cell_ids.ndim == 1 or (cell_ids.ndim == 2 and cell_ids.shape[1] in (1, 2))):
        raise InputError(f"{path}: 'cell_id' must be (n,) ids or (n, 2) prefix/suffix pairs, found {cell_ids.shape}")
    cell_ids = decode_cell_ids(cell_ids)
    label_cell_ids, layout = _label_cell_ids(path, group, cell_ids)
    if layout == "none":
        warnings.warn(
            f"{path}: no polygon_sets nor seg_mask_value (a file older than XOA 1.3): the labels are kept but no "
            "label value is mapped to a cell id",
            UserWarning,
            stacklevel=2,
        )
    transform = None
    if "homogeneous_transform" in group["masks"]:
        key = "masks/homogeneous_transform"
        transform = _read_whole(path, group[key], key).astype(np.float64).tolist()
    return XeniumMasks(labels, label_cell_ids, layout, str(path), transform)


def label_elements(masks: XeniumMasks, frame: XeniumFrame) -> dict[str, DataArray]:
    """Return the ``nucleus_labels`` and ``cell_labels`` elements, placed like the morphology image.

    Examples
    --------
    >>> labels = label_elements(read_cells_zarr("cells.zarr.zip"), XeniumFrame.morphology(0.2125))  # doctest: +SKIP

    """
    return {
        name: Labels2DModel.parse(raster, dims=("y", "x"), transformations=frame.morphology_transformations())
        for name, raster in masks.labels.items()
    }


def label_cell_ids_table(masks: XeniumMasks) -> AnnData:
    """Return the ``label_cell_ids`` table: one row per label value, annotating both label elements.

    ``obs`` holds ``region`` (``nucleus_labels`` / ``cell_labels``), ``label`` (the raster value, its instance key)
    and ``cell_id``, which joins ``cell_expression``'s ``spot_id``; ``X`` has no column.

    Examples
    --------
    >>> table = label_cell_ids_table(read_cells_zarr("cells.zarr.zip"))  # doctest: +SKIP

    """
    rows = masks.label_cell_ids
    obs = pd.DataFrame(
        {
            "region": pd.Categorical(rows["region"], categories=list(MASK_INDEX)),
            "label": rows["label"].to_numpy(),
            CELL_ID: rows[CELL_ID].astype(str).to_numpy(),
        },
        index=(rows["region"] + ":" + rows["label"].astype(str)).to_numpy(),
    )
    table = AnnData(X=sparse.csr_matrix((len(obs), 0), dtype=np.float32), obs=obs)
    return TableModel.parse(table, region=list(MASK_INDEX), region_key="region", instance_key="label")


def check_label_cells(masks: XeniumMasks, cells: GeoDataFrame, cells_path: Path) -> None:
    """Refuse labels that name cells the boundaries do not have (files of different runs)."""
    unknown = pd.Index(masks.label_cell_ids[CELL_ID].unique()).difference(cells.index)
    if len(unknown):
        raise InputError(
            f"{masks.source}: {len(unknown)} cell id(s) of its labels are not among the cells of {cells_path.name} "
            f"(e.g. {unknown[0]!r}); files from different runs?"
        )
