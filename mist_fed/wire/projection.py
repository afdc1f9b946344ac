"""Channel projections of ``[tokens, C]`` feature maps: fitted by the cloud, pinned by id.

A :class:`Basis` holds the principal axes of a gather's features (mean ``[C]``, axes ``[C, C]``
by decreasing variance), fitted from maps streamed through :class:`BasisFit` (a float64 mean
and covariance over every token of every image, so a sample of any size fits in ``C x C``
memory). ``basis.projection(D)`` is the :class:`Projection` a ``pca<D>-...`` wire applies:
``y = (x - mean) @ axes[:, :D]``. Its ``id`` is a hash of exactly the numbers it applies, so
two clouds that fit the same basis give the same id, and a device that trained on one id can
refuse features projected with any other (:mod:`mist_fed.wire.dtypes` for the wire names).

A basis is saved as safetensors (no pickle) with what it was fitted on in its metadata.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mist_fed.errors import WireError
from mist_fed.files import atomic_path


@dataclass(frozen=True)
class Projection:
    """``x [..., C] -> (x - mean) @ axes [..., D]``; ``id`` names these exact numbers."""

    mean: np.ndarray  # float32 [C]
    axes: np.ndarray  # float32 [C, D]
    id: str

    @property
    def dims(self) -> int:
        return int(self.axes.shape[1])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Project ``[..., C]`` features (any float dtype) to float32 ``[..., D]``."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-1] != self.axes.shape[0]:
            raise WireError(
                f"features have {x.shape[-1]} channels; projection {self.id} expects "
                f"{self.axes.shape[0]}"
            )
        flat = x.reshape(-1, x.shape[-1]) - self.mean
        return (flat @ self.axes).reshape(*x.shape[:-1], self.dims)


def projection_id(mean: np.ndarray, axes: np.ndarray) -> str:
    """The id of the projection that applies ``mean`` and ``axes`` (16 hex digits)."""
    h = hashlib.sha256(b"mist_fed.pca:1|")
    for a in (mean, axes):
        a = np.ascontiguousarray(a, dtype=np.float32)
        h.update(json.dumps(list(a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Basis:
    """Every principal axis of a feature map: ``projection(D)`` keeps the first ``D``."""

    mean: np.ndarray  # float32 [C]
    axes: np.ndarray  # float32 [C, C], columns by decreasing variance
    variance: np.ndarray  # float64 [C], the variance along each axis
    fitted_on: str  # what it was fitted on, in words (kept in the saved file)

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    def projection(self, dims: int) -> Projection:
        if not 1 <= dims <= self.channels:
            raise WireError(f"a projection to {dims} channels needs 1..{self.channels}")
        axes = np.ascontiguousarray(self.axes[:, :dims], dtype=np.float32)
        mean = np.ascontiguousarray(self.mean, dtype=np.float32)
        return Projection(mean, axes, projection_id(mean, axes))

    def kept(self, dims: int) -> float:
        """The share of the features' variance the first ``dims`` axes keep."""
        total = float(self.variance.sum())
        return float(self.variance[:dims].sum()) / total if total > 0 else 1.0

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # whole or absent: a crash mid-write leaves no half basis
            save_file(
                {
                    "mean": np.ascontiguousarray(self.mean, dtype=np.float32),
                    "axes": np.ascontiguousarray(self.axes, dtype=np.float32),
                    "variance": np.ascontiguousarray(self.variance, dtype=np.float64),
                },
                str(tmp),
                metadata={"fitted_on": self.fitted_on},
            )

    @classmethod
    def load(cls, path: str | Path) -> Basis:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                mean, axes, var = (f.get_tensor(n) for n in ("mean", "axes", "variance"))
        except Exception as e:  # safetensors raises its own errors for a damaged file
            raise WireError(
                f"projection basis {path} does not load ({type(e).__name__}: {e})"
            ) from e
        c = mean.shape[0] if mean.ndim == 1 else -1
        if c < 1 or axes.shape != (c, c) or var.shape != (c,):
            raise WireError(f"projection basis {path} has inconsistent shapes")
        if not all(np.isfinite(a).all() for a in (mean, axes, var)):
            raise WireError(f"projection basis {path} holds NaN or Inf")
        return cls(mean, axes, var, meta.get("fitted_on", ""))


class BasisFit:
    """Streams ``[n, tokens, C]`` maps in; :meth:`finish` gives their :class:`Basis`."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.rows = 0
        self.images = 0
        self._sum = np.zeros(channels, np.float64)
        self._outer = np.zeros((channels, channels), np.float64)

    def add(self, maps: np.ndarray) -> None:
        x = np.asarray(maps, dtype=np.float64)
        if x.ndim < 2 or x.shape[-1] != self.channels:
            raise WireError(f"a basis fit takes [..., {self.channels}] maps, got {list(x.shape)}")
        if not np.isfinite(x).all():
            raise WireError("features to fit a projection on hold NaN or Inf")
        flat = x.reshape(-1, self.channels)
        self.rows += len(flat)
        self.images += len(x) if x.ndim > 2 else 1
        self._sum += flat.sum(0)
        self._outer += flat.T @ flat

    def finish(self, fitted_on: str) -> Basis:
        if self.rows < 2:
            raise WireError("a projection needs at least two feature rows to fit")
        mean = self._sum / self.rows
        cov = self._outer / self.rows - np.outer(mean, mean)
        var, vecs = np.linalg.eigh((cov + cov.T) / 2)
        order = np.argsort(var)[::-1]
        var, vecs = np.clip(var[order], 0.0, None), vecs[:, order]
        # one sign per axis whatever the LAPACK build: its largest entry positive
        flip = np.sign(vecs[np.abs(vecs).argmax(0), np.arange(self.channels)])
        vecs = vecs * np.where(flip == 0, 1.0, flip)
        return Basis(mean.astype(np.float32), vecs.astype(np.float32), var, fitted_on)
