"""Xenium (a Xenium Onboard Analysis output folder) into a sample store, optionally placed on an H&E.

What is read, and how:

- ``transcripts.parquet`` (else ``transcripts.csv.gz``): every molecule, BLANK_/NegControl/Unassigned codewords
  included, as the points element ``transcripts``. Columns: ``x``, ``y`` (micrometres, from ``x_location``,
  ``y_location``), ``gene`` (categorical, from ``feature_name``), ``qv``, ``cell_id`` and every other column of
  the file unchanged. Parquet is read by dask in row-group partitions (``blocksize``), so a large file is
  never held in memory; the gzipped CSV cannot be split and is read whole.
- ``cell_boundaries`` / ``nucleus_boundaries`` (parquet, else csv.gz): the ``cells`` and ``nuclei`` polygons,
  built in one vectorised call (``shapely.linearrings`` over the vertex rows grouped by cell, then
  ``shapely.polygons``), indexed by ``cell_id``, with ``source = "xenium"``. Multi-nucleate cells (XOA >= 2
  files carry a ``label_id`` per nucleus) keep one polygon per nucleus, indexed ``<cell_id>_<k>``, with the
  owning cell in a ``cell_id`` column.
- ``cell_feature_matrix.h5`` (or the ``cell_feature_matrix/`` MEX folder): the ``cell_expression`` table, read
  by the same reader as Visium (scanpy's ``read_10x_h5(gex_only=False)``, else, for files scanpy cannot read such
  as R-written ones with float ``indptr``/``shape``, h5py directly:
  :func:`hest_zarr.converters._tenx.read_10x_h5_arrays`), raw integer counts of every feature;
  ``var['is_control']`` flags controls by the one rule of :func:`hest_zarr.elements.is_control_feature` (negative-
  control probes and codewords, unassigned/deprecated codewords, BLANK and intergenic features by name, and the
  control ``feature_types``). The columns of ``cells.parquet`` (centroids, counts, areas) join ``obs``.
  Xenium Protein features (``feature_types == "Protein Expression"``, XOA >= 4) go to the ``cell_protein`` table
  instead: float intensities, the fixed-point integers of the h5 divided by its ``protein_scaling_factor``.
- ``cells.zarr.zip``: the ``nucleus_labels`` and ``cell_labels`` label rasters (``masks/0``, ``masks/1``) on the
  morphology pixels, read lazily, and the ``label_cell_ids`` table (label value -> cell id), see
  :func:`read_cells_zarr`.
- ``morphology_focus.ome.tif`` (XOA 1), ``morphology_focus/morphology_focus_0000.ome.tif`` (XOA 2-3),
  ``morphology_focus/ch0000_dapi.ome.tif`` (XOA 4), else ``morphology_mip.ome.tif``, else the z-stack
  ``morphology.ome.tif`` (projected by its maximum): the ``dapi`` image, channel ``DAPI``, lazily through
  tifffile's zarr view (only the tiles a computation touches are decoded).
- A minimal bundle (e.g. SpatialExperimentIO's ``Xenium_small``: the matrix and ``cells.csv.gz`` only) converts
  too: transcripts, boundaries and images are optional. Without cell boundaries, ``cells`` are circles at the cell
  summary's ``x_centroid, y_centroid`` (um) with the radius of the cell's area, ``sqrt(cell_area / pi)``
  (:func:`centroid_circles`, provenance method ``centroid_circles``). The optional inputs a folder lacks are listed
  in every element's provenance (``absent_inputs``).
- ``experiment.xenium``: the pixel size (``pixel_size``, um per morphology pixel) and the panel, organism,
  preservation and software version, recorded in the provenance. Without it Xenium's 0.2125 um/px is used
  and a note says so.

Frames. Molecules, cells and nuclei keep their micrometre coordinates; their transformation carries them to
``global``. Without an H&E, ``global`` is the morphology image's pixels (``um / pixel_size``) and ``um`` is the
identity. With an H&E and its alignment, ``global`` is the H&E's pixels (the HEST convention) and every element
gets the composed transformation Xenium um -> H&E pixels; ``um`` is then ``global`` scaled by the H&E pixel size
(the store's rule, checked by :func:`hest_zarr.validate`), which equals Xenium's micrometres up to the rotation
and offset of the alignment. The alignment is either

- the 3x3 matrix Xenium Explorer exports: it maps H&E pixels to Xenium morphology pixels (10x Genomics
  knowledge base, "How can I convert coordinates between H&E image and Xenium data"); scaled by the Xenium pixel
  size it maps H&E pixels to micrometres; or
- a Xenium Explorer keypoints CSV (``fixedX, fixedY`` on the Xenium image in micrometres, ``alignmentX,
  alignmentY`` on the H&E in pixels): the affine H&E pixels -> micrometres is fitted by least squares and its
  root-mean-square residual (um) is recorded as each placed element's ``estimated_error_um``.

The H&E pixel size is the scale of that mapping (square root of its determinant).

Why not ``spatialdata_io.xenium``: it requires ``experiment.xenium`` and ``cells.zarr.zip`` (absent from many
exports, e.g. the SFE test crop), names its own elements and coordinate systems (``global`` = morphology
pixels, labels rasters, ``cell_circles``), drops non-gene features by default and offers no hook for the
H&E frame or for errors that name the file. Its file and column names (``XeniumKeys``) are used here.

Layout. This module assembles the sample (:func:`read_xenium`) and re-exports the readers, which live by concern in
private modules: ``_xenium_inputs`` (file names, ``experiment.xenium``, table files), ``_xenium_alignment`` (H&E
alignment and frames), ``_xenium_transcripts``, ``_xenium_shapes`` (boundaries, cell summary), ``_xenium_matrix``
(cell-feature matrix, protein), ``_xenium_labels`` (``cells.zarr.zip``) and ``_xenium_images`` (morphology, H&E).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
from geopandas import GeoDataFrame
from spatialdata import SpatialData
from xarray import DataArray

from hest_zarr.converters._xenium_alignment import XeniumAlignment, XeniumFrame, read_alignment
from hest_zarr.converters._xenium_images import (
    cells_on_he,
    he_image_element,
    read_morphology,
    warn_unless_image_covers,
)
from hest_zarr.converters._xenium_inputs import (
    DEFAULT_PIXEL_SIZE_UM,
    SOURCE,
    XeniumExperiment,
    XeniumInputs,
    locate_inputs,
    read_experiment,
)
from hest_zarr.converters._xenium_labels import (
    CELL_LABELS,
    LABEL_CELL_IDS,
    NUCLEUS_LABELS,
    XeniumMasks,
    check_label_cells,
    decode_cell_ids,
    label_cell_ids_table,
    label_elements,
    read_cells_zarr,
)
from hest_zarr.converters._xenium_matrix import (
    CELL_PROTEIN,
    cell_table,
    protein_element,
    protein_table,
    read_cell_feature_matrix,
    read_protein_scaling_factor,
    split_protein_features,
)
from hest_zarr.converters._xenium_shapes import (
    CENTROID_CIRCLES,
    CENTROID_CIRCLES_NOTE,
    centroid_circles,
    read_boundaries,
    read_cells,
)
from hest_zarr.converters._xenium_transcripts import read_transcripts
from hest_zarr.elements import Elements, build_sample, get_record, set_record
from hest_zarr.errors import InputError
from hest_zarr.schemas import ElementRecord, Provenance, SampleMetadata

__all__ = [
    "CELL_LABELS",
    "CELL_PROTEIN",
    "DEFAULT_PIXEL_SIZE_UM",
    "LABEL_CELL_IDS",
    "NUCLEUS_LABELS",
    "XeniumAlignment",
    "XeniumExperiment",
    "XeniumFrame",
    "XeniumMasks",
    "centroid_circles",
    "decode_cell_ids",
    "label_cell_ids_table",
    "label_elements",
    "protein_table",
    "read_alignment",
    "read_boundaries",
    "read_cell_feature_matrix",
    "read_cells",
    "read_cells_zarr",
    "read_experiment",
    "read_morphology",
    "read_protein_scaling_factor",
    "read_transcripts",
    "read_xenium",
    "split_protein_features",
]

#: Stack level of the warnings of :func:`read_xenium`'s steps, so that they name the line calling :func:`read_xenium`
#: (1: the function that warns, 2: the step, 3: ``read_xenium``, 4: its caller).
_USER_STACKLEVEL = 4


def read_xenium(
    path: str | Path,
    *,
    he_image: str | Path | np.ndarray | da.Array | None = None,
    alignment: str | Path | None = None,
    sample_id: str | None = None,
    metadata: SampleMetadata | None = None,
    labels: bool = True,
) -> SpatialData:
    """Read a Xenium output folder into a sample, optionally placed on its H&E.

    Parameters
    ----------
    path
        The Xenium output folder (``transcripts``, ``cell_boundaries``, ``cell_feature_matrix.h5``...). Only the
        matrix and the cell boundaries or the cell summary (``cells.parquet`` / ``cells.csv.gz``) are required.
    he_image
        The H&E: a slide file (any format :func:`~hest_zarr.converters.slides.slide_image` reads) or a
        ``(3, y, x)`` uint8 array. Requires ``alignment``; ``global`` is then the H&E's pixels.
    alignment
        Xenium Explorer's 3x3 matrix CSV (H&E pixels -> Xenium pixels) or a keypoints CSV
        (``fixedX, fixedY`` um, ``alignmentX, alignmentY`` H&E pixels).
    sample_id
        Sample id (default: the folder name).
    metadata
        Known metadata (e.g. the HEST-1k CSV row); converter-measured fields fill its gaps.
    labels
        Read the label rasters of ``cells.zarr.zip`` when the folder has one (lazily; they are written with the
        store).

    Returns
    -------
    The sample: ``transcripts`` (points, um), ``cells`` and ``nuclei`` (polygons, um; without boundary files,
    ``cells`` are circles at the cell summary's centroids, see :func:`centroid_circles`), ``cell_expression``
    (raw counts of genes and controls annotating ``cells``), ``dapi`` when a morphology image exists, ``he`` when
    given. With Xenium Protein features, ``cell_protein`` (float intensities, the h5's ``protein_scaling_factor``
    divided out, annotating ``cells``). With ``cells.zarr.zip``, ``nucleus_labels`` and ``cell_labels`` (label
    rasters on the morphology pixels) and ``label_cell_ids`` (label value -> cell id, see
    :func:`label_cell_ids_table`).

    Raises
    ------
    InputError
        A missing or unreadable required file (cell-feature matrix; cell boundaries or, without them, a cell summary
        with centroids and areas), an unreadable optional file (transcripts, nucleus boundaries...), an H&E without
        alignment (or the reverse), a bad alignment, an alignment that puts no cell on the H&E, counts whose
        cells are not in ``cells``, an unreadable ``cells.zarr.zip`` or one whose labels name cells not in ``cells``.

    Examples
    --------
    >>> sdata = read_xenium("xenium_outs", he_image="he.ome.tif", alignment="he_alignment.csv")  # doctest: +SKIP
    >>> hest_zarr.write(sdata, "TENX95.zarr")  # doctest: +SKIP

    """
    root = _xenium_folder(path, he_image, alignment)
    experiment = read_experiment(root)
    inputs = locate_inputs(root, experiment)
    placement = None
    if alignment is not None and he_image is not None:  # read first: a bad H&E or alignment fails fast
        placement = _read_placement(he_image, alignment, experiment)
    frame = placement.frame if placement is not None else XeniumFrame.morphology(experiment.pixel_size_um)
    parts = _Parts(experiment, frame, inputs.absent_inputs())
    cells = _add_cells(parts, inputs)
    if inputs.transcripts is not None:
        transcripts = read_transcripts(inputs.transcripts, frame=frame)
        parts.add("points", Elements.TRANSCRIPTS, transcripts, parts.read_from(inputs.transcripts))
    nb_genes = _add_expression(parts, inputs, cells)
    if labels and inputs.cells_zarr is not None:
        _add_labels(parts, inputs.cells_zarr, cells)
    if inputs.morphology is not None:
        _add_morphology(parts, inputs.morphology, cells)
    measured: dict[str, Any] = {
        "id": sample_id or root.name,
        "st_technology": "Xenium",
        "species": experiment.species,
        "preservation_method": experiment.preservation_method,
    }
    if placement is not None:
        _place_on_he(parts, placement, cells)
        measured.update(placement.measured, pixel_size_um_estimated=frame.pixel_size_um)
    measured["nb_genes"] = nb_genes
    return parts.build(measured, metadata)


def _xenium_folder(
    path: str | Path, he_image: str | Path | np.ndarray | da.Array | None, alignment: str | Path | None
) -> Path:
    """Return the folder; refuse one that does not exist, or an H&E without its alignment (or the reverse)."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: no such directory (expected a Xenium output folder)")
    if (he_image is None) != (alignment is None):
        given, lacking = ("he_image", "alignment") if alignment is None else ("alignment", "he_image")
        raise InputError(f"{root}: {given} given without {lacking}; an H&E is placed on Xenium only by its alignment")
    return root


# --------------------------------------------------------------------------------------------- the parts of a sample
@dataclass
class _Parts:
    """The elements of the sample being read, by kind, and what its record will say of each.

    ``elements`` go to :func:`~hest_zarr.elements.build_sample`; ``later`` (labels, then the table annotating them)
    are added after it, which takes no labels: the label table must not precede the labels it annotates.
    """

    experiment: XeniumExperiment
    frame: XeniumFrame
    absent: dict[str, list[str]]
    elements: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"images": {}, "shapes": {}, "points": {}, "tables": {}}
    )
    later: dict[str, dict[str, Any]] = field(default_factory=lambda: {"labels": {}, "tables": {}})
    inputs: dict[str, list[str]] = field(default_factory=dict)
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    estimated_errors_um: dict[str, float] = field(default_factory=dict)

    def add(
        self,
        kind: str,
        name: str,
        element: Any,
        inputs: list[str],
        parameters: dict[str, Any] | None = None,
        *,
        later: bool = False,
    ) -> None:
        """Add an element; its parameters default to the experiment's and the absent inputs."""
        (self.later if later else self.elements)[kind][name] = element
        self.inputs[name] = inputs
        self.parameters[name] = (
            parameters if parameters is not None else {**self.experiment.provenance(), **self.absent}
        )

    def read_from(self, path: Path) -> list[str]:
        """Return the inputs of an element read from ``path`` with ``experiment.xenium``."""
        return [str(path), *([self.experiment.source] if self.experiment.source else [])]

    def build(self, measured: dict[str, Any], known_metadata: SampleMetadata | None) -> SpatialData:
        """Assemble the sample and its record."""
        sample = build_sample(
            converter=SOURCE,
            metadata=measured,
            pixel_size_um=self.frame.pixel_size_um,
            inputs=self.inputs,
            known_metadata=known_metadata,
            **self.elements,
            parameters=self.parameters,
            methods=self.methods,
            estimated_errors_um=self.estimated_errors_um,
        )
        record = get_record(sample)
        for kind, group in self.later.items():
            for name, element in group.items():
                getattr(sample, kind)[name] = element
                record.elements[name] = ElementRecord(
                    kind=kind,
                    provenance=Provenance(
                        converter=SOURCE,
                        inputs=self.inputs[name],
                        method=self.methods.get(name),
                        parameters=dict(self.parameters[name]),
                        estimated_error_um=self.estimated_errors_um.get(name),
                    ),
                )
        set_record(sample, record)
        return sample


@dataclass(frozen=True)
class _Cells:
    """The ``cells`` element, the file it was drawn from, and the cell summary (path and table) when there is one."""

    shapes: GeoDataFrame
    path: Path
    summary: tuple[Path, pd.DataFrame] | None


def _add_cells(parts: _Parts, inputs: XeniumInputs) -> _Cells:
    """Add ``cells`` (boundaries, else circles from the cell summary) and ``nuclei`` when their file exists."""
    summary = (inputs.summary, read_cells(inputs.summary)) if inputs.summary is not None else None
    if inputs.boundaries is not None:
        cells = _Cells(read_boundaries(inputs.boundaries, frame=parts.frame), inputs.boundaries, summary)
        parts.add("shapes", Elements.CELLS, cells.shapes, parts.read_from(cells.path))
    else:
        cells = _Cells(centroid_circles(*summary, frame=parts.frame), summary[0], summary)
        parameters = {**parts.experiment.provenance(), **parts.absent, "cell_geometry": CENTROID_CIRCLES_NOTE}
        parts.add("shapes", Elements.CELLS, cells.shapes, parts.read_from(cells.path), parameters)
        parts.methods[Elements.CELLS] = CENTROID_CIRCLES
    if inputs.nuclei is not None:
        nuclei = read_boundaries(inputs.nuclei, frame=parts.frame)
        parts.add("shapes", Elements.NUCLEI, nuclei, parts.read_from(inputs.nuclei))
    return cells


def _add_expression(parts: _Parts, inputs: XeniumInputs, cells: _Cells) -> int:
    """Add ``cell_expression`` (genes and controls) and, with protein features, ``cell_protein``; count the genes."""
    counts, protein = split_protein_features(read_cell_feature_matrix(inputs.counts))
    table = cell_table(counts, inputs.counts, cells.shapes, cells.path, cells.summary)
    summary_inputs = [str(inputs.summary)] if inputs.summary is not None else []
    parts.add("tables", Elements.CELL_EXPRESSION, table, [str(inputs.counts), *summary_inputs])
    if protein is not None:
        protein_values, parameters = protein_element(
            protein, inputs.counts, parts.experiment, stacklevel=_USER_STACKLEVEL
        )
        parts.add("tables", CELL_PROTEIN, protein_values, [str(inputs.counts)], parameters)
    return int((~counts.var["is_control"]).sum())


def _add_labels(parts: _Parts, path: Path, cells: _Cells) -> None:
    """Add the label rasters of ``cells.zarr.zip`` and, when the file maps labels to cells, ``label_cell_ids``."""
    masks = read_cells_zarr(path)
    check_label_cells(masks, cells.shapes, cells.path)
    parameters = {**parts.experiment.provenance(), **masks.provenance()}
    for name, raster in label_elements(masks, parts.frame).items():
        parts.add("labels", name, raster, parts.read_from(path), dict(parameters), later=True)
    if masks.layout != "none":
        table = label_cell_ids_table(masks)
        parts.add("tables", LABEL_CELL_IDS, table, parts.read_from(path), dict(parameters), later=True)


def _add_morphology(parts: _Parts, path: Path, cells: _Cells) -> None:
    """Add the ``dapi`` image; warn when it does not span the cells."""
    dapi = read_morphology(path, frame=parts.frame)
    covers = warn_unless_image_covers(
        path, dapi, cells.shapes, parts.frame.morphology_pixel_size_um, stacklevel=_USER_STACKLEVEL
    )
    parts.add(
        "images", Elements.DAPI, dapi, parts.read_from(path), {**parts.experiment.provenance(), "covers_cells": covers}
    )


# --------------------------------------------------------------------------------------------- on the H&E
@dataclass(frozen=True)
class _Placement:
    """An H&E and its alignment: the frame they give, the ``he`` element, its inputs and what it measures."""

    alignment: XeniumAlignment
    frame: XeniumFrame
    he: DataArray
    he_inputs: list[str]
    measured: dict[str, Any]


def _read_placement(
    he_image: str | Path | np.ndarray | da.Array, alignment: str | Path, experiment: XeniumExperiment
) -> _Placement:
    """Read the alignment, then the H&E at the pixel size the alignment gives it."""
    aligned = read_alignment(alignment, xenium_pixel_size_um=experiment.pixel_size_um)
    frame = XeniumFrame.aligned(aligned, experiment.pixel_size_um)
    he, measured = he_image_element(he_image, frame.pixel_size_um)
    he_inputs = [str(he_image)] if isinstance(he_image, str | Path) else []
    return _Placement(aligned, frame, he, he_inputs, measured)


def _place_on_he(parts: _Parts, placement: _Placement, cells: _Cells) -> None:
    """Record the alignment in every element it places (all but tables), refuse one missing the cells, add ``he``."""
    aligned = placement.alignment
    placed = [*parts.elements["shapes"], *parts.elements["points"], *parts.elements["images"], *parts.later["labels"]]
    for name in placed:
        parts.methods[name] = aligned.method
        parts.inputs[name].append(aligned.source)
        parts.parameters[name].update(aligned.provenance())
    parts.parameters[Elements.CELLS]["cells_on_he"] = cells_on_he(aligned, placement.frame, cells.shapes, placement.he)
    parts.elements["images"][Elements.HE] = placement.he
    parts.inputs[Elements.HE] = placement.he_inputs
    if aligned.estimated_error_um is not None:
        parts.estimated_errors_um.update(dict.fromkeys(parts.methods, aligned.estimated_error_um))
