"""Xenium molecules (``transcripts.parquet``, else ``transcripts.csv.gz``) as the lazy points ``transcripts``."""

from __future__ import annotations

from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
from spatialdata.models import PointsModel
from spatialdata_io._constants._constants import XeniumKeys

from hest_zarr.converters._xenium_alignment import XeniumFrame
from hest_zarr.converters._xenium_inputs import (
    CELL_ID,
    DEFAULT_PIXEL_SIZE_UM,
    TRANSCRIPTS,
    binary_columns,
    decode_binary,
    parquet_schema,
    read_table,
    require_columns,
)
from hest_zarr.errors import InputError

#: Rows per dask partition of a gzipped CSV (read whole, then split).
CSV_PARTITION_ROWS = 1_000_000


def read_transcripts(
    path: str | Path, *, frame: XeniumFrame | None = None, blocksize: int | str = "default"
) -> dd.DataFrame:
    """Read every Xenium molecule as a points element (micrometres, lazily).

    Parameters
    ----------
    path
        ``transcripts.parquet`` or ``transcripts.csv.gz``.
    frame
        Where micrometres land in ``global`` (default: morphology pixels at 0.2125 um/px).
    blocksize
        Target bytes per dask partition of a parquet file (row groups are combined up to it; dask's default
        is 256 MiB). A gzipped CSV is one stream and is read whole.

    Returns
    -------
    The points: ``x, y`` (um), ``gene`` (categorical, all codewords kept), ``qv``, ``cell_id`` and the file's other
    columns, one row per molecule.

    Raises
    ------
    InputError
        Missing, truncated or unreadable file, or one without ``x_location, y_location, feature_name``.

    Examples
    --------
    >>> points = read_transcripts("xenium/transcripts.parquet")  # doctest: +SKIP
    >>> points["gene"].value_counts().compute()["BLANK_0070"]  # doctest: +SKIP

    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such transcripts file (expected {TRANSCRIPTS.expected})")
    frame = frame if frame is not None else XeniumFrame.morphology(DEFAULT_PIXEL_SIZE_UM)
    if path.suffix == ".parquet":
        schema = parquet_schema(path)
        table = dd.read_parquet(str(path), blocksize=blocksize)
        binary = binary_columns(schema)
        if binary:
            table = table.map_partitions(decode_binary, binary)
    else:
        table = dd.from_pandas(read_table(path), chunksize=CSV_PARTITION_ROWS, sort=False)
    required = (XeniumKeys.TRANSCRIPTS_X.value, XeniumKeys.TRANSCRIPTS_Y.value, XeniumKeys.FEATURE_NAME.value)
    require_columns(path, list(table.columns), required, "Xenium transcripts")
    table = table.rename(columns=dict(zip(required, ("x", "y", "gene"), strict=True)))
    genes = np.sort(table["gene"].dropna().unique().compute().astype(str).to_numpy())
    table["gene"] = table["gene"].astype(pd.CategoricalDtype(categories=genes))
    return PointsModel.parse(
        table,
        coordinates={"x": "x", "y": "y"},
        feature_key="gene",
        instance_key=CELL_ID if CELL_ID in table.columns else None,
        transformations=frame.micrometre_transformations(),
        sort=True,
    )
