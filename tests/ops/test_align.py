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
from typer.testing import CliRunner

import hest_zarr
from hest_zarr.cli import app
from hest_zarr.converters import read_sample
from hest_zarr.errors import AlignmentError, InputError
from hest_zarr.ops.align import align, align_image, fit_spot_grid
from hest_zarr.ops.fiducials import CornerDetection, detect_corners_classical, find_frame
from hest_zarr.ops.tissue import f1_score
from hest_zarr.ops.visium_layout import visium_layout
from hest_zarr.store import get_record, validate
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


def test_align_a_store_with_shifted_spots(
    perik_visium: Path, tmp_path: Path, truth: pd.DataFrame, um_per_fullres_px: float
) -> None:
    """Spots moved 40 px right and 25 px up before writing; ``hest-zarr align`` restores them.

    Measured: median 1.5 um, max 3.9 um from Space Ranger's positions; in_tissue F1 0.99 against Space Ranger's.
    """
    sdata = read_sample(perik_visium)
    spots = sdata.shapes["spots"]
    spots.geometry = spots.geometry.translate(40.0, -25.0)
    url = hest_zarr.write(sdata, tmp_path / "perik.zarr")

    result = CliRunner().invoke(app, ["align", url])
    assert result.exit_code == 0, result.output
    assert "6.5mm slide" in result.stdout
    aligned = hest_zarr.open(url)
    new_spots = aligned.shapes["spots"]
    assert len(new_spots) == 2898 and new_spots.index.equals(spots.index)
    reference = truth.set_index("barcode").loc[new_spots.index]
    dx = new_spots.geometry.x.to_numpy() - reference["pxl_col_in_fullres"].to_numpy()
    dy = new_spots.geometry.y.to_numpy() - reference["pxl_row_in_fullres"].to_numpy()
    errors = np.hypot(dx, dy) * um_per_fullres_px
    assert np.median(errors) < 5.0 and errors.max() < 8.0
    np.testing.assert_allclose(new_spots["radius"], spots["radius"])

    obs = aligned.tables["spot_expression"].obs
    assert obs["in_tissue_original"].sum() == 2898  # the filtered matrix holds the in-tissue spots only
    assert f1_score(obs["in_tissue"] == 1, obs["in_tissue_original"] == 1) > 0.97
    provenance = get_record(aligned).elements["spots"].provenance
    assert provenance.converter == "ops.align" and provenance.method in ("classical", "yolo")
    assert provenance.parameters["attempts"]["classical"] == "ok"  # yolo: "ok" or why it is unavailable
    assert provenance.parameters["slide"] == "6.5mm" and len(provenance.parameters["corners_used"]) >= 3
    assert 0 < provenance.estimated_error_um < 15
    assert provenance.parameters["um_per_global_px"] == pytest.approx(um_per_fullres_px, rel=0.005)
    assert validate(url) == []


def test_align_keeps_the_flags_of_a_grey_image(perik_visium: Path, tmp_path: Path) -> None:
    """Tissue is found by its stain: on a grey copy of perik's image the table's own in_tissue flags stay."""
    sdata = read_sample(perik_visium)
    he = sdata.images["he"]
    sdata.images["he"] = he.copy(data=np.repeat(he.data.mean(axis=0, keepdims=True).astype(np.uint8), 3, axis=0))
    obs = sdata.tables["spot_expression"].obs
    flags = np.where(np.arange(len(obs)) % 4 == 0, 0, 1).astype(np.int32)
    obs["in_tissue"] = flags
    url = hest_zarr.write(sdata, tmp_path / "grey.zarr")
    align(url, detector="classical")
    aligned = hest_zarr.open(url)
    np.testing.assert_array_equal(aligned.tables["spot_expression"].obs["in_tissue"].to_numpy(), flags)
    parameters = get_record(aligned).elements["spots"].provenance.parameters
    assert parameters["in_tissue_from"] == "kept: a grey image shows no stain"


def test_align_refuses_a_store_whose_image_shows_no_frame(scanpy_visium: Path, tmp_path: Path) -> None:
    """The scanpy Space Ranger 1.0 sample ships an all-black placeholder as its hires image."""
    url = hest_zarr.write(read_sample(scanpy_visium), tmp_path / "scanpy.zarr")
    with pytest.raises(AlignmentError, match="no lattice of fiducial dots found"):
        align(url, detector="classical")
    with pytest.raises(InputError, match="replace=True"):
        align(url, replace=False)
    assert get_record(hest_zarr.open(url)).elements["spots"].provenance.converter == "visium"  # left as it was


def test_cli_align_image(spatial: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "spots.csv"
    result = runner.invoke(
        app, ["align-image", str(spatial / "tissue_lowres_image.png"), "--out", str(out), "--detector", "classical"]
    )
    assert result.exit_code == 0, result.output
    written = pd.read_csv(out)
    assert list(written.columns) == ["array_row", "array_col", "pxl_row", "pxl_col", "in_tissue"]
    assert len(written) == 4992
    assert written.loc[0, ["array_row", "array_col"]].tolist() == [0, 0]

    blank = tmp_path / "blank.png"
    Image.new("RGB", (400, 300), (236, 236, 236)).save(blank)
    result = runner.invoke(app, ["align-image", str(blank), "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot align" in lines[0] and "no lattice of fiducial dots" in lines[0]
    assert not (tmp_path / "x.csv").exists()
    no_folder = runner.invoke(
        app, ["align-image", str(spatial / "tissue_lowres_image.png"), "--out", str(tmp_path / "absent" / "x.csv")]
    )
    assert no_folder.exit_code == 1 and "absent does not exist" in no_folder.stderr


def test_align_refuses_tables_that_do_not_match_their_spots(scanpy_visium: Path, tmp_path: Path) -> None:
    """A table row naming no spot, or a table without array positions, is refused before the image is read."""
    from hest_zarr.schemas import Provenance
    from hest_zarr.store import add_elements

    url = hest_zarr.write(read_sample(scanpy_visium), tmp_path / "scanpy.zarr")
    table = hest_zarr.open(url)["spot_expression"]
    renamed = table.copy()
    renamed.obs["spot_id"] = renamed.obs["spot_id"].astype(str).replace({renamed.obs["spot_id"].iloc[0]: "NOT-A-SPOT"})
    add_elements(url, {"spot_expression": renamed}, {"spot_expression": Provenance(converter="test")}, replace=True)
    with pytest.raises(InputError, match=r"1 spot ids of 'spot_expression' are not in 'spots' \(e.g. 'NOT-A-SPOT'\)"):
        align(url)
    no_rows = table.copy()
    del no_rows.obs["array_row"]
    add_elements(url, {"spot_expression": no_rows}, {"spot_expression": Provenance(converter="test")}, replace=True)
    with pytest.raises(InputError, match=r"'spot_expression' has no \['array_row'\] column"):
        align(url)
    unplaced = table.copy()
    unplaced.obs["array_row"] = unplaced.obs["array_row"].astype(float)
    unplaced.obs.loc[unplaced.obs.index[0], "array_row"] = np.nan
    add_elements(url, {"spot_expression": unplaced}, {"spot_expression": Provenance(converter="test")}, replace=True)
    with pytest.raises(InputError, match=r"array_row/array_col that are not whole numbers"):
        align(url)
