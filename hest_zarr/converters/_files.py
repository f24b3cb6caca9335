"""Where a reader finds its input files: one named set of candidate file names per input, tried in order.

Every converter declares each input it looks for as a :class:`SourceFile` (what it is, and the names Space
Ranger, Xenium Ranger or HEST give it across versions, newest first) and finds it with :meth:`SourceFile.find`
or :meth:`SourceFile.require`, so that a missing file is always reported the same way: the folder, what was
looked for and every name tried.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from hest_zarr.errors import InputError

#: Repeated labels named in a message before ``...``.
SHOWN_DUPLICATES = 5


@dataclass(frozen=True)
class SourceFile:
    """An input file of a reader: a description and the names it may have, relative to the source folder.

    Examples
    --------
    >>> counts = SourceFile("count matrix", ("filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix"))
    >>> counts.find(Path("/nonexistent")) is None
    True
    >>> counts.expected
    'filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix'

    """

    what: str
    names: tuple[str, ...]

    @property
    def expected(self) -> str:
        """The candidate names, for messages."""
        return " or ".join(self.names)

    def find(self, root: Path) -> Path | None:
        """Return the first candidate that exists under ``root``, or ``None``."""
        return next((root / name for name in self.names if (root / name).exists()), None)

    def require(self, root: Path) -> Path:
        """Return the first candidate that exists under ``root``; raise :class:`InputError` naming them all."""
        found = self.find(root)
        if found is None:
            raise InputError(f"{root}: no {self.what} found (expected {self.expected})")
        return found


def refuse_duplicates(labels: Iterable[object], source: str | Path, what: str = "barcode") -> None:
    """Refuse a file whose rows repeat a barcode (spot id): name the file, the first repeated ones and their number.

    Examples
    --------
    >>> refuse_duplicates(["AAAC-1", "TTTG-1"], "tissue_positions.csv")
    >>> refuse_duplicates(["AAAC-1", "TTTG-1", "AAAC-1"], "tissue_positions.csv")
    Traceback (most recent call last):
    hest_zarr.errors.InputError: tissue_positions.csv: 1 barcode appears on several rows: 'AAAC-1' (2 rows); ...

    """
    index = pd.Index(list(labels) if not isinstance(labels, pd.Index) else labels)
    if not index.has_duplicates:
        return
    counts = index.value_counts(sort=False)
    repeated = counts[counts > 1]
    shown = ", ".join(f"{label!r} ({n} rows)" for label, n in repeated.iloc[:SHOWN_DUPLICATES].items())
    more = ", ..." if len(repeated) > SHOWN_DUPLICATES else ""
    plural = f"{len(repeated)} {what}s appear" if len(repeated) > 1 else f"1 {what} appears"
    raise InputError(f"{source}: {plural} on several rows: {shown}{more}; each {what} must have one row")
