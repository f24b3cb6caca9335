"""Patch throughput: hest-zarr's chunk-aware patcher against OpenSlide, the decode limit, zarr, spatialdata, S3.

One run, one real-texture slide (``_slides.make_slide``: a ``--size`` square BigTIFF tiled from the real H&E
images of ``../shared/data``, 0.5 um/px) and ``--spots`` spots on a Visium grid (100 um centre to centre,
hexagonal) in its middle; patches of 224 px at 0.5 um/px (level 0, no resampling). Measured:

- ``openslide``: ``OpenSlide.read_region`` per patch on the same pixels written as a pyramidal JPEG TIFF (q90,
  512 px tiles) by ``hest_zarr.converters.hest.write_pyramidal_tiff``;
- ``zarr_naive``: one ``zarr.Array`` slice per patch on the store's level 0 (a subset of patches);
- ``spatialdata_tiles``: ``spatialdata.dataloader.ImageTilesDataset`` items (a subset of patches);
- ``decode_limit_<n>t``: every chunk under the patches read from disk and decoded once with the bare codec call
  (``imagecodecs.zstd_decode`` / ``jpeg_decode``, nothing else) on n threads, expressed as patches per second
  (the patch count over that time): the bar the issue sets at 70%;
- ``ours_<n>w``: ``extract_patches`` with n concurrent chunk reads, single process, the iteration timed (opening
  the store and planning excluded, as the decode limit excludes listing its chunks);
- OpenSlide, the decode limit and ours keep the best of 3 runs (same warm page cache for all);
- all of the above for the lossless (zstd) and the JPEG (q90) store;
- S3 (``--s3``): a ``moto_server`` process on 127.0.0.1 holding the store's metadata, tables and the level-0
  chunks the patches touch; ``s3_concurrent_gets``: those chunk objects fetched with s3fs's concurrent
  ``cat`` (no decoding), ``s3_ours``: ``extract_patches`` from the S3 URL (both best of 3, after one warm-up
  request), ``s3_zarr_naive``: per-patch zarr slices over ``FsspecStore`` (a subset); ``s3_cpu_accounting``:
  one more run of the GETs and of ours with the CPU seconds of this process and of the server;
  ``s3_gets_under_decode_load``: the same GETs while every touched chunk is decoded from local disk on as many
  threads as cores at the same time, no patching at all: the ceiling of any client that must decode what it
  fetches on the cores the server runs on;
- DataLoader: ``IterablePatchDataset`` over the zstd store with ``num_workers=2`` (and 0), batch 64, patches/s and
  the peak RSS of the process tree (polled every 50 ms).

Writes ``benchmarks/results/patch_throughput.json``. Run: ``python benchmarks/patch_throughput.py`` (about 15
minutes on 2 cores, 6 GB of disk under ``--workdir``; ``--keep`` keeps the slide and stores for reruns).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
from _slides import PIXEL_SIZE_UM, QUALITY, TILE, make_slide
from _watchdog import claim_workdir, release_workdir

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "patch_throughput.json"
SIZE_PX = 224
#: Local in-memory methods (OpenSlide, decode limit, ours) keep the best of this many runs.
REPEATS = 3


# --------------------------------------------------------------------------------------------- inputs
def visium_grid(size: int, n_spots: int) -> tuple[list[str], np.ndarray]:
    """``n_spots`` centres on a hexagonal 100 um grid (200 px at 0.5 um/px) centred in a ``size`` square."""
    pitch = 100 / PIXEL_SIZE_UM
    columns = int(np.ceil(np.sqrt(n_spots * np.sqrt(3) / 2)))
    rows = int(np.ceil(n_spots / columns))
    ids, centres = [], []
    for row in range(rows):
        for column in range(columns):
            if len(ids) == n_spots:
                break
            ids.append(f"r{row}_c{column}")
            centres.append([column * pitch + (row % 2) * pitch / 2, row * pitch * np.sqrt(3) / 2])
    centres = np.asarray(centres)
    centres += (size - (centres.max(axis=0) - centres.min(axis=0))) / 2 - centres.min(axis=0)
    return ids, centres


def build_stores(workdir: Path, size: int, n_spots: int) -> dict[str, Path]:
    import dask.array as da
    import zarr

    import hest_zarr
    from hest_zarr.converters.hest import write_pyramidal_tiff
    from hest_zarr.converters.slides import he_element, slide_image
    from hest_zarr.elements import build_sample, circle_spots

    claim_workdir(workdir, empty=False)  # a kept slide and stores (--keep) are reused
    slide = workdir / f"slide_{size}.tif"
    if not slide.exists():
        print(f"building {slide} ...", flush=True)
        make_slide(slide, size)
    ids, centres = visium_grid(size, n_spots)
    paths = {"slide": slide}
    for codec in ("zstd", "jpeg"):
        store = workdir / f"store_{size}_{codec}.zarr"
        paths[codec] = store
        if store.exists():
            continue
        print(f"converting to {store} ...", flush=True)
        image = slide_image(slide)
        sdata = build_sample(
            converter="slides",
            metadata={"id": "bench", "st_technology": "Visium", **image.metadata()},
            pixel_size_um=image.pixel_size_um,
            inputs={"he": [str(slide)]},
            images={"he": he_element(image)},
            shapes={"spots": circle_spots(centres, 55 / PIXEL_SIZE_UM / 2, ids, image.pixel_size_um)},
        )
        hest_zarr.write(sdata, store, image_codec=codec, jpeg_quality=QUALITY, chunk_size=TILE)
    tiff = workdir / f"pyramid_{size}.tif"
    paths["tiff"] = tiff
    if not tiff.exists():
        print(f"writing {tiff} ...", flush=True)
        group = zarr.open_group(str(paths["zstd"] / "images" / "he"), mode="r")
        levels = [da.from_zarr(group[f"s{k}"]) for k in range(len(list(group.array_keys())))]
        write_pyramidal_tiff(levels, tiff, pixel_size_um=PIXEL_SIZE_UM, tile=TILE, jpeg_quality=QUALITY)
    return paths


# --------------------------------------------------------------------------------------------- measurements
def rate(count: int, seconds: float) -> dict:
    return {"patches": count, "seconds": round(seconds, 3), "patches_per_s": round(count / seconds, 1)}


def timed(function, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def best_of(repeats: int, function, *args) -> tuple[object, float]:
    """The fastest of ``repeats`` runs (all methods that repeat get the same warm page cache)."""
    runs = [timed(function, *args) for _ in range(repeats)]
    return min(runs, key=lambda run: run[1])


def run_openslide(tiff: Path, coords: np.ndarray) -> dict:
    import openslide

    slide = openslide.OpenSlide(str(tiff))

    def read_all() -> None:
        for x, y in coords:
            np.asarray(slide.read_region((int(x), int(y)), 0, (SIZE_PX, SIZE_PX)))[..., :3]

    _, seconds = best_of(REPEATS, read_all)
    return rate(len(coords), seconds)


def run_zarr_naive(array, coords: np.ndarray) -> dict:
    def read_all() -> None:
        for x, y in coords:
            array[:, y : y + SIZE_PX, x : x + SIZE_PX]

    _, seconds = timed(read_all)
    return rate(len(coords), seconds)


def touched_chunks(store: Path, plan) -> tuple[list[Path], object]:
    """The chunk files under the patches, and the bare codec call that decodes them."""
    import imagecodecs

    from hest_zarr.ops.patch import _window_chunks
    from hest_zarr.store import open_levels

    level = open_levels(store)[plan.level]
    keys = sorted({key for o in plan.origins for key in _window_chunks(o, plan.window, level.chunk_side, level.shape)})
    names = [codec.to_dict()["name"] for codec in level.array.metadata.codecs]
    decode = imagecodecs.zstd_decode if "zstd" in names else imagecodecs.jpeg_decode
    return [store / level.path / "c" / "0" / str(row) / str(column) for row, column in keys], decode


def run_decode_limit(store: Path, plan, threads: int) -> dict:
    """Read every chunk under the patches from disk and decode it with the bare codec call, n threads."""
    paths, decode = touched_chunks(store, plan)

    def read_and_decode(path: Path) -> None:
        decode(path.read_bytes())

    with ThreadPoolExecutor(threads) as pool:
        _, seconds = best_of(REPEATS, lambda: list(pool.map(read_and_decode, paths)))
    return {**rate(len(plan), seconds), "chunks": len(paths), "chunks_per_s": round(len(paths) / seconds, 1)}


def run_ours(url, workers: int, storage_options=None, repeats: int = 1) -> dict:
    """Time the patch iteration (opening the store and planning are done before the clock starts)."""
    from hest_zarr.stream import extract_patches

    def read_all(batches) -> int:
        return sum(len(batch.indices) for batch in batches)

    runs = []
    for _ in range(repeats):
        _, batches = extract_patches(url, workers=workers, storage_options=storage_options)
        runs.append(timed(read_all, batches))
    count, seconds = min(runs, key=lambda run: run[1])
    return rate(count, seconds)


def run_spatialdata_tiles(store: Path, n: int) -> dict:
    import spatialdata
    from spatialdata.dataloader import ImageTilesDataset

    sdata = spatialdata.read_zarr(store)
    sdata.shapes["spots"] = sdata.shapes["spots"].iloc[:n]
    dataset = ImageTilesDataset(
        sdata,
        regions_to_images={"spots": "he"},
        regions_to_coordinate_systems={"spots": "global"},
        tile_dim_in_units=SIZE_PX,
    )

    def read_all() -> None:
        for index in range(len(dataset)):
            dataset[index]

    _, seconds = timed(read_all)
    return rate(len(dataset), seconds)


class PeakRSS:
    """Poll the RSS of this process and its children every 50 ms; keep the peak."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                total = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
            except psutil.Error:
                continue
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_dataloader(store: Path, workers: int) -> dict:
    from torch.utils.data import DataLoader

    from hest_zarr.stream import IterablePatchDataset

    dataset = IterablePatchDataset(str(store))
    loader = DataLoader(dataset, batch_size=64, num_workers=workers, persistent_workers=False)
    with PeakRSS() as memory:
        start = time.perf_counter()
        count = sum(len(batch["id"]) for batch in loader)
        seconds = time.perf_counter() - start
    return {**rate(count, seconds), "peak_rss_gib": round(memory.peak / 2**30, 2)}


# --------------------------------------------------------------------------------------------- S3
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_process():
    """``moto_server`` in its own process on a free loopback port."""
    port = free_port()
    process = subprocess.Popen(
        [shutil.which("moto_server") or "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield options, psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=10)


def upload_touched(store: Path, plan, options: dict, bucket: str) -> tuple[str, list[str]]:
    """Upload every file of the store except level chunks the patches do not touch; return URL and chunk keys."""
    import s3fs

    from hest_zarr.ops.patch import _window_chunks
    from hest_zarr.store import open_levels

    level = open_levels(store)[plan.level]
    keys = {
        f"{level.path}/c/0/{r}/{c}"
        for o in plan.origins
        for r, c in _window_chunks(o, plan.window, level.chunk_side, level.shape)
    }
    files = [
        p
        for p in store.rglob("*")
        if p.is_file() and ("/c/" not in p.relative_to(store).as_posix() or p.relative_to(store).as_posix() in keys)
    ]
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir(bucket)
    url = f"s3://{bucket}/{store.name}"
    fs.put([str(p) for p in files], [f"{url}/{p.relative_to(store).as_posix()}" for p in files])
    return url, sorted(f"{url}/{key}" for key in keys)


def cpu_accounted(server: psutil.Process, function, *args) -> dict:
    """One more run, with the CPU seconds the client (this process) and the moto server spent on it.

    Both share this machine's cores: when their sum over the wall time nears the core count, the client's own
    work (decoding) is paid for in GET throughput.
    """
    client = psutil.Process()

    def cpu(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    client_start, server_start, start = cpu(client), cpu(server), time.perf_counter()
    function(*args)
    wall = time.perf_counter() - start
    client_s, server_s = cpu(client) - client_start, cpu(server) - server_start
    return {
        "wall_s": round(wall, 3),
        "client_cpu_s": round(client_s, 3),
        "server_cpu_s": round(server_s, 3),
        "cores_busy": round((client_s + server_s) / wall, 2),
    }


def run_s3(store: Path, plan, codec: str, naive_subset: int) -> dict:
    import s3fs

    import hest_zarr

    results: dict = {}
    with moto_process() as (options, server):
        url, chunk_urls = upload_touched(store, plan, options, f"bench-{codec}")
        fs = s3fs.S3FileSystem(**options, max_concurrency=1, skip_instance_cache=True)
        fs.cat(chunk_urls[:8])  # warm the connection pool
        _, seconds = best_of(REPEATS, fs.cat, chunk_urls)
        results["s3_concurrent_gets"] = {
            **rate(len(plan), seconds),
            "chunks": len(chunk_urls),
            "chunks_per_s": round(len(chunk_urls) / seconds, 1),
        }
        paths, decode = touched_chunks(store, plan)

        def gets_under_decode_load() -> None:
            # the same GETs while every chunk is decoded from disk on as many threads as cores, at the same time
            with ThreadPoolExecutor(os.cpu_count()) as pool:
                load = pool.map(lambda path: decode(path.read_bytes()), paths)
                fs.cat(chunk_urls)
                list(load)

        _, seconds = best_of(REPEATS, gets_under_decode_load)
        results["s3_gets_under_decode_load"] = rate(len(plan), seconds)
        results["s3_ours"] = run_ours(url, workers=32, storage_options=options, repeats=REPEATS)
        results["s3_cpu_accounting"] = {
            "concurrent_gets": cpu_accounted(server, fs.cat, chunk_urls),
            "ours": cpu_accounted(server, run_ours, url, 32, options),
        }
        remote = hest_zarr.open(url, storage_options=options)
        array = remote["he"]["scale0"]["image"].data
        coords = plan.coords[:naive_subset]

        def naive() -> None:
            for x, y in coords:
                array[:, y : y + SIZE_PX, x : x + SIZE_PX].compute()

        _, seconds = timed(naive)
        results["s3_zarr_naive"] = rate(len(coords), seconds)
    results["s3_ours_vs_concurrent_gets"] = round(
        results["s3_ours"]["patches_per_s"] / results["s3_concurrent_gets"]["patches_per_s"], 3
    )
    results["s3_gets_under_decode_load_vs_concurrent_gets"] = round(
        results["s3_gets_under_decode_load"]["patches_per_s"] / results["s3_concurrent_gets"]["patches_per_s"], 3
    )
    results["s3_naive_vs_concurrent_gets"] = round(
        results["s3_zarr_naive"]["patches_per_s"] / results["s3_concurrent_gets"]["patches_per_s"], 3
    )
    return results


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40960)
    parser.add_argument("--spots", type=int, default=5000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hest-zarr-bench-patch"))
    parser.add_argument("--subset", type=int, default=500, help="patches for the slow baselines")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--no-spatialdata", action="store_true")
    parser.add_argument("--no-dataloader", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the slide and stores under --workdir")
    arguments = parser.parse_args()

    import warnings

    import zarr

    import hest_zarr
    from hest_zarr.ops.patch import plan_patches

    warnings.filterwarnings("ignore")
    paths = build_stores(arguments.workdir, arguments.size, arguments.spots)
    plan = plan_patches(hest_zarr.open(paths["zstd"]))
    assert (plan.level, plan.window) == (0, SIZE_PX)
    coords = plan.coords
    results: dict = {
        "slide": {"size_px": arguments.size, "pixel_size_um": PIXEL_SIZE_UM, "chunk_px": TILE, "jpeg_quality": QUALITY},
        "spots": len(plan),
        "patch": {"size_px": SIZE_PX, "pixel_size_um": 0.5, "level": plan.level},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
        "methods": {},
    }
    methods = results["methods"]
    print("openslide ...", flush=True)
    methods["openslide"] = run_openslide(paths["tiff"], coords)
    for codec in ("zstd", "jpeg"):
        store = paths[codec]
        level0 = zarr.open_array(str(store / "images" / "he" / "s0"), mode="r")
        print(f"{codec}: zarr naive, decode limit, ours ...", flush=True)
        methods[f"{codec}_zarr_naive"] = run_zarr_naive(level0, coords[: arguments.subset])
        for threads in (1, 2):
            methods[f"{codec}_decode_limit_{threads}t"] = run_decode_limit(store, plan, threads)
            methods[f"{codec}_ours_{threads}w"] = run_ours(store, threads, repeats=REPEATS)
        if not arguments.no_spatialdata:
            methods[f"{codec}_spatialdata_tiles"] = run_spatialdata_tiles(store, min(arguments.subset, 200))
        if not arguments.no_s3:
            print(f"{codec}: S3 ...", flush=True)
            methods.update({f"{codec}_{k}": v for k, v in run_s3(store, plan, codec, 100).items()})
    if not arguments.no_dataloader:
        print("DataLoader ...", flush=True)
        for workers in (0, 2):
            methods[f"dataloader_{workers}_workers"] = run_dataloader(paths["zstd"], workers)

    ratios = {}
    for codec in ("zstd", "jpeg"):
        for n in (1, 2):
            ours = methods[f"{codec}_ours_{n}w"]["patches_per_s"]
            ratios[f"{codec}_ours_{n}w_vs_openslide"] = round(ours / methods["openslide"]["patches_per_s"], 2)
            ratios[f"{codec}_ours_{n}w_vs_decode_limit_{n}t"] = round(
                ours / methods[f"{codec}_decode_limit_{n}t"]["patches_per_s"], 3
            )
    results["ratios"] = ratios
    results["goals"] = {
        "vs_openslide": ">= 10x",
        "vs_decode_limit_same_threads": ">= 0.70",
        "s3_vs_concurrent_gets": ">= 0.90",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'method':40s} {'patches/s':>10s}")
    for name, entry in methods.items():
        if isinstance(entry, dict) and "patches_per_s" in entry:
            extra = f"  peak RSS {entry['peak_rss_gib']} GiB" if "peak_rss_gib" in entry else ""
            print(f"{name:40s} {entry['patches_per_s']:>10.1f}{extra}")
        elif isinstance(entry, dict):
            print(f"{name:40s} {json.dumps(entry)}")
        else:
            print(f"{name:40s} {entry:>10}")
    for name, value in ratios.items():
        print(f"{name:40s} {value:>10}")
    print(f"wrote {RESULTS}")
    if not arguments.keep:
        release_workdir(arguments.workdir)


if __name__ == "__main__":
    main()
