from __future__ import annotations

import pandas as pd

from hest_zarr.elements import is_control_feature


def test_control_probe_names() -> None:
    controls = ["BLANK_0006", "NegControlProbe_00042", "NegControlCodeword_0500", "UnassignedCodeword_0011"]
    controls += ["DeprecatedCodeword_1", "SystemControl1", "NegPrb3", "Intergenic_Region_12", "blank-7"]
    assert is_control_feature(controls).all()
    assert not is_control_feature(["ERBB2", "ENSMUSG00000064339.1", "Controlled"]).any()


def test_xenium_feature_types_flag_controls_whatever_their_name() -> None:
    names = ["ACTB", "antisense_ACTB", "NegControlCodeword_0500"]
    types = ["Gene Expression", "Negative Control Probe", "Negative Control Codeword"]
    assert is_control_feature(names, types).tolist() == [False, True, True]
    assert is_control_feature(pd.Index(names)).tolist() == [False, False, True]
