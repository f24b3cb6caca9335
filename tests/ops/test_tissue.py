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
from spatialdata.transformations import Identity, get_transformation

import hest_zarr
from hest_zarr.converters import read_visium
from hest_zarr.converters.st_v1 import read_st_v1
from hest_zarr.errors import InputError
from hest_zarr.ops.tissue import (
    f1_score,
    ink_mask,
    load_deeplab,
    mask_to_polygons,
    segment_tissue,
    spot_tissue_fraction,
    tissue,
)
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


def test_store_operator_on_perik(perik_visium: Path, perik_lowres: np.ndarray, tmp_path: Path) -> None:
    url = hest_zarr.write(read_visium(perik_visium), tmp_path / "perik.zarr")
    before = hest_zarr.open(url)["spot_expression"].copy()
    result = tissue(url)
    sdata = hest_zarr.open(url)
    polygons = sdata["tissue"]
    assert isinstance(get_transformation(polygons, "global"), Identity)
    assert result.level == 0 and result.mask.shape == (600, 600)
    # the polygons are in full-resolution pixels: the lowres mask scaled by 1 / tissue_lowres_scalef
    # global has pixel centres at integers: lowres pixel j is centred on (j + 0.5) / scalef - 0.5
    yy, xx = (np.mgrid[:600, :600] + 0.5) / LOWRES_SCALEF - 0.5
    inside = np.zeros((600, 600), bool)
    for polygon in polygons.geometry:
        inside |= shapely.contains_xy(polygon, xx, yy)
    assert (inside == result.mask).mean() > 0.995  # simplified by 0.5 lowres px
    table = sdata["spot_expression"]
    assert (table.obs["in_tissue_original"] == 1).all()  # the filtered matrix holds in-tissue spots only
    assert int(table.obs["in_tissue"].sum()) == result.in_tissue["spot_expression"]
    assert result.agreement_f1["spot_expression"] >= 0.95  # measured 0.992
    for column in ("spot_id", "array_row", "array_col"):
        assert (table.obs[column].to_numpy() == before.obs[column].to_numpy()).all()
    assert (table.X != before.X).nnz == 0
    provenance = hest_zarr.get_record(sdata).elements
    assert provenance["tissue"].provenance.method == "threshold"
    assert provenance["spot_expression"].provenance.converter == "visium"
    assert provenance["spot_expression"].provenance.parameters["in_tissue"]["source"] == "ops.tissue"
    assert hest_zarr.validate(url) == []
    with pytest.raises(InputError, match="already holds 'tissue'"):
        tissue(url)
    tissue(url, replace=True)
    assert (hest_zarr.open(url)["spot_expression"].obs["in_tissue_original"] == 1).all()


def test_store_operator_on_s3(s3_server, s3_bucket: str, perik_visium: Path) -> None:
    """The same segmentation on a store in object storage (moto's S3 server on loopback)."""
    url = f"{s3_bucket}/perik.zarr"
    options = s3_server.storage_options
    hest_zarr.write(read_visium(perik_visium), url, storage_options=options)
    result = tissue(url, storage_options=options)
    remote = hest_zarr.open(url, storage_options=options)
    assert len(remote["tissue"]) == len(result.polygons) == 2
    assert int(remote["spot_expression"].obs["in_tissue"].sum()) == result.in_tissue["spot_expression"] == 2850
    assert hest_zarr.validate(url, storage_options=options) == []


@pytest.mark.parametrize("section", ["MOB1", "MOB2"])
def test_store_operator_agrees_with_st_spot_detector(section: str, tmp_path: Path) -> None:
    folder = shared("STUtility_ST_v1")
    sample = read_st_v1(
        folder / f"{section}.tsv", alignment=folder / f"alignment_table_{section}.tsv", image=folder / f"{section}.jpg"
    )
    result = tissue(hest_zarr.write(sample, tmp_path / f"{section}.zarr"))
    assert result.agreement_f1["spot_expression"] >= 0.95  # measured 0.981 (MOB1), 0.984 (MOB2)
    assert len(result.polygons) == 1


def test_blank_image_is_refused(scanpy_visium: Path, tmp_path: Path) -> None:
    url = hest_zarr.write(read_visium(scanpy_visium), tmp_path / "scanpy.zarr")  # its hires PNG is all black
    with pytest.raises(InputError, match="no tissue found on 'he' level 0"):
        tissue(url)


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


def test_cli(perik_visium: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hest_zarr.cli import app

    url = hest_zarr.write(read_visium(perik_visium), tmp_path / "perik.zarr")
    result = CliRunner().invoke(app, ["tissue", url])
    assert result.exit_code == 0, result.output
    output = " ".join(result.stdout.split())  # rich wraps long lines
    assert "2 tissue polygon(s) from 'he' level 0" in output
    assert "spot_expression: 2850 spots in tissue, F1 0.992 against the previous in_tissue" in output
    result = CliRunner().invoke(app, ["tissue", url, "--method", "deeplab", "--replace"])
    assert result.exit_code == 1
    assert "error: method='deeplab' needs weights" in result.stderr
