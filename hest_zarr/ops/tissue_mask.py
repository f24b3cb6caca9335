"""Tissue masks of an H&E image: which pixels are tissue (the mask half of :mod:`hest_zarr.ops.tissue`).

Two methods (:func:`segment_tissue`):

- ``"threshold"`` (default, no weights, :func:`threshold_tissue_mask`): stained tissue is saturated, glass is not.
  The saturation of the HSV image (smoothed by a Gaussian of 1 px) is thresholded by Otsu's method over the pixels
  that can be tissue, with a floor of 0.08 so that a blank slide stays blank. Left out beforehand: dark pixels
  (value < 0.3: slide frames and borders, black ink, debris), green ink (hue 0.15-0.5, saturation > 0.2: H&E has
  no green) and blue ink (hue 0.5-0.68 with saturation > 0.5; haematoxylin-rich tissue is blue-violet but far less
  saturated, 0.07-0.4 on the ST v1 MOB sections). Then morphology (:func:`clean_mask`): when their size is known
  (``dot_diameter_px``; on Visium stores the 105 um fiducial) round components of that size are removed, so that
  the closing cannot merge fiducial dots into a frame; a binary closing joins fragmented tissue, objects below
  0.05 % of the image area (debris, specks, bubbles' rims) are dropped, holes below that area are filled and an
  opening smooths the outline. Large holes (lumens, tears) stay holes.
- ``"deeplab"`` (:func:`deeplab_tissue_mask`): torchvision's DeepLabV3 (ResNet-50 backbone, 2 classes, class 1 =
  tissue) with weights the user gives (a state dict file, :func:`load_deeplab`: a model input, not a store); torch
  is imported only then. The same size clean-up follows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage as ndi
from skimage import color, filters, measure

from hest_zarr.errors import HestZarrError, InputError

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
#: ImageNet normalisation expected by torchvision's pretrained backbones (and so by DeepLabV3 weights).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: DeepLab runs on the image resized so that its longest side is at most this.
DEEPLAB_MAX_SIDE = 1024


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
