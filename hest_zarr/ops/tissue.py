"""Tissue segmentation of an H&E: a mask, its polygons (with holes) and the per-spot ``in_tissue`` flags.

Two methods:

- ``"threshold"`` (default, no weights): stained tissue is saturated, glass is not. The saturation of the HSV image
  (smoothed by a Gaussian of 1 px) is thresholded by Otsu's method over the pixels that can be tissue, with a floor
  of 0.08 so that a blank slide stays blank. Left out beforehand: dark pixels (value < 0.3: slide frames and
  borders, black ink, debris), green ink (hue 0.15-0.5, saturation > 0.2: H&E has no green) and blue ink (hue
  0.5-0.68 with saturation > 0.5; haematoxylin-rich tissue is blue-violet but far less saturated, 0.07-0.4 on the
  ST v1 MOB sections). Then morphology: when their size is known (``dot_diameter_px``; on Visium stores the 105 um
  fiducial) round components of that size are removed, so that the closing cannot merge fiducial dots into a frame;
  a binary closing joins fragmented tissue, objects below 0.05 % of the image area (debris, specks, bubbles' rims)
  are dropped, holes below that area are filled and an opening smooths the outline. Large holes (lumens, tears)
  stay holes.
- ``"deeplab"``: torchvision's DeepLabV3 (ResNet-50 backbone, 2 classes, class 1 = tissue) with weights the
  user gives (a state dict, :func:`load_deeplab`); torch is imported only then. The same size clean-up follows.

Polygons are traced on the mask's pixel edges (:func:`mask_to_polygons`, pixel ``i`` spans ``[i, i + 1)``).

:func:`tissue` runs this on a store: it reads one low-resolution level of ``he`` lazily, writes the ``tissue``
shapes element (polygons in ``global`` pixels) and sets ``in_tissue`` (spots whose disk is at least half covered
by tissue) and ``tissue_fraction`` in the obs of every spot table, keeping its other columns; the value it
replaces is kept once as ``in_tissue_original``.

Measured (``benchmarks/tissue_and_registration.py``, per-spot flags against the real ground truth): F1 0.973 against
Space Ranger's ``in_tissue`` on the perik CytAssist lowres image (600 px, 0.3 s) and 0.987 on Space Ranger's
``detected_tissue_image.jpg`` read at 1/4; 0.981 and 0.984 against the ST spot detector's ``selected`` spots on MOB1
and MOB2 (1905 px, about 4 s).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import shapely
from geopandas import GeoDataFrame
from scipy import ndimage as ndi
from shapely.geometry import Polygon
from skimage import color, filters, measure
from spatialdata.models import ShapesModel
from spatialdata.transformations import get_transformation

from hest_zarr import _raster
from hest_zarr.elements import CoordinateSystems, Elements, Keys, frame_transformations
from hest_zarr.errors import HestZarrError, InputError
from hest_zarr.ops.pixel_size import spot_centres_global
from hest_zarr.schemas import Provenance, annotated_region
from hest_zarr.store import StorageOptions, add_elements, get_record
from hest_zarr.store import open as open_store

TissueMethod = Literal["threshold", "deeplab"]

#: Darker pixels (HSV value) are never tissue: slide frames, black ink, debris.
DARK_VALUE = 0.3
#: Floor of the saturation threshold: below it a slide is taken as blank glass.
MIN_SATURATION = 0.08
#: Ink hues (HSV hue in [0, 1)) and the saturation above which a pixel of that hue is ink.
GREEN_INK_HUE = (0.15, 0.5)
GREEN_INK_SATURATION = 0.2
BLUE_INK_HUE = (0.5, 0.68)
BLUE_INK_SATURATION = 0.5
SMOOTHING_SIGMA_PX = 1.0
#: Objects (and holes) smaller than this fraction of the image area are removed (filled).
MIN_OBJECT_FRACTION = 5e-4
#: Default closing/opening radius: the image's longest side over this.
MORPHOLOGY_RADIUS_DIVISOR = 300
#: A dot (fiducial) is a convex, roundish component whose size is within this range of the expected diameter.
DOT_DIAMETER_RANGE = (0.5, 1.5)
DOT_SOLIDITY = 0.85
DOT_AXIS_RATIO = 1.5
#: Diameter of a Visium fiducial dot (Loupe's slide templates).
VISIUM_FIDUCIAL_DIAMETER_UM = 105.0
#: A spot is in tissue when at least this fraction of its disk is.
IN_TISSUE_FRACTION = 0.5
#: Points sampled per axis over a spot's bounding square to measure its tissue fraction (even: none on the centre
#: lines, so a spot centred on a straight tissue edge measures 0.5).
SPOT_SAMPLES_PER_AXIS = 8
#: Spots sampled at a time (each one ~52 points): bounds the memory of flagging millions of Visium HD bins.
SPOTS_PER_BATCH = 100_000
#: ImageNet normalisation expected by torchvision's pretrained backbones (and so by DeepLabV3 weights).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: DeepLab runs on the image resized so that its longest side is at most this.
DEEPLAB_MAX_SIDE = 1024
ORIGINAL_IN_TISSUE = "in_tissue_original"
TISSUE_FRACTION = "tissue_fraction"


# --------------------------------------------------------------------------------------------- threshold
def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"expected an RGB image of shape (y, x, 3), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise InputError(f"expected a uint8 RGB image, got dtype {image.dtype}")
    if min(image.shape[:2]) < 2:
        raise InputError(f"image of shape {image.shape} is too small to segment")
    return image


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


def _padded(operation: Any, mask: np.ndarray, radius: int) -> np.ndarray:
    """Apply a binary morphology operation with a disk, padding so that the image border does not erode it."""
    padded = np.pad(mask, radius + 1, mode="edge")
    return operation(padded, structure=_disk(radius))[radius + 1 : -radius - 1, radius + 1 : -radius - 1]


def remove_small_objects(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop connected components (8-connected) of fewer than ``min_area`` pixels.

    Examples
    --------
    >>> remove_small_objects(np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1]], bool), 2).astype(int).tolist()
    [[0, 0, 0], [0, 0, 1], [0, 0, 1]]

    """
    labels, _ = ndi.label(mask, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_area: int) -> np.ndarray:
    """Fill holes (background components not touching the border) of at most ``max_area`` pixels.

    Examples
    --------
    >>> ring = np.ones((5, 5), bool)
    >>> ring[2, 2] = False
    >>> bool(fill_small_holes(ring, 1)[2, 2]), bool(fill_small_holes(ring, 0)[2, 2])
    (True, False)

    """
    labels, _ = ndi.label(~mask)
    sizes = np.bincount(labels.ravel())
    border = np.unique(np.r_[labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    fill = sizes <= max_area
    fill[border] = False
    fill[0] = False
    return mask | fill[labels]


def remove_dots(mask: np.ndarray, diameter_px: float) -> np.ndarray:
    """Remove round components about ``diameter_px`` across (fiducial dots), holes filled, before any closing.

    A component is a dot when the diameter of the disk of its (hole-filled) area is within 0.5-1.5 x
    ``diameter_px``, it is convex (solidity >= 0.85) and about as wide as long (axis ratio <= 1.5).

    Examples
    --------
    >>> yy, xx = np.mgrid[:40, :40]
    >>> mask = (xx - 10) ** 2 + (yy - 10) ** 2 <= 16  # a dot 9 px across
    >>> mask[25:35, 5:35] = True  # a band of tissue
    >>> int(mask.sum()), int(remove_dots(mask, 9.0).sum())
    (349, 300)

    """
    labels, count = ndi.label(mask)
    if count == 0:
        return mask
    dots = np.zeros(count + 1, dtype=bool)
    low, high = (
        (DOT_DIAMETER_RANGE[0] * diameter_px / 2) ** 2 * np.pi,
        (DOT_DIAMETER_RANGE[1] * diameter_px / 2) ** 2 * np.pi,
    )
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    for region in measure.regionprops(labels):
        if sizes[region.label] > high or region.area_filled < low:
            continue
        filled = region.area_filled
        axis_ratio = region.axis_major_length / max(region.axis_minor_length, 1e-9)
        dots[region.label] = (
            low <= filled <= high and filled / region.area_convex >= DOT_SOLIDITY and axis_ratio <= DOT_AXIS_RATIO
        )
    return mask & ~dots[labels]


def ink_mask(image: np.ndarray) -> np.ndarray:
    """Return the pixels of pen ink: green (no H&E stain is green), strongly saturated blue, and black.

    Examples
    --------
    >>> pixels = np.array([[[40, 160, 60], [40, 60, 200]], [[20, 20, 20], [200, 120, 180]]], np.uint8)
    >>> ink_mask(pixels).tolist()  # green, blue, black; the pink is eosin
    [[True, True], [True, False]]

    """
    return _ink(color.rgb2hsv(_check_rgb(image)))


def _ink(hsv: np.ndarray) -> np.ndarray:
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    green = (hue >= GREEN_INK_HUE[0]) & (hue < GREEN_INK_HUE[1]) & (saturation > GREEN_INK_SATURATION)
    blue = (hue >= BLUE_INK_HUE[0]) & (hue < BLUE_INK_HUE[1]) & (saturation > BLUE_INK_SATURATION)
    return green | blue | (value < DARK_VALUE)


@dataclass(frozen=True)
class TissueMask:
    """A tissue mask and how it was obtained.

    Attributes
    ----------
    mask
        Boolean ``(y, x)`` array, True on tissue.
    method
        ``"threshold"`` or ``"deeplab"``.
    parameters
        The method's parameters and measured values (e.g. the saturation threshold), for the provenance.

    """

    mask: np.ndarray
    method: str
    parameters: dict[str, Any] = field(default_factory=dict)


def clean_mask(
    mask: np.ndarray,
    *,
    radius_px: int | None = None,
    min_object_fraction: float = MIN_OBJECT_FRACTION,
    dot_diameter_px: float | None = None,
) -> np.ndarray:
    """Remove dots and small objects, join fragments and fill small holes of a raw tissue mask.

    Parameters
    ----------
    mask
        Raw boolean mask.
    radius_px
        Radius of the closing and opening disks (default: the longest side / 300, at least 1).
    min_object_fraction
        Objects and holes smaller than this fraction of the image area are removed and filled.
    dot_diameter_px
        Diameter of fiducial dots, removed first (:func:`remove_dots`); ``None`` removes no dots.

    """
    radius = radius_px if radius_px is not None else max(1, round(max(mask.shape) / MORPHOLOGY_RADIUS_DIVISOR))
    min_area = max(1, int(min_object_fraction * mask.size))
    if dot_diameter_px is not None:
        mask = remove_dots(mask, dot_diameter_px)
    mask = _padded(ndi.binary_closing, mask, radius)
    mask = remove_small_objects(mask, min_area)
    mask = fill_small_holes(mask, min_area)
    mask = _padded(ndi.binary_opening, mask, radius)
    return remove_small_objects(mask, min_area)


def threshold_tissue_mask(
    image: np.ndarray,
    *,
    radius_px: int | None = None,
    min_object_fraction: float = MIN_OBJECT_FRACTION,
    min_saturation: float = MIN_SATURATION,
    dot_diameter_px: float | None = None,
) -> TissueMask:
    """Segment tissue by thresholding the saturation, without ink and dark pixels (see the module docstring).

    Parameters
    ----------
    image
        RGB ``(y, x, 3)`` uint8, a low-resolution view of the slide (hundreds to a few thousand pixels a side).
    radius_px, min_object_fraction, dot_diameter_px
        Morphology parameters (:func:`clean_mask`).
    min_saturation
        Floor of the Otsu threshold.

    Examples
    --------
    >>> slide = np.full((60, 60, 3), 235.0)
    >>> slide[20:40, 10:50] = (200, 80, 160)  # an eosin-pink section, 20 x 40 px
    >>> slide = np.clip(slide + np.random.default_rng(0).normal(0, 4, slide.shape), 0, 255).astype(np.uint8)
    >>> int(threshold_tissue_mask(slide).mask.sum())
    796

    """
    image = _check_rgb(image)
    hsv = color.rgb2hsv(image)
    saturation = ndi.gaussian_filter(hsv[..., 1], SMOOTHING_SIGMA_PX)
    candidates = ~_ink(hsv)
    values = saturation[candidates]
    otsu = float(filters.threshold_otsu(values)) if values.size and np.ptp(values) > 0 else min_saturation
    threshold = max(otsu, min_saturation)
    raw = (saturation > threshold) & candidates
    mask = clean_mask(
        raw, radius_px=radius_px, min_object_fraction=min_object_fraction, dot_diameter_px=dot_diameter_px
    )
    parameters = {
        "saturation_threshold": threshold,
        "otsu_threshold": otsu,
        "min_saturation": min_saturation,
        "ink_or_dark_fraction": float(1 - candidates.mean()),
        "min_object_fraction": min_object_fraction,
        "radius_px": radius_px,
        "dot_diameter_px": dot_diameter_px,
    }
    return TissueMask(mask=mask, method="threshold", parameters=parameters)


# --------------------------------------------------------------------------------------------- deeplab
def _torch() -> Any:
    try:
        import torch
        import torchvision  # noqa: F401
    except ImportError as err:
        raise HestZarrError(
            "method='deeplab' needs torch and torchvision (pip install 'hest-zarr[ml]'); use method='threshold' "
            "for segmentation without them"
        ) from err
    return torch


def load_deeplab(weights: str | Path) -> Any:
    """Load user weights into torchvision's ``deeplabv3_resnet50(num_classes=2)`` (class 1 = tissue).

    Parameters
    ----------
    weights
        A file saved with ``torch.save(model.state_dict(), path)``; a checkpoint dict holding it under
        ``"state_dict"`` or ``"model"`` works too. Weights trained with the auxiliary classifier are accepted.

    Raises
    ------
    InputError
        The file is missing, is not a PyTorch state dict, or does not fit the model (keys or shapes).

    Examples
    --------
    >>> model = load_deeplab("tissue_deeplab.pt")  # doctest: +SKIP

    """
    torch = _torch()
    from torchvision.models.segmentation import deeplabv3_resnet50

    path = Path(weights)
    if not path.is_file():
        raise InputError(f"{path}: no such weights file (expected a DeepLabV3-ResNet50 state dict saved by torch)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors alike
        raise InputError(f"{path}: not a PyTorch weights file ({type(err).__name__}: {err})") from err
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise InputError(f"{path}: expected a state dict (parameter name -> tensor), found {type(state).__name__}")
    has_aux = any(key.startswith("aux_classifier.") for key in state)
    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=2, aux_loss=has_aux)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
        raise InputError(
            f"{path}: these weights do not fit deeplabv3_resnet50(num_classes=2): {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(mismatched)} of "
            f"another shape (e.g. {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in mismatched[:2]]})"
        ) from err
    return model.eval()


def deeplab_tissue_mask(
    image: np.ndarray,
    weights: str | Path,
    *,
    max_side: int = DEEPLAB_MAX_SIDE,
    min_object_fraction: float = MIN_OBJECT_FRACTION,
) -> TissueMask:
    """Segment tissue with DeepLabV3-ResNet50 and user weights (:func:`load_deeplab`).

    The image is scaled to ``[0, 1]``, normalised with the ImageNet mean and standard deviation, resized so that its
    longest side is at most ``max_side``; the class scores are resized back and the arg-max taken. Small objects
    and holes are then removed as by the threshold method (no closing: the network's outline is kept).

    Examples
    --------
    >>> deeplab_tissue_mask(image, "tissue_deeplab.pt").mask.shape == image.shape[:2]  # doctest: +SKIP
    True

    """
    image = _check_rgb(image)
    torch = _torch()
    model = load_deeplab(weights)
    tensor = torch.from_numpy(np.ascontiguousarray(image).copy()).permute(2, 0, 1).float().div(255)
    tensor = (tensor - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    height, width = image.shape[:2]
    factor = min(1.0, max_side / max(height, width))
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    batch = torch.nn.functional.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False)
    with torch.inference_mode():
        scores = model(batch)["out"]
        scores = torch.nn.functional.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
    raw = (scores[0].argmax(dim=0) == 1).numpy()
    min_area = max(1, int(min_object_fraction * raw.size))
    mask = fill_small_holes(remove_small_objects(raw, min_area), min_area)
    parameters = {"weights": str(weights), "input_size": list(size), "min_object_fraction": min_object_fraction}
    return TissueMask(mask=mask, method="deeplab", parameters=parameters)


def segment_tissue(
    image: np.ndarray, *, method: TissueMethod = "threshold", weights: str | Path | None = None, **options: Any
) -> TissueMask:
    """Segment the tissue of an RGB image with the chosen method.

    Parameters
    ----------
    image
        RGB ``(y, x, 3)`` uint8.
    method
        ``"threshold"`` (:func:`threshold_tissue_mask`) or ``"deeplab"`` (:func:`deeplab_tissue_mask`).
    weights
        DeepLab weights file; required by ``"deeplab"``.
    options
        Keyword arguments of the method's function.

    Examples
    --------
    >>> from PIL import Image
    >>> lowres = np.asarray(Image.open("spatial/tissue_lowres_image.png").convert("RGB"))  # doctest: +SKIP
    >>> round(float(segment_tissue(lowres).mask.mean()), 2)  # perik's CytAssist image  # doctest: +SKIP
    0.26

    """
    if method == "threshold":
        if weights is not None:
            raise InputError("weights were given but method='threshold' uses none (pass method='deeplab')")
        return threshold_tissue_mask(image, **options)
    if method == "deeplab":
        if weights is None:
            raise InputError("method='deeplab' needs weights: the path of a DeepLabV3-ResNet50 state dict")
        return deeplab_tissue_mask(image, weights, **options)
    raise InputError(f"unknown tissue segmentation method {method!r} (expected 'threshold' or 'deeplab')")


# --------------------------------------------------------------------------------------------- polygons
def mask_to_polygons(mask: np.ndarray, *, simplify_px: float = 0.5) -> list[Polygon]:
    """Trace a mask's components as polygons with holes, in pixel coordinates (pixel ``i`` spans ``[i, i + 1)``).

    Each 4-connected component becomes one polygon; its outline runs through the midpoints of the pixel edges
    between tissue and background (so the polygon's area is the pixel count up to the cut corners), holes are the
    other closed outlines of the component. Islands inside a hole are polygons of their own.

    Parameters
    ----------
    mask
        Boolean ``(y, x)`` array.
    simplify_px
        Douglas-Peucker tolerance in pixels (topology preserved); 0 keeps every vertex.

    Examples
    --------
    >>> ring = np.zeros((7, 7), bool)
    >>> ring[1:6, 1:6] = True
    >>> ring[3, 3] = False
    >>> polygon = mask_to_polygons(ring)[0]
    >>> len(polygon.interiors), polygon.bounds
    (1, (1.0, 1.0, 6.0, 6.0))

    """
    mask = np.asarray(mask, dtype=bool)
    labels, _ = ndi.label(mask)
    polygons: list[Polygon] = []
    for index, window in enumerate(ndi.find_objects(labels), start=1):
        if window is None:
            continue
        component = np.pad(labels[window] == index, 1)
        offset = np.array([window[1].start - 1 + 0.5, window[0].start - 1 + 0.5])  # (x, y) of the padded pixel 0
        rings = [
            contour[:, ::-1] + offset
            for contour in measure.find_contours(component.astype(np.uint8), 0.5, fully_connected="low")
            if len(contour) >= 4
        ]
        if not rings:
            continue
        areas = [abs(shapely.area(Polygon(ring))) for ring in rings]
        outer = int(np.argmax(areas))
        holes = [ring for position, ring in enumerate(rings) if position != outer]
        polygon = Polygon(rings[outer], holes)
        if simplify_px > 0:
            polygon = polygon.simplify(simplify_px, preserve_topology=True)
        if not polygon.is_valid:
            polygon = shapely.make_valid(polygon)
        polygons.extend(_polygon_parts(polygon))
    return polygons


def _polygon_parts(geometry: Any) -> list[Polygon]:
    if isinstance(geometry, Polygon):
        return [geometry] if not geometry.is_empty else []
    return [part for part in getattr(geometry, "geoms", []) if isinstance(part, Polygon) and not part.is_empty]


# --------------------------------------------------------------------------------------------- spots
def spot_tissue_fraction(mask: np.ndarray, centres_px: np.ndarray, radii_px: np.ndarray) -> np.ndarray:
    """Return the fraction of each spot's disk that lies on tissue, sampled on an 8 x 8 grid over the disk.

    Parameters
    ----------
    mask
        Boolean ``(y, x)`` tissue mask.
    centres_px
        Spot centres ``(x, y)`` in the mask's pixels (pixel ``i`` spans ``[i, i + 1)``).
    radii_px
        Spot radii in the mask's pixels (a spot smaller than a pixel samples the pixel of its centre).

    Examples
    --------
    >>> mask = np.zeros((10, 10), bool)
    >>> mask[:, :5] = True
    >>> spot_tissue_fraction(mask, np.array([[2.0, 5.0], [5.0, 5.0], [8.0, 5.0]]), np.array([1.0, 2.0, 1.0])).round(2)
    array([1. , 0.5, 0. ])

    """
    steps = np.linspace(-1, 1, SPOT_SAMPLES_PER_AXIS)
    dx, dy = np.meshgrid(steps, steps)
    inside = dx**2 + dy**2 <= 1
    offsets = np.c_[dx[inside], dy[inside]]
    centres_px = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
    radii = np.broadcast_to(np.asarray(radii_px, dtype=np.float64), (len(centres_px),))
    fraction = _covered(mask, centres_px).astype(np.float64)  # sub-pixel spots: the pixel of the centre
    large = np.flatnonzero(radii >= 0.5)
    for start in range(0, len(large), SPOTS_PER_BATCH):  # bounded memory (Visium HD: millions of bins)
        spots = large[start : start + SPOTS_PER_BATCH]
        samples = centres_px[spots, None, :] + offsets[None] * radii[spots, None, None]
        fraction[spots] = _covered(mask, samples.reshape(-1, 2)).reshape(len(spots), -1).mean(axis=1)
    return fraction


def _covered(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Whether each point ``(x, y)`` falls on a True pixel of ``mask`` (pixel ``i`` spans ``[i, i + 1)``)."""
    columns, rows = np.floor(points[:, 0]).astype(np.int64), np.floor(points[:, 1]).astype(np.int64)
    on_image = (columns >= 0) & (columns < mask.shape[1]) & (rows >= 0) & (rows < mask.shape[0])
    covered = np.zeros(len(points), dtype=bool)
    covered[on_image] = mask[rows[on_image], columns[on_image]]
    return covered


def _spot_radii_global(spots: GeoDataFrame) -> np.ndarray:
    """Spot radii in ``global`` pixels: circles' ``radius``, else the radius of a disk of the polygon's area."""
    if "radius" in spots.columns:
        radii = spots["radius"].to_numpy(dtype=np.float64)
    else:
        radii = np.sqrt(spots.geometry.area.to_numpy() / np.pi)
    matrix = get_transformation(spots, CoordinateSystems.GLOBAL).to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )
    return radii * np.sqrt(abs(np.linalg.det(matrix[:2, :2])))


def f1_score(predicted: np.ndarray, truth: np.ndarray) -> float:
    """F1 of boolean predictions against boolean truth (1.0 when both are empty).

    Examples
    --------
    >>> f1_score(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool))
    0.5

    """
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    true_positive = int((predicted & truth).sum())
    wrong = int((predicted ^ truth).sum())
    return 1.0 if true_positive + wrong == 0 else 2 * true_positive / (2 * true_positive + wrong)


# --------------------------------------------------------------------------------------------- store
@dataclass(frozen=True)
class TissueResult:
    """What :func:`tissue` wrote.

    Attributes
    ----------
    polygons
        The ``tissue`` element (polygons in ``global`` pixels).
    mask
        The mask on the level it was computed on.
    level
        Pyramid level of ``he`` that was segmented.
    in_tissue
        Spot table -> number of spots now flagged in tissue.
    agreement_f1
        Spot table -> F1 of the new flags against the ``in_tissue`` the table held before (where it had one).

    """

    polygons: GeoDataFrame
    mask: np.ndarray
    level: int
    in_tissue: dict[str, int]
    agreement_f1: dict[str, float]


def _image_levels(image: Any) -> list[Any]:
    return _raster._levels(image) or [_raster._scale0(image).data]


def _level_to_global(image: Any, level: int) -> np.ndarray:
    """3x3 affine from pixels of pyramid ``level`` (level k is ``Scale(2**k)`` of level 0) to ``global``."""
    matrix = get_transformation(_raster._scale0(image), CoordinateSystems.GLOBAL).to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )
    return matrix @ np.diag([2.0**level, 2.0**level, 1.0])


def _affine_polygons(polygons: list[Polygon], matrix: np.ndarray) -> list[Any]:
    coefficients = [matrix[0, 0], matrix[0, 1], matrix[1, 0], matrix[1, 1], matrix[0, 2], matrix[1, 2]]
    return [shapely.affinity.affine_transform(polygon, coefficients) for polygon in polygons]


def _spot_tables(sdata: Any) -> dict[str, str]:
    """Table name -> the spots element it annotates, for every spot table of the store."""
    return {
        name: region
        for name in sdata.tables
        if (region := annotated_region(name)) is not None and region in sdata.shapes and region.startswith("spots")
    }


def tissue(
    url: str | Path,
    *,
    method: TissueMethod = "threshold",
    weights: str | Path | None = None,
    level: int | None = None,
    replace: bool = False,
    storage_options: StorageOptions = None,
) -> TissueResult:
    """Segment a store's tissue, write the ``tissue`` polygons and the spots' ``in_tissue`` flags.

    Parameters
    ----------
    url
        Store path or URL; it must hold an ``he`` image.
    method
        ``"threshold"`` (no weights) or ``"deeplab"`` (needs ``weights``).
    weights
        DeepLabV3-ResNet50 state dict for ``method="deeplab"``.
    level
        Pyramid level of ``he`` to segment (default: the coarsest, at most 2048 px a side in stores written here).
        On Visium stores the threshold method removes dots of the 105 um fiducial size first.
    replace
        Replace an existing ``tissue`` element.
    storage_options
        fsspec options for a remote URL.

    Returns
    -------
    The polygons, the mask, the level and the per-table counts of spots in tissue (and the F1 against the flags
    they replace).

    Raises
    ------
    InputError
        No ``he`` image, a level the pyramid lacks, a ``tissue`` element already there without ``replace``, a bad
        method or weights, or no tissue found (a blank or placeholder image).

    Examples
    --------
    >>> result = tissue("perik.zarr")  # doctest: +SKIP
    >>> result.in_tissue, result.agreement_f1  # doctest: +SKIP
    ({'spot_expression': 2852}, {'spot_expression': 0.992})

    """
    sdata = open_store(url, storage_options)
    record = get_record(sdata)
    if Elements.HE not in sdata.images:
        raise InputError(f"{url}: no '{Elements.HE}' image to segment (found images {sorted(sdata.images)})")
    if Elements.TISSUE in record.elements and not replace:
        raise InputError(f"{url}: already holds '{Elements.TISSUE}' (pass replace=True to replace it)")
    image = sdata.images[Elements.HE]
    levels = _image_levels(image)
    level = len(levels) - 1 if level is None else level
    if not 0 <= level < len(levels):
        raise InputError(f"{url}: '{Elements.HE}' has levels 0-{len(levels) - 1}, not {level}")
    if levels[level].shape[0] != 3 or levels[level].dtype != np.uint8:  # checked before decoding the level
        raise InputError(
            f"{url}: '{Elements.HE}' is not RGB uint8 (shape {levels[level].shape}, dtype {levels[level].dtype})"
        )
    pixels = np.moveaxis(np.asarray(levels[level].compute()), 0, -1)
    to_global = _level_to_global(image, level)
    pixel_size_um = record.pixel_size_um or 1.0
    level_pixel_um = float(np.sqrt(abs(np.linalg.det(to_global[:2, :2])))) * pixel_size_um
    options: dict[str, Any] = {}
    if method == "threshold" and record.metadata.st_technology == "Visium" and record.pixel_size_um is not None:
        options["dot_diameter_px"] = VISIUM_FIDUCIAL_DIAMETER_UM / level_pixel_um
    segmentation = segment_tissue(pixels, method=method, weights=weights, **options)
    if not segmentation.mask.any():
        raise InputError(
            f"{url}: no tissue found on '{Elements.HE}' level {level} ({pixels.shape[1]} x {pixels.shape[0]} px, "
            f"{segmentation.method}: {segmentation.parameters}); a blank or placeholder image?"
        )
    # mask pixel i spans [i, i + 1) at its level; global has pixel centres at integers, so edges are at -0.5
    edges_to_global = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]]) @ to_global
    global_polygons = _affine_polygons(mask_to_polygons(segmentation.mask), edges_to_global)
    frame = GeoDataFrame(geometry=global_polygons, index=pd.RangeIndex(len(global_polygons)).astype(str))
    frame["area_um2"] = frame.geometry.area.to_numpy() * pixel_size_um**2
    polygons = ShapesModel.parse(frame, transformations=frame_transformations(pixel_size_um))

    elements: dict[str, Any] = {Elements.TISSUE: polygons}
    provenance = {
        Elements.TISSUE: Provenance(
            converter="ops.tissue",
            inputs=[f"{url}/{Elements.HE}/scale{level}"],
            method=segmentation.method,
            parameters={**segmentation.parameters, "level": level, "level_shape": list(pixels.shape[:2])},
            estimated_error_um=level_pixel_um,
        )
    }
    from_global = np.linalg.inv(to_global)
    in_tissue: dict[str, int] = {}
    agreement: dict[str, float] = {}
    for table_name, spots_name in _spot_tables(sdata).items():
        spots = sdata.shapes[spots_name]
        centres = (spot_centres_global(spots) + 0.5) @ from_global[:2, :2].T + from_global[:2, 2]
        radii = _spot_radii_global(spots) * np.sqrt(abs(np.linalg.det(from_global[:2, :2])))
        fraction = pd.Series(spot_tissue_fraction(segmentation.mask, centres, radii), index=spots.index.astype(str))
        table = sdata.tables[table_name]  # this SpatialData is the function's own
        fractions = fraction.reindex(table.obs[Keys.SPOT_ID].astype(str)).to_numpy()
        if np.isnan(fractions).any():
            raise InputError(
                f"{url}: {int(np.isnan(fractions).sum())} spot(s) of table '{table_name}' have no shape in "
                f"'{spots_name}'; cannot flag them in_tissue"
            )
        flags = (fractions >= IN_TISSUE_FRACTION).astype(np.int32)
        if Keys.IN_TISSUE in table.obs and ORIGINAL_IN_TISSUE not in table.obs:
            table.obs[ORIGINAL_IN_TISSUE] = table.obs[Keys.IN_TISSUE].to_numpy()
        if ORIGINAL_IN_TISSUE in table.obs:
            agreement[table_name] = f1_score(flags, table.obs[ORIGINAL_IN_TISSUE].to_numpy().astype(bool))
        table.obs[Keys.IN_TISSUE] = flags
        table.obs[TISSUE_FRACTION] = fractions.astype(np.float32)
        in_tissue[table_name] = int(flags.sum())
        old = record.elements[table_name].provenance
        parameters = {
            **old.parameters,
            "in_tissue": {
                "source": "ops.tissue",
                "rule": f"{TISSUE_FRACTION} >= {IN_TISSUE_FRACTION}",
                "spots_in_tissue": in_tissue[table_name],
                "f1_vs_original": agreement.get(table_name),
            },
        }
        elements[table_name] = table
        provenance[table_name] = Provenance.model_validate({**old.model_dump(), "parameters": parameters})
    with warnings.catch_warnings():  # the tables annotate spots that stay in the store, not in this call
        warnings.filterwarnings("ignore", message=".*is annotating '.*', which is not present", category=UserWarning)
        add_elements(url, elements, provenance, replace=True, storage_options=storage_options)
    return TissueResult(
        polygons=polygons, mask=segmentation.mask, level=level, in_tissue=in_tissue, agreement_f1=agreement
    )
