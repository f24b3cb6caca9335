"""A corruption corpus made from copies of real stores: every element kind deleted, truncated or garbled.

Each case damages one object of a freshly written copy of a real sample (the bundled MOB1 ST v1 sample, the
scanpy Visium sample, the Xenium transcripts) and checks that every read through hest-zarr and ``validate``
answer with an error naming the element and the object, never with fill values or silently wrong counts.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

import hest_zarr
from hest_zarr.converters import read_visium
from hest_zarr.errors import CorruptStoreError
from hest_zarr.stream import SamplePatches
from tests.conftest import shared


def _delete(path: Path) -> None:
    path.unlink()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size: only a checksum sees it
    path.write_bytes(bytes(data))


DAMAGES: dict[str, Callable[[Path], None]] = {"deleted": _delete, "truncated": _truncate, "garbled": _garble}


@pytest.fixture(scope="module")
def visium_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = read_visium(shared("scanpy", "visium_data", "1.0.0"))
    return Path(hest_zarr.write(sdata, tmp_path_factory.mktemp("corpus") / "visium.zarr", chunk_size=256))


def _first_chunk(store: Path, array: str) -> str:
    chunks = sorted(p for p in (store / array / "c").rglob("*") if p.is_file())
    return chunks[len(chunks) // 2].relative_to(store).as_posix()


OBJECTS = {
    "image chunk": lambda store: _first_chunk(store, "images/he/s0"),
    "table X/data chunk": lambda store: _first_chunk(store, "tables/spot_expression/X/data"),
    "table X/indptr chunk": lambda store: _first_chunk(store, "tables/spot_expression/X/indptr"),
    "table obs/_index chunk": lambda store: _first_chunk(store, "tables/spot_expression/obs/_index"),
    "shapes parquet": lambda store: "shapes/spots/shapes.parquet",
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("what", sorted(OBJECTS))
def test_every_damaged_object_is_named_by_validate_and_refused_by_reads(
    visium_store: Path, tmp_path: Path, what: str, damage: str
) -> None:
    store = tmp_path / "visium.zarr"
    shutil.copytree(visium_store, store)
    key = OBJECTS[what](store)
    DAMAGES[damage](store / key)

    full = [str(problem) for problem in hest_zarr.validate(store)]
    element = key.split("/")[1]
    assert full and full[0].startswith(f"{element}: {key}: "), full
    quick = [str(problem) for problem in hest_zarr.validate(store, check_data=False)]
    if damage == "garbled" and what == "image chunk":  # the same size: listing cannot see it, only decoding can
        assert quick == []
    else:  # listing sees the rest; a table or the shapes changed in place fail as they are read
        assert quick[0].startswith(f"{element}: {key}: ")

    if what == "image chunk" and damage == "garbled":
        # the store opens (listing sees nothing); cutting patches over the chunk names it instead of a wrong tile
        patches = SamplePatches.from_store(store, size_px=64, pixel_size_um=4.0)
        level = f"images/he/s{patches.plan.level}"
        for chunk in (store / level / "c").rglob("*"):  # whichever chunks the patches touch
            if chunk.is_file():
                _garble(chunk)
        with pytest.raises(CorruptStoreError, match=rf"chunk {level}/c/0/\d+/\d+ cannot be decoded .*crc32c"):
            for _ in patches.read(batch_size=4096):
                pass
    elif damage == "garbled" and what != "shapes parquet":
        # a table chunk changed in place fails its checksum as anndata decodes it: open names the object
        with pytest.raises(CorruptStoreError, match=rf"damaged store: {element}: {key}: fails its crc32c"):
            hest_zarr.open(store)
    else:
        # missing or truncated objects are found by listing when the store opens, before anything is read
        with pytest.raises(CorruptStoreError, match=rf"damaged store: {element}: "):
            hest_zarr.open(store)


def test_damaged_transcripts_parts_and_jpeg_chunks(tmp_path: Path, visium_store: Path) -> None:
    """Points (Xenium transcripts parquet) and JPEG-coded images: the kinds the corpus above does not write."""
    from hest_zarr.converters import read_xenium

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xenium = read_xenium(shared("SFE", "xenium"))
    store = Path(hest_zarr.write(xenium, tmp_path / "xenium.zarr"))
    assert hest_zarr.validate(store) == []
    part = sorted((store / "points" / "transcripts" / "points.parquet").glob("*.parquet"))[0]
    key = part.relative_to(store).as_posix()
    _garble(part)
    assert f"transcripts: {key}: fails its crc32c checksum (its bytes changed)" in map(str, hest_zarr.validate(store))
    part.unlink()
    with pytest.raises(CorruptStoreError, match=rf"transcripts: {key}: missing"):
        hest_zarr.open(store)

    jpeg = Path(hest_zarr.write(hest_zarr.open(visium_store), tmp_path / "jpeg.zarr", image_codec="jpeg"))
    chunk = _first_chunk(jpeg, "images/he/s0")
    _garble(jpeg / chunk)
    assert [str(p) for p in hest_zarr.validate(jpeg)] == [f"he: {chunk}: fails its crc32c checksum (its bytes changed)"]
    patches = SamplePatches.from_store(jpeg, size_px=64, pixel_size_um=4.0)
    with pytest.raises(CorruptStoreError, match=rf"chunk {chunk} cannot be decoded .*crc32c"):
        for _ in patches.read(batch_size=4096):
            pass
