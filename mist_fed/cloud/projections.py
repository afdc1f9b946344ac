"""The cloud's channel projections: fitted once per (gather, image set), kept, served by id.

A ``pca<D>-<dtype>`` wire sends each token's first ``D`` principal coordinates
(:mod:`mist_fed.wire.projection`). The basis is fitted on the cloud from the gather's own
features, which the embedder computes and stores as for any request (the store stays the one
place features are written):

* ``pca<D>-``: on a fixed image sample, the first ``projection_images`` training images of the
  ``projection_sample`` task (``digits`` by default: scikit-learn's bundled images, here on any
  machine), the same whatever task a device asks for;
* ``pca<D>task-``: on the first ``projection_images`` training images of the task asked for.

Each basis is saved under the store's directory (``projections/``) and loaded again by a
restarted cloud, so its id is the same across restarts; a new fit (a wiped store) gives a new
id, and devices pinned to the old one refuse its features. Features are served by projecting
the gather's float16 map from the store and encoding the coordinates in the wire's dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

from mist_fed.cloud.embed import Embedder, ImageLoader
from mist_fed.core.specs import GatherSpec
from mist_fed.errors import WireError
from mist_fed.wire.codec import WireMeta, encode_arrays, tensor_numpy
from mist_fed.wire.dtypes import parse_wire, stored_dtype, wire_shape
from mist_fed.wire.projection import Basis, BasisFit, Projection

log = logging.getLogger(__name__)

#: ``(task, limit)`` -> the hashes of its first ``limit`` training images, a loader for image ``i``
TrainImages = Callable[[str, int], tuple[list[str], ImageLoader]]


class Projections:
    """Fitted bases by (gather, image set); :meth:`get` fits a missing one once."""

    def __init__(
        self,
        embedder: Embedder,
        root: Path | None,
        train_images: TrainImages,
        sample_task: str = "digits",
        images: int = 1000,
        chunk: int = 64,
    ) -> None:
        self.embedder = embedder
        self.root = root
        self.train_images = train_images
        self.sample_task = sample_task
        self.images = images
        self.chunk = chunk
        self._bases: dict[str, Basis] = {}
        self._lock = threading.Lock()  # one fit at a time: a fit runs the backbone

    def _key(self, spec: GatherSpec, task: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", task)[:60]
        tag = hashlib.sha256(task.encode()).hexdigest()[:12]  # the whole spec, not its prefix
        return f"{spec.label()}-{safe}-{tag}-{self.images}"

    def basis(self, spec: GatherSpec, task: str) -> Basis:
        """The basis of ``spec``'s features fitted on ``task``'s training images (once)."""
        key = self._key(spec, task)
        with self._lock:
            found = self._bases.get(key)
            if found is not None:
                return found
            path = None if self.root is None else self.root / f"{key}.safetensors"
            if path is not None and path.is_file():
                try:
                    found = Basis.load(path)
                except WireError as e:
                    log.warning("%s; fitting it again", e)
            if found is None:
                found = self._fit(spec, task)
                if path is not None:
                    try:
                        found.save(path)
                    except OSError as e:
                        log.warning("projection basis not saved to %s (%s): memory only", path, e)
            self._bases[key] = found
            return found

    def _fit(self, spec: GatherSpec, task: str) -> Basis:
        hashes, load = self.train_images(task, self.images)
        if len(hashes) < 2:
            raise WireError(f"{task} has {len(hashes)} training images; a projection needs 2")
        fit: BasisFit | None = None
        for start in range(0, len(hashes), self.chunk):
            part = hashes[start : start + self.chunk]
            cols = self.embedder.columns(spec, "float16", part, partial(_offset, load, start))
            maps = tensor_numpy(cols["features"])
            fit = fit or BasisFit(maps.shape[-1])
            fit.add(maps)
        assert fit is not None
        basis = fit.finish(f"{spec.label()} of {len(hashes)} {task} training images")
        log.info("fitted a projection basis on %s", basis.fitted_on)
        return basis

    def get(self, spec: GatherSpec, dtype: str, task: str | None) -> Projection | None:
        """The projection a ``dtype`` wire applies to ``task``'s ``spec`` features (or ``None``)."""
        wire = parse_wire(dtype)
        if wire.dims is None:
            return None
        if wire.scope == "task":
            if task is None:
                raise WireError(
                    f"{dtype!r} is fitted on a task's training images; uploaded images have no "
                    f"task: use pca{wire.dims}-{wire.encoded} (fitted on a fixed sample)"
                )
            source = task
        else:
            source = self.sample_task
        return self.basis(spec, source).projection(wire.dims)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                key: {"fitted_on": b.fitted_on, "channels": b.channels}
                for key, b in self._bases.items()
            }


def wire_meta(
    embedder: Embedder, spec: GatherSpec, dtype: str, proj: Projection | None
) -> WireMeta:
    """The stream's metadata: the gather's, its shape and basis as the wire sends them."""
    meta = embedder.meta(spec, dtype if proj is None else stored_dtype(dtype))
    if proj is None:
        return meta
    try:
        shape = wire_shape(meta.shape, dtype)
    except ValueError as e:
        raise WireError(str(e)) from e
    return dataclasses.replace(meta, dtype=dtype, shape=shape, basis=proj.id)


def project_columns(
    meta: WireMeta, proj: Projection | None, columns: dict[str, pa.Array]
) -> dict[str, pa.Array]:
    """Stored columns as the wire sends them: projected and encoded in ``meta.dtype``."""
    if proj is None:
        return columns
    return encode_arrays(meta, proj.apply(tensor_numpy(columns["features"])))


def _offset(load: ImageLoader, start: int, i: int) -> Any:
    return load(start + i)
