"""The shipped YOLOv8 fiducial-corner detector on real Visium images (never seen in training).

Ground truth: Space Ranger's spot positions (``tissue_positions.csv``) are an exact affine map of the 6.5 mm slide
layout's spot positions (``template65.json``); the same map takes the layout's corner-pattern dots to the image.
Scaled images map full-resolution pixel centres to their own (``(x + 0.5) * scale - 0.5``).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hest_zarr.errors import InputError
from hest_zarr.ops.visium_layout import CORNER_NAMES

if importlib.util.find_spec("ultralytics") is None:  # not importorskip: importing it alters numpy printing
    pytest.skip("ultralytics is not installed", allow_module_level=True)

from hest_zarr.ops.fiducials_yolo import detect_corners_yolo
from tests.conftest import shared

LAYOUT_CORNER_NAMES = {
    "hourglass": "hourglass",
    "hexFilled": "hex_filled",
    "triangle": "triangle",
    "hexOpen": "hex_open",
}


@pytest.fixture(scope="module")
def corner_truth_fullres() -> dict[str, np.ndarray]:
    """Centroid of each corner pattern's dots in Space Ranger full-resolution pixels (x = column, y = row)."""
    layout = json.loads(shared("hest", "spot_templates", "template65.json").read_text())
    spots = pd.DataFrame(layout["oligo"])
    positions = pd.read_csv(shared("perik_visium_cytassist_mouse_placenta", "spatial", "tissue_positions.csv"))
    matched = positions.merge(spots, left_on=["array_row", "array_col"], right_on=["row", "col"])
    assert len(matched) == 4992
    design = np.c_[matched["x"], matched["y"], np.ones(len(matched))]
    pixels = np.c_[matched["pxl_col_in_fullres"], matched["pxl_row_in_fullres"]]
    affine = np.linalg.lstsq(design, pixels, rcond=None)[0]
    assert np.abs(design @ affine - pixels).max() < 0.01  # an exact affine map
    truth = {}
    for layout_name, name in LAYOUT_CORNER_NAMES.items():
        dots = np.array([[f["x"], f["y"], 1.0] for f in layout["fiducial"] if f.get("fidName") == layout_name])
        truth[name] = dots.mean(0) @ affine
    return truth


def errors_px(image: np.ndarray, truth: dict[str, np.ndarray], scale: float) -> dict[str, float]:
    """Distance of each detected corner from the truth scaled to ``image`` (pixel centres at integers)."""
    found = {d.name: d for d in detect_corners_yolo(image)}
    return {
        name: float(np.hypot(*(np.array([d.x, d.y]) - ((truth[name] + 0.5) * scale - 0.5))))
        for name, d in found.items()
    }


def spatial_image(name: str, mode: str = "RGB") -> np.ndarray:
    return np.asarray(Image.open(shared("perik_visium_cytassist_mouse_placenta", "spatial", name)).convert(mode))


def test_lowres_colour_image(corner_truth_fullres):
    """600x600 colour image at 0.2 x full resolution: the frame spans 320 px, dots are 4.5 px wide and 6.4 px apart.

    The triangle corner (bottom left) lies under the embryo section's edge and the hex-filled one is half covered
    by the other section; all four are found within 1 px (23 um) of the true dot centroid (measured: 0.26-0.50 px).
    """
    errors = errors_px(spatial_image("tissue_lowres_image.png"), corner_truth_fullres, 0.2)
    assert sorted(errors) == sorted(CORNER_NAMES)
    assert max(errors.values()) < 1.0, errors


def test_corners_are_named_by_shape_not_position(corner_truth_fullres):
    """The lowres image turned 90 degrees and mirrored: every corner pattern now sits elsewhere but keeps its name."""
    image = spatial_image("tissue_lowres_image.png")
    height, width = image.shape[:2]
    turned = np.ascontiguousarray(np.rot90(image)[:, ::-1])  # (x, y) -> (height - 1 - y, width - 1 - x)
    found = {d.name: d for d in detect_corners_yolo(turned)}
    assert sorted(found) == sorted(CORNER_NAMES)
    for name, detection in found.items():
        x, y = (corner_truth_fullres[name] + 0.5) * 0.2 - 0.5
        assert np.hypot(detection.x - (height - 1 - y), detection.y - (width - 1 - x)) < 1.5, name


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_space_ranger_fiducial_overlay(corner_truth_fullres, mode):
    """3000x3000 CytAssist image with Space Ranger's red circles drawn around every fiducial, as RGB and 2-D grey.

    All four within 8 full-resolution px (37 um, a quarter of the 150 um dot pitch; measured: 0.5-5.2 px).
    """
    errors = errors_px(spatial_image("aligned_fiducials.jpg", mode), corner_truth_fullres, 1.0)
    assert sorted(errors) == sorted(CORNER_NAMES)
    assert max(errors.values()) < 8.0, errors


def test_space_ranger_tissue_overlay(corner_truth_fullres):
    """3000x3000 greyscale image with Space Ranger's spot circles and tissue tint drawn over it.

    The two free corners are within 2 px (9 um); the hex-filled corner (half under a dark section edge) and the
    triangle (under the embryo's dark rim) are pulled towards their visible dots but stay within 16 px
    (75 um, half the dot pitch; measured 10.4 and 13.5 px), close enough for a grid fit to start from.
    """
    errors = errors_px(spatial_image("detected_tissue_image.jpg"), corner_truth_fullres, 1.0)
    assert sorted(errors) == sorted(CORNER_NAMES)
    assert errors["hourglass"] < 2.0 and errors["hex_open"] < 2.0, errors
    assert max(errors.values()) < 16.0, errors


def test_blank_image_has_no_corners():
    assert detect_corners_yolo(np.full((600, 800, 3), 236, np.uint8)) == []


def test_tissue_without_frame_has_no_confident_corners():
    """A real 1000x1000 H&E tile with no slide frame (held out of the training textures)."""
    tile = np.asarray(Image.open(shared("tiatoolbox", "target_image.png")).convert("RGB"))
    assert detect_corners_yolo(tile, min_score=0.25) == []


def test_bad_inputs_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="uint8"):
        detect_corners_yolo(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(InputError, match="shape"):
        detect_corners_yolo(np.zeros((64, 64, 4), np.uint8))
    with pytest.raises(InputError, match="not found"):
        detect_corners_yolo(np.zeros((64, 64, 3), np.uint8), weights=tmp_path / "missing.pt")
    with pytest.raises(InputError, match="min_score"):
        detect_corners_yolo(np.zeros((64, 64, 3), np.uint8), min_score=1.5)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_text("not a checkpoint")
    with pytest.raises(InputError, match=r"corrupt\.pt: not a loadable YOLO checkpoint"):
        detect_corners_yolo(np.zeros((64, 64, 3), np.uint8), weights=corrupt)
