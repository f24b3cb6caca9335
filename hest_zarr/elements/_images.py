"""Image and label elements in memory: their pyramid levels and where each level's pixels sit in ``global``.

The one place that knows how a spatialdata image element holds its levels (a ``DataTree`` of ``scale<k>``
nodes, or a single ``DataArray``), used by the store's writer and by every operator that reads pixels.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
from spatialdata.transformations import get_transformation
from xarray import DataArray, DataTree

from hest_zarr.schemas import CoordinateSystems

XY = ("x", "y")


def image_levels(image: DataArray | DataTree) -> list[da.Array]:
    """Return the (dask) arrays of every pyramid level, finest first (one level for a single-scale image).

    Examples
    --------
    >>> import numpy as np
    >>> from spatialdata.models import Image2DModel
    >>> image = Image2DModel.parse(np.zeros((3, 64, 64), np.uint8), dims=("c", "y", "x"), scale_factors=[2])
    >>> [level.shape for level in image_levels(image)]
    [(3, 64, 64), (3, 32, 32)]

    """
    if isinstance(image, DataTree):
        names = sorted(image.keys(), key=lambda name: int(name.removeprefix("scale")))
        return [image[name]["image"].data for name in names]
    return [image.data]


def scale0(image: DataArray | DataTree) -> DataArray:
    """Return the full-resolution level of an image element (it carries the element's transformations)."""
    if isinstance(image, DataTree):
        return image["scale0"]["image"]
    return image


def affine_xy(element: Any, system: str = CoordinateSystems.GLOBAL) -> np.ndarray:
    """Return the 3x3 ``(x, y)`` affine from an element's own coordinates to a coordinate system."""
    if isinstance(element, DataTree):
        element = scale0(element)
    return get_transformation(element, to_coordinate_system=system).to_affine_matrix(input_axes=XY, output_axes=XY)


def level_to_global(image: DataArray | DataTree, level: int) -> np.ndarray:
    """3x3 affine from pixels of pyramid ``level`` (level k is ``Scale(2**k)`` of level 0) to ``global``."""
    return affine_xy(image) @ np.diag([2.0**level, 2.0**level, 1.0])


def load_level(image: DataArray | DataTree, max_side: int) -> tuple[int, np.ndarray]:
    """Load the finest level whose longest side is at most ``max_side`` (else the coarsest), as ``(c, y, x)``."""
    levels = image_levels(image)
    chosen = next((k for k, level in enumerate(levels) if max(level.shape[1:]) <= max_side), len(levels) - 1)
    return chosen, np.asarray(levels[chosen].compute())
