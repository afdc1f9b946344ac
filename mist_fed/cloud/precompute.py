"""Precompute: fill the feature store for many (gather spec, dtype) pairs from ONE backbone pass.

The embedder computes one spec family per request; a comparison that asks for every gather
(``final``, ``block``, ``mist`` at each ``k``, ``side``) in several wire dtypes would run the
backbone once per family and dtype. :func:`precompute` runs it once per image, encodes every
pair exactly as the server would, and writes them to the store the server then reads (same
directory, same ``weights_id``, same image hashes): the cloud still computes each image once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mist_fed.cloud.embed import image_hash
from mist_fed.cloud.store import FeatureStore
from mist_fed.data.registry import TaskSplit
from mist_fed.model.backbone import Backbone
from mist_fed.model.gather import GatherSpec, feature_shape, gather_many
from mist_fed.wire.codec import WireMeta, encode_arrays

log = logging.getLogger(__name__)


def precompute(
    backbone: Backbone,
    store_dir: str | Path,
    split: TaskSplit,
    rows: Sequence[int],
    pairs: Sequence[tuple[GatherSpec, str]],
    batch_size: int = 16,
) -> int:
    """Store every ``(spec, dtype)`` of ``pairs`` for ``split``'s ``rows``; returns images embedded.

    Images already stored for every pair are skipped, and a pair is written only for the images
    it lacks (reruns, or a new pair, fill what is missing without duplicating the rest).
    """
    store = FeatureStore(store_dir, backbone.weights_id)
    tf = backbone.transform()
    hashes = [image_hash(split.image(r)) for r in rows]
    missing: dict[tuple[GatherSpec, str], set[str]] = {}
    todo: dict[str, int] = {}
    for pair in pairs:
        locs = store.lookup(*pair, hashes)
        missing[pair] = {h for h, loc in zip(hashes, locs, strict=True) if loc is None}
        todo.update((h, r) for h, r in zip(hashes, rows, strict=True) if h in missing[pair])
    items = list(todo.items())
    start = time.perf_counter()
    for b in range(0, len(items), batch_size):
        chunk = items[b : b + batch_size]
        keys = [h for h, _ in chunk]
        needed = {p: [i for i, h in enumerate(keys) if h in missing[p]] for p in pairs}
        needed = {p: idx for p, idx in needed.items() if idx}
        specs = sorted({s for s, _ in needed}, key=lambda s: s.label())
        x = torch.stack([tf(split.image(r).convert("RGB")) for _, r in chunk])
        out = gather_many(backbone, x, specs)
        for (spec, dtype), idx in needed.items():  # only what the store lacks: no duplicates
            shape = feature_shape(backbone, spec)
            meta = WireMeta(backbone.name, backbone.weights_id, spec.kind, spec.k, dtype, shape)
            batch = encode_arrays(meta, out[spec][idx])
            store.put(spec, dtype, [keys[i] for i in idx], batch)
        done = b + len(chunk)
        log.info(
            "precompute %d/%d images (%.1f img/s)",
            done,
            len(items),
            done / max(time.perf_counter() - start, 1e-9),
        )
    return len(items)
