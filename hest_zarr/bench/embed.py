"""Patch embeddings of a sample, cut with the one patch reader and cached in the store.

Patches come from :func:`hest_zarr.stream.extract_patches` (:class:`hest_zarr.stream.SamplePatches`, the reader the
streaming datasets use too: chunk-aware, every image chunk read once) and go through the encoder in batches. The
result is added to the sample's store (:func:`hest_zarr.store.add_elements`) as the table ``embeddings_<encoder>``
(``_<size>px_<um>um`` appended when the patch geometry is not the protocol's 224 px at 0.5 um/px) annotating
``spots``: ``X`` is ``(spots, D)`` float32, ``obs`` holds ``spot_id`` and ``region``. Its provenance records the
encoder's fingerprint and the patch geometry; a later run with the same fingerprint and geometry that needs no other
spots reads the table instead of embedding again.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from hest_zarr.bench.encoders import Encoder, Precision, resolve_precision
from hest_zarr.bench.protocol import PATCH_PIXEL_SIZE_UM, PATCH_SIZE_PX
from hest_zarr.elements import Elements, Keys, get_record
from hest_zarr.errors import HestZarrError, redact
from hest_zarr.ops.patch import PatchPlan
from hest_zarr.schemas import Provenance
from hest_zarr.store import StorageOptions, add_elements
from hest_zarr.store import open as open_store
from hest_zarr.stream import extract_patches

EMBED_OPERATOR = "bench.embed"


def embeddings_table_name(
    encoder_name: str, size_px: int = PATCH_SIZE_PX, pixel_size_um: float = PATCH_PIXEL_SIZE_UM
) -> str:
    """Name of the cache table of an encoder at a patch geometry.

    Examples
    --------
    >>> embeddings_table_name("uni"), embeddings_table_name("uni.v2", 224, 4.385)
    ('embeddings_uni', 'embeddings_uni.v2_224px_4p385um')

    """
    name = f"{Elements.EMBEDDINGS_PREFIX}{encoder_name}"
    if (size_px, pixel_size_um) == (PATCH_SIZE_PX, PATCH_PIXEL_SIZE_UM):
        return name
    return f"{name}_{size_px}px_{format(pixel_size_um, 'g').replace('.', 'p')}um"


def cache_fingerprint(encoder: Encoder, element: str, size_px: int, pixel_size_um: float) -> dict[str, Any]:
    """Return what cached embeddings must match to be reused: the encoder's fingerprint and the patch geometry."""
    return _canonical(
        {
            "encoder": encoder.fingerprint,
            "patches": {"element": element, "size_px": size_px, "pixel_size_um": pixel_size_um},
        }
    )


def _canonical(value: Any) -> Any:
    """JSON round trip, so tuples and lists (and what the store gives back) compare equal."""
    return json.loads(json.dumps(value, sort_keys=True))


@dataclass
class SampleEmbeddings:
    """Embeddings of the requested spots of one sample (rows in the order asked for)."""

    ids: np.ndarray
    embeddings: np.ndarray
    table: str
    from_cache: bool
    seconds: float


def read_cached_embeddings(
    url: str | Path,
    table_name: str,
    fingerprint: dict[str, Any],
    ids: np.ndarray,
    storage_options: StorageOptions = None,
) -> np.ndarray | None:
    """Return the cached embeddings of ``ids`` when the store's table matches the fingerprint and holds them all."""
    sdata = open_store(url, storage_options)
    if table_name not in sdata.tables:
        return None
    element = get_record(sdata).elements.get(table_name)
    recorded = element.provenance.parameters.get("fingerprint") if element is not None else None
    if _canonical(recorded) != fingerprint:
        warnings.warn(f"{url}: '{table_name}' was made with other settings; embedding again", stacklevel=2)
        return None
    table = sdata.tables[table_name]
    rows = pd.Index(table.obs[Keys.SPOT_ID].astype(str)).get_indexer(ids)
    if (rows < 0).any():
        return None
    return np.asarray(table.X[rows], dtype=np.float32)


def embed_patches(
    url: str | Path,
    encoder: Encoder,
    *,
    element: str = Elements.SPOTS,
    size_px: int = PATCH_SIZE_PX,
    pixel_size_um: float = PATCH_PIXEL_SIZE_UM,
    in_tissue_only: bool = True,
    batch_size: int = 64,
    precision: Precision | str = "auto",
    storage_options: StorageOptions = None,
    progress: bool = False,
) -> tuple[PatchPlan, np.ndarray]:
    """Cut every patch of a sample and embed it; return the patch plan and the embeddings in plan order.

    Examples
    --------
    >>> plan, embeddings = embed_patches("MOB1.zarr", efficientnet_lite0())  # doctest: +SKIP
    >>> embeddings.shape  # doctest: +SKIP
    (379, 1280)

    """
    from tqdm.auto import tqdm

    plan, batches = extract_patches(
        url,
        element=element,
        size_px=size_px,
        pixel_size_um=pixel_size_um,
        in_tissue_only=in_tissue_only,
        batch_size=batch_size,
        storage_options=storage_options,
    )
    embeddings: np.ndarray | None = None
    with tqdm(total=len(plan), desc=f"{encoder.name}", unit="patch", disable=not progress) as bar:
        for batch in batches:
            features = encoder.embed(batch.images, precision=precision)
            if embeddings is None:
                embeddings = np.empty((len(plan), features.shape[1]), dtype=np.float32)
            embeddings[batch.indices] = features
            bar.update(len(batch.indices))
    if embeddings is None:
        raise HestZarrError(f"{url}: no patch was cut")
    return plan, embeddings


def embeddings_table(ids: np.ndarray, embeddings: np.ndarray, element: str = Elements.SPOTS) -> AnnData:
    """Build the cache table: ``X`` = embeddings, annotating ``element`` by ``spot_id``."""
    from spatialdata.models import TableModel

    obs = pd.DataFrame(
        {Keys.SPOT_ID: np.asarray(ids, dtype=str), Keys.REGION: pd.Categorical([element] * len(ids))},
        index=pd.Index(np.asarray(ids, dtype=str)),
    )
    var = pd.DataFrame(index=[f"dim_{i}" for i in range(embeddings.shape[1])])
    table = AnnData(X=np.asarray(embeddings, dtype=np.float32), obs=obs, var=var)
    return TableModel.parse(table, region=element, region_key=Keys.REGION, instance_key=Keys.SPOT_ID)


def sample_embeddings(
    url: str | Path,
    encoder: Encoder,
    ids: np.ndarray,
    *,
    element: str = Elements.SPOTS,
    size_px: int = PATCH_SIZE_PX,
    pixel_size_um: float = PATCH_PIXEL_SIZE_UM,
    in_tissue_only: bool = True,
    batch_size: int = 64,
    precision: Precision | str = "auto",
    cache: bool = True,
    storage_options: StorageOptions = None,
    progress: bool = False,
) -> SampleEmbeddings:
    """Return the embeddings of the given spots: from the store's cache table, else embedded and cached.

    Parameters
    ----------
    url
        Sample store.
    encoder
        The encoder (already on its device).
    ids
        Spot ids whose embeddings are wanted (a subset of the patch plan's).
    element, size_px, pixel_size_um, in_tissue_only
        Which patches: see :func:`hest_zarr.ops.patch.plan_patches`.
    batch_size, precision
        Inference batch size and precision (``auto``: fp16 autocast on CUDA, fp32 on CPU).
    cache
        Read and write the ``embeddings_<encoder>`` table of the store (else embed, keep nothing).
    storage_options
        fsspec options for a remote store.
    progress
        Show a progress bar while embedding.

    Examples
    --------
    >>> result = sample_embeddings("MOB1.zarr", efficientnet_lite0(), ids)  # doctest: +SKIP
    >>> result.table, result.from_cache  # doctest: +SKIP
    ('embeddings_efficientnet_lite0', False)

    """
    start = time.perf_counter()
    ids = np.asarray(ids, dtype=str)
    table_name = embeddings_table_name(encoder.name, size_px, pixel_size_um)
    fingerprint = cache_fingerprint(encoder, element, size_px, pixel_size_um)
    if cache:
        cached = read_cached_embeddings(url, table_name, fingerprint, ids, storage_options)
        if cached is not None:
            return SampleEmbeddings(ids, cached, table_name, True, time.perf_counter() - start)
    plan, embeddings = embed_patches(
        url,
        encoder,
        element=element,
        size_px=size_px,
        pixel_size_um=pixel_size_um,
        in_tissue_only=in_tissue_only,
        batch_size=batch_size,
        precision=precision,
        storage_options=storage_options,
        progress=progress,
    )
    rows = pd.Index(plan.ids).get_indexer(ids)
    if (rows < 0).any():
        raise HestZarrError(f"{url}: spot {ids[int(np.argmax(rows < 0))]!r} has no patch")
    if cache:
        try:
            _write_cache(url, table_name, fingerprint, encoder, plan, embeddings, element, precision, storage_options)
        except (HestZarrError, OSError, NotImplementedError) as err:  # a read-only store: keep the embeddings
            warnings.warn(f"{url}: embeddings computed but not cached ({type(err).__name__}: {err})", stacklevel=2)
    return SampleEmbeddings(ids, embeddings[rows], table_name, False, time.perf_counter() - start)


def _write_cache(
    url: str | Path,
    table_name: str,
    fingerprint: dict[str, Any],
    encoder: Encoder,
    plan: PatchPlan,
    embeddings: np.ndarray,
    element: str,
    precision: Precision | str,
    storage_options: StorageOptions,
) -> None:
    device = encoder.device
    provenance = Provenance(
        converter=EMBED_OPERATOR,
        inputs=[redact(str(url))],
        method=f"patch encoder {encoder.name} ({encoder.fingerprint.get('kind')})",
        parameters={
            "fingerprint": fingerprint,
            "device": str(device),
            "precision": resolve_precision(precision, device),
            "n_patches": len(plan),
            "level": plan.level,
            "level_pixel_size_um": plan.level_pixel_size_um,
            "window_px_at_level": plan.window,
        },
    )
    with warnings.catch_warnings():  # the table annotates the store's spots, absent from the staged elements
        warnings.filterwarnings("ignore", message="The table is annotating", category=UserWarning)
        add_elements(
            url,
            {table_name: embeddings_table(plan.ids, embeddings, element)},
            {table_name: provenance},
            replace=True,  # a stale table of that name (other settings or fewer spots) is superseded
            storage_options=storage_options,
        )
