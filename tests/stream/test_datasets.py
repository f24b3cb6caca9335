"""PyTorch datasets: items equal the patch reader's patches and the real counts; DataLoader workers under spawn."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import scanpy as sc

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

import hest_zarr  # noqa: E402
from hest_zarr.bench.embed import embeddings_table  # noqa: E402
from hest_zarr.converters import read_visium  # noqa: E402
from hest_zarr.errors import InputError  # noqa: E402
from hest_zarr.schemas import Provenance  # noqa: E402
from hest_zarr.stream import (  # noqa: E402
    IterablePatchDataset,
    PatchDataset,
    extract_patches,
)

GENES = ["Sox11", "Pdia3", "Basp1"]


@pytest.fixture(scope="module")
def perik_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, float]:
    """The real perik Visium sample (lowres H&E, 2,898 spots); patches of 16 px at the image's own pixel size."""
    from tests.conftest import shared

    url = hest_zarr.write(
        read_visium(shared("perik_visium_cytassist_mouse_placenta")),
        tmp_path_factory.mktemp("stream") / "perik.zarr",
        chunk_size=128,
    )
    sdata = hest_zarr.open(url)
    level0_um = hest_zarr.get_record(sdata).pixel_size_um / 0.2
    # a cached-embeddings table also annotates 'spots' and sorts before 'spot_expression': genes must not come from it
    ids = sdata["spot_expression"].obs["spot_id"].to_numpy()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The table is annotating", category=UserWarning)
        hest_zarr.add_elements(
            url,
            {"embeddings_a": embeddings_table(ids, np.zeros((len(ids), 2)))},
            {"embeddings_a": Provenance(converter="test", inputs=[str(url)], method="zeros")},
        )
    assert sorted(hest_zarr.open(url).tables) == ["embeddings_a", "spot_expression"]
    return url, level0_um


@pytest.fixture(scope="module")
def reference(perik_store) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    url, level0_um = perik_store
    _, batches = extract_patches(url, size_px=16, pixel_size_um=level0_um)
    patches = {spot: pixels for batch in batches for spot, pixels in zip(batch.ids, batch.images, strict=True)}
    counts = sc.read_10x_h5(
        Path(__file__).resolve().parents[2].parent
        / "shared"
        / "data"
        / "perik_visium_cytassist_mouse_placenta"
        / "filtered_feature_bc_matrix.h5"
    )
    counts.var_names_make_unique()
    expression = dict(zip(counts.obs_names, np.asarray(counts[:, GENES].X.todense(), dtype=np.float32), strict=True))
    return patches, expression


def check_item(item_id: str, image, expression, reference) -> None:
    patches, counts = reference
    np.testing.assert_array_equal(np.asarray(image).transpose(1, 2, 0), patches[item_id])
    np.testing.assert_array_equal(np.asarray(expression), counts[item_id])


def test_map_style_items_equal_patches_and_counts(perik_store, reference) -> None:
    url, level0_um = perik_store
    dataset = PatchDataset(url, genes=GENES, size_px=16, pixel_size_um=level0_um)
    assert len(dataset) == 2898
    for index in (0, 17, 2897):
        item = dataset[index]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 16, 16)
        check_item(item["id"], item["image"], item["expression"], reference)
    items = dataset.__getitems__([5, 3, 2000, 3])
    assert [item["id"] for item in items] == [dataset[i]["id"] for i in (5, 3, 2000, 3)]
    with pytest.raises(IndexError):
        dataset[2898]


def test_dataloaders_with_two_spawned_workers(perik_store, reference) -> None:
    url, level0_um = perik_store
    iterable = IterablePatchDataset(url, genes=GENES, size_px=16, pixel_size_um=level0_um, shuffle=True, seed=3)
    pickle.loads(pickle.dumps(iterable))
    seen: list[str] = []
    loader = DataLoader(iterable, batch_size=64, num_workers=2, multiprocessing_context="spawn")
    for batch in loader:
        for item_id, image, expression in zip(batch["id"], batch["image"], batch["expression"], strict=True):
            check_item(item_id, image, expression, reference)
        seen.extend(batch["id"])
    assert len(seen) == 2898 and len(set(seen)) == 2898  # every patch once, no duplicates across workers

    mapped = PatchDataset(url, genes=GENES, size_px=16, pixel_size_um=level0_um)
    loader = DataLoader(mapped, batch_size=100, shuffle=True, num_workers=2, multiprocessing_context="spawn")
    batch = next(iter(loader))
    assert batch["image"].shape == (100, 3, 16, 16)
    for item_id, image, expression in zip(batch["id"], batch["image"], batch["expression"], strict=True):
        check_item(item_id, image, expression, reference)


def test_iterable_shards_ranks_and_reshuffles_epochs(perik_store) -> None:
    url, level0_um = perik_store
    shares = []
    for rank in range(3):
        dataset = IterablePatchDataset(url, size_px=16, pixel_size_um=level0_um, rank=rank, world_size=3)
        shares.append([item["id"] for item in dataset])
    assert sum(len(share) for share in shares) == 2898
    assert len(set().union(*map(set, shares))) == 2898
    shuffled = IterablePatchDataset(url, size_px=16, pixel_size_um=level0_um, shuffle=True)
    first = [item["id"] for item in shuffled]
    shuffled.set_epoch(1)
    second = [item["id"] for item in shuffled]
    assert first != second and sorted(first) == sorted(second)
    assert "expression" not in next(iter(shuffled))


def test_transforms_and_bad_genes(perik_store) -> None:
    url, level0_um = perik_store
    dataset = PatchDataset(
        url,
        genes=GENES,
        size_px=16,
        pixel_size_um=level0_um,
        transform=lambda image: image.float() / 255,
        target_transform=torch.log1p,
    )
    item = dataset[0]
    assert item["image"].dtype == torch.float32 and float(item["image"].max()) <= 1.0
    raw = PatchDataset(url, genes=GENES, size_px=16, pixel_size_um=level0_um)[0]["expression"]
    torch.testing.assert_close(item["expression"], torch.log1p(raw))
    with pytest.raises(InputError, match=r"genes \['NOT_A_GENE'\] \(1 in all\) are not in 'spot_expression'"):
        PatchDataset(url, genes=["Sox11", "NOT_A_GENE"], size_px=16, pixel_size_um=level0_um)
