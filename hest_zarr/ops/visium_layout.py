"""Visium slide layouts: the spot lattice and the fiducial frame of a capture area, generated from a few constants.

A Visium capture area is a hexagonal lattice of spots inside a frame of fiducial dots, both in slide micrometres
(x to the right, y down, as in Loupe's slide templates):

- **Spots.** ``array_col`` steps by 2 between neighbours of one row (50 um per unit, 100 um centre to centre) and
  ``array_row`` by 1 between rows; only positions with ``array_row + array_col`` even hold a spot.
- **Fiducial frame.** A coarser hexagonal lattice of dots (150 um apart) on nodes ``(row, col)`` with ``row + col``
  even: three-node-wide bands along the four sides, separated by one empty node from the four corner patterns
  (3 rows x 5 columns each): the *hourglass* (all 8 nodes, top left), the *filled hexagon* (all 7 nodes, top
  right), the *triangle* (top row's two outer nodes empty, bottom left) and the *open hexagon* (centre empty,
  bottom right). Rotation and mirroring of an image are resolved by which pattern sits where.
- **Band code.** Some band nodes are left empty, a code that differs between slide versions (the CytAssist 6.5 mm
  slide of the perik sample has another code than the slides of Loupe's templates). :attr:`SlideLayout.fiducials`
  holds the dots of the template slides; :meth:`SlideLayout.frame_nodes` gives every node of the bands and corner
  patterns, the positions a dot may occupy on any version.

The constants below were measured from Loupe's slide templates (``template65.json``, ``template11.json`` of the
HEST-Library, CC BY-NC-SA: read by the tests, never bundled); ``tests/ops/test_visium_layout.py`` checks that the
generated layouts reproduce every spot and fiducial of those files exactly (to 1e-6 um).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import numpy as np
import pandas as pd

from hest_zarr.elements import Keys
from hest_zarr.errors import InputError

#: The four corner patterns of a Visium capture-area frame (hourglass top left, filled hexagon top right, triangle
#: bottom left, open hexagon bottom right on an unrotated, unmirrored slide).
CornerName = Literal["hourglass", "hex_filled", "triangle", "hex_open"]
CORNER_NAMES: tuple[CornerName, ...] = ("hourglass", "hex_filled", "triangle", "hex_open")
SlideName = Literal["6.5mm", "11mm"]
SLIDE_NAMES: tuple[SlideName, ...] = ("6.5mm", "11mm")
#: Rows x columns of a corner pattern's window of frame nodes.
CORNER_WINDOW = (3, 5)
#: Frame nodes between a corner window and the bands next to it (one empty node, then the band).
_BAND_INSET_ROWS = 4
_BAND_INSET_COLS = 7
#: Width of a side band, in frame columns (three dots on alternate rows).
_SIDE_BAND_COLS = 6


@dataclass(frozen=True)
class _SlideConstants:
    """The measured geometry of one capture-area size (micrometres, frame and spot lattice units)."""

    frame_rows: int
    frame_cols: int
    frame_origin_um: tuple[float, float]  # (x, y) of frame node (0, 0) on the slide
    fiducial_col_um: float  # x step of one frame column
    fiducial_row_um: float  # y step of one frame row
    fiducial_diameter_um: float
    spot_rows: int
    spot_cols: int
    spot_offset_um: tuple[float, float]  # (x, y) of spot (0, 0) from frame node (0, 0)
    spot_col_um: float
    spot_row_um: float
    #: Band nodes left empty on the template slides: ``(row, first col, last col, step)`` runs along a row and
    #: ``(col, first row, last row, step)`` runs along a column.
    empty_row_runs: tuple[tuple[int, int, int, int], ...]
    empty_col_runs: tuple[tuple[int, int, int, int], ...]


#: The constants of each slide side by side, in the order of :data:`SLIDE_NAMES` (6.5 mm, 11 mm).
_MEASURED: dict[str, tuple[Any, Any]] = {
    "frame_rows": (59, 93),
    "frame_cols": (100, 164),
    "frame_origin_um": ((4288.0, 38652.0), (4288.0, 27442.0)),
    "fiducial_col_um": (75.0, 75.5),
    "fiducial_row_um": (130.0, 130.0),
    "fiducial_diameter_um": (105.0, 105.0),
    "spot_rows": (78, 128),
    "spot_cols": (128, 224),
    "spot_offset_um": ((537.0, 421.0), (578.0, 488.0)),
    "spot_col_um": (50.0, 50.0),
    "spot_row_um": (87.0, 86.5),
    "empty_row_runs": (
        ((1, 11, 11, 4), (57, 11, 91, 4)),
        ((0, 12, 152, 4), (2, 10, 154, 4), (91, 11, 155, 4)),
    ),
    "empty_col_runs": (
        ((2, 52, 52, 4), (97, 5, 29, 4), (97, 31, 51, 4)),
        ((0, 6, 6, 4), (1, 7, 87, 4), (5, 7, 87, 4), (158, 88, 88, 4), (161, 5, 85, 4)),
    ),
}
_CONSTANTS: dict[SlideName, _SlideConstants] = {
    slide: _SlideConstants(**{name: values[column] for name, values in _MEASURED.items()})
    for column, slide in enumerate(SLIDE_NAMES)
}


@dataclass(frozen=True)
class SlideLayout:
    """Spots and fiducial frame of one Visium capture-area size, in slide micrometres.

    Attributes
    ----------
    name
        ``"6.5mm"`` or ``"11mm"``.
    spots
        One row per spot: ``array_row``, ``array_col``, ``x_um``, ``y_um``.
    fiducials
        One row per fiducial dot of the template slides: ``row``, ``col`` (frame node), ``x_um``, ``y_um`` and
        ``corner`` (the corner pattern it belongs to, ``""`` for band dots).
    frame_rows, frame_cols
        Size of the frame lattice in nodes.
    fiducial_col_um, fiducial_row_um
        Micrometres per frame column and per frame row.
    frame_origin_um
        Slide position ``(x, y)`` of frame node ``(0, 0)``.
    fiducial_diameter_um
        Diameter of a fiducial dot.

    """

    name: SlideName
    spots: pd.DataFrame
    fiducials: pd.DataFrame
    frame_rows: int
    frame_cols: int
    fiducial_col_um: float
    fiducial_row_um: float
    frame_origin_um: tuple[float, float]
    fiducial_diameter_um: float

    @property
    def fiducial_pitch_um(self) -> float:
        """Distance between neighbouring fiducial dots along a row (two frame columns)."""
        return 2 * self.fiducial_col_um

    def node_um(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Slide positions ``(n, 2)`` (x, y in um) of frame nodes.

        Examples
        --------
        >>> visium_layout("6.5mm").node_um(np.array([0, 58]), np.array([0, 99])).tolist()
        [[4288.0, 38652.0], [11713.0, 46192.0]]

        """
        x = self.frame_origin_um[0] + np.asarray(cols, dtype=np.float64) * self.fiducial_col_um
        y = self.frame_origin_um[1] + np.asarray(rows, dtype=np.float64) * self.fiducial_row_um
        return np.column_stack([x, y])

    def corner_windows(self) -> dict[CornerName, tuple[int, int]]:
        """Top-left frame node ``(row, col)`` of each corner pattern's 3 x 5 window."""
        return _corner_windows(self.frame_rows, self.frame_cols)

    def corner_nodes(self, name: CornerName) -> tuple[np.ndarray, np.ndarray]:
        """Frame nodes ``(rows, cols)`` holding the dots of one corner pattern.

        Examples
        --------
        >>> rows, cols = visium_layout("6.5mm").corner_nodes("triangle")
        >>> list(zip(rows.tolist(), cols.tolist()))
        [(56, 2), (57, 1), (57, 3), (58, 0), (58, 2), (58, 4)]

        """
        return _corner_nodes(name, self.frame_rows, self.frame_cols)

    def corner_centroid_um(self, name: CornerName) -> np.ndarray:
        """Centroid ``(x, y)`` in um of one corner pattern's dots (the point a corner detection locates)."""
        return self.node_um(*self.corner_nodes(name)).mean(axis=0)

    def frame_nodes(self) -> pd.DataFrame:
        """Every frame node that may hold a dot: side bands (whatever their code) and corner patterns.

        Returns
        -------
        Columns ``row``, ``col``, ``corner`` (``""`` for band nodes).

        Examples
        --------
        >>> nodes = visium_layout("6.5mm").frame_nodes()
        >>> len(nodes), int((nodes["corner"] != "").sum())
        (591, 27)

        """
        return _frame_nodes(self.frame_rows, self.frame_cols)

    def empty_nodes(self) -> pd.DataFrame:
        """Frame-lattice nodes that never hold a dot: corner-pattern holes and the nodes bordering the frame.

        A fit that slipped by whole lattice steps puts dots on them.

        Returns
        -------
        Columns ``row``, ``col``, ``kind`` (``"hole"`` inside a corner window, ``"gap"`` next to the frame).

        Examples
        --------
        >>> empty = visium_layout("6.5mm").empty_nodes()
        >>> empty["kind"].value_counts().to_dict()
        {'gap': 432, 'hole': 3}

        """
        return _empty_frame_nodes(self.frame_rows, self.frame_cols)


def _corner_windows(frame_rows: int, frame_cols: int) -> dict[CornerName, tuple[int, int]]:
    last_row, last_col = frame_rows - CORNER_WINDOW[0], frame_cols - CORNER_WINDOW[1]
    return {
        "hourglass": (0, 0),
        "hex_filled": (0, last_col),
        "triangle": (last_row, 0),
        "hex_open": (last_row, last_col),
    }


def _corner_nodes(name: CornerName, frame_rows: int, frame_cols: int) -> tuple[np.ndarray, np.ndarray]:
    top, left = _corner_windows(frame_rows, frame_cols)[name]
    rows, cols = _lattice_nodes(top, left, *CORNER_WINDOW)
    if name == "triangle":  # the top row's two outer nodes are empty
        keep = ~((rows == top) & ((cols == left) | (cols == left + CORNER_WINDOW[1] - 1)))
    elif name == "hex_open":  # the centre is empty
        keep = ~((rows == top + 1) & (cols == left + 2))
    else:
        keep = np.ones(rows.shape, dtype=bool)
    return rows[keep], cols[keep]


def _frame_nodes(frame_rows: int, frame_cols: int) -> pd.DataFrame:
    regions = [  # (first row, last row, first col, last col) of the top, bottom, left and right bands
        (0, 2, _BAND_INSET_COLS, frame_cols - 1 - _BAND_INSET_COLS),
        (frame_rows - 3, frame_rows - 1, _BAND_INSET_COLS, frame_cols - 1 - _BAND_INSET_COLS),
        (_BAND_INSET_ROWS, frame_rows - 1 - _BAND_INSET_ROWS, 0, _SIDE_BAND_COLS - 1),
        (_BAND_INSET_ROWS, frame_rows - 1 - _BAND_INSET_ROWS, frame_cols - _SIDE_BAND_COLS, frame_cols - 1),
    ]
    parts = []
    for first_row, last_row, first_col, last_col in regions:
        rows, cols = _lattice_nodes(first_row, first_col, last_row - first_row + 1, last_col - first_col + 1)
        parts.append(pd.DataFrame({"row": rows, "col": cols, "corner": ""}))
    for name in CORNER_NAMES:
        rows, cols = _corner_nodes(name, frame_rows, frame_cols)
        parts.append(pd.DataFrame({"row": rows, "col": cols, "corner": name}))
    return pd.concat(parts, ignore_index=True)


def _empty_frame_nodes(frame_rows: int, frame_cols: int) -> pd.DataFrame:
    margin = 2  # even: grid parity is node parity
    shape = (frame_rows + 2 * margin, frame_cols + 2 * margin)
    rows, cols = np.indices(shape)
    on_lattice = (rows + cols) % 2 == 0
    nodes = _frame_nodes(frame_rows, frame_cols)
    frame = np.zeros(shape, dtype=bool)
    frame[nodes["row"] + margin, nodes["col"] + margin] = True
    windows = np.zeros(shape, dtype=bool)
    for top, left in _corner_windows(frame_rows, frame_cols).values():
        windows[top + margin : top + margin + CORNER_WINDOW[0], left + margin : left + margin + CORNER_WINDOW[1]] = True
    windows &= on_lattice
    occupied = frame | windows
    near = np.zeros(shape, dtype=bool)
    for d_row, d_col in ((0, 2), (0, -2), (1, 1), (1, -1), (-1, 1), (-1, -1)):  # hexagonal neighbours
        near |= np.roll(occupied, (d_row, d_col), axis=(0, 1))
    parts = []
    for kind, grid in (("hole", windows & ~frame), ("gap", near & ~occupied & on_lattice)):
        grid_rows, grid_cols = np.nonzero(grid)
        parts.append(pd.DataFrame({"row": grid_rows - margin, "col": grid_cols - margin, "kind": kind}))
    return pd.concat(parts, ignore_index=True)


def _lattice_nodes(top: int, left: int, n_rows: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``(rows, cols)`` with ``row + col`` even of a rectangle of the lattice, row by row."""
    rows, cols = np.mgrid[top : top + n_rows, left : left + n_cols]
    on_lattice = (rows + cols) % 2 == 0
    return rows[on_lattice], cols[on_lattice]


def _empty_nodes(constants: _SlideConstants) -> set[tuple[int, int]]:
    empty = set()
    for row, first, last, step in constants.empty_row_runs:
        empty.update((row, col) for col in range(first, last + 1, step))
    for col, first, last, step in constants.empty_col_runs:
        empty.update((row, col) for row in range(first, last + 1, step))
    return empty


def resolve_slides(slide: str) -> tuple[SlideName, ...]:
    """Return the slide layouts a ``slide`` argument names: one, or both for ``"auto"``.

    Examples
    --------
    >>> resolve_slides("auto"), resolve_slides("11mm")
    (('6.5mm', '11mm'), ('11mm',))

    """
    if slide == "auto":
        return SLIDE_NAMES
    if slide not in SLIDE_NAMES:
        raise InputError(f"unknown Visium slide {slide!r}; expected 'auto' or one of {list(SLIDE_NAMES)}")
    return (slide,)


@cache
def visium_layout(slide: SlideName) -> SlideLayout:
    """Generate the layout of a Visium capture area: spot lattice and fiducial frame in slide micrometres.

    Parameters
    ----------
    slide
        ``"6.5mm"`` (4,992 spots, 78 rows x 128 columns) or ``"11mm"`` (14,336 spots, 128 x 224).

    Returns
    -------
    The layout (cached; treat its tables as read-only).

    Raises
    ------
    InputError
        For another slide name.

    Examples
    --------
    >>> layout = visium_layout("6.5mm")
    >>> len(layout.spots), len(layout.fiducials)
    (4992, 555)
    >>> layout.spots.iloc[1][["array_row", "array_col", "x_um", "y_um"]].tolist()
    [0.0, 2.0, 4925.0, 39073.0]

    """
    if slide not in _CONSTANTS:
        raise InputError(f"unknown Visium slide {slide!r}; expected one of {list(SLIDE_NAMES)}")
    constants = _CONSTANTS[slide]
    rows, cols = _lattice_nodes(0, 0, constants.spot_rows, constants.spot_cols)
    origin_x = constants.frame_origin_um[0] + constants.spot_offset_um[0]
    origin_y = constants.frame_origin_um[1] + constants.spot_offset_um[1]
    spots = pd.DataFrame(
        {
            Keys.ARRAY_ROW: rows,
            Keys.ARRAY_COL: cols,
            "x_um": origin_x + cols * constants.spot_col_um,
            "y_um": origin_y + rows * constants.spot_row_um,
        }
    )
    nodes = _frame_nodes(constants.frame_rows, constants.frame_cols)
    empty = _empty_nodes(constants)
    fiducials = nodes[[node not in empty for node in zip(nodes["row"], nodes["col"], strict=True)]]
    fiducials = fiducials.reset_index(drop=True)
    fiducials.insert(2, "x_um", constants.frame_origin_um[0] + fiducials["col"] * constants.fiducial_col_um)
    fiducials.insert(3, "y_um", constants.frame_origin_um[1] + fiducials["row"] * constants.fiducial_row_um)
    return SlideLayout(
        name=slide,
        spots=spots,
        fiducials=fiducials,
        frame_rows=constants.frame_rows,
        frame_cols=constants.frame_cols,
        fiducial_col_um=constants.fiducial_col_um,
        fiducial_row_um=constants.fiducial_row_um,
        frame_origin_um=constants.frame_origin_um,
        fiducial_diameter_um=constants.fiducial_diameter_um,
    )
