"""Several condition sources joined into one feature store (the seed's "[x_t..., image_clip, text_clip]").

The captioner reads one feature store; to condition on several (a CLIP image embedding and a CLIP text
embedding of the same image, or a patch grid and a pooled vector), their items are joined along the
token axis: a pooled vector counts as one token, a grid (N, C) as N. The joined store's metadata
``segments`` records each source's token count in order ("1,1"), from which the model gives each
source its own segment embedding (:func:`diffcap.config.resolve` reads it into
``model.cond_segments``). Every source must have the same width C and an item for every id.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..io import PathLike
from .errors import DataError, describe_ids
from .shard_file import write_features
from .store import FeatureStore, shard_name, write_index
from .store_index import INDEX_FILE

SEGMENTS_KEY = "segments"


def join_features(sources: Sequence[PathLike], out: PathLike, shard_size: int = 4096) -> Path:
    """Write the items of ``sources`` (stores keyed by the same image ids, all C wide) concatenated along
    the token axis as a sharded store at ``out``; returns the path of its index.

    Items are read and written ``shard_size`` at a time, so the sources need not fit in memory. The
    joined dtype is the widest of the sources' (float16 patch grids with float32 pooled vectors give
    float32).
    """
    if len(sources) < 2:
        raise DataError(f"joining condition sources needs at least two feature stores, got {len(sources)}")
    stores = [FeatureStore.open(path) for path in sources]
    for store in stores:
        if store.spec.is_pixels or len(store.item_shape) not in (1, 2):
            raise DataError(
                f"{store.path}: a condition source holds vectors (C,) or grids (N, C), not {store.item_shape}"
            )
    widths = {store.item_shape[-1] for store in stores}
    if len(widths) > 1:
        shapes = ", ".join(f"{store.path}: {store.item_shape}" for store in stores)
        raise DataError(f"condition sources must be equally wide to be joined; got {shapes}")
    ids = sorted(stores[0].ids)
    for store in stores[1:]:
        if set(store.ids) != set(ids):
            missing = sorted(set(ids) ^ set(store.ids))
            raise DataError(f"{store.path} and {stores[0].path} differ in their ids: {describe_ids(missing)}")
    dtype = stores[0].dtype
    for store in stores[1:]:
        dtype = torch.promote_types(dtype, store.dtype)
    segments = [1 if len(store.item_shape) == 1 else store.item_shape[0] for store in stores]
    metadata = {
        SEGMENTS_KEY: ",".join(map(str, segments)),
        "sources": json.dumps([str(store.path) for store in stores]),
    }
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_FILE).unlink(missing_ok=True)  # a half-rewritten store must not open
    files = []
    for k, start in enumerate(range(0, len(ids), shard_size)):
        chunk = ids[start : start + shard_size]
        parts = [store.get(chunk).to(dtype) for store in stores]
        joined = torch.cat([p[:, None] if p.dim() == 2 else p for p in parts], dim=1)  # (n, sum(segments), C)
        files.append(folder / shard_name(k))
        write_features(files[-1], dict(zip(chunk, joined)), metadata)
    for stale in set(folder.glob("shard-*.safetensors")) - set(files):
        stale.unlink()
    return write_index(folder, files, metadata)
