"""Which features of an expression table are control or blank probes rather than genes: one rule for every reader."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

import numpy as np
import pandas as pd

#: Names of control and blank probes (Xenium, CosMx, MERSCOPE), matched anywhere in the name, any case.
CONTROL_PROBE: Final = re.compile(
    r"blank|negcontrol|systemcontrol|control_?probe|unassignedcodeword|deprecatedcodeword|negprb|intergenic",
    re.IGNORECASE,
)
#: Xenium ``feature_types`` of controls (``features.tsv.gz`` / the h5's ``feature_type``).
CONTROL_FEATURE_TYPES: Final = frozenset(
    {
        "Negative Control Probe",
        "Negative Control Codeword",
        "Unassigned Codeword",
        "Deprecated Codeword",
        "Genomic Control",
        "Blank Codeword",
    }
)


def is_control_feature(names: Iterable[str], feature_types: Iterable[str] | None = None) -> np.ndarray:
    """Flag control features by name (:data:`CONTROL_PROBE`) or, when given, by their Xenium feature type.

    Examples
    --------
    >>> is_control_feature(["ACTB", "BLANK_0070", "NegControlProbe_00003", "Controlled"]).tolist()
    [False, True, True, False]

    """
    by_name = np.fromiter((CONTROL_PROBE.search(str(name)) is not None for name in names), dtype=bool)
    if feature_types is None:
        return by_name
    return by_name | np.asarray(pd.Series(list(feature_types)).astype(str).isin(CONTROL_FEATURE_TYPES), dtype=bool)
