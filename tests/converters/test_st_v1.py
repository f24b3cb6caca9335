"""The ST v1 converter on the real STUtility mouse olfactory bulb (MOB1, MOB2) and breast cancer (BC1) data.

Expectations are computed here from the raw files with pandas/numpy: counts from ``pd.read_csv``, positions from
the alignment tables, the pixel size from the median pixel distance between spots two array units apart (200 um).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import hest_zarr
from hest_zarr.converters.st_v1 import read_st_v1
from hest_zarr.elements import get_record
from hest_zarr.errors import InputError
from hest_zarr.schemas import SampleMetadata
from tests.conftest import shared

#: Spots (rows) of each count table as counted in the files (MOB2.tsv holds 1,933 spots, not 1,934).
MOB_SPOTS = {"MOB1": 1934, "MOB2": 1933}
#: Count-table spots the spot detector did not report (absent from the alignment table).
MOB_UNALIGNED = {"MOB1": 11, "MOB2": 8}


def mob(name: str, *, image: bool = True):
    folder = shared("STUtility_ST_v1")
    return read_st_v1(
        folder / f"{name}.tsv",
        alignment=folder / f"alignment_table_{name}.tsv",
        image=folder / f"{name}.jpg" if image else None,
    )


def alignment_table(name: str) -> pd.DataFrame:
    table = pd.read_csv(shared("STUtility_ST_v1", f"alignment_table_{name}.tsv"), sep="\t")
    table.index = table["x"].astype(str) + "x" + table["y"].astype(str)
    return table


def grid_pixel_size(name: str) -> float:
    """Micrometres per pixel from the median pixel step between spots 2 array units (200 um) apart in x and in y."""
    table = pd.read_csv(shared("STUtility_ST_v1", f"alignment_table_{name}.tsv"), sep="\t").set_index(["x", "y"])
    x, y = table.index.get_level_values("x"), table.index.get_level_values("y")
    right = table.reindex(pd.MultiIndex.from_arrays([x + 2, y]))
    below = table.reindex(pd.MultiIndex.from_arrays([x, y + 2]))
    step_x = np.nanmedian(right["pixel_x"].to_numpy() - table["pixel_x"].to_numpy())
    step_y = np.nanmedian(below["pixel_y"].to_numpy() - table["pixel_y"].to_numpy())
    return float(np.sqrt(200 / step_x * 200 / step_y))


@pytest.mark.parametrize("name", ["MOB1", "MOB2"])
def test_mob_counts_equal_pandas(name: str) -> None:
    expected = pd.read_csv(shared("STUtility_ST_v1", f"{name}.tsv"), sep="\t", index_col=0)
    table = mob(name, image=False)["spot_expression"]
    assert table.shape == expected.shape == (MOB_SPOTS[name], 1000)
    assert list(table.obs_names) == list(expected.index)
    assert list(table.var_names) == list(expected.columns)
    assert np.array_equal(table.X.toarray(), expected.to_numpy())
    assert table.X.dtype == np.int32


@pytest.mark.parametrize("name", ["MOB1", "MOB2"])
def test_mob_spots_sit_on_the_alignment_pixels(name: str) -> None:
    sdata = mob(name, image=False)
    spots, obs = sdata["spots"], sdata["spot_expression"].obs
    alignment = alignment_table(name)
    aligned = spots.index.intersection(alignment.index)
    assert len(spots) - len(aligned) == MOB_UNALIGNED[name]
    centres = np.c_[spots.geometry.x, spots.geometry.y]
    rows = spots.index.get_indexer(aligned)
    assert np.array_equal(centres[rows], alignment.loc[aligned, ["pixel_x", "pixel_y"]].to_numpy())
    assert np.array_equal(obs.loc[aligned, "in_tissue"].to_numpy(), alignment.loc[aligned, "selected"].to_numpy())
    assert int(obs["in_tissue"].sum()) == int(alignment["selected"].sum())
    assert obs["position_fitted"].sum() == MOB_UNALIGNED[name]
    # spots the detector did not report lie midway between opposite neighbours, within a fifth of a spot diameter
    tolerance_px = 0.2 * 2 * spots["radius"].iloc[0]
    pixels = alignment[["pixel_x", "pixel_y"]]
    for spot_id in spots.index.difference(alignment.index):
        x, y = map(int, spot_id.split("x"))
        pairs = [(f"{x + dx}x{y + dy}", f"{x - dx}x{y - dy}") for dx, dy in ((1, 1), (1, -1), (2, 0), (0, 2))]
        middles = [(pixels.loc[a] + pixels.loc[b]).to_numpy() / 2 for a, b in pairs if {a, b} <= set(pixels.index)]
        assert middles
        assert np.hypot(*(centres[spots.index.get_loc(spot_id)] - np.mean(middles, axis=0))) < tolerance_px


def test_mob_pixel_size_is_consistent_and_matches_the_grid() -> None:
    records = {name: get_record(mob(name, image=False)) for name in ("MOB1", "MOB2")}
    sizes = {name: record.pixel_size_um for name, record in records.items()}
    for name, record in records.items():
        assert sizes[name] == pytest.approx(grid_pixel_size(name), rel=1e-3)  # about 4.385 um/px
        parameters = record.elements["spots"].provenance.parameters
        assert parameters["array_design"] == "2k"
        assert parameters["fit_rms_px"] < 0.2
        assert record.elements["spots"].provenance.estimated_error_um == pytest.approx(
            parameters["fit_rms_px"] * sizes[name]
        )
        assert record.metadata.pixel_size_um_estimated == sizes[name]
        assert record.metadata.spot_diameter == 100
        assert record.metadata.spots_under_tissue == int(alignment_table(name)["selected"].sum())
    assert sizes["MOB1"] == pytest.approx(sizes["MOB2"], rel=1e-3)


def test_mob_spots_are_100_um_circles_and_the_image_is_the_jpg() -> None:
    sdata = mob("MOB1")
    record = get_record(sdata)
    assert np.allclose(sdata["spots"]["radius"], 50 / record.pixel_size_um)
    with Image.open(shared("STUtility_ST_v1", "MOB1.jpg")) as jpg:
        expected = np.moveaxis(np.asarray(jpg.convert("RGB")), -1, 0)
    assert np.array_equal(sdata["he"].to_numpy(), expected)
    assert (record.metadata.fullres_px_width, record.metadata.fullres_px_height) == (1905, 1905)


def test_species_is_inferred_from_ensembl_ids_and_the_caller_wins() -> None:
    folder = shared("STUtility_ST_v1")
    inferred = get_record(read_st_v1(folder / "MOB1.tsv"))
    assert inferred.metadata.species == "Mus musculus"
    inference = inferred.elements["spot_expression"].provenance.parameters["species_inference"]
    assert "1000 of 1000 are mouse Ensembl ids" in inference
    known = SampleMetadata(id="MOB1", st_technology="Spatial Transcriptomics", organ="Brain", species="Mus musculus")
    assert get_record(read_st_v1(folder / "MOB1.tsv", metadata=known)).metadata.organ == "Brain"


def test_bc1_genes_by_spots_with_adjusted_ids() -> None:
    path = shared("STUtility_ST_v1", "BC1.csv")
    expected = pd.read_csv(path, index_col=0).T  # genes x spots in the file
    sdata = read_st_v1(path)
    table, record = sdata["spot_expression"], get_record(sdata)
    assert table.shape == expected.shape == (254, 500)
    assert np.array_equal(table.X.toarray(), expected.to_numpy())
    ids = expected.index.str.split("x", expand=True).to_frame().astype(float).to_numpy()
    assert np.array_equal(table.obs[["array_col", "array_row"]].to_numpy(), ids)
    # no alignment: the 1k grid (200 um per array unit) in micrometres
    spots = sdata["spots"].loc[expected.index]
    assert np.allclose(np.c_[spots.geometry.x, spots.geometry.y], ids * 200)
    assert np.allclose(spots["radius"], 50)
    assert record.pixel_size_um == 1.0
    assert record.elements["spots"].provenance.parameters["global_units"] == "um"
    assert record.metadata.inter_spot_dist == 200
    assert record.metadata.species == "Homo sapiens"


@pytest.mark.parametrize("name", ["MOB1", "BC1"])
def test_stores_write_validate_and_reopen(name: str, tmp_path: Path) -> None:
    folder = shared("STUtility_ST_v1")
    sdata = mob(name) if name.startswith("MOB") else read_st_v1(folder / "BC1.csv")
    url = hest_zarr.write(sdata, tmp_path / f"{name}.zarr")
    assert hest_zarr.validate(url) == []
    reopened = hest_zarr.open(url)
    assert (reopened["spot_expression"].X != sdata["spot_expression"].X).nnz == 0
    assert reopened["spots"].geometry.equals(sdata["spots"].geometry)
    assert get_record(reopened).pixel_size_um == get_record(sdata).pixel_size_um


def test_missing_counts_file_leaves_no_store(tmp_path: Path) -> None:
    target = tmp_path / "MOB9.zarr"
    with pytest.raises(InputError, match=r"MOB9.tsv: no such file"):
        hest_zarr.write(read_st_v1(shared("STUtility_ST_v1") / "MOB9.tsv"), target)
    assert not target.exists()


def test_alignment_of_another_sample() -> None:
    folder = shared("STUtility_ST_v1")
    with pytest.raises(InputError, match=r"alignment_table_MOB1.tsv: only 0 of the 254 spots of BC1.csv have a row"):
        read_st_v1(folder / "BC1.csv", alignment=folder / "alignment_table_MOB1.tsv")


def test_image_smaller_than_the_spots(tmp_path: Path) -> None:
    """A real H&E downscaled here (synthetic mismatch): the alignment pixels lie beyond it."""
    folder = shared("STUtility_ST_v1")
    small = tmp_path / "small.jpg"
    with Image.open(folder / "MOB1.jpg") as jpg:
        jpg.resize((800, 800)).save(small)
    with pytest.raises(InputError, match=r"small.jpg: image covers 800 x 800 full-resolution px but \d+ spots lie"):
        read_st_v1(folder / "MOB1.tsv", alignment=folder / "alignment_table_MOB1.tsv", image=small)


def test_unknown_layout_and_unplaceable_image() -> None:
    folder = shared("STUtility_ST_v1")
    with pytest.raises(InputError, match=r"alignment_table_MOB1.tsv: unknown layout \(expected XxY spot ids"):
        read_st_v1(folder / "alignment_table_MOB1.tsv")
    with pytest.raises(InputError, match=r"MOB1.jpg: an image needs the spot detector's alignment table"):
        read_st_v1(folder / "MOB1.tsv", image=folder / "MOB1.jpg")
    with pytest.raises(InputError, match=r"MOB1.tsv: not a spot detector alignment table: missing column"):
        read_st_v1(folder / "MOB1.tsv", alignment=folder / "MOB1.tsv")
