"""The one patch reader by URL: ``SamplePatches`` and ``extract_patches`` on real local and S3 stores.

The stores are the real CMU-1 slide of ``tests/ops/test_patch.py`` (its fixture is shared); the S3 API is moto's
server on loopback. Needs no torch: the datasets' tests are ``test_datasets.py``.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import s3fs

import hest_zarr
from hest_zarr.converters import read_visium
from hest_zarr.errors import InputError, RemoteUnreachableError
from hest_zarr.ops.patch import _window_chunks
from hest_zarr.store import _chunks
from hest_zarr.stream import SamplePatches, extract_patches
from tests.conftest import moto_server
from tests.ops.test_patch import direct_crop, spot_grid, write_svs_store


@pytest.fixture(scope="module")
def svs_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    return write_svs_store(tmp_path_factory.mktemp("stream_patches"))


def extracted(url, **kwargs) -> tuple[object, dict[str, np.ndarray]]:
    """Every patch of a store through :func:`extract_patches`, by id."""
    plan, batches = extract_patches(url, **kwargs)
    images = {spot: pixels.copy() for batch in batches for spot, pixels in zip(batch.ids, batch.images, strict=True)}
    return plan, images


def test_extract_patches_cuts_the_sample_readers_patches(svs_store) -> None:
    url, level0, _ = svs_store
    plan, images = extracted(url, size_px=112, pixel_size_um=0.5, batch_size=5)
    sample = SamplePatches.from_store(url, size_px=112, pixel_size_um=0.5)
    assert sample.sample_id == "cmu1" and sample.url == str(url) and sample.expression is None
    np.testing.assert_array_equal(sample.plan.ids, plan.ids)
    np.testing.assert_array_equal(sample.plan.origins, plan.origins)
    assert sorted(images) == sorted(spot_grid()[0])
    for batch in sample.read(batch_size=64):
        for spot, (x0, y0), pixels in zip(batch.ids, batch.coords, batch.images, strict=True):
            np.testing.assert_array_equal(pixels, images[spot])
            np.testing.assert_array_equal(pixels, direct_crop(level0, int(x0), int(y0), 112))
    sample.close()


def test_sample_patches_pickle_without_their_reader_and_read_subsets(svs_store) -> None:
    """A pickled reader (as DataLoader workers get it) reopens its chunks; subsets index into the given positions."""
    url, level0, _ = svs_store
    sample = SamplePatches.from_store(url, size_px=64, pixel_size_um=0.5, workers=2)
    bands = sample.bands()  # opens the reader
    assert sorted(np.concatenate(bands)) == list(range(len(sample.plan)))
    clone = pickle.loads(pickle.dumps(sample))
    assert clone._reader is None and sample._reader is not None
    wanted = np.array([50, 3, 7, len(sample.plan) - 1])
    seen = []
    for batch in clone.read(wanted, batch_size=3):
        positions = wanted[batch.indices]
        seen.extend(positions)
        np.testing.assert_array_equal(batch.ids, clone.plan.ids[positions])
        np.testing.assert_array_equal(batch.coords, clone.plan.coords[positions])
        for (x0, y0), pixels in zip(batch.coords, batch.images, strict=True):
            np.testing.assert_array_equal(pixels, direct_crop(level0, int(x0), int(y0), 64))
    assert sorted(seen) == sorted(wanted)
    for opened in (sample, clone):
        opened.close()


def test_genes_need_an_expression_table_and_a_store_an_image(svs_store, perik_visium: Path, tmp_path: Path) -> None:
    url, _, _ = svs_store
    with pytest.raises(InputError, match="genes were asked for, but no expression table annotates 'spots'"):
        SamplePatches.from_store(url, genes=["GAPDH"])
    sdata = read_visium(perik_visium)
    del sdata.images["he"]
    record = hest_zarr.get_record(sdata)
    del record.elements["he"]
    hest_zarr.set_record(sdata, record)
    noimage = hest_zarr.write(sdata, tmp_path / "noimage.zarr")
    with pytest.raises(InputError, match="the store holds no image 'he' to cut patches from"):
        extract_patches(noimage)


def test_s3_patches_equal_local_and_fetch_each_chunk_once(svs_store, s3_server, s3_bucket: str) -> None:
    url, _, _ = svs_store
    remote = f"{s3_bucket}/cmu1.zarr"
    hest_zarr.write(hest_zarr.open(url), remote, chunk_size=256, storage_options=s3_server.storage_options)
    _, local_images = extracted(url)
    s3_server.reset()
    plan, remote_images = extracted(remote, storage_options=s3_server.storage_options)
    assert sorted(remote_images) == sorted(local_images)
    for spot, pixels in local_images.items():
        np.testing.assert_array_equal(remote_images[spot], pixels)
    chunk_gets = [path for method, path in s3_server.requests if method == "GET" and "/images/he/s0/c/" in path]
    assert len(chunk_gets) == len(set(chunk_gets))  # every chunk fetched once
    touched = {
        key
        for origin in plan.origins
        for key in _window_chunks(origin, plan.window, (256, 256), (2967, 2220))  # level 0 is 2967 x 2220
    }
    assert len(chunk_gets) == len(touched)


def test_unreachable_remote_mid_read_retries_then_names_the_chunk(
    svs_store, s3_server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second S3 server is stopped after the plan is made: reads retry, then fail naming the chunk."""
    url, _, _ = svs_store
    remote = f"{s3_bucket}/cmu1.zarr"
    hest_zarr.write(hest_zarr.open(url), remote, chunk_size=256, storage_options=s3_server.storage_options)
    monkeypatch.setattr(_chunks.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's own retries back off for ~30 s
    with moto_server() as doomed:
        options = {**doomed.storage_options, "config_kwargs": {"retries": {"max_attempts": 1}}}
        _, batches = extract_patches(remote, storage_options=options, batch_size=4)
    with pytest.raises(RemoteUnreachableError, match=r"chunk images/he/s0/c/0/\d+/\d+ could not be fetched after 3"):
        list(batches)


def test_the_stream_package_imports_torch_only_for_the_datasets() -> None:
    """``hest_zarr.stream`` works without the ``ml`` extra; its datasets import torch when first named."""
    code = (
        "import sys, hest_zarr.stream as stream; assert 'torch' not in sys.modules, 'imported torch'; "
        "stream.SamplePatches, stream.extract_patches; assert 'torch' not in sys.modules; "
        "stream.PatchDataset; assert 'torch' in sys.modules"
    )
    pytest.importorskip("torch")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
