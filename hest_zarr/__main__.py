"""``python -m hest_zarr`` runs the command line."""

from __future__ import annotations

from hest_zarr.cli import app

app(prog_name="hest-zarr")
