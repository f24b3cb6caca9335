"""Visium (Space Ranger ``outs/``, any version, CytAssist included) into a sample store.

Counts: a 10x h5 or MEX directory (read with scanpy's 10x readers; MEX files may be gzipped or not), or an AnnData
``.h5ad`` whose raw counts are in ``layers['counts']``, ``X`` or ``raw.X``. Positions: the old headerless
``tissue_positions_list.csv``, the new ``tissue_positions.csv`` with header or ``tissue_positions.parquet`` (read with
pandas); without any of them, a Loupe manual-alignment JSON (``oligo`` entries with ``row``, ``col``, ``imageX``,
``imageY``, ``dia`` and ``tissue``). Loupe names no barcodes, so its spots are matched to the barcodes by array
position: from Space Ranger's barcode coordinate list (``barcodes/visium-vN_coordinates.txt`` of its install) or from
``array_row``/``array_col`` columns of an AnnData's ``obs``.

Why not ``spatialdata_io.visium``: it names coordinate systems after the dataset, keeps images at their
downscaled resolution in separate systems, reads neither h5ad counts nor Loupe alignments, and gives no hook to fail
with a clear message on mismatched barcodes or truncated files; the store layout needs ``global`` =
full-resolution pixels and ``um``.

Spots are circles centred on Space Ranger's ``pxl_col_in_fullres, pxl_row_in_fullres`` (Loupe's ``imageX,
imageY``) with the radius of the 55 um capture spot. The pixel size is measured on the spot lattice
(:func:`spot_lattice_pixel_size`): the trimmed least-squares fit of every positioned spot's centre to its
``array_row, array_col`` on the slide layout (100 um along rows, rows 87 um apart on 6.5 mm capture areas).
``65 um / spot_diameter_fullres`` (Loupe's ``dia``) is only the fallback for fewer than 3 spots not on one line: it
matches the lattice on Space Ranger 1.0 and 2.x outputs but is 7.7 % low on Space Ranger 3.0 CytAssist ones, whose
``spot_diameter_fullres`` spans 70 um.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata_io._constants._constants import VisiumKeys

from hest_zarr.converters._images import he_image
from hest_zarr.converters._spaceranger import (
    POSITIONS,
    find_loupe_alignment,
    loupe_positions,
    pick_spatial_image,
    positions_for_barcodes,
    positive_number,
    read_positions,
    read_scalefactors,
    spot_expression,
)
from hest_zarr.converters._tenx import COUNTS, read_counts, species_from_genome
from hest_zarr.elements import Elements, Keys, circle_spots, spot_sample
from hest_zarr.elements.lattice import (
    DISAGREEMENT_TOLERANCE,
    VISIUM_INTER_SPOT_DISTANCE_UM,
    PixelSizeDisagreementWarning,
    fit_pixel_size,
    spans_plane,
    visium_lattice_name,
    visium_lattice_um,
)
from hest_zarr.errors import InputError
from hest_zarr.schemas import SampleMetadata

VISIUM_SPOT_DIAMETER_UM = 55.0
#: What Space Ranger's ``spot_diameter_fullres`` (and Loupe's ``dia``) span according to the 10x docs (a
#: theoretical 65 um spot, not the 55 um capture spot); the fallback pixel size is this over it. Measured with the
#: lattice's pixel size it spans 65.0 um on the scanpy (Space Ranger 1.0) sample, 64.96 um on SFE's (2.x) and
#: 70.0 um on perik's (3.0 CytAssist).
SPOT_DIAMETER_FULLRES_UM = 65.0
#: Columns of a positions frame that place its spots on the lattice and in the image.
LATTICE_COLUMNS = ["array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
SCALEFACTORS_FILE = f"spatial/{VisiumKeys.SCALEFACTORS_FILE.value}"


# --------------------------------------------------------------------------------------------- counts
def find_counts(root: Path) -> Path:
    """Return the counts file of a Space Ranger folder: a 10x matrix (filtered first), else its only ``*.h5ad``.

    Examples
    --------
    >>> find_counts(Path("outs")).name  # doctest: +SKIP
    'filtered_feature_bc_matrix.h5'

    """
    found = COUNTS.find(root)
    if found is not None:
        return found
    h5ads = sorted(root.glob("*.h5ad"))
    if len(h5ads) > 1:
        raise InputError(
            f"{root}: several AnnData files ({', '.join(p.name for p in h5ads)}); pass counts= to pick one"
        )
    if h5ads:
        return h5ads[0]
    raise InputError(f"{root}: no {COUNTS.what} found (expected {COUNTS.expected}, or a *.h5ad)")


# --------------------------------------------------------------------------------------------- pixel size
def spot_lattice_pixel_size(
    spots: pd.DataFrame, spot_diameter_px: float, source: str, *, fiducial_diameter_px: float | None = None
) -> tuple[float, dict[str, Any]]:
    """Return the size of a full-resolution pixel (um) measured on the Visium spot lattice, and its provenance.

    The centres ``pxl_col_in_fullres, pxl_row_in_fullres`` of every spot with a position (all rows of the positions
    file, not only the counts' barcodes: more spots, a tighter fit) are fitted to their slide-layout positions
    (:func:`hest_zarr.elements.lattice.visium_lattice_um` of ``array_row, array_col``) by trimmed least squares
    (:func:`hest_zarr.elements.lattice.fit_pixel_size`). With fewer than 3 such spots not on one line the lattice is
    undetermined and the pixel size falls back to ``65 um / spot_diameter_fullres``, with a warning.

    Parameters
    ----------
    spots
        Spots with ``array_row``, ``array_col``, ``pxl_row_in_fullres`` and ``pxl_col_in_fullres`` columns; rows
        with a missing value are left out.
    spot_diameter_px
        Space Ranger's ``spot_diameter_fullres`` (Loupe's ``dia``).
    source
        The positions file, named in warnings and errors.
    fiducial_diameter_px
        Space Ranger's ``fiducial_diameter_fullres``: recorded in micrometres as a check (the slide layouts' fiducials
        are 105 um).

    Returns
    -------
    The pixel size and the spots' provenance parameters: ``pixel_size_method`` (``"spot lattice"``, or the
    fallback), ``pixel_size_fit`` (pixel size, standard error ``uncertainty_um``, ``residual_rms_px``, spots and
    outliers), ``pixel_size_um_from_spot_diameter`` and ``difference_vs_spot_diameter`` (lattice / that - 1),
    ``spot_diameter_fullres_um`` and ``fiducial_diameter_fullres_um`` (those diameters at the lattice's pixel size).

    Warns
    -----
    PixelSizeDisagreementWarning
        The lattice and ``65 um / spot_diameter_fullres`` differ by more than 5 % (Space Ranger 3.0 CytAssist: 7.7 %).
    UserWarning
        Too few spots for the lattice: the fallback is used.

    Examples
    --------
    >>> rows, cols = np.divmod(np.arange(40), 8)
    >>> spots = pd.DataFrame({"array_row": rows, "array_col": 2 * cols + rows % 2})
    >>> spots[["pxl_col_in_fullres", "pxl_row_in_fullres"]] = visium_lattice_um(rows, 2 * cols + rows % 2) / 0.5
    >>> pixel_size, parameters = spot_lattice_pixel_size(spots, 130.0, "tissue_positions.csv")
    >>> round(pixel_size, 9), parameters["pixel_size_method"], abs(parameters["difference_vs_spot_diameter"]) < 1e-9
    (0.5, 'spot lattice', True)

    """
    from_diameter = SPOT_DIAMETER_FULLRES_UM / spot_diameter_px
    try:
        values = spots[LATTICE_COLUMNS].to_numpy(dtype=np.float64)
    except ValueError as err:
        raise InputError(f"{source}: {', '.join(LATTICE_COLUMNS)} must be numbers ({err})") from err
    values = values[np.isfinite(values).all(axis=1)]
    rows, cols, centres = values[:, 0], values[:, 1], values[:, [3, 2]]
    lattice_um = visium_lattice_um(rows, cols) if len(values) else np.empty((0, 2))
    parameters: dict[str, Any] = {
        "spot_diameter_px": spot_diameter_px,
        "pixel_size_um_from_spot_diameter": from_diameter,
    }
    if not spans_plane(lattice_um):
        warnings.warn(
            f"{source}: {len(values)} spot(s) with a position, too few or on one line to fit the spot lattice; the "
            f"pixel size falls back to {SPOT_DIAMETER_FULLRES_UM:g} um / spot_diameter_fullres = {from_diameter:.4g} "
            "um/px (7.7 % low on Space Ranger 3.0 CytAssist outputs)",
            UserWarning,
            stacklevel=3,
        )
        parameters["pixel_size_method"] = f"{SPOT_DIAMETER_FULLRES_UM:g} um / spot_diameter_fullres (too few spots)"
        return from_diameter, parameters
    estimate = fit_pixel_size(
        centres,
        lattice_um,
        pitch_um=VISIUM_INTER_SPOT_DISTANCE_UM,
        lattice=visium_lattice_name(rows, cols),
        source=source,
    )
    pixel_size = estimate.pixel_size_um
    difference = pixel_size / from_diameter - 1
    parameters.update(
        pixel_size_method="spot lattice",
        pixel_size_fit=estimate.parameters(),
        difference_vs_spot_diameter=difference,
        spot_diameter_fullres_um=spot_diameter_px * pixel_size,
    )
    if fiducial_diameter_px is not None:
        parameters["fiducial_diameter_fullres_um"] = fiducial_diameter_px * pixel_size
    if abs(difference) > DISAGREEMENT_TOLERANCE:
        warnings.warn(
            f"{source}: the spot lattice gives {pixel_size:.4g} um/px, {difference:+.1%} against "
            f"{SPOT_DIAMETER_FULLRES_UM:g} um / spot_diameter_fullres ({from_diameter:.4g} um/px): "
            f"spot_diameter_fullres spans {spot_diameter_px * pixel_size:.1f} um here; the lattice is used",
            PixelSizeDisagreementWarning,
            stacklevel=3,
        )
    return pixel_size, parameters


# --------------------------------------------------------------------------------------------- spot placement
@dataclass(frozen=True)
class _Placement:
    """Where the spots come from: the positions by barcode, every spot of the source (for the lattice) and why."""

    positions: pd.DataFrame
    lattice_spots: pd.DataFrame
    spot_diameter_px: float
    fiducial_diameter_px: float | None
    inputs: list[str]
    source: str
    method: str


def _loupe_alignment(root: Path, alignment: str | Path | None) -> Path | None:
    """Return the Loupe alignment placing the spots: the one given, else one found where ``spatial/`` has none.

    ``None`` when no alignment is given and ``spatial/`` holds a positions file.

    Raises
    ------
    InputError
        Neither a positions file nor a Loupe alignment.

    """
    if alignment is not None:
        return Path(alignment)
    if POSITIONS.find(root) is not None:
        return None
    found = find_loupe_alignment(root)
    if found is None:
        raise InputError(
            f"{root}: no {POSITIONS.what} found (expected {POSITIONS.expected}, "
            "or a Loupe alignment *.json with 'oligo' entries)"
        )
    return found


def _loupe_placement(
    alignment_path: Path, adata: AnnData, counts_path: Path, barcode_coordinates: str | Path | None
) -> _Placement:
    """Place the spots of a Loupe alignment (:func:`loupe_positions`)."""
    coordinates_path = Path(barcode_coordinates) if barcode_coordinates is not None else None
    positions, lattice_spots = loupe_positions(alignment_path, adata, coordinates_path)
    spot_inputs = [str(p) for p in (counts_path, alignment_path, coordinates_path) if p is not None]
    return _Placement(
        positions=positions,
        lattice_spots=lattice_spots,
        spot_diameter_px=positive_number(
            lattice_spots["spot_diameter_fullres"].median(), f"{alignment_path}: the median spot diameter 'dia'"
        ),
        fiducial_diameter_px=None,
        inputs=spot_inputs,
        source=" + ".join(spot_inputs[1:]),
        method="loupe alignment",
    )


def _space_ranger_placement(root: Path, counts_path: Path, factors: dict[str, float], factors_path: Path) -> _Placement:
    """Place the spots of Space Ranger's positions file, with the spot diameter of its scale factors."""
    if not factors:
        raise InputError(f"{root}: no scale factors (expected {SCALEFACTORS_FILE})")
    positions_path = POSITIONS.require(root)
    positions = read_positions(positions_path)
    return _Placement(
        positions=positions,
        lattice_spots=positions,
        spot_diameter_px=float(factors["spot_diameter_fullres"]),
        fiducial_diameter_px=factors.get("fiducial_diameter_fullres"),
        inputs=[str(counts_path), str(positions_path), str(factors_path)],
        source=str(positions_path),
        method="space ranger",
    )


# --------------------------------------------------------------------------------------------- converter
def read_visium(
    path: str | Path,
    *,
    image: str | Path | None = None,
    sample_id: str | None = None,
    metadata: SampleMetadata | None = None,
    counts: str | Path | None = None,
    alignment: str | Path | None = None,
    barcode_coordinates: str | Path | None = None,
    include_image: bool = True,
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
    counts
        Counts file (10x h5, MEX directory or ``.h5ad``); default: found in ``path`` (:func:`find_counts`).
    alignment
        Loupe alignment JSON to place the spots; default: used only when ``spatial/`` has no positions file, found
        as the ``*.json`` with ``oligo`` entries in ``path`` or ``path/spatial``.
    barcode_coordinates
        Space Ranger's ``visium-vN_coordinates.txt``, which gives Loupe spots their barcodes (not needed when the
        counts' ``obs`` hold ``array_row``/``array_col``).
    include_image
        Store an H&E; ``False`` converts spots and counts only (e.g. when ``spatial/`` holds a cropped image).

    Returns
    -------
    The sample: ``spots`` (circles), ``spot_expression`` (raw counts) and ``he`` when an image exists.

    Raises
    ------
    InputError
        Missing or unreadable files, positions lacking barcodes of the matrix, normalised counts, an image smaller
        than the spot coordinates imply.

    Examples
    --------
    >>> sdata = read_visium("outs", sample_id="V1_Mouse_Brain")  # doctest: +SKIP
    >>> sdata = read_visium("GSM123", alignment="GSM123/V10M24-003-B1.json", image="GSM123/slide.tif")  # doctest: +SKIP
    >>> hest_zarr.write(sdata, "V1_Mouse_Brain.zarr")  # doctest: +SKIP

    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: no such directory (expected a Space Ranger outs/ folder)")
    if image is not None and not include_image:
        raise InputError(f"{image}: an image was given with include_image=False")
    counts_path = Path(counts) if counts is not None else find_counts(root)
    if not counts_path.exists():
        raise InputError(f"{counts_path}: no such counts file")
    factors_path = root / SCALEFACTORS_FILE
    factors = read_scalefactors(factors_path) if factors_path.is_file() else {}
    alignment_path = _loupe_alignment(root, alignment)
    adata = read_counts(counts_path)
    if alignment_path is not None:
        placement = _loupe_placement(alignment_path, adata, counts_path, barcode_coordinates)
    else:
        placement = _space_ranger_placement(root, counts_path, factors, factors_path)
    pixel_size_um, spot_parameters = spot_lattice_pixel_size(
        placement.lattice_spots,
        placement.spot_diameter_px,
        placement.source,
        fiducial_diameter_px=placement.fiducial_diameter_px,
    )
    positions = positions_for_barcodes(placement.positions, adata.obs_names, placement.source, counts_path)
    centres = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    spots = circle_spots(
        centres,
        VISIUM_SPOT_DIAMETER_UM / pixel_size_um / 2,
        adata.obs_names.astype(str),
        pixel_size_um,
        source=str(placement.source),
    )
    table = spot_expression(adata, positions, counts_path)
    inputs: dict[str, list[str]] = {Elements.SPOTS: placement.inputs, Elements.SPOT_EXPRESSION: placement.inputs}
    images: dict[str, Any] = {}
    parameters: dict[str, dict[str, Any]] = {Elements.SPOTS: spot_parameters}
    measured: dict[str, Any] = {}
    picked = (Path(image), 1.0) if image is not None else pick_spatial_image(root, factors)
    if include_image and picked is not None:
        image_path, scale = picked
        images[Elements.HE], measured = he_image(image_path, scale, pixel_size_um, centres)
        inputs[Elements.HE] = [str(image_path)]
        parameters[Elements.HE] = {"scale_to_fullres": 1 / scale}

    measured.update(
        id=sample_id or root.name,
        st_technology="Visium",
        species=species_from_genome(adata),
        spot_diameter=VISIUM_SPOT_DIAMETER_UM,
        inter_spot_dist=VISIUM_INTER_SPOT_DISTANCE_UM,
        spots_under_tissue=int(positions[Keys.IN_TISSUE].sum()),
        nb_genes=int(adata.n_vars),
        pixel_size_um_estimated=pixel_size_um,
    )
    return spot_sample(
        spots,
        table,
        method=placement.method,
        converter="visium",
        metadata=measured,
        pixel_size_um=pixel_size_um,
        inputs=inputs,
        known_metadata=metadata,
        images=images,
        parameters=parameters,
    )
