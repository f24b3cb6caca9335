"""Sample metadata: one model for the 28 columns of the HEST-1k metadata CSV.

The model types every column, gives its unit and allowed values, and normalises the spellings found
in the released CSV (UTF-8 BOM, blank patients, Mac-Roman mojibake, mixed date formats, ``PFA`` vs
``PFA fixed``) without dropping a row. Every normalisation is reported so that it can be audited.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hest_zarr.errors import InputError

StTechnology = Literal["Visium", "Visium HD", "Xenium", "Spatial Transcriptomics"]
Species = Literal["Homo sapiens", "Mus musculus"]
PreservationMethod = Literal["Fresh Frozen", "FFPE", "Snap Frozen", "PFA fixed", "Flash Frozen", "Fixed Frozen"]
Magnification = Literal["10x", "20x", "40x"]

#: Upper bounds (exclusive, um/px) of the magnification buckets used by HEST-1k: a scan finer than
#: 0.5 um/px is called 40x, finer than 1 um/px 20x, anything coarser 10x. Every row of the released
#: CSV agrees with these bounds (``tests/schemas/test_metadata.py``).
MAGNIFICATION_BOUNDS_UM: tuple[tuple[float, Magnification], ...] = ((0.5, "40x"), (1.0, "20x"))

_PRESERVATION_SYNONYMS = {"PFA": "PFA fixed"}
_DATE_FORMATS = ("%m/%d/%y", "%d-%b-%y", "%B %d %Y", "%Y-%m-%d")


def magnification_from_pixel_size(pixel_size_um: float) -> Magnification:
    """Return the HEST-1k magnification bucket of a pixel size.

    Parameters
    ----------
    pixel_size_um
        Size of one full-resolution pixel in micrometres.

    Examples
    --------
    >>> magnification_from_pixel_size(0.2738)
    '40x'
    >>> magnification_from_pixel_size(0.7)
    '20x'

    """
    if not pixel_size_um > 0:
        raise ValueError(f"pixel size must be positive, got {pixel_size_um!r} um/px")
    for bound, magnification in MAGNIFICATION_BOUNDS_UM:
        if pixel_size_um < bound:
            return magnification
    return "10x"


def _um(description: str, **kwargs: Any) -> Any:
    return Field(description=description, json_schema_extra={"unit": "um"}, **kwargs)


class SampleMetadata(BaseModel):
    """Metadata of one sample, one field per column of the HEST-1k metadata CSV.

    Only ``id`` and ``st_technology`` are required: a sample converted from outside HEST-1k rarely
    knows its study title or patient. Blank strings become ``None``.

    Examples
    --------
    >>> SampleMetadata(id="MOB1", st_technology="Spatial Transcriptomics", species="Mus musculus").magnification is None
    True

    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    id: str = Field(min_length=1, description="Sample identifier (HEST-1k id, e.g. TENX95).")
    st_technology: StTechnology = Field(description="Spatial transcriptomics technology.")
    dataset_title: str | None = Field(None, description="Title of the study or 10x dataset.")
    image_filename: str | None = Field(None, description="File name of the full-resolution H&E in HEST-1k.")
    organ: str | None = Field(None, description="Organ (HEST-1k spelling, e.g. 'Bowel', 'Spinal cord').")
    disease_state: str | None = Field(None, description="Healthy, Diseased, Cancer, Treated, ...")
    oncotree_code: str | None = Field(None, description="OncoTree code of the cancer type.")
    species: Species | None = None
    patient: str | None = Field(None, description="Patient identifier, unique within a dataset.")
    data_publication_date: dt.date | None = Field(None, description="Publication date of the data.")
    license: str | None = None
    study_link: str | None = None
    download_page_link1: str | None = None
    inter_spot_dist: float | None = _um("Centre-to-centre distance of neighbouring spots.", gt=0, default=None)
    spot_diameter: float | None = _um("Diameter of one spot (or side of one bin).", gt=0, default=None)
    spots_under_tissue: int | None = Field(None, ge=0, description="Number of spots covered by tissue.")
    preservation_method: PreservationMethod | None = None
    nb_genes: int | None = Field(None, ge=0, description="Number of genes (features) measured.")
    treatment_comment: str | None = None
    pixel_size_um_embedded: float | None = _um("Pixel size read from the image file.", gt=0, default=None)
    pixel_size_um_estimated: float | None = _um("Pixel size estimated from the spot grid.", gt=0, default=None)
    magnification: Magnification | None = Field(None, description="Bucket of the estimated pixel size.")
    fullres_px_width: int | None = Field(None, gt=0, description="Width of the full-resolution H&E (px).")
    fullres_px_height: int | None = Field(None, gt=0, description="Height of the full-resolution H&E (px).")
    tissue: str | None = None
    disease_comment: str | None = None
    subseries: str | None = None
    hest_version_added: str | None = Field(None, pattern=r"^v\d+_\d+_\d+$")

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, float) and math.isnan(value):
            return None
        return value

    @field_validator("preservation_method", mode="before")
    @classmethod
    def _preservation_synonyms(cls, value: Any) -> Any:
        return _PRESERVATION_SYNONYMS.get(value, value) if isinstance(value, str) else value

    @field_validator("data_publication_date", mode="before")
    @classmethod
    def _parse_date(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.lower().startswith("none"):
            return None
        for fmt in _DATE_FORMATS:
            try:
                return dt.datetime.strptime(text, fmt).date()
            except ValueError:
                continue
        raise ValueError(f"unrecognised date {value!r}; expected one of the formats {_DATE_FORMATS}")

    @model_validator(mode="after")
    def _magnification_matches_pixel_size(self) -> SampleMetadata:
        if self.magnification is not None and self.pixel_size_um_estimated is not None:
            expected = magnification_from_pixel_size(self.pixel_size_um_estimated)
            if expected != self.magnification:
                raise ValueError(
                    f"magnification {self.magnification!r} disagrees with pixel_size_um_estimated="
                    f"{self.pixel_size_um_estimated} um/px, which is {expected!r}"
                )
        return self


@dataclass(frozen=True)
class Normalisation:
    """One change made to a raw CSV value so that it fits :class:`SampleMetadata`."""

    sample_id: str
    column: str
    raw: str
    value: Any
    reason: str


def _fix_mojibake(text: str) -> str:
    """Undo UTF-8 text that was decoded as Mac Roman (``'Œºl'`` -> ``'μl'``), when it round-trips.

    Plain ASCII is returned unchanged; genuine accents (``'é'``) do not round-trip and are kept.
    """
    if text.isascii():
        return text
    try:
        return text.encode("mac_roman").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _normalise_row(row: dict[str, Any]) -> tuple[dict[str, Any], list[Normalisation]]:
    sample_id = str(row.get("id", "")).strip()
    notes: list[Normalisation] = []
    clean: dict[str, Any] = {}
    for column, raw in row.items():
        value = raw
        if isinstance(raw, str):
            value = _fix_mojibake(raw.strip())
            if not value:
                value = None
                if raw:
                    notes.append(Normalisation(sample_id, column, raw, None, "whitespace-only value read as missing"))
            elif value != raw.strip():
                notes.append(Normalisation(sample_id, column, raw, value, "Mac Roman mojibake decoded as UTF-8"))
            elif column == "preservation_method" and value in _PRESERVATION_SYNONYMS:
                value = _PRESERVATION_SYNONYMS[value]
                notes.append(Normalisation(sample_id, column, raw, value, "synonym mapped to the allowed value"))
            elif column == "data_publication_date" and value.lower().startswith("none"):
                notes.append(Normalisation(sample_id, column, raw, None, "no date given"))
                value = None
        clean[column] = value
    return clean, notes


def read_hest_metadata_csv(path: str | Path) -> tuple[list[SampleMetadata], list[Normalisation]]:
    """Read the HEST-1k metadata CSV into validated models, normalising and reporting odd values.

    Parameters
    ----------
    path
        Path to ``HEST_v1_1_0.csv`` (or a later release with the same columns).

    Returns
    -------
    The samples in file order, and every normalisation that was applied.

    Raises
    ------
    InputError
        When the file is missing, lacks a column, or a row cannot be validated; the message names
        the file, the sample id and the column.

    Examples
    --------
    >>> samples, notes = read_hest_metadata_csv("../shared/data/hest/HEST_v1_1_0.csv")  # doctest: +SKIP
    >>> len(samples)  # doctest: +SKIP
    1229

    """
    import pandas as pd
    from pydantic import ValidationError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected the HEST-1k metadata CSV)")
    frame = pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    missing = [name for name in SampleMetadata.model_fields if name not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    extra = [name for name in frame.columns if name not in SampleMetadata.model_fields]
    if extra:
        raise InputError(f"{path}: unknown column(s) {extra}")
    samples: list[SampleMetadata] = []
    notes: list[Normalisation] = []
    for line, row in enumerate(frame.to_dict(orient="records"), start=2):
        clean, row_notes = _normalise_row(row)
        try:
            samples.append(SampleMetadata.model_validate(clean))
        except ValidationError as err:
            first = err.errors()[0]
            column = ".".join(str(part) for part in first["loc"]) or "row"
            raise InputError(f"{path}, line {line} (id {row.get('id')!r}), column {column}: {first['msg']}") from err
        notes.extend(row_notes)
    return samples, notes


def metadata_by_id(samples: Iterable[SampleMetadata]) -> dict[str, SampleMetadata]:
    """Index samples by id, refusing duplicate ids."""
    index: dict[str, SampleMetadata] = {}
    for sample in samples:
        if sample.id in index:
            raise InputError(f"duplicate sample id {sample.id!r} in the metadata")
        index[sample.id] = sample
    return index
