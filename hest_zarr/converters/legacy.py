"""Bare expression + coordinate tables (the formats of pre-Space Ranger papers and tool tutorials) into a sample.

Expression: a CSV/TSV/TXT table (optionally gzipped; delimiter sniffed from the first line; genes x spots or
spots x genes, decided by which axis carries the coordinate table's spot ids), a 10x MEX directory or h5 file
(read by :func:`hest_zarr.converters._tenx.read_counts`), or an AnnData ``.h5ad``/``.h5`` (raw counts in ``X`` or
``layers['counts']``). Coordinates: a CSV/TSV/TXT table with spot ids and x/y, either image pixels
(``pxl_col_in_fullres``, ``imagecol``, ``pixel_x``...) or array positions (``array_col``, ``col``...); columns
named only ``x``/``y``/``sdimx``/``sdimy`` are array positions when they are small integers (<= 256) and pixels
otherwise. Space Ranger's headerless ``tissue_positions_list.csv`` is recognised by its six columns. A table
without ids (Giotto's ``*_locs.txt``) is matched to the spots by row order when its length equals the spot count.
An AnnData may carry its own coordinates (``obs`` columns or ``obsm['spatial']``).

Frames: with pixel coordinates, ``global`` is those pixels (the image's, when one is given) and the pixel size is
measured on the spot lattice: by an affine fit of array -> pixel positions when the table also holds array
positions, else from the median nearest-neighbour spacing (= ``inter_spot_dist_um``). With array coordinates only,
spots are placed on the technology's lattice in micrometres and ``global`` is micrometres (pixel size 1.0).

Why not an existing reader: scanpy and spatialdata-io read Space Ranger folders, not bare tables whose layout,
orientation and coordinate kind must be detected, and they give no file-naming error on mismatched ids.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from scipy.spatial import cKDTree
from spatialdata import SpatialData

from hest_zarr.converters._files import refuse_duplicates
from hest_zarr.converters._images import he_image
from hest_zarr.converters._spaceranger import POSITION_COLUMNS
from hest_zarr.converters._tables import SpotPlacement, compact_integers, infer_species, read_delimited_table
from hest_zarr.converters._tenx import read_anndata_counts, read_counts
from hest_zarr.converters.visium import VISIUM_SPOT_DIAMETER_UM
from hest_zarr.elements import Elements, Keys, circle_spots, expression_table, spot_sample
from hest_zarr.elements.lattice import VISIUM_INTER_SPOT_DISTANCE_UM, fit_lattice, visium_lattice_um
from hest_zarr.errors import InputError
from hest_zarr.schemas import SampleMetadata

CoordinateKind = Literal["auto", "pixel", "array"]

#: Column names (lower case) of each coordinate, most specific first.
PIXEL_X_COLUMNS = ("pxl_col_in_fullres", "imagecol", "x_pixel", "pixel_x", "pxl_x", "x_px")
PIXEL_Y_COLUMNS = ("pxl_row_in_fullres", "imagerow", "y_pixel", "pixel_y", "pxl_y", "y_px")
ARRAY_X_COLUMNS = ("array_col", "array_x", "col")
ARRAY_Y_COLUMNS = ("array_row", "array_y", "row")
#: Names that say nothing about the kind: decided from the values.
PLAIN_X_COLUMNS = ("x", "sdimx", "x_coord", "coord_x", "spatial_x")
PLAIN_Y_COLUMNS = ("y", "sdimy", "y_coord", "coord_y", "spatial_y")
ID_COLUMNS = ("barcode", "barcodes", "spot_id", "spot", "cell_id", "id")
#: Array coordinates are small integers; larger values are pixels.
MAX_ARRAY_COORDINATE = 256
#: Array position -> micrometres of square grids, in units of the inter-spot distance: (per column, per row).
SQUARE_LATTICES: dict[str, tuple[float, float]] = {"Spatial Transcriptomics": (1.0, 1.0)}  # ST 1k array
#: Technologies whose array positions can be placed in micrometres (Visium: ``_lattice.visium_lattice_um``).
ARRAY_LATTICES: tuple[str, ...] = ("Visium", *SQUARE_LATTICES)
TEXT_SUFFIXES = (".csv", ".tsv", ".txt")
NEIGHBOUR_TOLERANCE = 0.15


# --------------------------------------------------------------------------------------------- pixel size
def nearest_neighbour_pixel_size(pixels: np.ndarray, spacing_um: float, source: str) -> tuple[float, dict[str, Any]]:
    """Estimate the pixel size from the nearest-neighbour spacing of spots on a regular lattice.

    The spacing is the median of every distance between neighbours (up to 6 per spot) lying within 15 % of the
    median nearest-neighbour distance: each spot's closest neighbour alone would bias it low, being the minimum of
    several jittered distances. Returns the pixel size (um/px) and provenance parameters. Refuses (``InputError``
    naming ``source``) when fewer than half of the spots have a neighbour at that spacing: the spots are then too
    sparse for their spacing to be the lattice's.

    Examples
    --------
    >>> grid = np.array([[x, y] for x in range(5) for y in range(5)], dtype=float) * 50
    >>> nearest_neighbour_pixel_size(grid, 100.0, "demo")[0]
    2.0

    """
    pixels = np.asarray(pixels, dtype=np.float64)
    if len(pixels) < 2:
        raise InputError(f"{source}: a single spot gives no spacing to measure the pixel size on; pass pixel_size_um")
    distances, _ = cKDTree(pixels).query(pixels, k=min(len(pixels), 7))
    neighbours = distances[:, 1:]
    nearest = float(np.median(neighbours[:, 0]))
    at_spacing = np.abs(neighbours - nearest) <= NEIGHBOUR_TOLERANCE * nearest
    on_lattice = float(np.mean(at_spacing.any(axis=1)))
    if nearest <= 0 or on_lattice < 0.5:
        raise InputError(
            f"{source}: spots too sparse or irregular to measure the pixel size (only {on_lattice:.0%} have a "
            f"neighbour at the median nearest-neighbour distance {nearest:.1f} px); pass pixel_size_um"
        )
    spacing_px = float(np.median(neighbours[at_spacing]))
    return spacing_um / spacing_px, {
        "neighbour_spacing_px": spacing_px,
        "neighbour_distances_used": int(at_spacing.sum()),
        "spots_at_spacing_fraction": on_lattice,
    }


# --------------------------------------------------------------------------------------------- expression
def _h5_layout(path: Path) -> Literal["10x", "anndata"]:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            keys = set(handle.keys())
            if {"X", "obs", "var"} <= keys:
                return "anndata"
            if "matrix" in keys or any(
                "barcodes" in handle[key] for key in keys if isinstance(handle[key], h5py.Group)
            ):
                return "10x"
    except OSError as err:
        raise InputError(f"{path}: not a readable HDF5 file ({err})") from err
    raise InputError(f"{path}: unknown HDF5 layout (expected a 10x matrix or an AnnData); found groups {sorted(keys)}")


def _read_expression(path: Path) -> AnnData | pd.DataFrame:
    """Return an AnnData (spots x genes) or, for a text table, the table in its file orientation."""
    if path.is_dir():
        return read_counts(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected the expression matrix)")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".h5ad"]:
        return read_anndata_counts(path)
    if suffixes[-1:] == [".h5"]:
        return read_counts(path) if _h5_layout(path) == "10x" else read_anndata_counts(path)
    if any(s in TEXT_SUFFIXES for s in suffixes[-2:]):
        table = read_delimited_table(path)
        non_numeric = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
        if table.empty or non_numeric:
            raise InputError(
                f"{path}: unrecognised expression table (expected a numeric genes x spots or spots x genes matrix "
                f"with names in the first row and column); found {table.shape[0]} rows x {table.shape[1]} columns"
                + (f", text in column {non_numeric[0]!r}" if non_numeric else "")
            )
        table.index = table.index.astype(str)
        table.columns = table.columns.astype(str)
        return table
    raise InputError(
        f"{path}: unknown expression format (expected .csv/.tsv/.txt[.gz], a MEX directory, a 10x .h5 or an .h5ad)"
    )


# --------------------------------------------------------------------------------------------- coordinates
@dataclass
class _Coordinates:
    """Spot coordinates as read: ids (``None`` when the table has none), positions and their kind."""

    ids: pd.Index | None
    xy: np.ndarray
    kind: Literal["pixel", "array"]
    columns: tuple[str, str]
    array_xy: np.ndarray | None = None  # array (col, row) when the table also holds them
    obs: dict[str, np.ndarray] = field(default_factory=dict)
    flipped_y: bool = False


def _find(columns: dict[str, str], candidates: tuple[str, ...]) -> str | None:
    return next((columns[name] for name in candidates if name in columns), None)


def _looks_like_array(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return bool(
        finite.size and np.array_equal(finite, np.round(finite)) and np.abs(finite).max() <= MAX_ARRAY_COORDINATE
    )


def _headerless(table: pd.DataFrame) -> bool:
    names = [str(c) for c in table.columns]
    return sum(name.replace(".", "", 1).lstrip("-").isdigit() for name in names) >= len(names) - 1


def _read_coordinate_frame(path: Path) -> pd.DataFrame:
    """Read a coordinate table; a headerless one gets Space Ranger's names when it has their six columns."""
    table = read_delimited_table(path, index_col=None)
    if not _headerless(table):
        return table
    table = read_delimited_table(path, index_col=None, header=None)
    if table.shape[1] == len(POSITION_COLUMNS) and not pd.api.types.is_numeric_dtype(table[0]):
        table.columns = POSITION_COLUMNS
    return table


def _coordinates_from_frame(
    frame: pd.DataFrame, source: str, kind: CoordinateKind, flip_y: bool | None
) -> _Coordinates:
    columns = {str(c).lower(): c for c in frame.columns}
    id_column = _find(columns, ID_COLUMNS)
    if id_column is None:
        text_columns = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
        id_column = text_columns[0] if text_columns else None
    if id_column is not None:
        ids = pd.Index(frame[id_column].astype(str))
    elif not isinstance(frame.index, pd.RangeIndex):
        ids = pd.Index(frame.index.astype(str))
    else:
        ids = None

    pixel = (_find(columns, PIXEL_X_COLUMNS), _find(columns, PIXEL_Y_COLUMNS))
    array = (_find(columns, ARRAY_X_COLUMNS), _find(columns, ARRAY_Y_COLUMNS))
    plain = (_find(columns, PLAIN_X_COLUMNS), _find(columns, PLAIN_Y_COLUMNS))
    numeric = [c for c in frame.columns if c != id_column and pd.api.types.is_numeric_dtype(frame[c])]
    if None in plain and None in pixel and None in array and len(numeric) == 2:
        plain = (numeric[0], numeric[1])  # two unnamed numeric columns: x then y
    has = {name: None not in pair for name, pair in (("pixel", pixel), ("array", array), ("plain", plain))}
    if kind == "auto":
        if has["pixel"]:
            kind = "pixel"
        elif has["array"]:
            kind = "array"
        elif has["plain"]:
            kind = "array" if _looks_like_array(frame[list(plain)].to_numpy(dtype=np.float64)) else "pixel"
        else:
            raise InputError(
                f"{source}: unrecognised coordinate table (expected x/y columns such as pxl_col_in_fullres/"
                f"pxl_row_in_fullres, imagecol/imagerow, array_col/array_row or x/y); found {list(frame.columns)}"
            )
    chosen = pixel if kind == "pixel" else array
    if None in chosen:
        chosen = plain
    if None in chosen:
        raise InputError(f"{source}: no {kind} coordinate columns found in {list(frame.columns)}")
    try:
        xy = frame[list(chosen)].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"{source}: coordinate columns {list(chosen)} are not numeric ({err})") from err
    if not np.isfinite(xy).all():
        raise InputError(f"{source}: missing or non-finite values in coordinate columns {list(chosen)}")
    flipped = False
    if kind == "pixel":
        flipped = bool((xy[:, 1] <= 0).all() and (xy[:, 1] < 0).any()) if flip_y is None else flip_y
        if flipped:
            xy = xy * np.array([1.0, -1.0])
    obs: dict[str, np.ndarray] = {}
    for key, column in (
        (Keys.IN_TISSUE, _find(columns, ("in_tissue", "selected"))),
        (Keys.ARRAY_COL, array[0]),
        (Keys.ARRAY_ROW, array[1]),
    ):
        if column is not None:
            obs[key] = frame[column].to_numpy()
    array_xy = frame[list(array)].to_numpy(dtype=np.float64) if has["array"] else None
    if kind == "array" and array_xy is None:
        array_xy = xy
    return _Coordinates(
        ids=ids,
        xy=xy,
        kind=kind,
        columns=(str(chosen[0]), str(chosen[1])),
        array_xy=array_xy,
        obs=obs,
        flipped_y=flipped,
    )


def _coordinates_from_anndata(adata: AnnData, source: str, kind: CoordinateKind, flip_y: bool | None) -> _Coordinates:
    frame = adata.obs.copy()
    if "spatial" in adata.obsm and not any(c.lower() in PIXEL_X_COLUMNS for c in map(str, frame.columns)):
        spatial = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        frame["pixel_x"], frame["pixel_y"] = spatial[:, 0], spatial[:, 1]
    frame.insert(0, "spot_id", adata.obs_names.astype(str))
    return _coordinates_from_frame(frame, source, kind, flip_y)


def _orient(table: pd.DataFrame, coordinates: _Coordinates, expression: Path, source: str) -> tuple[AnnData, str]:
    """Turn a text table into spots x genes, the spot axis being the one that carries the coordinate ids."""
    if coordinates.ids is not None:
        in_rows, in_columns = (
            int(table.index.isin(coordinates.ids).sum()),
            int(table.columns.isin(coordinates.ids).sum()),
        )
        if in_rows == in_columns == 0:
            raise InputError(
                f"{source}: none of its spot ids (e.g. {coordinates.ids[0]!r}) names a row or a column of "
                f"{expression.name} (rows e.g. {table.index[0]!r}, columns e.g. {table.columns[0]!r})"
            )
        spots_are_rows = in_rows >= in_columns
    else:
        count = len(coordinates.xy)
        spots_are_rows = table.shape[0] == count
        if spots_are_rows == (table.shape[1] == count):
            raise InputError(
                f"{source}: has no spot ids and its {count} rows match {'both' if spots_are_rows else 'neither'} the "
                f"{table.shape[0]} rows and the {table.shape[1]} columns of {expression.name}; cannot tell the spots"
            )
    spots_x_genes = table if spots_are_rows else table.T
    adata = AnnData(X=sparse.csr_matrix(spots_x_genes.to_numpy()), obs=pd.DataFrame(index=spots_x_genes.index))
    adata.var_names = spots_x_genes.columns
    return adata, "spots x genes" if spots_are_rows else "genes x spots"


def _match(spot_ids: pd.Index, coordinates: _Coordinates, expression: Path, source: str) -> np.ndarray:
    """Row of the coordinate table of every spot (by id, or by order for a table without ids)."""
    if coordinates.ids is None:
        if len(coordinates.xy) != len(spot_ids):
            raise InputError(
                f"{source}: has no spot ids and {len(coordinates.xy)} rows, but {expression.name} has "
                f"{len(spot_ids)} spots; cannot match them by order"
            )
        return np.arange(len(spot_ids))
    refuse_duplicates(coordinates.ids, source, "spot id")
    rows = coordinates.ids.get_indexer(spot_ids)
    missing = spot_ids[rows < 0]
    if len(missing):
        raise InputError(
            f"{source}: {len(missing)} of the {len(spot_ids)} spots of {expression.name} have no coordinates "
            f"(e.g. {missing[0]!r}); coordinates and expression come from different samples?"
        )
    return rows


def array_positions_um(array_xy: np.ndarray, technology: str, inter_spot_dist_um: float, source: str) -> np.ndarray:
    """Place array positions ``(column, row)`` on the technology's lattice, in micrometres.

    Visium spots go where the Visium converter puts them (:func:`hest_zarr.elements.lattice.visium_lattice_um`:
    rows 87 um apart on 6.5 mm capture areas, 86.5 um on 11 mm ones), scaled by ``inter_spot_dist_um / 100``.

    Raises
    ------
    InputError
        When the technology has no known lattice (see ``ARRAY_LATTICES``).

    Examples
    --------
    >>> array_positions_um(np.array([[2.0, 1.0], [0.0, 0.0]]), "Visium", 100.0, "demo").tolist()
    [[100.0, 87.0], [0.0, 0.0]]

    """
    array_xy = np.asarray(array_xy, dtype=np.float64)
    if technology == "Visium":
        scale = inter_spot_dist_um / VISIUM_INTER_SPOT_DISTANCE_UM
        return visium_lattice_um(array_xy[:, 1], array_xy[:, 0]) * scale
    if technology not in SQUARE_LATTICES:
        raise InputError(
            f"{source}: array coordinates of {technology!r} cannot be placed (lattices known for "
            f"{', '.join(ARRAY_LATTICES)}); give pixel coordinates"
        )
    return array_xy * np.asarray(SQUARE_LATTICES[technology]) * inter_spot_dist_um


# --------------------------------------------------------------------------------------------- converter
def _read_inputs(
    expression_path: Path, coordinates: str | Path | None, kind: CoordinateKind, flip_y: bool | None
) -> tuple[AnnData | pd.DataFrame, _Coordinates, str, list[str]]:
    """Read the expression and the coordinates (the table given, else the AnnData's own).

    Returns the expression as read, the coordinates, the file that gave them and the coordinate inputs to record.
    """
    loaded = _read_expression(expression_path)
    if coordinates is not None:
        coordinates_path = Path(coordinates)
        frame = _read_coordinate_frame(coordinates_path)
        coords = _coordinates_from_frame(frame, str(coordinates_path), kind, flip_y)
        return loaded, coords, str(coordinates_path), [str(coordinates_path)]
    if isinstance(loaded, AnnData):
        coords = _coordinates_from_anndata(loaded, str(expression_path), kind, flip_y)
        return loaded, coords, str(expression_path), []
    raise InputError(f"{expression_path}: a text table holds no coordinates; pass a coordinate table")


def _keep_spots(
    adata: AnnData, rows: np.ndarray, spots: Collection[str] | None, expression_path: Path
) -> tuple[AnnData, np.ndarray]:
    """Keep only the ``spots`` asked for (all when ``None``), with their coordinate rows."""
    if spots is None:
        return adata, rows
    wanted = pd.Index([str(s) for s in spots])
    absent = wanted.difference(adata.obs_names)
    if len(absent):
        raise InputError(f"{expression_path}: {len(absent)} requested spot(s) absent (e.g. {absent[0]!r})")
    keep = adata.obs_names.get_indexer(wanted)
    return adata[keep], rows[keep]


def _place_spots(
    coords: _Coordinates,
    rows: np.ndarray,
    *,
    image: str | Path | None,
    technology: str,
    inter_spot_dist_um: float,
    pixel_size_um: float | None,
    source: str,
) -> SpotPlacement:
    """Place the spots: array positions on the technology's lattice in micrometres, else at their pixels.

    The pixel size of pixel coordinates is the caller's, else the affine fit of array to pixel positions when the
    table holds both, else the median nearest-neighbour spacing.
    """
    if coords.kind == "array":
        if image is not None:
            raise InputError(
                f"{source}: holds array coordinates, which cannot be placed on {Path(image).name}; "
                "give a table with pixel coordinates"
            )
        return SpotPlacement(
            centres=array_positions_um(coords.xy[rows], technology, inter_spot_dist_um, source),
            pixel_size=1.0,
            method=f"array positions on the {technology} lattice; no image: global = micrometres",
            parameters={"global_units": "um"},
        )
    centres = coords.xy[rows]
    parameters: dict[str, Any] = {}
    error_um: float | None = None
    if pixel_size_um is not None:
        pixel_size, method = float(pixel_size_um), "pixel coordinates; pixel size given by the caller"
    elif coords.array_xy is not None and technology in ARRAY_LATTICES:
        fit = fit_lattice(
            array_positions_um(coords.array_xy, technology, inter_spot_dist_um, source), coords.xy, source
        )
        pixel_size, method = fit.pixel_size_um, "pixel coordinates; pixel size from the affine fit array -> pixel"
        parameters.update(fit.parameters())
        error_um = fit.rms_px * fit.pixel_size_um
    else:
        pixel_size, details = nearest_neighbour_pixel_size(centres, inter_spot_dist_um, source)
        method = "pixel coordinates; pixel size from the median nearest-neighbour spacing"
        parameters.update(details)
    parameters["global_units"] = "image pixels" if image is not None else "pixels of the coordinate table"
    return SpotPlacement(
        centres=centres, pixel_size=pixel_size, method=method, parameters=parameters, error_um=error_um
    )


def read_legacy(
    expression: str | Path,
    coordinates: str | Path | None = None,
    *,
    image: str | Path | None = None,
    coordinate_kind: CoordinateKind = "auto",
    spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM,
    inter_spot_dist_um: float = VISIUM_INTER_SPOT_DISTANCE_UM,
    technology: str = "Visium",
    pixel_size_um: float | None = None,
    flip_y: bool | None = None,
    spots: Collection[str] | None = None,
    sample_id: str | None = None,
    metadata: SampleMetadata | None = None,
) -> SpatialData:
    """Read a bare expression table and a coordinate table (and optionally an H&E) into a sample.

    Parameters
    ----------
    expression
        CSV/TSV/TXT[.gz] table (genes x spots or spots x genes), 10x MEX directory or h5, or AnnData h5ad/h5.
    coordinates
        Coordinate table (CSV/TSV/TXT). May be omitted for an AnnData holding its own coordinates.
    image
        Full-resolution H&E whose pixels the coordinates refer to (needs pixel coordinates).
    coordinate_kind
        ``"pixel"``, ``"array"`` or ``"auto"`` (from the column names, else from the values).
    spot_diameter_um, inter_spot_dist_um, technology
        The spot geometry (defaults: Visium, 55 um spots 100 um apart) and the HEST ``st_technology``.
    pixel_size_um
        Micrometres per pixel of the coordinates, when known; otherwise measured on the spot lattice.
    flip_y
        Negate y (Giotto stores ``-row``). ``None``: negate when every y is <= 0.
    spots
        Keep only these spot ids (e.g. one sample of a multi-sample table).
    sample_id
        Sample id (default: the expression file's name without suffixes).
    metadata
        Known metadata; its values win over the measured ones.

    Returns
    -------
    The sample: ``spots`` (circles), ``spot_expression`` (raw counts) and ``he`` when an image is given.

    Raises
    ------
    InputError
        Missing or unrecognisable files, ids that do not match, non-integer counts, an image smaller than the
        spot coordinates, array coordinates with an image.

    Examples
    --------
    >>> sdata = read_legacy("visium_DG_expr.txt.gz", "visium_DG_locs.txt", sample_id="DG")  # doctest: +SKIP
    >>> hest_zarr.write(sdata, "DG.zarr")  # doctest: +SKIP

    """
    expression_path = Path(expression)
    loaded, coords, source, coordinate_inputs = _read_inputs(expression_path, coordinates, coordinate_kind, flip_y)
    orientation = "spots x genes"
    adata = loaded
    if isinstance(loaded, pd.DataFrame):
        adata, orientation = _orient(loaded, coords, expression_path, source)
    refuse_duplicates(adata.obs_names, expression_path, "spot id")
    rows = _match(adata.obs_names, coords, expression_path, source)
    adata, rows = _keep_spots(adata, rows, spots, expression_path)
    spot_ids = adata.obs_names.astype(str)
    placement = _place_spots(
        coords,
        rows,
        image=image,
        technology=technology,
        inter_spot_dist_um=inter_spot_dist_um,
        pixel_size_um=pixel_size_um,
        source=source,
    )
    pixel_size = placement.pixel_size
    spot_parameters: dict[str, Any] = {
        "coordinate_kind": coords.kind,
        "coordinate_columns": list(coords.columns),
        "matched_by": "spot id" if coords.ids is not None else "row order (the coordinate table has no ids)",
        "expression_orientation": orientation,
        "y_negated": coords.flipped_y,
        "spot_diameter_um": spot_diameter_um,
        "inter_spot_dist_um": inter_spot_dist_um,
        **placement.parameters,
    }
    obs_columns = {key: compact_integers(values[rows]) for key, values in coords.obs.items()}
    spot_shapes = circle_spots(
        placement.centres, spot_diameter_um / 2 / pixel_size, spot_ids, pixel_size, source=source
    )
    table = expression_table(adata.X, spot_ids, adata.var, obs_columns=obs_columns, source=str(expression_path))
    spot_inputs = [str(expression_path), *coordinate_inputs]
    inputs: dict[str, list[str]] = {Elements.SPOTS: spot_inputs, Elements.SPOT_EXPRESSION: spot_inputs}
    measured: dict[str, Any] = {}
    images: dict[str, Any] = {}
    if image is not None:
        image_path = Path(image)
        images[Elements.HE], measured = he_image(image_path, 1.0, pixel_size, placement.centres)
        inputs[Elements.HE] = [str(image_path)]

    table_parameters: dict[str, Any] = {"expression_orientation": orientation}
    species = infer_species(adata.var_names)
    if species is not None:
        table_parameters["species_inference"] = species[1]
    measured.update(
        id=sample_id or expression_path.name.split(".")[0],
        st_technology=technology,
        species=species[0] if species else None,
        spot_diameter=spot_diameter_um,
        inter_spot_dist=inter_spot_dist_um,
        spots_under_tissue=int(obs_columns[Keys.IN_TISSUE].sum()) if Keys.IN_TISSUE in obs_columns else None,
        nb_genes=int(adata.n_vars),
        pixel_size_um_estimated=pixel_size if coords.kind == "pixel" else None,
    )
    return spot_sample(
        spot_shapes,
        table,
        method=placement.method,
        estimated_error_um=placement.error_um,
        converter="legacy",
        metadata=measured,
        pixel_size_um=pixel_size,
        inputs=inputs,
        known_metadata=metadata,
        images=images,
        parameters={Elements.SPOTS: spot_parameters, Elements.SPOT_EXPRESSION: table_parameters},
    )
