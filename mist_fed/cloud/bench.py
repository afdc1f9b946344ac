"""``mist-fed bench cloud``: our server and embedder against bare baselines, side by side.

(a) bytes/s of ``do_get`` from the feature server (store warm) vs a bare ``pyarrow.flight``
    server streaming the same in-memory table (target ratio >= 0.8);
(b) images/s of backbone + Gather* for every candidate k from one pass vs plain timm
    ``forward_features`` on the same batch (target ratio >= 0.9).

Runs are interleaved and the best of ``reps`` is kept for each side, so background load on a
shared machine hits both alike.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import torch

from mist_fed.cloud.backbone import Backbone, create_backbone
from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.gather import GatherSpec, candidate_ks, gather_many
from mist_fed.cloud.runner import running_cloud
from mist_fed.wire.request import FeatureRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    backbone: str = "vit_tiny_patch16_224"
    images: int = 64  # rows streamed per do_get
    batch: int = 16  # images per forward in (b)
    reps: int = 5  # forward passes per side in (b)
    stream_reps: int = 40  # do_get streams per side in (a) (each takes milliseconds)
    dtype: str = "float32"
    threads: int | None = None  # torch threads; None = torch's default


class _BareServer(flight.FlightServerBase):
    """The baseline: streams one in-memory table, nothing else."""

    def __init__(self, location: str, table: pa.Table) -> None:
        super().__init__(location)
        self.table = table

    def do_get(self, context: Any, ticket: flight.Ticket) -> flight.RecordBatchStream:
        return flight.RecordBatchStream(self.table)


def _best(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def bench_stream(backbone: Backbone, cfg: BenchConfig, host: str) -> dict[str, float]:
    """(a): do_get bytes/s, ours (warm store) vs bare pyarrow.flight."""
    task = f"synthetic:train={cfg.images},val=1,test=1,size=32"
    k = backbone.num_blocks
    ticket = flight.Ticket(FeatureRequest(task, "train", "mist", k, cfg.dtype).to_json())
    with tempfile.TemporaryDirectory() as store:
        serve = ServeConfig(host=host, port=0, cache_dir=store, random_init=True, tasks=(task,))
        with running_cloud(serve, backbone=backbone) as loc:
            ours = flight.connect(loc)
            table = ours.do_get(ticket).read_all()  # warms the store
            bare = _BareServer(f"grpc+tcp://{host}:0", table)
            # wait, not serve: serve installs Arrow's SIGINT handler, which would swallow Ctrl-C
            thread = threading.Thread(target=bare.wait, daemon=True)
            thread.start()
            try:
                theirs = flight.connect(f"grpc+tcp://{host}:{bare.port}")
                ours_t, theirs_t = [], []
                for _ in range(cfg.stream_reps):
                    ours_t.append(_best(lambda: ours.do_get(ticket).read_all(), 1)[0])
                    theirs_t.append(
                        _best(lambda: theirs.do_get(flight.Ticket(b"")).read_all(), 1)[0]
                    )
            finally:
                bare.shutdown()
                thread.join(timeout=10)
    nbytes = table.nbytes
    ours_bps, bare_bps = nbytes / min(ours_t), nbytes / min(theirs_t)
    return {
        "stream_bytes": float(nbytes),
        "ours_bytes_per_s": ours_bps,
        "bare_bytes_per_s": bare_bps,
        "ours_median_s": statistics.median(ours_t),
        "bare_median_s": statistics.median(theirs_t),
        "stream_ratio": ours_bps / bare_bps,
        "stream_ratio_median": statistics.median(theirs_t) / statistics.median(ours_t),
    }


def bench_embed(backbone: Backbone, cfg: BenchConfig) -> dict[str, float]:
    """(b): images/s of backbone + Gather* (all candidate k, one pass) vs timm forward_features."""
    size = backbone.img_size
    x = torch.randn(cfg.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    specs = [GatherSpec("mist", k) for k in candidate_ks(backbone.num_blocks)]
    model = backbone.model

    def ours() -> Any:
        return gather_many(backbone, x, specs)

    def timm_ff() -> Any:
        with torch.inference_mode():
            return model.forward_features(x)

    ours(), timm_ff()  # warm up
    ours_t, timm_t = [], []
    for _ in range(cfg.reps):
        ours_t.append(_best(ours, 1)[0])
        timm_t.append(_best(timm_ff, 1)[0])
    ours_ips, timm_ips = cfg.batch / min(ours_t), cfg.batch / min(timm_t)
    return {
        "ours_images_per_s": ours_ips,
        "timm_images_per_s": timm_ips,
        "embed_ratio": ours_ips / timm_ips,
    }


def bench_cloud(cfg: BenchConfig, host: str, **model_kwargs: Any) -> dict[str, Any]:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    backbone = create_backbone(cfg.backbone, random_init=True, **model_kwargs)
    out: dict[str, Any] = {
        "config": asdict(cfg),
        "backbone": backbone.name,
        "blocks": backbone.num_blocks,
        "tokens": backbone.num_tokens,
        "dim": backbone.embed_dim,
        "torch_threads": torch.get_num_threads(),
    }
    out.update(bench_embed(backbone, cfg))
    out.update(bench_stream(backbone, cfg, host))
    return out
