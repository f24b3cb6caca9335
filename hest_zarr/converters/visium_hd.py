"""Visium HD (Space Ranger ``outs/`` with ``binned_outputs/square_XXXum/``) into a sample store.

Each bin size becomes its own spot set: a shapes element ``spots_square_XXXum`` of axis-aligned squares (side = bin
size in full-resolution pixels, centred on ``pxl_col_in_fullres, pxl_row_in_fullres``, indexed by barcode) and a
table ``spot_expression_square_XXXum`` annotating it (raw counts, ``array_row``, ``array_col``, ``in_tissue``).
A bin folder holds its counts (10x h5 or MEX) and, in ``spatial/`` or else in the sample's own ``spatial/``,
``tissue_positions.parquet`` and ``scalefactors_json.json``.

The pixel size is Space Ranger's ``microns_per_pixel`` when the scale factors give it, else the bin size over
``spot_diameter_fullres`` (which Space Ranger sets to one bin in pixels). Without a full-resolution image, the hires
(else lowres) image of the smallest bin's ``spatial/`` (else of the sample's) is stored as ``he``, scaled to
full-resolution pixels.

Why not ``spatialdata_io.visium_hd``: it names elements and coordinate systems after the dataset, needs the
``feature_slice.h5`` and microscope metadata of a full Space Ranger run, and asserts instead of naming the file at
fault; counts, positions and images are read here with the same readers as Visium (:mod:`._tenx`,
:mod:`._spaceranger`, :mod:`._images`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata_io._constants._constants import VisiumHDKeys

from hest_zarr.converters._images import he_image
from hest_zarr.converters._spaceranger import (
    pick_spatial_image,
    positions_for_barcodes,
    read_positions,
    read_scalefactors,
    spot_expression,
)
from hest_zarr.converters._tenx import COUNTS, read_counts, species_from_genome
from hest_zarr.elements import Elements, Keys, build_sample, square_spots
from hest_zarr.errors import InputError
from hest_zarr.schemas import SampleMetadata

BIN_FOLDER = re.compile(rf"^{VisiumHDKeys.BIN_PREFIX.value}(\d{{3}})um$")
POSITIONS_FILE = f"{VisiumHDKeys.SPATIAL.value}/{VisiumHDKeys.TISSUE_POSITIONS_FILE.value}"
SCALEFACTORS_FILE = f"{VisiumHDKeys.SPATIAL.value}/{VisiumHDKeys.SCALEFACTORS_FILE.value}"
#: Relative tolerance between the pixel sizes of the bin folders of one sample.
PIXEL_SIZE_RTOL = 1e-6


@dataclass(frozen=True)
class HDBin:
    """One bin size of a Visium HD sample, read: counts, positions of its barcodes and scale factors."""

    size_um: int
    folder: Path
    counts_path: Path
    positions_path: Path
    factors_path: Path
    counts: AnnData
    positions: pd.DataFrame
    pixel_size_um: float

    @property
    def suffix(self) -> str:
        """The bin folder's name, e.g. ``square_008um``: the suffix of the element names."""
        return self.folder.name


def find_bins(path: str | Path) -> dict[int, Path]:
    """Return the bin folders of a Visium HD sample by bin size in micrometres.

    Raises
    ------
    InputError
        ``path`` has no ``binned_outputs/square_XXXum/`` folder.

    Examples
    --------
    >>> find_bins("../shared/data/VisiumIO_visiumhd")  # doctest: +SKIP
    {2: PosixPath('../shared/data/VisiumIO_visiumhd/binned_outputs/square_002um')}

    """
    root = Path(path)
    binned = root / VisiumHDKeys.BINNED_OUTPUTS.value
    if not binned.is_dir():
        found = sorted(p.name for p in root.iterdir())[:8] if root.is_dir() else []
        raise InputError(
            f"{root}: unknown folder layout (expected a Visium HD outs/ with binned_outputs/square_XXXum/); "
            f"found {found}"
        )
    bins = {
        int(match.group(1)): folder
        for folder in binned.iterdir()
        if folder.is_dir() and (match := BIN_FOLDER.match(folder.name))
    }
    if not bins:
        raise InputError(
            f"{binned}: no bin folder (expected square_002um, square_008um, ...); "
            f"found {sorted(p.name for p in binned.iterdir())[:8]}"
        )
    return dict(sorted(bins.items()))


def _spatial_file(root: Path, folder: Path, relative: str) -> Path:
    """Return ``relative`` in the bin folder, else in the sample root."""
    for base in (folder, root):
        if (base / relative).is_file():
            return base / relative
    raise InputError(f"{folder}: no {relative} (looked in the bin folder and in {root})")


def _pixel_size(factors: dict[str, float], size_um: int) -> float:
    if VisiumHDKeys.SCALEFACTORS_MICRONS_PER_PIXEL.value in factors:
        return float(factors[VisiumHDKeys.SCALEFACTORS_MICRONS_PER_PIXEL.value])
    factors_bin_um = float(factors.get(VisiumHDKeys.SCALEFACTORS_BIN_SIZE_UM.value, size_um))
    return factors_bin_um / float(factors[VisiumHDKeys.SCALEFACTORS_SPOT_DIAMETER_FULLRES.value])


def read_bin(root: Path, size_um: int, folder: Path) -> HDBin:
    """Read one bin folder: counts, the positions of their barcodes, the pixel size from the scale factors.

    Examples
    --------
    >>> root = Path("../shared/data/VisiumIO_visiumhd")  # doctest: +SKIP
    >>> read_bin(root, 2, find_bins(root)[2]).counts.shape  # doctest: +SKIP
    (10, 10)

    """
    counts_path = COUNTS.require(folder)
    positions_path = _spatial_file(root, folder, POSITIONS_FILE)
    factors_path = _spatial_file(root, folder, SCALEFACTORS_FILE)
    factors = read_scalefactors(factors_path)
    counts = read_counts(counts_path)
    positions = positions_for_barcodes(
        read_positions(positions_path), counts.obs_names, str(positions_path), counts_path
    )
    return HDBin(
        size_um=size_um,
        folder=folder,
        counts_path=counts_path,
        positions_path=positions_path,
        factors_path=factors_path,
        counts=counts,
        positions=positions,
        pixel_size_um=_pixel_size(factors, size_um),
    )


def _common_pixel_size(bins: list[HDBin]) -> float:
    pixel_size_um = bins[0].pixel_size_um
    for other in bins[1:]:
        if not np.isclose(other.pixel_size_um, pixel_size_um, rtol=PIXEL_SIZE_RTOL, atol=0):
            raise InputError(
                f"{other.factors_path}: {other.pixel_size_um} um/px, but {bins[0].factors_path} gives "
                f"{pixel_size_um} um/px; the bins of one sample share one full-resolution image"
            )
    return pixel_size_um


def _spatial_image(root: Path, bins: list[HDBin]) -> tuple[Path, float] | None:
    """Space Ranger's hires (else lowres) image of the smallest bin folder that has one, else of the sample root."""
    for base in [hd_bin.folder for hd_bin in bins] + [root]:
        factors_path = base / SCALEFACTORS_FILE
        if factors_path.is_file() and (picked := pick_spatial_image(base, read_scalefactors(factors_path))):
            return picked
    return None


def read_visium_hd(
    path: str | Path,
    *,
    bin_sizes: Iterable[int] | None = None,
    image: str | Path | None = None,
    sample_id: str | None = None,
    metadata: SampleMetadata | None = None,
) -> SpatialData:
    """Read a Visium HD Space Ranger ``outs/`` folder into a sample, one spot set per bin size.

    Parameters
    ----------
    path
        The folder holding ``binned_outputs/``.
    bin_sizes
        Bin sizes to read, in micrometres (e.g. ``[8, 16]``); default: every ``square_XXXum`` folder.
    image
        Full-resolution H&E. Without it the hires (else lowres) image of ``spatial/`` is stored as ``he``, scaled
        to full-resolution coordinates.
    sample_id
        Sample id (default: the folder name).
    metadata
        Known metadata (e.g. the HEST-1k CSV row); converter-measured fields fill its gaps.

    Returns
    -------
    The sample: for each bin size ``spots_square_XXXum`` (squares) and ``spot_expression_square_XXXum`` (raw
    counts), and ``he`` when an image exists. ``spot_diameter`` and ``inter_spot_dist`` are the smallest bin size.

    Raises
    ------
    InputError
        An unknown folder layout, a bin size that is not there, missing or unreadable files, positions lacking
        barcodes of the matrix, bins whose scale factors disagree, an image smaller than the bin coordinates imply.

    Examples
    --------
    >>> sdata = read_visium_hd("outs", bin_sizes=[8, 16], image="slide.btf", sample_id="TENX156")  # doctest: +SKIP
    >>> sorted(sdata.shapes)  # doctest: +SKIP
    ['spots_square_008um', 'spots_square_016um']

    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: no such directory (expected a Visium HD outs/ folder)")
    available = find_bins(root)
    wanted = sorted(set(bin_sizes)) if bin_sizes is not None else list(available)
    absent = [size for size in wanted if size not in available]
    if absent or not wanted:
        found = [folder.name for folder in available.values()]
        asked = f"bin size(s) {absent} um" if absent else "no bin size (bin_sizes is empty)"
        raise InputError(f"{root / VisiumHDKeys.BINNED_OUTPUTS.value}: asked for {asked}; found {found}")
    bins = [read_bin(root, size, available[size]) for size in wanted]
    pixel_size_um = _common_pixel_size(bins)

    shapes: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    inputs: dict[str, list[str]] = {}
    parameters: dict[str, dict[str, Any]] = {}
    for hd_bin in bins:
        spots_name = f"{Elements.SPOTS}_{hd_bin.suffix}"
        table_name = f"{Elements.SPOT_EXPRESSION}_{hd_bin.suffix}"
        side_px = hd_bin.size_um / pixel_size_um
        centres = hd_bin.positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
        shapes[spots_name] = square_spots(centres, side_px, hd_bin.counts.obs_names.astype(str), pixel_size_um)
        tables[table_name] = spot_expression(hd_bin.counts, hd_bin.positions, hd_bin.counts_path, region=spots_name)
        bin_inputs = [str(hd_bin.counts_path), str(hd_bin.positions_path), str(hd_bin.factors_path)]
        inputs[spots_name] = inputs[table_name] = bin_inputs
        parameters[spots_name] = {"bin_size_um": hd_bin.size_um, "side_px": side_px}

    images: dict[str, Any] = {}
    measured: dict[str, Any] = {}
    picked = (Path(image), 1.0) if image is not None else _spatial_image(root, bins)
    if picked is not None:
        image_path, scale = picked
        all_centres = np.concatenate(
            [b.positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64) for b in bins]
        )
        images[Elements.HE], measured = he_image(image_path, scale, pixel_size_um, all_centres)
        inputs[Elements.HE] = [str(image_path)]
        parameters[Elements.HE] = {"scale_to_fullres": 1 / scale}

    smallest = bins[0]
    measured.update(
        id=sample_id or root.name,
        st_technology="Visium HD",
        species=species_from_genome(smallest.counts),
        spot_diameter=float(smallest.size_um),
        inter_spot_dist=float(smallest.size_um),
        spots_under_tissue=int(smallest.positions[Keys.IN_TISSUE].sum()),
        nb_genes=int(smallest.counts.n_vars),
        pixel_size_um_estimated=pixel_size_um,
    )
    return build_sample(
        converter="visium_hd",
        metadata=measured,
        pixel_size_um=pixel_size_um,
        inputs=inputs,
        known_metadata=metadata,
        images=images,
        shapes=shapes,
        tables=tables,
        parameters=parameters,
    )
