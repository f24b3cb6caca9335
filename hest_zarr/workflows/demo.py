"""The demo job: convert the bundled real ST v1 section (MOB1), write it, patch it, and summarise both."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from hest_zarr.converters.st_v1 import read_st_v1
from hest_zarr.elements import get_record
from hest_zarr.store import info, open_patches, validate, write
from hest_zarr.workflows.patch import write_patches

DEMO_SAMPLE = "st_v1_mob1"
#: HEST-Benchmark's field of view: 112 um patches (224 px at 0.5 um/px); MOB1's H&E is ~4.39 um/px.
PATCH_FIELD_UM = 112.0


def demo_sample_path() -> Path:
    """Return the folder of the bundled ST v1 MOB1 section (see ``hest_zarr/data/ATTRIBUTION.md``)."""
    return Path(str(files("hest_zarr") / "data" / DEMO_SAMPLE))


def run_demo(output: str | Path) -> dict[str, Any]:
    """Convert MOB1 into the store ``output``, validate it, cut a patch around every spot, and summarise.

    The patches cover HEST-Benchmark's 112 um at the section's own resolution (no upsampling of its
    ~4.39 um/px H&E) and go to ``<output>.patches.zarr``.

    Examples
    --------
    >>> summary = run_demo("demo_output/mob1.zarr")  # doctest: +SKIP
    >>> summary["store"]["elements"]["spot_expression"]["n_obs"], summary["patches"]["n"]  # doctest: +SKIP
    (1934, 1934)

    """
    folder = demo_sample_path()
    sdata = read_st_v1(
        folder / "MOB1.tsv.gz",
        alignment=folder / "alignment_table_MOB1.tsv.gz",
        image=folder / "MOB1.jpg",
        sample_id="MOB1",
    )
    url = write(sdata, output, overwrite=True, chunk_size=256)
    problems = validate(url)
    if problems:
        raise RuntimeError("the demo store does not validate:\n" + "\n".join(map(str, problems)))
    pixel_size = get_record(sdata).pixel_size_um
    size_px = round(PATCH_FIELD_UM / pixel_size)
    patches_url = write_patches(
        url, f"{Path(output)}.patches.zarr", size_px=size_px, pixel_size_um=pixel_size, overwrite=True, progress=False
    )
    patches = open_patches(patches_url)
    return {
        "store": info(url),
        "patches": {
            "url": patches_url,
            "n": len(patches),
            "shape": list(patches.img.shape),
            "pixel_size_um": pixel_size,
            "field_um": size_px * pixel_size,
        },
    }
