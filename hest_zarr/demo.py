"""The demo job: convert the bundled real Visium sample, write it, reopen it and print a summary."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import hest_zarr
from hest_zarr.converters import read_visium

DEMO_SAMPLE = "visium_human_subset_1.0.0"


def demo_sample_path() -> Path:
    """Return the folder of the bundled Space Ranger 1.0.0 sample (see ``hest_zarr/data/ATTRIBUTION.md``)."""
    return Path(str(files("hest_zarr") / "data" / DEMO_SAMPLE))


def run_demo(output: str | Path) -> dict:
    """Convert the bundled sample into ``output``, reopen it, validate it and return its summary.

    Examples
    --------
    >>> summary = run_demo("demo_output/visium_demo.zarr")  # doctest: +SKIP
    >>> summary["elements"]["spot_expression"]["n_obs"]  # doctest: +SKIP
    100

    """
    sdata = read_visium(demo_sample_path(), sample_id="visium_human_subset")
    url = hest_zarr.write(sdata, output, overwrite=True)
    problems = hest_zarr.validate(url)
    if problems:
        raise RuntimeError("the demo store does not validate:\n" + "\n".join(map(str, problems)))
    return hest_zarr.info(url)
