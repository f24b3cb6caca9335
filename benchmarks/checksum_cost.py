"""What the integrity checks cost: slide conversion and chunk reading, with and without checksums, in one run.

A real-texture slide (``_slides.make_slide``: crops of every real H&E image in ``../shared/data``) is converted by
``hest_zarr.write`` twice per round, alternated: as released (every chunk ends with the ``crc32c`` codec, the
store is sealed with a manifest holding every object's crc32c) and with both switched off (the chains of the
previous release, no manifest). Each store's level 0 is then read whole through ``ChunkReader`` (the patch path:
fetch, verify the crc32c, decode), also alternated. Ratios are checked / unchecked; medians of the rounds.

Usage::

    python benchmarks/checksum_cost.py [--size 16384] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from _slides import QUALITY, TILE, make_slide

RESULTS = Path(__file__).parent / "results" / "checksum_cost.json"


@contextmanager
def checksums(enabled: bool):
    """Switch the crc32c codec and the manifest off (the previous release's stores) or leave them on."""
    import hest_zarr.store._raster as raster
    import hest_zarr.store._write as write
    from hest_zarr.store import codecs

    original_codecs, original_seal = raster.image_array_codecs, write.seal_store

    def without_crc32c(*args, **kwargs):
        chain = original_codecs(*args, **kwargs)
        chain["compressors"] = [c for c in chain["compressors"] or [] if c is not codecs.CHECKSUM] or None
        return chain

    def consolidate_only(staging, manifest, *, consolidate=True):
        import zarr

        zarr.consolidate_metadata(str(staging))

    if not enabled:
        raster.image_array_codecs, write.seal_store = without_crc32c, consolidate_only
    try:
        yield
    finally:
        raster.image_array_codecs, write.seal_store = original_codecs, original_seal


def convert(slide: Path, out: Path, codec: str) -> float:
    import warnings

    import hest_zarr
    from hest_zarr.converters.slides import he_element, slide_image
    from hest_zarr.elements import build_sample

    image = slide_image(slide)
    sdata = build_sample(
        converter="slides",
        metadata={"id": "bench", "st_technology": "Visium", **image.metadata()},
        pixel_size_um=image.pixel_size_um,
        inputs={"he": [str(slide)]},
        images={"he": he_element(dataclasses.replace(image))},
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hest_zarr.write(sdata, out, image_codec=codec, jpeg_quality=QUALITY, chunk_size=TILE, overwrite=True)
    return time.perf_counter() - start


def read_level0(store: Path) -> tuple[float, int]:
    import warnings

    from hest_zarr.store import ChunkReader, chunk_workers, open_levels

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unchecked store warns that it has no manifest
        level = open_levels(store)[0]
    reader = ChunkReader(level, workers=chunk_workers(store))
    _, rows, columns = level.array.cdata_shape
    keys = [(row, column) for row in range(rows) for column in range(columns)]
    start = time.perf_counter()
    for future in reader.submit_many(keys).values():
        reader.release([future.result()])
    seconds = time.perf_counter() - start
    reader.close()
    return seconds, len(keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="hest-zarr-checksum-"))
    try:
        slide = folder / "slide.tif"
        results: dict = {
            "slide": make_slide(slide, arguments.size),
            "rounds": arguments.rounds,
            "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start",
            "codecs": {},
        }
        for codec in ("zstd", "jpeg"):
            timings: dict[str, dict[str, list[float]]] = {
                name: {"convert_s": [], "read_chunks_per_s": []} for name in ("checked", "unchecked")
            }
            for _ in range(arguments.rounds):
                for name in ("unchecked", "checked"):
                    with checksums(name == "checked"):
                        timings[name]["convert_s"].append(convert(slide, folder / f"{name}.zarr", codec))
                for name in ("unchecked", "checked"):
                    seconds, n = read_level0(folder / f"{name}.zarr")
                    timings[name]["read_chunks_per_s"].append(n / seconds)
            medians = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in timings.items()}
            results["codecs"][codec] = {
                "median": medians,
                "all": timings,
                "convert_time_ratio_checked_over_unchecked": medians["checked"]["convert_s"]
                / medians["unchecked"]["convert_s"],
                "read_rate_ratio_checked_over_unchecked": medians["checked"]["read_chunks_per_s"]
                / medians["unchecked"]["read_chunks_per_s"],
            }
            entry = results["codecs"][codec]
            print(
                f"{codec}: conversion {medians['unchecked']['convert_s']:.1f} s -> "
                f"{medians['checked']['convert_s']:.1f} s (x{entry['convert_time_ratio_checked_over_unchecked']:.3f}); "
                f"level-0 reads {medians['unchecked']['read_chunks_per_s']:.0f} -> "
                f"{medians['checked']['read_chunks_per_s']:.0f} chunks/s "
                f"(x{entry['read_rate_ratio_checked_over_unchecked']:.3f})"
            )
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
