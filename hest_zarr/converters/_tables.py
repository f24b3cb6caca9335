"""Bare text tables and where their spots sit, shared by the ST v1 and legacy-table converters.

:class:`SpotPlacement` is where a table's spots were placed; :func:`read_delimited_table` reads a CSV/TSV/TXT
table with any delimiter, :func:`compact_integers` stores integer-valued columns (array positions, flags) as
integers and :func:`infer_species` tells the species from gene names where it is unambiguous.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from hest_zarr.errors import InputError

#: Fewest genes, and the agreeing fraction of them, for :func:`infer_species` to name a species.
MIN_SPECIES_GENES = 20
SPECIES_AGREEMENT = 0.9


@dataclass(frozen=True)
class SpotPlacement:
    """Where a table's spots sit, and how that was found.

    ``centres`` are in ``global``; ``parameters`` go to the spots' provenance, ``obs_columns`` to their table;
    ``error_um`` is the positional error in micrometres, when known.
    """

    centres: np.ndarray
    pixel_size: float
    method: str
    parameters: dict[str, Any]
    obs_columns: dict[str, np.ndarray] = field(default_factory=dict)
    error_um: float | None = None


def read_delimited_table(
    path: str | Path, *, index_col: int | None = 0, header: Literal["infer"] | None = "infer"
) -> pd.DataFrame:
    """Read a CSV/TSV/TXT table (optionally ``.gz``), sniffing the delimiter from its first line.

    Tab, comma and semicolon are tried in that order, else runs of whitespace. A header one field shorter than the
    rows (R's ``write.table``) makes the first column the index, as pandas does.

    Parameters
    ----------
    path
        The table.
    index_col
        Column to use as the index (``None``: a default range index).
    header
        ``None`` for a table without a header row.

    Raises
    ------
    InputError
        Missing, empty or unparseable file.

    Examples
    --------
    >>> counts = read_delimited_table("MOB1.tsv")  # doctest: +SKIP

    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as handle:
            first_line = handle.readline()
        separator = next((s for s in ("\t", ",", ";") if s in first_line), r"\s+")
        refuse_cut_last_line(path, separator, has_header=header is not None)
        return pd.read_csv(path, sep=separator, index_col=index_col, header=header)
    except InputError:
        raise
    except (EOFError, zlib.error) as err:
        raise InputError(f"{path}: truncated: the compressed file ends early ({type(err).__name__}: {err})") from err
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"{path}: not a readable delimited text table ({type(err).__name__}: {err})") from err


def _fields(line: str, separator: str) -> list[str]:
    line = line.rstrip("\r\n")
    return line.split() if separator == r"\s+" else next(csv.reader([line], delimiter=separator))


def _head_and_last_line(path: Path) -> tuple[list[str], str, bool]:
    """Return the first two lines, the last non-blank line and whether the file ends with a newline."""
    if path.suffix == ".gz":  # no random access: read it through
        with gzip.open(path, "rt") as handle:
            head = list(itertools.islice(handle, 2))
            last = head[-1] if head else ""
            for line in handle:
                if line.strip():
                    last = line
        return head, last, last.endswith("\n")
    with open(path) as handle:
        head = list(itertools.islice(handle, 2))
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - TAIL_BYTES))
        tail = handle.read()
    lines = [line for line in tail.decode("utf-8", errors="replace").splitlines() if line.strip()]
    return head, lines[-1] if lines else "", tail.rstrip(b" \t").endswith(b"\n")


#: How much of the end of a plain table is read to find its last line.
TAIL_BYTES = 1 << 20


def refuse_cut_last_line(path: Path, separator: str, *, has_header: bool = True) -> None:
    """Refuse a table cut mid-line (an interrupted download or copy): its last line is shorter than its rows.

    The last line is compared with the first data row: fewer fields, or as many but an empty last one and no
    final newline, mean the file ends inside a row.

    Raises
    ------
    InputError
        Naming the file and both field counts.

    Examples
    --------
    >>> refuse_cut_last_line(Path("tissue_positions.csv"), ",")  # doctest: +SKIP

    """
    head, last, ends_with_newline = _head_and_last_line(path)
    reference = head[1] if has_header and len(head) > 1 else head[0] if head else ""
    if not reference.strip() or last == reference or (has_header and last == head[0]):
        return
    expected, found = _fields(reference, separator), _fields(last, separator)
    if len(found) < len(expected) or (not ends_with_newline and len(found) == len(expected) and found[-1] == ""):
        raise InputError(
            f"{path}: truncated: its last line has {len(found)} fields where its first row has {len(expected)} "
            "(the file ends inside a row; download or copy it again)"
        )


def compact_integers(values: np.ndarray) -> np.ndarray:
    """Return integer-valued numbers as int32 (array positions, flags); anything else unchanged.

    Examples
    --------
    >>> compact_integers(np.array([1.0, 2.0])).dtype.name, compact_integers(np.array([1.5])).dtype.name
    ('int32', 'float64')

    """
    values = np.asarray(values)
    if pd.api.types.is_numeric_dtype(values) and np.array_equal(values, np.round(values)):
        return values.astype(np.int32)
    return values


def infer_species(gene_names: Iterable[Any]) -> tuple[str, str] | None:
    """Infer the species from gene identifiers, only where it is unambiguous; return it with the reason.

    Mouse: >= 90 % mouse Ensembl ids (``ENSMUSG``) or capitalised symbols (``Gapdh``). Human: >= 90 % human Ensembl
    ids (``ENSG``) or upper-case symbols (``GAPDH``). At least 20 genes are needed; otherwise ``None``.

    Examples
    --------
    >>> infer_species(["Gapdh", "Actb", "Mbp"] * 10)[0]
    'Mus musculus'

    """
    names = [str(name) for name in gene_names]
    if len(names) < MIN_SPECIES_GENES:
        return None
    votes = {
        ("Mus musculus", "mouse Ensembl ids (ENSMUSG)"): sum(n.startswith("ENSMUSG") for n in names),
        ("Homo sapiens", "human Ensembl ids (ENSG)"): sum(n.startswith("ENSG") for n in names),
    }
    symbols = [n for n in names if n[:1].isalpha() and sum(c.isalpha() for c in n) >= 2]
    if len(symbols) >= MIN_SPECIES_GENES:
        votes[("Mus musculus", "capitalised symbols as in mouse (e.g. Gapdh)")] = sum(
            n[0].isupper() and n[1:] == n[1:].lower() and any(c.islower() for c in n) for n in symbols
        )
        votes[("Homo sapiens", "upper-case symbols as in human (e.g. GAPDH)")] = sum(n == n.upper() for n in symbols)
    for (species, kind), count in votes.items():
        total = len(symbols) if "symbols" in kind else len(names)
        if count >= SPECIES_AGREEMENT * total:
            return species, f"inferred from gene names: {count} of {total} are {kind}"
    return None
