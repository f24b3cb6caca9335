"""What a valid element and sample is: names, builders, the record, image levels, the control-probe rule.

Everything above the schemas builds and inspects elements through this package, in the spirit of
spatialdata's ``models``: converters assemble samples with :func:`build_sample`, operators return an
:class:`ElementUpdate`, and the store checks what it writes and reads with :func:`validate_sample`.
"""

from __future__ import annotations

from hest_zarr.elements._builders import (
    build_sample,
    circle_spots,
    expression_table,
    frame_transformations,
    integer_counts,
    spot_sample,
    square_spots,
)
from hest_zarr.elements._features import CONTROL_FEATURE_TYPES, CONTROL_PROBE, is_control_feature
from hest_zarr.elements._images import affine_xy, image_levels, level_to_global, load_level, scale0
from hest_zarr.elements._records import ElementUpdate, get_record, set_record
from hest_zarr.elements._validate import Problem, validate_sample
from hest_zarr.schemas import ELEMENT_GROUPS, CoordinateSystems, Elements, Keys, annotated_region, expected_kind

__all__ = [
    "CONTROL_FEATURE_TYPES",
    "CONTROL_PROBE",
    "ELEMENT_GROUPS",
    "CoordinateSystems",
    "ElementUpdate",
    "Elements",
    "Keys",
    "Problem",
    "affine_xy",
    "annotated_region",
    "build_sample",
    "circle_spots",
    "expected_kind",
    "expression_table",
    "frame_transformations",
    "get_record",
    "image_levels",
    "integer_counts",
    "is_control_feature",
    "level_to_global",
    "load_level",
    "scale0",
    "set_record",
    "spot_sample",
    "square_spots",
    "validate_sample",
]
