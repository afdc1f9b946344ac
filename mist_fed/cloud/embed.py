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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

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
        return backbone_meta(self.backbone, spec, dtype)

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

    def encode(
        self, images: Sequence[Image.Image], needed: Needed
    ) -> dict[tuple[GatherSpec, str], dict[str, pa.Array]]:
        """One backbone pass over ``images``; each pair's encoded columns for its rows."""
        return encode_pairs(self.backbone, self.transform, self.device, images, needed)

    def warm(
        self,
        pairs: Sequence[tuple[GatherSpec, str]],
        hashes: Sequence[str],
        load: ImageLoader,
        pool: EmbedPool | None = None,
    ) -> int:
        """Store exactly the ``(spec, dtype)`` pairs for the images ``hashes`` (no family).

        ``load(i)`` gives image ``i``. One backbone pass per image computes every pair it lacks;
        pairs already stored for an image are not written again. Returns images embedded.
        With a ``pool`` (:class:`~mist_fed.cloud.ray_warm.RayEmbedPool`), its workers run the
        passes, each loading image ``i`` itself; this embedder still writes every row.
        """
        wanted = list(dict.fromkeys(pairs))
        first: dict[str, int] = {}
        for i, h in enumerate(hashes):
            first.setdefault(h, i)
        keys = list(first)
        jobs: list[WarmJob] = []
        for b in range(0, len(keys), self.batch_size):
            chunk = keys[b : b + self.batch_size]
            needed: Needed = {}
            for pair in wanted:
                idx = [j for j, loc in enumerate(self.store.lookup(*pair, chunk)) if loc is None]
                if idx:
                    needed[pair] = idx
            rows = sorted({j for idx in needed.values() for j in idx})
            if rows:  # needed's indices re-based on the images this job loads
                pos = {j: n for n, j in enumerate(rows)}
                rebased = {pair: [pos[j] for j in idx] for pair, idx in needed.items()}
                jobs.append(
                    WarmJob([chunk[j] for j in rows], [first[chunk[j]] for j in rows], rebased)
                )
        results: Iterator[tuple[WarmJob, dict[tuple[GatherSpec, str], dict[str, pa.Array]]]]
        if pool is None:
            results = (
                (job, self._warm_local(job, load)) for job in jobs
            )  # per job: requests are served between jobs
        else:
            results = pool.run(jobs, self)
        embedded = 0
        start = time.perf_counter()
        for job, out in results:
            again = 0
            for (s, dtype), idx in job.needed.items():
                meta = self.meta(s, dtype)
                check_columns(meta, out[(s, dtype)], len(idx))  # a worker's rows: checked
                again = max(
                    again, self.store.put(s, dtype, [job.hashes[j] for j in idx], out[(s, dtype)])
                )
            embedded += len(job.hashes)
            with self._count_lock:
                self.counters.images_embedded += len(job.hashes)
                self.counters.images_reembedded += again
                self.counters.forward_batches += 1
            log.info(
                "warm: %d/%d images embedded (%.1f img/s)%s",
                embedded,
                sum(len(j.hashes) for j in jobs),
                embedded / max(time.perf_counter() - start, 1e-9),
                "" if pool is None else f" on {pool.workers} Ray workers",
            )
        return embedded

    def _warm_local(
        self, job: WarmJob, load: ImageLoader
    ) -> dict[tuple[GatherSpec, str], dict[str, pa.Array]]:
        with self._forward_lock:
            return self.encode([load(i) for i in job.items], job.needed)


#: (gather spec, stored dtype) -> the indices, into a job's images, of the rows it needs
Needed = dict[tuple[GatherSpec, str], list[int]]


@dataclass(frozen=True)
class WarmJob:
    """One forward batch of a warm: the images' hashes, their indices for the loader (rows of
    the warmed split), and which rows each pair needs."""

    hashes: list[str]
    items: list[int]
    needed: Needed


class EmbedPool(Protocol):
    """Workers that run a warm's jobs elsewhere; results come back in any order."""

    workers: int

    def run(
        self, jobs: Sequence[WarmJob], embedder: Embedder
    ) -> Iterator[tuple[WarmJob, dict[tuple[GatherSpec, str], dict[str, pa.Array]]]]: ...


def encode_pairs(
    backbone: Backbone,
    transform: Callable[[Any], torch.Tensor],
    device: torch.device,
    images: Sequence[Image.Image],
    needed: Needed,
) -> dict[tuple[GatherSpec, str], dict[str, pa.Array]]:
    """One backbone pass over ``images``: each ``(spec, dtype)`` pair's encoded columns for the
    rows ``needed`` names (what a warm job computes, in the service or on a Ray worker)."""
    specs = sorted({s for s, _ in needed}, key=lambda s: s.label())
    x = torch.stack([transform(im.convert("RGB")) for im in images])
    out = gather_many(backbone, x.to(device), specs)
    return {
        (s, dtype): encode_arrays(backbone_meta(backbone, s, dtype), out[s][idx].cpu())
        for (s, dtype), idx in needed.items()
    }


def backbone_meta(backbone: Backbone, spec: GatherSpec, dtype: str) -> WireMeta:
    """The wire metadata of ``backbone``'s ``spec`` features in ``dtype``."""
    return WireMeta(
        backbone=backbone.name,
        weights=backbone.weights_id,
        gather=spec.kind,
        k=spec.k,
        dtype=dtype,
        shape=feature_shape(backbone, spec),
    )


def check_columns(meta: WireMeta, cols: dict[str, pa.Array], rows: int) -> None:
    """Refuse encoded columns that are not ``rows`` rows of ``meta``'s features."""
    want = encode_arrays(meta, torch.zeros(1, *meta.shape))
    if set(cols) != set(want) or any(
        len(cols[n]) != rows or cols[n].type != want[n].type for n in want
    ):
        raise WireError(
            f"embedded columns do not match {meta.gather} k={meta.k} {meta.dtype} "
            f"({rows} rows of {meta.shape}); the worker runs another backbone or version"
        )
