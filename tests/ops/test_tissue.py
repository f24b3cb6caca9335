"""Tissue segmentation against real ground truth: Space Ranger's in_tissue (perik CytAssist) and the ST spot
detector's ``selected`` spots (MOB1, MOB2); robustness to pen ink and fiducial dots drawn onto the real image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from PIL import Image
from skimage.draw import disk, line

import hest_zarr
from hest_zarr.converters import read_visium
from hest_zarr.elements import get_record
from hest_zarr.errors import InputError
from hest_zarr.ops.tissue import f1_score, mask_to_polygons, segment_sample, spot_tissue_fraction
from hest_zarr.ops.tissue_mask import ink_mask, load_deeplab, segment_tissue
from tests.conftest import shared

LOWRES_SCALEF = 0.2  # perik scalefactors_json.json: tissue_lowres_scalef
#: the 55 um capture spot: perik's spot_diameter_fullres spans 70 um on its spot lattice (Space Ranger 3.0 CytAssist)
SPOT_RADIUS_FULLRES = 14.964878633873417 / 2 * 55 / 70


@pytest.fixture(scope="module")
def perik_truth() -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution spot centres (x, y) and Space Ranger's in_tissue of all 4,992 perik spots."""
    positions = pd.read_csv(shared("perik_visium_cytassist_mouse_placenta", "spatial", "tissue_positions.csv"))
    assert int(positions["in_tissue"].sum()) == 2898
    return positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(), positions["in_tissue"].to_numpy(bool)


@pytest.fixture(scope="module")
def perik_lowres() -> np.ndarray:
    path = shared("perik_visium_cytassist_mouse_placenta", "spatial", "tissue_lowres_image.png")
    return np.asarray(Image.open(path).convert("RGB"))


def spot_f1(mask: np.ndarray, centres: np.ndarray, truth: np.ndarray, scale: float) -> float:
    # full-resolution pixel centres are at integers; the mask's pixel i spans [i, i + 1)
    fraction = spot_tissue_fraction(mask, (centres + 0.5) * scale, np.full(len(centres), SPOT_RADIUS_FULLRES * scale))
    return f1_score(fraction >= 0.5, truth)


def test_perik_lowres_agrees_with_space_ranger(perik_lowres: np.ndarray, perik_truth: tuple) -> None:
    result = segment_tissue(perik_lowres)
    assert result.mask.shape == (600, 600)
    assert spot_f1(result.mask, *perik_truth, LOWRES_SCALEF) >= 0.95  # measured 0.973
    assert 0.3 < result.parameters["saturation_threshold"] < 0.6
    assert result.parameters["ink_or_dark_fraction"] > 0.05  # the CytAssist image's dark frame is left out


def test_perik_detected_tissue_image(perik_truth: tuple) -> None:
    """Space Ranger's own overlay (3000 px, grey slide with the detected tissue in red), segmented at 1/4."""
    path = shared("perik_visium_cytassist_mouse_placenta", "spatial", "detected_tissue_image.jpg")
    image = np.asarray(Image.open(path).convert("RGB"))[::4, ::4]
    assert spot_f1(segment_tissue(image).mask, *perik_truth, 0.25) >= 0.95  # measured 0.987


def test_polygons_trace_the_mask_with_holes(perik_lowres: np.ndarray) -> None:
    mask = segment_tissue(perik_lowres).mask
    polygons = mask_to_polygons(mask, simplify_px=0)
    assert len(polygons) == 2  # the embryo and the second section
    assert all(p.is_valid for p in polygons)
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]] + 0.5
    traced = np.zeros(mask.shape, bool)
    for polygon in polygons:
        traced |= shapely.contains_xy(polygon, xx, yy)
    assert (traced == mask).all()
    assert sum(p.area for p in polygons) == pytest.approx(mask.sum(), rel=0.01)
    ring = np.zeros((20, 20), bool)
    ring[2:18, 2:18] = True
    ring[6:14, 6:14] = False
    ring[8:12, 8:12] = True  # an island in the hole
    parts = sorted(mask_to_polygons(ring, simplify_px=0), key=lambda p: p.area)
    assert [len(p.interiors) for p in parts] == [0, 1]
    assert [p.area for p in parts] == pytest.approx([16 - 0.5, (256 - 0.5) - (64 - 0.5)])  # corners cut by 1/8 px


def test_pen_ink_is_left_out(perik_lowres: np.ndarray, perik_truth: tuple) -> None:
    """Blue, green and black strokes drawn (synthetic, 80 % opaque, 5 px wide) over the real lowres image."""
    image = perik_lowres.copy()
    strokes = np.zeros(image.shape[:2], bool)
    for (r0, c0, r1, c1), colour in (
        ((480, 60, 560, 330), (30, 60, 170)),  # blue, across glass
        ((300, 380, 560, 560), (40, 140, 70)),  # green
        ((560, 340, 420, 560), (25, 25, 30)),  # black
        ((100, 20, 420, 260), (30, 60, 170)),  # blue, across the embryo
    ):
        for offset in range(-2, 3):
            rows, cols = line(r0, c0 + offset, r1, c1 + offset)
            strokes[rows, cols] = True
            image[rows, cols] = (0.8 * np.array(colour) + 0.2 * image[rows, cols]).astype(np.uint8)
    clean = segment_tissue(perik_lowres).mask
    inked = segment_tissue(image).mask
    assert not (inked & strokes & ~clean).any()  # no ink on glass becomes tissue
    assert ink_mask(image)[strokes & ~clean].mean() > 0.95
    assert spot_f1(inked, *perik_truth, LOWRES_SCALEF) >= 0.95


def test_blue_ink_is_not_blue_violet_tissue(tmp_path: Path) -> None:
    """MOB's haematoxylin-rich tissue is blue-violet (hue 0.65-0.74): a blue stroke (synthetic) goes, tissue stays."""
    folder = shared("STUtility_ST_v1")
    image = np.asarray(Image.open(folder / "MOB1.jpg").convert("RGB"))[::2, ::2].copy()
    table = pd.read_csv(folder / "alignment_table_MOB1.tsv", sep="\t")
    centres, truth = table[["pixel_x", "pixel_y"]].to_numpy() / 2, table["selected"].to_numpy(bool)
    strokes = np.zeros(image.shape[:2], bool)
    for offset in range(-3, 4):
        rows, cols = line(700, 150 + offset, 820, 800 + offset)
        strokes[rows, cols] = True
    image[strokes] = (0.8 * np.array([30, 60, 170]) + 0.2 * image[strokes]).astype(np.uint8)
    mask = segment_tissue(image).mask
    assert not (mask & strokes).any()
    radius = np.full(len(centres), 50 / 4.385 / 2)  # 100 um spots at 4.385 um/px, halved image
    assert f1_score(spot_tissue_fraction(mask, centres, radius) >= 0.5, truth) >= 0.95


def test_fiducial_dots_are_removed(perik_lowres: np.ndarray, perik_truth: tuple) -> None:
    """A frame of stained dots (synthetic: 5 px across, 2 px apart) drawn on the glass of the real lowres image."""
    image = perik_lowres.copy()
    frame = np.zeros(image.shape[:2], bool)
    for x in range(390, 571, 7):
        for y in (300, 540):
            frame[disk((y, x), 2.5, shape=frame.shape)] = True
    for y in range(300, 541, 7):
        for x in (390, 570):
            frame[disk((y, x), 2.5, shape=frame.shape)] = True
    image[frame] = (150, 60, 150)
    assert segment_tissue(image).mask[frame].any()  # merged by the closing into a frame
    mask = segment_tissue(image, dot_diameter_px=5.0).mask
    assert not mask[frame].any()
    assert spot_f1(mask, *perik_truth, LOWRES_SCALEF) >= 0.95


def test_bad_arguments(perik_lowres: np.ndarray) -> None:
    with pytest.raises(InputError, match=r"expected an RGB image of shape \(y, x, 3\)"):
        segment_tissue(perik_lowres[..., 0])
    with pytest.raises(InputError, match="needs weights"):
        segment_tissue(perik_lowres, method="deeplab")
    with pytest.raises(InputError, match="unknown tissue segmentation method 'otsu'"):
        segment_tissue(perik_lowres, method="otsu")


# ----------------------------------------------------------------------------------------------- deeplab
@pytest.fixture(scope="module")
def deeplab_state() -> dict:
    """A DeepLabV3-ResNet50 state dict generated here (synthetic: no tissue model's weights are in the test data)
    whose classifier ignores its input and scores class 1 (tissue) higher everywhere.
    """
    torch = pytest.importorskip("torch")
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    model = segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=2)
    state = model.state_dict()
    state["classifier.4.weight"] = torch.zeros_like(state["classifier.4.weight"])
    state["classifier.4.bias"] = torch.tensor([0.0, 1.0])
    return state


def test_deeplab_loads_user_weights(deeplab_state: dict, perik_lowres: np.ndarray, tmp_path: Path) -> None:
    import torch

    path = tmp_path / "tissue.pt"
    torch.save(deeplab_state, path)
    image = perik_lowres[::8, ::8]
    result = segment_tissue(image, method="deeplab", weights=path)
    assert result.mask.shape == image.shape[:2] and result.mask.dtype == bool
    assert result.mask.all()  # the weights' classifier says tissue everywhere: they were loaded
    torch.save({"state_dict": {**deeplab_state, "classifier.4.bias": torch.tensor([1.0, 0.0])}}, path)
    assert not segment_tissue(image, method="deeplab", weights=path).mask.any()


def test_deeplab_refuses_wrong_weights(deeplab_state: dict, tmp_path: Path) -> None:
    import torch

    three_classes = {**deeplab_state, "classifier.4.weight": torch.zeros(3, 256, 1, 1)}
    torch.save(three_classes, tmp_path / "three.pt")
    with pytest.raises(InputError, match=r"three\.pt: these weights do not fit deeplabv3_resnet50\(num_classes=2\)"):
        load_deeplab(tmp_path / "three.pt")
    with pytest.raises(InputError, match=r"missing\.pt: no such weights file"):
        load_deeplab(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("not weights")
    with pytest.raises(InputError, match=r"text\.pt: not a PyTorch weights file"):
        load_deeplab(tmp_path / "text.pt")


# ----------------------------------------------------------------------------------------------- sample operator
def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_segment_sample_in_memory(perik_visium: Path, perik_truth: tuple, tmp_path: Path) -> None:
    """The operator on an opened store: the polygons in full-resolution pixels, the flags, nothing written."""
    root = tmp_path / "perik.zarr"
    hest_zarr.write(read_visium(perik_visium), root)
    files = _files(root)
    sdata = hest_zarr.open(root)
    result = segment_sample(sdata)
    assert _files(root) == files
    assert "in_tissue_original" not in sdata.tables["spot_expression"].obs  # the sample is left as it was
    assert result.level == 0 and result.mask.shape == (600, 600) and len(result.polygons) == 2
    assert result.in_tissue == {"spot_expression": 2850}
    assert result.agreement_f1["spot_expression"] >= 0.95  # measured 0.992
    # the polygons are in full-resolution pixels: the lowres mask scaled by 1 / tissue_lowres_scalef
    centres, truth = perik_truth
    inside = np.zeros(len(centres), bool)
    for polygon in result.polygons.geometry:
        inside |= shapely.contains_xy(polygon, centres[:, 0], centres[:, 1])
    assert f1_score(inside, truth) >= 0.95
    update = result.update
    assert sorted(update.elements) == ["spot_expression", "tissue"] and update.replace
    assert update.provenance["tissue"].inputs == ["he/scale0"]  # store-relative: the workflow anchors it
    lowres_pixel_um = get_record(sdata).pixel_size_um / LOWRES_SCALEF
    assert update.provenance["tissue"].estimated_error_um == pytest.approx(lowres_pixel_um)
    table = update.elements["spot_expression"]
    assert int(table.obs["in_tissue"].sum()) == 2850 and (table.obs["in_tissue_original"] == 1).all()
    assert update.provenance["spot_expression"].converter == "visium"  # the table keeps its provenance
    assert update.provenance["spot_expression"].parameters["in_tissue"]["spots_in_tissue"] == 2850


def test_segment_sample_of_a_converter_output(scanpy_visium: Path) -> None:
    """No store at all: the scanpy sample's hires PNG is all black, which the operator refuses by name."""
    sdata = read_visium(scanpy_visium)
    with pytest.raises(InputError, match=r"^sample: no tissue found on 'he' level 0"):
        segment_sample(sdata)
    del sdata.images["he"]
    with pytest.raises(InputError, match=r"^scanpy: no 'he' image to segment"):
        segment_sample(sdata, where="scanpy")
