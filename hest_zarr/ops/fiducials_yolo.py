"""Visium fiducial corners found by a small YOLOv8 detector (ultralytics) shipped with the package.

The weights ``hest_zarr/data/fiducial_detector.pt`` were trained by ``scripts/train_fiducial_detector.py`` on
rendered Visium frames (the slide layout's fiducial dots drawn over real H&E and glass backgrounds, with
rotation, mirroring, blur, stain, JPEG, dirt, tissue over the corners and greyscale CytAssist-like images);
``scripts/README.md`` records the recipe and its metrics. Each training box is a square centred on the
centroid of one corner pattern's dots, so the centre of a predicted box is that centroid. On the real Visium
CytAssist images of the tests (never used in training) free corners come within 0.5 px of the true centroid at
the detector's scale; corners half buried under dark tissue are pulled towards their visible dots (up to 3 px).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from hest_zarr.errors import InputError
from hest_zarr.ops.fiducials import CornerDetection
from hest_zarr.ops.visium_layout import CORNER_NAMES

if TYPE_CHECKING:
    from ultralytics import YOLO

#: The detector shipped with the package.
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "data" / "fiducial_detector.pt"
#: Longest side (pixels) an image is reduced to before detection: the scale the detector was trained at.
INFERENCE_SIDE = 640


@functools.lru_cache(maxsize=4)
def _load_detector(weights: str) -> YOLO:
    """Load (once per path) a corner detector on the CPU, without any network access."""
    os.environ["YOLO_OFFLINE"] = "1"
    print_options = np.get_printoptions()
    try:
        from ultralytics import YOLO
    except ImportError as error:
        raise ImportError(
            "the YOLO fiducial detector needs ultralytics: install hest-zarr with the `ml` extra"
        ) from error
    finally:
        np.set_printoptions(**print_options)  # importing ultralytics changes numpy's print options globally
    try:
        model = YOLO(weights, task="detect")
    except Exception as error:  # torch/ultralytics raise TypeError, RuntimeError, UnpicklingError... on foreign bytes
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{weights}: not a loadable YOLO checkpoint ({reason})") from error
    if sorted(model.names.values()) != sorted(CORNER_NAMES):
        raise InputError(
            f"{weights}: not a fiducial corner detector (its classes are {sorted(model.names.values())}, "
            f"expected {list(CORNER_NAMES)})"
        )
    return model


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as an ``HxWx3`` uint8 array, raising :class:`InputError` on anything else."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise InputError(
            f"fiducial detection needs a uint8 numpy image, got {type(image).__name__} "
            f"of dtype {getattr(image, 'dtype', None)}"
        )
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"fiducial detection needs an HxW grey or HxWx3 RGB image, got shape {image.shape}")
    return np.ascontiguousarray(image)


def detect_corners_yolo(
    image: np.ndarray, *, weights: str | Path | None = None, min_score: float = 0.25
) -> list[CornerDetection]:
    """Find the four corner patterns of a Visium fiducial frame with the YOLOv8 detector.

    Parameters
    ----------
    image
        ``HxWx3`` uint8 RGB or ``HxW`` uint8 grey image showing a capture area (any orientation or mirroring).
        Images larger than 640 pixels are reduced (area averaging) to 640 pixels on their longest side first;
        the detector was trained on frames spanning 35-93% of the image's shorter side.
    weights
        A YOLOv8 ``.pt`` file with the four corner classes; default: the detector shipped with the package.
    min_score
        Detections with a lower confidence are dropped.

    Returns
    -------
    At most one detection per corner name (the most confident), in :data:`CORNER_NAMES` order; ``x, y`` are
    the centroid of that pattern's fiducial dots in ``image`` pixels (pixel centres at integer coordinates).

    Raises
    ------
    InputError
        If the image is not uint8 grey/RGB, ``min_score`` is outside [0, 1] or the weights are missing or
        are not a corner detector.

    Examples
    --------
    >>> import numpy as np
    >>> detect_corners_yolo(np.full((480, 640, 3), 235, np.uint8))  # doctest: +SKIP
    []
    >>> from PIL import Image
    >>> lowres = np.asarray(Image.open("spatial/tissue_lowres_image.png").convert("RGB"))  # doctest: +SKIP
    >>> [(c.name, round(c.x), round(c.y)) for c in detect_corners_yolo(lowres)]  # doctest: +SKIP
    [('hourglass', 34, 142), ('hex_filled', 339, 142), ('triangle', 34, 455), ('hex_open', 338, 453)]

    """
    if not 0.0 <= min_score <= 1.0:
        raise InputError(f"min_score must be in [0, 1], got {min_score}")
    weights_path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    if not weights_path.is_file():
        raise InputError(f"fiducial detector weights not found: {weights_path}")
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    scale = min(1.0, INFERENCE_SIDE / max(height, width))
    if scale < 1.0:
        rgb = cv2.resize(
            rgb, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
        )
    scale_x, scale_y = rgb.shape[1] / width, rgb.shape[0] / height
    model = _load_detector(str(weights_path.resolve()))
    # ultralytics reads numpy images as BGR, as the training images were read (cv2.imread)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    boxes = model.predict(bgr, imgsz=INFERENCE_SIDE, conf=min_score, device="cpu", verbose=False)[0].boxes
    best: dict[str, CornerDetection] = {}
    for label, score, (centre_x, centre_y) in zip(
        boxes.cls.tolist(), boxes.conf.tolist(), boxes.xywh[:, :2].tolist(), strict=True
    ):
        name = model.names[int(label)]
        if name not in best or score > best[name].score:
            # box coordinates put pixel edges at integers; CornerDetection puts pixel centres there
            best[name] = CornerDetection(name, centre_x / scale_x - 0.5, centre_y / scale_y - 0.5, float(score))
    return [best[name] for name in CORNER_NAMES if name in best]
