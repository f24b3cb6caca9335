"""Where a reader finds its input files: one named set of candidate file names per input, tried in order.

Every converter declares each input it looks for as a :class:`SourceFile` (what it is, and the names Space
Ranger, Xenium Ranger or HEST give it across versions, newest first) and finds it with :meth:`SourceFile.find`
or :meth:`SourceFile.require`, so that a missing file is always reported the same way: the folder, what was
looked for and every name tried.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hest_zarr.errors import InputError


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
