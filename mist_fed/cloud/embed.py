"""Batched embedding: images -> encoded feature columns, through the store.

For each request the embedder looks every image hash up in the :class:`FeatureStore`,
runs the frozen backbone once per batch of misses, and stores every spec of the request's
*family* from that one pass (for ``mist``/``block`` at depth ``k``: all candidate depths
``{N/3, 2N/3, N}`` and ``k``), so a later request for another candidate ``k`` is a store hit.
Images are preprocessed with the backbone's own eval transform.

:meth:`Embedder.warm` fills the store ahead of a run for many (gather spec, dtype) pairs at
once, with ONE backbone pass per image (a comparison asks for ``final``, ``block``, ``mist`` at
each ``k`` and ``side`` in several wire dtypes). It writes through the same store as requests
do: the service stays the store's one writer, and each image is still embedded once.
Counters tell images embedded from images embedded *again* (their stored rows were evicted
under the store's size cap, or found damaged), so "each image embedded once" stays measurable.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import torch
from PIL import Image, UnidentifiedImageError

from mist_fed.cloud.backbone import Backbone
from mist_fed.cloud.gather import (
    DEPTH_GATHERS,
    GatherSpec,
    candidate_ks,
    feature_shape,
    gather_many,
)
from mist_fed.cloud.store import FeatureStore, content_hash
from mist_fed.errors import WireError
from mist_fed.wire.codec import WireMeta, encode_arrays

log = logging.getLogger(__name__)

ImageLoader = Callable[[int], Image.Image]


def image_hash(img: Image.Image) -> str:
    """Content hash of a decoded RGB image (same pixels -> same key, whatever the file format)."""
    img = img.convert("RGB")
    return content_hash(f"{img.mode}:{img.size}:".encode() + img.tobytes())


def decode_image(data: bytes, max_bytes: int) -> Image.Image:
    """Decode uploaded PNG/JPEG bytes into an RGB image, or raise ``WireError`` naming why."""
    if len(data) > max_bytes:
        raise WireError(f"image is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise WireError(f"image does not decode ({type(e).__name__}: {e})") from e
    return img.convert("RGB")


@dataclass
class EmbedCounters:
    images_embedded: int = 0
    images_reembedded: int = 0  # embedded again: their stored rows were evicted or damaged
    forward_batches: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Embedder:
    """The frozen backbone behind the store: ``columns(spec, dtype, hashes, load)``."""

    def __init__(
        self,
        backbone: Backbone,
        store: FeatureStore,
        batch_size: int = 32,
        device: torch.device | None = None,
    ) -> None:
        self.device = device or torch.device("cpu")
        self.backbone = backbone.to(self.device)
        self.store = store
        self.batch_size = batch_size
        self.transform = backbone.transform()
        self.counters = EmbedCounters()
        self._forward_lock = threading.Lock()
        self._count_lock = threading.Lock()

    def meta(self, spec: GatherSpec, dtype: str) -> WireMeta:
        return WireMeta(
            backbone=self.backbone.name,
            weights=self.backbone.weights_id,
            gather=spec.kind,
            k=spec.k,
            dtype=dtype,
            shape=feature_shape(self.backbone, spec),
        )

    def family(self, spec: GatherSpec) -> list[GatherSpec]:
        """Every spec one pass for ``spec`` computes and stores."""
        if spec.kind in DEPTH_GATHERS:
            ks = sorted({*candidate_ks(self.backbone.num_blocks), spec.k or 0})
            return [GatherSpec(spec.kind, k) for k in ks]
        return [spec]

    def columns(
        self, spec: GatherSpec, dtype: str, hashes: Sequence[str], load: ImageLoader
    ) -> dict[str, pa.Array]:
        """Encoded columns for the images ``hashes[i]`` (``load(i)`` gives image ``i`` on a miss)."""
        locs = self.store.lookup(spec, dtype, hashes)
        miss = [i for i, loc in enumerate(locs) if loc is None]
        with self._count_lock:
            self.counters.cache_hits += len(hashes) - len(miss)
            self.counters.cache_misses += len(miss)
        if miss:
            self._compute(spec, dtype, hashes, miss, load)
            locs = self.store.lookup(spec, dtype, hashes)
        missing = [hashes[i] for i, loc in enumerate(locs) if loc is None]
        if missing:
            raise WireError(f"feature store lost {len(missing)} rows just written; check the disk")
        return self.store.columns(spec, dtype, [loc for loc in locs if loc is not None])

    def _compute(
        self,
        spec: GatherSpec,
        dtype: str,
        hashes: Sequence[str],
        miss: Sequence[int],
        load: ImageLoader,
    ) -> None:
        unique: dict[str, int] = {}
        for i in miss:
            unique.setdefault(hashes[i], i)
        family = self.family(spec)
        items = list(unique.items())
        with self._forward_lock:
            # another request may have filled these while we waited for the lock
            found = self.store.lookup(spec, dtype, [h for h, _ in items])
            todo = [item for item, loc in zip(items, found, strict=True) if loc is None]
            parts: dict[GatherSpec, list[torch.Tensor]] = {s: [] for s in family}
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                x = torch.stack([self.transform(load(i).convert("RGB")) for _, i in chunk])
                out = gather_many(self.backbone, x.to(self.device), family)
                for s in family:
                    parts[s].append(out[s].cpu())
                with self._count_lock:
                    self.counters.images_embedded += len(chunk)
                    self.counters.forward_batches += 1
            if not todo:
                return
            # one shard per request chunk: served later as one zero-copy slice
            hashes_done = [h for h, _ in todo]
            again = 0
            for s in family:
                feats = torch.cat(parts[s])
                cols = encode_arrays(self.meta(s, dtype), feats)
                again = max(again, self.store.put(s, dtype, hashes_done, cols))
            with self._count_lock:
                self.counters.images_reembedded += again
            log.debug("embedded %d images (%s)", len(todo), ",".join(s.label() for s in family))

    def warm(
        self,
        pairs: Sequence[tuple[GatherSpec, str]],
        hashes: Sequence[str],
        load: ImageLoader,
    ) -> int:
        """Store exactly the ``(spec, dtype)`` pairs for the images ``hashes`` (no family).

        ``load(i)`` gives image ``i``. One backbone pass per image computes every pair it lacks;
        pairs already stored for an image are not written again. Returns images embedded.
        """
        wanted = list(dict.fromkeys(pairs))
        first: dict[str, int] = {}
        for i, h in enumerate(hashes):
            first.setdefault(h, i)
        keys = list(first)
        embedded = 0
        start = time.perf_counter()
        for b in range(0, len(keys), self.batch_size):
            chunk = keys[b : b + self.batch_size]
            with self._forward_lock:  # per batch: requests are served between batches
                needed: dict[tuple[GatherSpec, str], list[int]] = {}
                for pair in wanted:
                    locs = self.store.lookup(*pair, chunk)
                    idx = [j for j, loc in enumerate(locs) if loc is None]
                    if idx:
                        needed[pair] = idx
                rows = sorted({j for idx in needed.values() for j in idx})
                if not rows:
                    continue
                pos = {j: n for n, j in enumerate(rows)}
                specs = sorted({s for s, _ in needed}, key=lambda s: s.label())
                x = torch.stack(
                    [self.transform(load(first[chunk[j]]).convert("RGB")) for j in rows]
                )
                out = gather_many(self.backbone, x.to(self.device), specs)
                again = 0
                for (s, dtype), idx in needed.items():
                    feats = out[s][[pos[j] for j in idx]].cpu()
                    cols = encode_arrays(self.meta(s, dtype), feats)
                    again = max(again, self.store.put(s, dtype, [chunk[j] for j in idx], cols))
            embedded += len(rows)
            with self._count_lock:
                self.counters.images_embedded += len(rows)
                self.counters.images_reembedded += again
                self.counters.forward_batches += 1
            log.info(
                "warm: %d/%d images checked, %d embedded (%.1f img/s)",
                min(b + self.batch_size, len(keys)),
                len(keys),
                embedded,
                embedded / max(time.perf_counter() - start, 1e-9),
            )
        return embedded
