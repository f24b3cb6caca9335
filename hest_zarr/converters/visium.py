"""Visium (Space Ranger ``outs/``) into a sample store.

Counts are read with scanpy's 10x readers (h5 or MEX), positions with pandas (old headerless
``tissue_positions_list.csv``, new ``tissue_positions.csv`` with header, or ``tissue_positions.parquet``).
Why not ``spatialdata_io.visium``: it names coordinate systems after the dataset, keeps images at their
downscaled resolution in separate systems, and gives no hook to fail with a clear message on mismatched
barcodes or truncated files; the store layout needs ``global`` = full-resolution pixels and ``um``.

Spots are circles centred on Space Ranger's ``pxl_col_in_fullres, pxl_row_in_fullres`` with radius
``spot_diameter_fullres / 2``; the pixel size is 55 um over that diameter (the spot diameter of Visium v1/v2
slides, which Space Ranger measures on the fiducial frame).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity, Scale
from spatialdata_io._constants._constants import VisiumKeys

from hest_zarr._constants import Elements, Keys
from hest_zarr.converters._common import (
    build_sample,
    circle_spots,
    expression_table,
    frame_transformations,
    integer_counts,
)
from hest_zarr.errors import InputError
from hest_zarr.schemas import SampleMetadata

VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_INTER_SPOT_DISTANCE_UM = 100.0
COUNTS_CANDIDATES = (
    VisiumKeys.FILTERED_COUNTS_FILE.value,
    "filtered_feature_bc_matrix",
    VisiumKeys.RAW_COUNTS_FILE.value,
)
POSITIONS_CANDIDATES = (
    f"spatial/{VisiumKeys.SPOTS_FILE_2.value}",
    f"spatial/{VisiumKeys.SPOTS_FILE_1.value}",
    "spatial/tissue_positions.parquet",
)
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
SCALEFACTORS_FILE = f"spatial/{VisiumKeys.SCALEFACTORS_FILE.value}"
_GENOME_SPECIES = {"GRCh38": "Homo sapiens", "hg19": "Homo sapiens", "mm10": "Mus musculus", "GRCm39": "Mus musculus"}


def _first_existing(root: Path, candidates: tuple[str, ...], what: str) -> Path:
    for name in candidates:
        if (root / name).exists():
            return root / name
    raise InputError(f"{root}: no {what} found (expected one of {', '.join(candidates)})")


def read_counts(path: Path) -> AnnData:
    """Read a 10x feature-barcode matrix (h5 file or MEX directory) as integer counts.

    ``var_names`` are gene symbols made unique; Ensembl ids stay in ``var['gene_ids']``.
    """
    import scanpy as sc

    try:
        if path.is_dir():
            adata = sc.read_10x_mtx(path, var_names="gene_symbols", make_unique=True, gex_only=False)
        else:
            adata = sc.read_10x_h5(path, gex_only=False)
            adata.var_names_make_unique()
    except FileNotFoundError as err:
        raise InputError(f"{path}: incomplete matrix ({err})") from err
    except Exception as err:  # h5py raises OSError/KeyError, scanpy ValueError on damaged files
        raise InputError(f"{path}: not a readable 10x feature-barcode matrix ({type(err).__name__}: {err})") from err
    adata.X = integer_counts(adata.X, str(path))
    return adata


def read_positions(path: Path) -> pd.DataFrame:
    """Read Space Ranger spot positions (any version) indexed by barcode."""
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            with path.open() as handle:
                has_header = handle.readline().startswith("barcode")
            frame = pd.read_csv(path, header=0 if has_header else None)
            if not has_header:
                frame.columns = POSITION_COLUMNS[: frame.shape[1]]
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: cannot read spot positions ({err})") from err
    missing = [c for c in POSITION_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing position column(s) {missing}; found {list(frame.columns)}")
    return frame[POSITION_COLUMNS].set_index("barcode")


def _read_scalefactors(path: Path) -> dict[str, float]:
    try:
        factors = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read scale factors ({err})") from err
    if "spot_diameter_fullres" not in factors:
        raise InputError(f"{path}: no 'spot_diameter_fullres' entry")
    return factors


def _read_image(path: Path) -> np.ndarray:
    """Read an RGB image into ``c, y, x`` uint8 (Space Ranger PNG/JPG/TIFF images)."""
    import tifffile
    from PIL import Image

    try:
        if path.suffix.lower() in (".tif", ".tiff", ".btf"):
            pixels = tifffile.imread(path)
        else:
            with Image.open(path) as handle:
                pixels = np.asarray(handle.convert("RGB"))
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read image ({err})") from err
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    if pixels.ndim != 3 or pixels.shape[-1] not in (3, 4):
        raise InputError(f"{path}: expected an RGB image, found shape {pixels.shape}")
    if pixels.dtype == np.uint16:
        pixels = (pixels // 257).astype(np.uint8)
    return np.moveaxis(pixels[..., :3].astype(np.uint8, copy=False), -1, 0)


def _pick_image(root: Path, image: Path | None, factors: dict[str, float]) -> tuple[Path, float] | None:
    """Return the H&E to store and its scale to full resolution (1 for a full-resolution image)."""
    if image is not None:
        if not Path(image).is_file():
            raise InputError(f"{image}: no such image file")
        return Path(image), 1.0
    for name, key in (
        (VisiumKeys.IMAGE_HIRES_FILE.value, "tissue_hires_scalef"),
        (VisiumKeys.IMAGE_LOWRES_FILE.value, "tissue_lowres_scalef"),
    ):
        if (root / name).is_file() and key in factors:
            return root / name, float(factors[key])
    return None


def read_visium(
    path: str | Path,
    *,
    image: str | Path | None = None,
    sample_id: str | None = None,
    metadata: SampleMetadata | None = None,
) -> SpatialData:
    """Read a Space Ranger ``outs/`` folder into a sample (a SpatialData object with its record).

    Parameters
    ----------
    path
        The ``outs/`` folder (holding the counts and ``spatial/``).
    image
        Full-resolution H&E. Without it the hires (else lowres) image of ``spatial/`` is stored as ``he``,
        scaled to full-resolution coordinates.
    sample_id
        Sample id (default: the folder name).
    metadata
        Known metadata (e.g. the HEST-1k CSV row); converter-measured fields fill its gaps.

    Returns
    -------
    The sample: ``spots`` (circles), ``spot_expression`` (raw counts) and ``he`` when an image exists.

    Raises
    ------
    InputError
        Missing or unreadable files, positions lacking barcodes of the matrix, an image smaller than the
        spot coordinates imply.

    Examples
    --------
    >>> sdata = read_visium("outs", sample_id="V1_Mouse_Brain")  # doctest: +SKIP
    >>> hest_zarr.write(sdata, "V1_Mouse_Brain.zarr")  # doctest: +SKIP

    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: no such directory (expected a Space Ranger outs/ folder)")
    counts_path = _first_existing(root, COUNTS_CANDIDATES, "count matrix")
    positions_path = _first_existing(root, POSITIONS_CANDIDATES, "spot positions")
    factors_path = root / SCALEFACTORS_FILE
    if not factors_path.is_file():
        raise InputError(f"{root}: no scale factors (expected {SCALEFACTORS_FILE})")
    factors = _read_scalefactors(factors_path)
    adata = read_counts(counts_path)
    positions = read_positions(positions_path)

    missing = adata.obs_names.difference(positions.index)
    if len(missing):
        raise InputError(
            f"{positions_path}: {len(missing)} of the {adata.n_obs} barcodes of {counts_path.name} have no position "
            f"(e.g. {missing[0]}); positions and counts come from different samples?"
        )
    positions = positions.loc[adata.obs_names]
    spot_diameter_px = float(factors["spot_diameter_fullres"])
    pixel_size_um = VISIUM_SPOT_DIAMETER_UM / spot_diameter_px
    barcodes = adata.obs_names.astype(str)
    centres = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    spots = circle_spots(centres, spot_diameter_px / 2, barcodes, pixel_size_um)
    table = expression_table(
        adata.X,
        barcodes,
        adata.var,
        obs_columns={
            c: positions[c].to_numpy(dtype=np.int32) for c in (Keys.ARRAY_ROW, Keys.ARRAY_COL, Keys.IN_TISSUE)
        },
        source=str(counts_path),
    )
    spot_inputs = [str(counts_path), str(positions_path), str(factors_path)]
    inputs: dict[str, list[str]] = {Elements.SPOTS: spot_inputs, Elements.SPOT_EXPRESSION: spot_inputs}
    images: dict[str, Any] = {}
    parameters: dict[str, dict[str, Any]] = {}
    measured: dict[str, Any] = {}
    picked = _pick_image(root, Path(image) if image is not None else None, factors)
    if picked is not None:
        image_path, scale = picked
        pixels = _read_image(image_path)
        fullres_shape = (round(pixels.shape[1] / scale), round(pixels.shape[2] / scale))
        _check_image_covers_spots(image_path, fullres_shape, centres)
        to_global = Identity() if scale == 1.0 else Scale([1 / scale, 1 / scale], axes=("x", "y"))
        images[Elements.HE] = Image2DModel.parse(
            pixels,
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            transformations=frame_transformations(pixel_size_um, to_global),
        )
        inputs[Elements.HE] = [str(image_path)]
        parameters[Elements.HE] = {"scale_to_fullres": 1 / scale}
        if scale == 1.0:
            measured.update(fullres_px_height=fullres_shape[0], fullres_px_width=fullres_shape[1])

    genome = str(adata.var["genome"].iloc[0]) if "genome" in adata.var and adata.n_vars else None
    measured.update(
        id=sample_id or root.name,
        st_technology="Visium",
        species=_GENOME_SPECIES.get(genome),
        spot_diameter=VISIUM_SPOT_DIAMETER_UM,
        inter_spot_dist=VISIUM_INTER_SPOT_DISTANCE_UM,
        spots_under_tissue=int(positions[Keys.IN_TISSUE].sum()),
        nb_genes=int(adata.n_vars),
        pixel_size_um_estimated=pixel_size_um,
    )
    return build_sample(
        converter="visium",
        metadata=measured,
        pixel_size_um=pixel_size_um,
        inputs=inputs,
        known_metadata=metadata,
        images=images,
        shapes={Elements.SPOTS: spots},
        tables={Elements.SPOT_EXPRESSION: table},
        parameters=parameters,
    )


def _check_image_covers_spots(image_path: Path, fullres_shape: tuple[int, int], centres: np.ndarray) -> None:
    height, width = fullres_shape
    beyond = (centres[:, 0] > width) | (centres[:, 1] > height) | (centres < 0).any(axis=1)
    if beyond.any():
        raise InputError(
            f"{image_path}: image covers {width} x {height} full-resolution px but {int(beyond.sum())} spots lie "
            f"outside it (max x {centres[:, 0].max():.0f}, max y {centres[:, 1].max():.0f}); wrong image?"
        )
