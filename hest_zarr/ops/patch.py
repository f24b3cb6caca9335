"""Patches around spots (or any shapes/points element, or a grid over the tissue), read chunk by chunk.

How a patch is made (the documented resampling):

1. The target is ``size_px`` pixels at ``pixel_size_um`` (default 224 px at 0.5 um/px = 112 um, as in
   HEST-Benchmark). The pyramid level used is the coarsest whose pixels are not larger than the target's
   (level ``k`` has ``level_scale = 2**k`` level-0 pixels per pixel).
2. At that level the patch is the square window of ``window = round(size_px * pixel_size_um / level
   pixel size)`` pixels whose top-left corner is ``round(centre_k - window / 2)``, with ``centre_k`` the
   centre in that level's pixel coordinates (pixel centres at integers). Parts outside the image are
   filled with ``pad_value`` (white by default, like slide background).
3. When ``window != size_px`` the window is resized to ``size_px`` with OpenCV's area interpolation
   (``INTER_AREA``) when shrinking, bilinear when enlarging. When the target is finer than the slide's
   pixels, level 0 is enlarged with a warning (``allow_upsample=False`` refuses instead).

``coords`` are the patch's top-left corner in level-0 pixels of the image, as in HEST's patch files.

The operator is pure: :func:`plan_patches` takes a SpatialData (in memory, or opened lazily by
:func:`hest_zarr.open`), :func:`read_patches` a plan and a :class:`hest_zarr.store.ChunkReader` of the plan's
level. Opening a store by URL, and the reader that the datasets and the benchmark share, are
:class:`hest_zarr.stream.SamplePatches`; writing a patch store is :func:`hest_zarr.workflows.patch.write_patches`.

How it is read: patches are sorted by the chunk row their window starts in; each band of patches needs
a set of chunks that are fetched and decoded exactly once, concurrently (:class:`hest_zarr.store.ChunkReader`), while
the previous band is being cut; a chunk is dropped as soon as no later band needs it, so memory stays at
about two chunk rows of the touched chunks whatever the slide size. No dask graph is built.
"""

from __future__ import annotations

import collections
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from spatialdata import SpatialData

from hest_zarr.elements import CoordinateSystems, Elements, Keys, affine_xy, get_record, image_levels
from hest_zarr.errors import InputError
from hest_zarr.store import ChunkKey, ChunkReader, LevelArray

DEFAULT_SIZE_PX = 224
DEFAULT_PIXEL_SIZE_UM = 0.5
GRID = "grid"


@dataclass(frozen=True)
class PatchPlan:
    """Where every patch of a sample is read: the level, the window side, the top-left of each window.

    Attributes
    ----------
    ids
        Patch ids (spot ids, or ``r<row>_c<col>`` for grid patches).
    centers
        Patch centres in level-0 pixels of the image, ``(x, y)``.
    level
        Pyramid level read.
    level_scale
        Level-0 pixels per pixel of that level.
    level_pixel_size_um
        Micrometres per pixel of that level.
    window
        Side of the window read at that level, in its pixels.
    origins
        Top-left corner ``(x, y)`` of every window, in pixels of that level.
    size_px, pixel_size_um
        The target: side in pixels and micrometres per pixel of the returned patches.

    """

    ids: np.ndarray
    centers: np.ndarray
    level: int
    level_scale: float
    level_pixel_size_um: float
    window: int
    origins: np.ndarray
    size_px: int
    pixel_size_um: float

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def coords(self) -> np.ndarray:
        """Top-left corner ``(x, y)`` of every patch in level-0 pixels (int64)."""
        return np.round(self.origins * self.level_scale).astype(np.int64)

    def subset(self, indices: np.ndarray) -> PatchPlan:
        """Return the plan of some of the patches."""
        return PatchPlan(
            self.ids[indices],
            self.centers[indices],
            self.level,
            self.level_scale,
            self.level_pixel_size_um,
            self.window,
            self.origins[indices],
            self.size_px,
            self.pixel_size_um,
        )


@dataclass
class PatchBatch:
    """Patches cut together: positions in the plan, ids, top-left level-0 coords and ``(n, H, W, 3)`` pixels."""

    indices: np.ndarray
    ids: np.ndarray
    coords: np.ndarray
    images: np.ndarray = field(repr=False)


# --------------------------------------------------------------------------------------------- planning
def _element_centres(sdata: SpatialData, element: str) -> tuple[np.ndarray, np.ndarray, Any]:
    """Centres of a shapes or points element in its own coordinates, with its ids and the element."""
    if element in sdata.shapes:
        shapes = sdata.shapes[element]
        centroids = shapes.geometry.centroid
        return np.asarray(shapes.index.astype(str)), np.column_stack([centroids.x, centroids.y]), shapes
    if element in sdata.points:
        points = sdata.points[element]
        frame = points[["x", "y"]].compute()
        return np.asarray(frame.index.astype(str)), frame.to_numpy(dtype=float), points
    raise InputError(f"no shapes or points element '{element}' in the sample (it holds {sorted(sdata.shapes)})")


def _grid_centres(sdata: SpatialData, image_shape: tuple[int, int], side_px: float, image_affine: np.ndarray):
    """Centres of non-overlapping patches tiling the tissue (or the whole image without a ``tissue`` element)."""
    height, width = image_shape
    columns = np.arange(side_px / 2, width, side_px)
    rows = np.arange(side_px / 2, height, side_px)
    grid_x, grid_y = np.meshgrid(columns, rows)
    row_index, col_index = np.meshgrid(np.arange(len(rows)), np.arange(len(columns)), indexing="ij")
    centres = np.column_stack([grid_x.ravel(), grid_y.ravel()])
    ids = np.array([f"r{r}_c{c}" for r, c in zip(row_index.ravel(), col_index.ravel(), strict=True)])
    if Elements.TISSUE in sdata.shapes:
        import shapely

        tissue = sdata.shapes[Elements.TISSUE]
        to_image = np.linalg.inv(image_affine) @ affine_xy(tissue, CoordinateSystems.GLOBAL)
        union = shapely.union_all(tissue.geometry.values)
        to_tissue = np.linalg.inv(to_image)
        inside = np.zeros(len(centres), dtype=bool)
        # a tile is kept when its centre or any corner lies on tissue
        for offset in ((0, 0), (-1, -1), (-1, 1), (1, -1), (1, 1)):
            points = centres + np.asarray(offset) * side_px / 2
            tissue_xy = (to_tissue @ np.column_stack([points, np.ones(len(points))]).T).T
            inside |= shapely.contains_xy(union, tissue_xy[:, 0], tissue_xy[:, 1])
        centres, ids = centres[inside], ids[inside]
    return ids, centres


def plan_patches(
    sdata: SpatialData,
    *,
    element: str = Elements.SPOTS,
    image: str = Elements.HE,
    size_px: int = DEFAULT_SIZE_PX,
    pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM,
    in_tissue_only: bool = False,
    allow_upsample: bool = True,
) -> PatchPlan:
    """Decide the level and window of every patch.

    Parameters
    ----------
    sdata
        A sample: in memory (e.g. a converter's output) or opened lazily (:func:`hest_zarr.open`).
    element
        Shapes or points element whose centres are the patch centres, or ``"grid"`` for non-overlapping
        patches tiling the ``tissue`` polygons (the whole image when the store has none).
    image
        Image element to cut.
    size_px, pixel_size_um
        Target side in pixels and micrometres per pixel.
    in_tissue_only
        Keep only spots flagged ``in_tissue`` in the expression table annotating them.
    allow_upsample
        When the target is finer than the image's pixels: enlarge level 0 (with a warning) or refuse.

    Examples
    --------
    >>> sdata = hest_zarr.open("sample.zarr")  # doctest: +SKIP
    >>> plan = plan_patches(sdata, size_px=224, pixel_size_um=0.5)  # doctest: +SKIP
    >>> plan.level, plan.window, len(plan)  # doctest: +SKIP
    (0, 224, 4992)

    """
    if size_px < 1 or pixel_size_um <= 0:
        raise InputError(f"size_px must be >= 1 and pixel_size_um > 0, got {size_px} and {pixel_size_um}")
    if image not in sdata.images:
        raise InputError(f"the store holds no image '{image}' to cut patches from (images: {sorted(sdata.images)})")
    record = get_record(sdata)
    if record.pixel_size_um is None:
        raise InputError("the store records no pixel size, so a target in micrometres per pixel cannot be met")
    image_affine = affine_xy(sdata[image], CoordinateSystems.GLOBAL)
    level0_um = record.pixel_size_um * float(np.sqrt(abs(np.linalg.det(image_affine[:2, :2]))))
    shapes = [(int(level.shape[-2]), int(level.shape[-1])) for level in image_levels(sdata[image])]
    height, width = shapes[0]
    scales = [width / shape[1] for shape in shapes]
    scales = [2.0**k if abs(scale - 2.0**k) / 2.0**k < 0.01 else scale for k, scale in enumerate(scales)]

    if element == GRID:
        ids, centres = _grid_centres(sdata, (height, width), size_px * pixel_size_um / level0_um, image_affine)
    else:
        ids, own_xy, source = _element_centres(sdata, element)
        to_image = np.linalg.inv(image_affine) @ affine_xy(source, CoordinateSystems.GLOBAL)
        centres = (to_image @ np.column_stack([own_xy, np.ones(len(own_xy))]).T).T[:, :2]
        if in_tissue_only:
            keep = _in_tissue(sdata, element, ids)
            ids, centres = ids[keep], centres[keep]
    outside = (centres[:, 0] < 0) | (centres[:, 1] < 0) | (centres[:, 0] >= width) | (centres[:, 1] >= height)
    if outside.any():
        warnings.warn(
            f"{int(outside.sum())} of {len(ids)} patch centres of '{element}' lie outside the image "
            f"'{image}' ({width} x {height} px); they are skipped (e.g. {ids[outside][0]!r})",
            stacklevel=2,
        )
        ids, centres = ids[~outside], centres[~outside]
    if len(ids) == 0:
        raise InputError(f"no patch to cut: '{element}' has no centre inside the image '{image}'")

    level = max((k for k, scale in enumerate(scales) if level0_um * scale <= pixel_size_um * (1 + 1e-6)), default=0)
    level_um = level0_um * scales[level]
    if level_um > pixel_size_um * (1 + 1e-6):
        message = (
            f"the target {pixel_size_um} um/px is finer than the image's {level0_um:.4g} um/px: "
            f"patches are enlarged {level_um / pixel_size_um:.2f}x from level 0"
        )
        if not allow_upsample:
            raise InputError(message + " (refused: allow_upsample=False)")
        warnings.warn(message, stacklevel=2)
    window = max(1, round(size_px * pixel_size_um / level_um))
    centres_k = (centres + 0.5) / scales[level] - 0.5
    origins = np.floor(centres_k - window / 2 + 0.5).astype(np.int64)
    return PatchPlan(ids, centres, level, scales[level], level_um, window, origins, size_px, pixel_size_um)


def _in_tissue(sdata: SpatialData, element: str, ids: np.ndarray) -> np.ndarray:
    for table in sdata.tables.values():
        attrs = table.uns.get("spatialdata_attrs", {})
        if attrs.get("region") == element and Keys.IN_TISSUE in table.obs:
            flags = table.obs.set_index(attrs["instance_key"])[Keys.IN_TISSUE].astype(bool)
            return flags.reindex(ids).fillna(False).to_numpy(dtype=bool)
    raise InputError(f"in_tissue_only: no table annotating '{element}' has an '{Keys.IN_TISSUE}' column")


# --------------------------------------------------------------------------------------------- reading
def _window_chunks(origin: np.ndarray, window: int, chunk: tuple[int, int], shape: tuple[int, int]) -> list[ChunkKey]:
    x0, y0 = int(origin[0]), int(origin[1])
    height, width = shape
    rows = range(max(y0, 0) // chunk[0], (min(y0 + window, height) - 1) // chunk[0] + 1)
    columns = range(max(x0, 0) // chunk[1], (min(x0 + window, width) - 1) // chunk[1] + 1)
    return [(row, column) for row in rows for column in columns]


def _cut(
    x0: int,
    y0: int,
    window: int,
    chunks: dict[ChunkKey, np.ndarray],
    chunk: tuple[int, int],
    shape: tuple[int, int],
    pad_value: int,
    out: np.ndarray,
) -> np.ndarray:
    """Copy the window with top-left ``(x0, y0)`` from the decoded chunks into ``out`` (``window x window x c``).

    Plain integer arithmetic: this runs once per patch on the thread that also hands out the batches.
    """
    (chunk_height, chunk_width), (height, width) = chunk, shape
    y_end, x_end = min(y0 + window, height), min(x0 + window, width)
    if x0 < 0 or y0 < 0 or x_end < x0 + window or y_end < y0 + window:
        out[...] = pad_value
    first_column, last_column = max(x0, 0) // chunk_width, (x_end - 1) // chunk_width
    for row in range(max(y0, 0) // chunk_height, (y_end - 1) // chunk_height + 1):
        top = row * chunk_height
        ya, yb = max(y0, top), min(y_end, top + chunk_height)
        for column in range(first_column, last_column + 1):
            left = column * chunk_width
            xa, xb = max(x0, left), min(x_end, left + chunk_width)
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = chunks[row, column][ya - top : yb - top, xa - left : xb - left]
    return out


def _resize(window: np.ndarray, size_px: int) -> np.ndarray:
    if window.shape[0] == size_px:
        return window
    interpolation = cv2.INTER_AREA if window.shape[0] > size_px else cv2.INTER_LINEAR
    return cv2.resize(window, (size_px, size_px), interpolation=interpolation)


def plan_bands(plan: PatchPlan, level: LevelArray) -> list[np.ndarray]:
    """Group the plan's patches by the chunk row their window starts in, top to bottom, each left to right.

    Returns the patch indices of every band. Consecutive bands share one chunk row at most (a window
    spans two rows when it is smaller than a chunk), so bands are the unit of work to split between readers.

    Examples
    --------
    >>> level = hest_zarr.store.open_levels("sample.zarr")[plan.level]  # doctest: +SKIP
    >>> sum(len(band) for band in plan_bands(plan, level)) == len(plan)  # doctest: +SKIP
    True

    """
    (chunk_height, _), (height, _) = level.chunk_side, level.shape
    start_rows = np.clip(plan.origins[:, 1], 0, height - 1) // chunk_height
    order = np.lexsort((plan.origins[:, 0], start_rows))
    return [order[start_rows[order] == row] for row in np.unique(start_rows)]


class _Recycler:
    """Hand out batch arrays, reusing one the caller has let go of (nothing references it any more).

    Fresh memory costs the kernel a page fault and zeroing per 4 KiB; reusing dropped batches saves that (a
    few percent of patching time on the benchmark slide). A batch still referenced (kept, viewed, wrapped by
    ``torch.from_numpy``) has more references than the recycler's own and is never reused. The recycler's own
    count is measured once on a probe array, through the same code, rather than assumed: interpreters differ in
    which temporary references they count.
    """

    def __init__(self, keep: int = 8) -> None:
        self._recent: collections.deque[np.ndarray] = collections.deque([np.empty(0, dtype=np.uint8)], maxlen=keep)
        self._alone = next(self._reference_counts())[1]
        self._recent.clear()

    def _reference_counts(self) -> Iterator[tuple[np.ndarray, int]]:
        for array in self._recent:
            yield array, sys.getrefcount(array)

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        for array, references in self._reference_counts():
            if references == self._alone and array.shape == shape:
                return array
        array = np.empty(shape, dtype=np.uint8)
        self._recent.append(array)
        return array


def read_patches(
    plan: PatchPlan,
    reader: ChunkReader,
    *,
    batch_size: int = 16,
    pad_value: int = 255,
    prefetch_bands: int | None = None,
) -> Iterator[PatchBatch]:
    """Cut the plan's patches band by band, each chunk fetched and decoded once; yields batches.

    Batches come in band order (top to bottom, left to right), not in the plan's order: use
    ``batch.indices`` (positions in ``plan``) to place them. ``prefetch_bands`` (default: the reader's) is how
    many bands of chunks are requested ahead of the one being cut.

    Examples
    --------
    >>> plan = plan_patches(hest_zarr.open("sample.zarr"))  # doctest: +SKIP
    >>> reader = ChunkReader(hest_zarr.store.open_levels("sample.zarr")[plan.level], workers=4)  # doctest: +SKIP
    >>> images = np.empty((len(plan), plan.size_px, plan.size_px, 3), np.uint8)  # doctest: +SKIP
    >>> for batch in read_patches(plan, reader):  # doctest: +SKIP
    ...     images[batch.indices] = batch.images

    """
    level = reader.level
    chunk, shape, channels = level.chunk_side, level.shape, level.array.shape[0]
    bands = plan_bands(plan, level)
    coords = plan.coords
    band_chunks = [
        sorted({key for index in band for key in _window_chunks(plan.origins[index], plan.window, chunk, shape)})
        for band in bands
    ]
    ahead_bands = reader.prefetch_bands if prefetch_bands is None else prefetch_bands
    outputs = _Recycler()
    pending: dict[ChunkKey, Future[np.ndarray]] = {}
    decoded: dict[ChunkKey, np.ndarray] = {}
    try:
        for number, band in enumerate(bands):
            for ahead in band_chunks[number : number + 1 + ahead_bands]:
                pending.update(reader.submit_many([k for k in ahead if k not in decoded and k not in pending]))
            for key in band_chunks[number]:
                if key not in decoded:
                    decoded[key] = pending.pop(key).result()
            origins = plan.origins[band].tolist()
            for offset in range(0, len(band), batch_size):
                indices = band[offset : offset + batch_size]
                images = outputs.take((len(indices), plan.size_px, plan.size_px, channels))
                for out, (x0, y0) in zip(images, origins[offset : offset + batch_size], strict=True):
                    if plan.window == plan.size_px:
                        _cut(x0, y0, plan.window, decoded, chunk, shape, pad_value, out)
                    else:
                        window = np.empty((plan.window, plan.window, channels), np.uint8)
                        _cut(x0, y0, plan.window, decoded, chunk, shape, pad_value, window)
                        out[...] = _resize(window, plan.size_px)
                yield PatchBatch(indices, plan.ids[indices], coords[indices], images)
            if number + 1 < len(bands):
                next_row = min(key[0] for key in band_chunks[number + 1])
                reader.release([decoded.pop(key) for key in [key for key in decoded if key[0] < next_row]])
    finally:
        for future in pending.values():
            future.cancel()
        reader.release(decoded.values())
