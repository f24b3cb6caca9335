"""Names shared by every module: element names, coordinate systems and attribute keys.

Kept in one place (as spatialdata-io's ``_constants`` and sopa's ``SopaKeys``) so that an element
written by one step is found by the next, and a renamed key is a one-line change.
"""

from __future__ import annotations

from typing import Final


class Elements:
    """Names of the elements of a sample store (see ``docs/design.md`` section 1)."""

    HE: Final = "he"
    DAPI: Final = "dapi"
    SPOTS: Final = "spots"
    TISSUE: Final = "tissue"
    NUCLEI: Final = "nuclei"
    CELLS: Final = "cells"
    TRANSCRIPTS: Final = "transcripts"
    SPOT_EXPRESSION: Final = "spot_expression"
    CELL_EXPRESSION: Final = "cell_expression"
    EMBEDDINGS_PREFIX: Final = "embeddings_"


class CoordinateSystems:
    """Coordinate systems present in every store."""

    GLOBAL: Final = "global"  # pixels of the full-resolution H&E (level 0)
    UM: Final = "um"  # micrometres on the slide


class Keys:
    """Attribute and column keys."""

    ROOT_ATTRS: Final = "hest_zarr"  # key of our record in the root group's attributes
    SPOT_ID: Final = "spot_id"  # obs column of expression tables holding the shapes index
    REGION: Final = "region"  # obs column naming the annotated element
    ARRAY_ROW: Final = "array_row"
    ARRAY_COL: Final = "array_col"
    IN_TISSUE: Final = "in_tissue"


ELEMENT_GROUPS: Final = ("images", "labels", "points", "shapes", "tables")
