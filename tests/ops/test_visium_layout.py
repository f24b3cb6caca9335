"""The generated Visium slide layouts against Loupe's slide templates (HEST-Library, read here, never bundled)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from hest_zarr.errors import InputError
from hest_zarr.ops.visium_layout import visium_layout
from tests.conftest import shared

#: Template corner names (``fidName``; upper case in the 11 mm file) -> layout corner names.
TEMPLATE_CORNERS = {"hourglass": "hourglass", "hexfilled": "hex_filled", "triangle": "triangle", "hexopen": "hex_open"}
TOLERANCE_UM = 1e-6


def _template(name: str) -> dict:
    return json.loads(shared("hest", "spot_templates", name).read_text())


@pytest.mark.parametrize(
    ("slide", "template", "n_spots", "n_fiducials"),
    [("6.5mm", "template65.json", 4992, 555), ("11mm", "template11.json", 14336, 812)],
)
def test_layout_matches_template(slide: str, template: str, n_spots: int, n_fiducials: int) -> None:
    layout = visium_layout(slide)
    data = _template(template)

    spots = pd.DataFrame(data["oligo"]).set_index(["row", "col"]).sort_index()
    generated = layout.spots.set_index(["array_row", "array_col"]).sort_index()
    assert len(spots) == len(generated) == n_spots
    assert spots.index.equals(generated.index)
    assert np.abs(generated["x_um"].to_numpy() - spots["x"].to_numpy()).max() <= TOLERANCE_UM
    assert np.abs(generated["y_um"].to_numpy() - spots["y"].to_numpy()).max() <= TOLERANCE_UM

    fiducials = pd.DataFrame(data["fiducial"]).set_index(["row", "col"]).sort_index()
    dots = layout.fiducials.set_index(["row", "col"]).sort_index()
    assert len(fiducials) == len(dots) == n_fiducials
    assert fiducials.index.equals(dots.index)
    assert np.abs(dots["x_um"].to_numpy() - fiducials["x"].to_numpy()).max() <= TOLERANCE_UM
    assert np.abs(dots["y_um"].to_numpy() - fiducials["y"].to_numpy()).max() <= TOLERANCE_UM
    names = fiducials["fidName"].fillna("").str.lower().map(lambda name: TEMPLATE_CORNERS.get(name, ""))
    assert (names.to_numpy() == dots["corner"].to_numpy()).all()


@pytest.mark.parametrize("slide", ["6.5mm", "11mm"])
def test_frame_nodes_cover_the_template_dots_and_corners(slide: str) -> None:
    layout = visium_layout(slide)
    nodes = layout.frame_nodes()
    node_set = set(zip(nodes["row"], nodes["col"], strict=True))
    assert set(zip(layout.fiducials["row"], layout.fiducials["col"], strict=True)) <= node_set
    assert ((nodes["row"] + nodes["col"]) % 2 == 0).all()
    centroids = {name: layout.corner_centroid_um(name) for name in layout.corner_windows()}
    # hourglass top left, hex_filled top right, triangle bottom left, hex_open bottom right (x right, y down)
    assert centroids["hourglass"][0] < centroids["hex_filled"][0]
    assert centroids["triangle"][0] < centroids["hex_open"][0]
    assert centroids["hourglass"][1] < centroids["triangle"][1]
    assert centroids["hex_filled"][1] < centroids["hex_open"][1]


def test_unknown_slide_is_an_error() -> None:
    with pytest.raises(InputError, match="unknown Visium slide '3mm'"):
        visium_layout("3mm")
