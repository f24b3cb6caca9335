"""The ``hest_zarr`` record a sample carries in its attributes, and the result an operator returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError
from spatialdata import SpatialData

from hest_zarr.errors import NotAStoreError
from hest_zarr.schemas import Keys, Provenance, StoreRecord


def get_record(sdata: SpatialData) -> StoreRecord:
    """Return the validated ``hest_zarr`` record of a SpatialData object.

    Raises
    ------
    NotAStoreError
        When the object carries no record or an invalid one.

    """
    raw = sdata.attrs.get(Keys.ROOT_ATTRS)
    if raw is None:
        raise NotAStoreError(f"this SpatialData object carries no '{Keys.ROOT_ATTRS}' record (use set_record)")
    try:
        return StoreRecord.model_validate(raw)
    except ValidationError as err:
        raise NotAStoreError(f"invalid '{Keys.ROOT_ATTRS}' record: {err}") from err


def set_record(sdata: SpatialData, record: StoreRecord) -> None:
    """Attach a record to a SpatialData object (stored in its root attributes on write)."""
    sdata.attrs[Keys.ROOT_ATTRS] = record.model_dump(mode="json")


@dataclass(frozen=True)
class ElementUpdate:
    """What an operator returns: new or replacing elements with their provenance, and changes to the record.

    Operators never write; a workflow hands the update to :func:`hest_zarr.store.add_elements`. Operators list
    the store elements they read in each provenance's ``inputs`` relative to the store (``"he/scale2"``);
    :meth:`read_from` anchors them to the store's URL when the update is written.

    Attributes
    ----------
    elements
        Element name -> spatialdata element (parsed by its model, transformations set).
    provenance
        Element name -> provenance, one for every element; an entry for an element that is not in ``elements``
        updates that element's record only.
    metadata_updates
        :class:`~hest_zarr.schemas.SampleMetadata` fields to set.
    pixel_size_um
        New scale from ``global`` to ``um`` (``None`` keeps the store's).
    replace
        Whether elements of the same name are replaced.
    anchored
        Names of the provenance entries whose ``inputs`` are paths inside the store (what the operator read),
        which :meth:`read_from` anchors; ``None``: every entry. An entry the operator carries over from the sample
        (a replaced table keeping its converter's source files) is left out.

    Examples
    --------
    >>> update = ElementUpdate({}, {"spots": Provenance(converter="ops.x", inputs=["spots"])})
    >>> update.read_from("s3://bucket/s.zarr").provenance["spots"].inputs
    ['s3://bucket/s.zarr/spots']
    >>> kept = ElementUpdate({}, {"spots": Provenance(converter="visium", inputs=["outs/x.csv"])}, anchored=frozenset())
    >>> kept.read_from("s3://bucket/s.zarr").provenance["spots"].inputs
    ['outs/x.csv']

    """

    elements: Mapping[str, Any]
    provenance: Mapping[str, Provenance]
    metadata_updates: Mapping[str, Any] = field(default_factory=dict)
    pixel_size_um: float | None = None
    replace: bool = False
    anchored: frozenset[str] | None = None

    def read_from(self, url: str) -> ElementUpdate:
        """Return the update with the store-relative ``inputs`` of its :attr:`anchored` entries under ``url``."""
        base = str(url).rstrip("/")
        provenance = {
            name: entry.model_copy(update={"inputs": [f"{base}/{path}" for path in entry.inputs]})
            if self.anchored is None or name in self.anchored
            else entry
            for name, entry in self.provenance.items()
        }
        return replace(self, provenance=provenance, anchored=frozenset())
