"""Visium alignment from the fiducial frame against Space Ranger's own spot positions (perik CytAssist sample).

Errors are in micrometres on the slide: full-resolution pixels times 100 um over the spot pitch that Space Ranger's
``tissue_positions.csv`` measures (4.678 um/px; 65 um / ``spot_diameter_fullres`` would say 4.344, 7.7 % less, see
``hest_zarr.ops.pixel_size``). Space Ranger's pixel coordinates put pixel centres at integers and its downscaled
images are area-resampled, so a position ``p`` in an image of scale factor ``s`` is ``(p + 0.5) / s - 0.5`` in
full-resolution pixels. ``aligned_fiducials.jpg`` and ``detected_tissue_image.jpg`` are Space Ranger's 3000 px
overlays of the full-resolution image (scale factor 1), reduced here to the hires scale (2000 px, 7.0 um/px).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import hest_zarr
from hest_zarr.converters import read_sample
from hest_zarr.errors import AlignmentError, InputError
from hest_zarr.ops.align import align_image, align_sample
from hest_zarr.ops.fiducials import CornerDetection, detect_corners_classical, find_frame
from hest_zarr.ops.spot_grid import fit_spot_grid
from hest_zarr.ops.tissue import f1_score
from hest_zarr.ops.visium_layout import visium_layout
from hest_zarr.store import get_record
from tests.conftest import shared

HIRES_SIDE = 2000


@pytest.fixture(scope="module")
def spatial() -> Path:
    return shared("perik_visium_cytassist_mouse_placenta", "spatial")


@pytest.fixture(scope="module")
def truth(spatial: Path) -> pd.DataFrame:
    return pd.read_csv(spatial / "tissue_positions.csv")


@pytest.fixture(scope="module")
def um_per_fullres_px(truth: pd.DataFrame) -> float:
    """Micrometres per full-resolution pixel from Space Ranger's lattice (100 um between neighbouring spots)."""
    design = np.column_stack([truth["array_col"], truth["array_row"], np.ones(len(truth))])
    columns, *_ = np.linalg.lstsq(design, truth[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(), rcond=None)
    return 100.0 / (2 * float(np.hypot(*columns[0])))


@pytest.fixture(scope="module")
def lowres(spatial: Path) -> np.ndarray:
    return np.asarray(Image.open(spatial / "tissue_lowres_image.png").convert("RGB"))


@pytest.fixture(scope="module")
def lowres_result(lowres: np.ndarray):
    return align_image(lowres, detector="classical")


def _hires(path: Path) -> np.ndarray:
    image = np.asarray(Image.open(path).convert("RGB"))
    return cv2.resize(image, (HIRES_SIDE, HIRES_SIDE), interpolation=cv2.INTER_AREA)


def _errors_um(spots: pd.DataFrame, truth: pd.DataFrame, scalef: float, um_per_px: float) -> np.ndarray:
    merged = spots.merge(truth, on=["array_row", "array_col"], validate="one_to_one")
    assert len(merged) == 4992
    dx = (merged["pxl_col"] + 0.5) / scalef - 0.5 - merged["pxl_col_in_fullres"]
    dy = (merged["pxl_row"] + 0.5) / scalef - 0.5 - merged["pxl_row_in_fullres"]
    return np.hypot(dx, dy).to_numpy() * um_per_px


def test_classical_on_the_lowres_image(lowres_result, truth: pd.DataFrame, um_per_fullres_px: float) -> None:
    """Measured: median 3.1 um, max 4.1 um (one lowres pixel is 23.4 um); in_tissue F1 0.974."""
    result = lowres_result
    assert result.detector == "classical" and result.slide == "6.5mm"
    assert len(result.fit.corners_used) >= 3  # the triangle corner is under tissue
    assert result.fit.n_frame_dots > 300
    assert 22.9 < result.fit.um_per_px < 23.9  # 4.678 um/px / 0.2
    errors = _errors_um(result.spots, truth, 0.2, um_per_fullres_px)
    assert np.median(errors) < 5.0
    assert errors.max() < 8.0
    merged = result.spots.merge(truth, on=["array_row", "array_col"], suffixes=("", "_truth"))
    assert f1_score(merged["in_tissue"] == 1, merged["in_tissue_truth"] == 1) > 0.96
    assert 0 < result.fit.residual_um < 15


def test_an_image_over_the_size_limit_is_aligned_on_a_reduced_copy(
    spatial: Path, truth: pd.DataFrame, um_per_fullres_px: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 2000 px hires overlay with the limit lowered to 1000 px: found at half size, reported at full size."""
    import hest_zarr.ops.align as align_module

    image = _hires(spatial / "aligned_fiducials.jpg")
    monkeypatch.setattr(align_module, "ALIGN_MAX_SIDE", 1000)
    result = align_image(image, detector="classical")
    errors = _errors_um(result.spots, truth, HIRES_SIDE / 3000, um_per_fullres_px)
    assert np.median(errors) < 5.0 and errors.max() < 8.0
    assert result.fit.um_per_px == pytest.approx(um_per_fullres_px * 3000 / HIRES_SIDE, rel=0.01)


def test_classical_on_the_hires_scale_overlay(spatial: Path, truth: pd.DataFrame, um_per_fullres_px: float) -> None:
    """Space Ranger's aligned_fiducials.jpg at the hires scale. Measured: median 2.8 um, max 3.8 um (7.0 um/px)."""
    image = _hires(spatial / "aligned_fiducials.jpg")
    result = align_image(image, detector="classical")
    assert set(result.fit.corners_used) == {"hourglass", "hex_filled", "triangle", "hex_open"}
    errors = _errors_um(result.spots, truth, HIRES_SIDE / 3000, um_per_fullres_px)
    assert np.median(errors) < 5.0
    assert errors.max() < 7.0


def test_tissue_over_two_corners_is_refused(spatial: Path) -> None:
    """detected_tissue_image.jpg shows the triangle and half the filled hexagon under dark tissue."""
    image = _hires(spatial / "detected_tissue_image.jpg")
    with pytest.raises(AlignmentError, match=r"found 2 of the 4 corner patterns .*\(hourglass, hex_open\)"):
        align_image(image, detector="classical")


@pytest.mark.parametrize(
    ("transform", "back"),
    [
        (lambda image: np.rot90(image, 1), lambda x, y, h, w: (w - 1 - y, x)),
        (lambda image: np.rot90(image, 2)[:, ::-1], lambda x, y, h, w: (x, h - 1 - y)),
        (lambda image: image.transpose(1, 0, 2), lambda x, y, h, w: (y, x)),
    ],
    ids=["rotated-90", "mirrored-vertically", "transposed"],
)
def test_rotated_and_mirrored_images_give_the_same_spots(lowres: np.ndarray, lowres_result, transform, back) -> None:
    result = align_image(np.ascontiguousarray(transform(lowres)), detector="classical")
    reference = lowres_result.spots.set_index(["array_row", "array_col"])
    spots = result.spots.set_index(["array_row", "array_col"]).loc[reference.index]
    x, y = back(spots["pxl_col"].to_numpy(), spots["pxl_row"].to_numpy(), *lowres.shape[:2])
    assert np.hypot(x - reference["pxl_col"], y - reference["pxl_row"]).max() < 0.05
    assert (spots["in_tissue"].to_numpy() == reference["in_tissue"].to_numpy()).all()


def test_corners_of_the_classical_detector(lowres: np.ndarray) -> None:
    corners = {corner.name: corner for corner in detect_corners_classical(lowres)}
    assert {"hourglass", "hex_filled", "hex_open"} <= set(corners)
    assert (corners["hourglass"].x, corners["hourglass"].y) == pytest.approx((34.2, 141.7), abs=1.0)
    assert (corners["hex_open"].x, corners["hex_open"].y) == pytest.approx((338.4, 453.2), abs=1.0)
    assert all(0.9 <= corner.score <= 1.0 for corner in corners.values())


def _paint_corners(lowres: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    painted = lowres.copy()
    glass = np.median(lowres[470:500, 60:250].reshape(-1, 3), axis=0).astype(np.uint8)
    for top, bottom, left, right in boxes:
        painted[top:bottom, left:right] = glass
    return painted


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("blank", r"no lattice of fiducial dots found"),
        ("two corners painted over", r"found 1 of the 4 corner patterns of the 6.5mm frame \(hex_open\)"),
        ("H&E tile without a frame", r"no lattice of fiducial dots found"),
        ("forced 11 mm on a 6.5 mm slide", r"of the 11mm frame"),
    ],
)
def test_bad_input_is_refused_with_the_reason(lowres: np.ndarray, case: str, message: str) -> None:
    slide = "auto"
    if case == "blank":
        image = np.full((600, 600, 3), 238, np.uint8)
    elif case == "two corners painted over":  # hourglass and filled hexagon (the triangle is under tissue)
        image = _paint_corners(lowres, [(120, 165, 15, 60), (120, 165, 320, 365)])
    elif case == "H&E tile without a frame":
        image = np.asarray(Image.open(shared("tiatoolbox", "target_image.png")).convert("RGB"))
    else:
        image, slide = lowres, "11mm"
    with pytest.raises(AlignmentError, match=message):
        align_image(image, slide=slide, detector="classical")


def test_a_fit_needs_three_consistent_corners_and_frame_dots_of_its_layout(lowres: np.ndarray) -> None:
    frame = find_frame(lowres)
    assert frame is not None and frame.layout.name == "6.5mm"
    reference = fit_spot_grid(frame.corners, frame.layout, lowres.shape, frame.dots_px)
    two = [corner for corner in frame.corners if corner.name in ("hourglass", "hex_open")]
    with pytest.raises(AlignmentError, match="found 2 of the 4 corner patterns"):
        fit_spot_grid(two, frame.layout, lowres.shape, frame.dots_px)
    # the same corners read as the 11 mm frame: a near-similarity, but the frame dots do not fit
    with pytest.raises(AlignmentError, match="frame dots do not fit the 11mm layout"):
        fit_spot_grid(frame.corners, visium_layout("11mm"), lowres.shape, frame.dots_px)

    def moved(corners: list[CornerDetection], dx: float) -> list[CornerDetection]:
        return [CornerDetection(c.name, c.x + dx * (c.name == "hex_open"), c.y, c.score) for c in corners]

    # three corners, one of them 20 px (3 pitches) off: the lattice fit slips, and is refused
    with pytest.raises(AlignmentError, match="slipped along the dot lattice"):
        fit_spot_grid(moved(frame.corners, 20.0), frame.layout, lowres.shape, frame.dots_px)
    # with a fourth corner, the three that agree with the frame dots win
    triangle = reference.affine @ np.append(frame.layout.corner_centroid_um("triangle"), 1.0)
    four = [*frame.corners, CornerDetection("triangle", *triangle, 0.9)]
    fit = fit_spot_grid(moved(four, 20.0), frame.layout, lowres.shape, frame.dots_px)
    assert "hex_open" not in fit.corners_used
    np.testing.assert_allclose(fit.spots[["pxl_row", "pxl_col"]], reference.spots[["pxl_row", "pxl_col"]], atol=0.01)


def test_bad_arguments() -> None:
    with pytest.raises(InputError, match="uint8"):
        align_image(np.zeros((50, 50, 3)), detector="classical")
    with pytest.raises(InputError, match="unknown Visium slide"):
        align_image(np.zeros((50, 50, 3), np.uint8), slide="3mm")
    with pytest.raises(InputError, match="unknown detector"):
        align_image(np.zeros((50, 50, 3), np.uint8), detector="sift")
    with pytest.raises(InputError, match="the image is empty"):
        align_image(np.zeros((0, 0, 3), np.uint8), detector="classical")
    layout = visium_layout("6.5mm")
    names = ("hourglass", "hex_filled", "hex_open")
    corners = [
        CornerDetection(name, *((layout.corner_centroid_um(name) - layout.frame_origin_um) / 10 + (20, 30)), 1.0)
        for name in names
    ]
    with pytest.raises(InputError, match=r"frame_dots must be finite \(n, 2\) pixel positions"):
        fit_spot_grid(corners, layout, (820, 800), frame_dots=np.zeros((30, 3)))
    with pytest.raises(InputError, match=r"frame_dots must be finite"):
        fit_spot_grid(corners, layout, (820, 800), frame_dots=np.full((30, 2), np.nan))
    with pytest.raises(InputError, match="corner positions must be finite"):
        fit_spot_grid([*corners[:2], CornerDetection(names[2], np.nan, 5.0, 1.0)], layout, (820, 800))


def _render_11mm_slide() -> tuple[np.ndarray, np.ndarray]:
    """Synthetic (no real 11 mm image is available): the 11 mm frame's dots drawn at 25 um/px, turned 1.5 degrees.

    Returns the image and the affine um -> pixels it was drawn with.
    """
    layout = visium_layout("11mm")
    angle = np.radians(1.5)
    linear = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / 25.0
    centre_um = layout.fiducials[["x_um", "y_um"]].to_numpy().mean(axis=0)
    offset = np.array([330.0, 320.0]) - linear @ centre_um
    affine = np.column_stack([linear, offset])
    supersample = 4
    canvas = np.full((660 * supersample, 640 * supersample), 232, np.uint8)
    dots = layout.fiducials[["x_um", "y_um"]].to_numpy() @ linear.T + offset
    radius = layout.fiducial_diameter_um / 2 / 25.0 * supersample
    for x, y in (dots + 0.5) * supersample - 0.5:
        cv2.circle(canvas, (round(x * 16), round(y * 16)), round(radius * 16), 150, -1, cv2.LINE_AA, shift=4)
    grey = cv2.resize(canvas, (640, 660), interpolation=cv2.INTER_AREA)
    noise = np.random.default_rng(7).normal(0, 3, grey.shape)
    return np.clip(grey + noise, 0, 255).astype(np.uint8), affine


def test_an_11mm_frame_is_recognised() -> None:
    image, affine = _render_11mm_slide()
    result = align_image(image, detector="classical")
    assert result.slide == "11mm" and len(result.spots) == 14336
    assert set(result.fit.corners_used) == {"hourglass", "hex_filled", "triangle", "hex_open"}
    layout = visium_layout("11mm")
    expected = layout.spots[["x_um", "y_um"]].to_numpy() @ affine[:, :2].T + affine[:, 2]
    error = np.hypot(result.spots["pxl_col"] - expected[:, 0], result.spots["pxl_row"] - expected[:, 1])
    assert error.max() < 0.2  # pixels of 25 um
    with pytest.raises(AlignmentError, match=r"6\.5mm frame"):
        align_image(image, slide="6.5mm", detector="classical")


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_align_sample_in_memory(
    perik_visium: Path, tmp_path: Path, truth: pd.DataFrame, um_per_fullres_px: float
) -> None:
    """Spots moved 40 px right and 25 px up; the operator on the opened store restores them and writes nothing.

    Measured: median 1.5 um, max 3.9 um from Space Ranger's positions.
    """
    sdata = read_sample(perik_visium)
    spots = sdata.shapes["spots"]
    spots.geometry = spots.geometry.translate(40.0, -25.0)
    root = tmp_path / "perik.zarr"
    hest_zarr.write(sdata, root)
    files = _files(root)
    opened = hest_zarr.open(root)
    shifted_x = opened.shapes["spots"].geometry.x.to_numpy().copy()

    result = align_sample(opened, detector="classical")
    assert _files(root) == files  # nothing written
    np.testing.assert_array_equal(opened.shapes["spots"].geometry.x.to_numpy(), shifted_x)  # the sample is unchanged
    assert "in_tissue_original" not in opened.tables["spot_expression"].obs

    update = result.update
    assert sorted(update.elements) == ["spot_expression", "spots"] and update.replace
    new_spots = update.elements["spots"]
    assert len(new_spots) == 2898 and new_spots.index.equals(spots.index)
    reference = truth.set_index("barcode").loc[new_spots.index]
    dx = new_spots.geometry.x.to_numpy() - reference["pxl_col_in_fullres"].to_numpy()
    dy = new_spots.geometry.y.to_numpy() - reference["pxl_row_in_fullres"].to_numpy()
    errors = np.hypot(dx, dy) * um_per_fullres_px
    assert np.median(errors) < 5.0 and errors.max() < 8.0
    assert 0 < result.fit.residual_um < 15

    provenance = update.provenance["spots"]
    assert provenance.converter == "ops.align" and provenance.method == "classical"
    assert provenance.inputs == [f"he/scale{provenance.parameters['level']}"]  # store-relative: the workflow anchors
    assert provenance.estimated_error_um == pytest.approx(result.fit.residual_um)
    obs = update.elements["spot_expression"].obs
    assert (obs["in_tissue_original"] == 1).all()
    assert int(obs["in_tissue"].sum()) == provenance.parameters["spots_in_tissue"]
    assert f1_score(obs["in_tissue"] == 1, obs["in_tissue_original"] == 1) > 0.97
    table_provenance = update.provenance["spot_expression"]
    assert table_provenance.inputs == get_record(opened).elements["spot_expression"].provenance.inputs  # its own
    assert table_provenance.parameters["in_tissue"]["source"] == "ops.align"


def test_align_sample_refuses_a_sample_without_a_table(perik_visium: Path) -> None:
    sdata = read_sample(perik_visium)
    del sdata.tables["spot_expression"]
    with pytest.raises(InputError, match=r"^sample: cannot align without \['spot_expression'\]"):
        align_sample(sdata)
    with pytest.raises(InputError, match=r"^perik: cannot align without"):
        align_sample(sdata, where="perik")
