"""The initial edge weights a method needs from the cloud, as ``safetensors`` bytes.

Partial-1 tunes the backbone's last block on the device, starting from the pretrained block,
but a device cannot run (or hold) the backbone. The cloud answers the Flight action
:data:`ACTION` (body: ``{"method": NAME}`` as JSON) with one result: a safetensors blob of the
method's :meth:`~mist_fed.cloud.backbone.Backbone.edge_init_state` whose metadata names the method and
the backbone and weights id it came from, so the device can check it matches the features.
Pure encode/decode here; the server and :class:`~mist_fed.wire.flight.FeatureClient` use them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from mist_fed.errors import WireError

ACTION = "edge_init"
META_KEY = "mist_fed.edge_init"
MAX_REQUEST_BYTES = 1024


@dataclass(frozen=True)
class EdgeInit:
    """Initial edge weights (``state``, keyed as in the edge net) and where they came from."""

    method: str
    backbone: str
    weights: str
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    nbytes: int = 0  # size on the wire, set by decode

    def header(self) -> dict[str, str]:
        return {"method": self.method, "backbone": self.backbone, "weights": self.weights}


def encode_request(method: str) -> bytes:
    return json.dumps({"method": method}).encode()


def decode_request(body: bytes) -> str:
    """The method name of an ``edge_init`` action body; :class:`WireError` if malformed."""
    if len(body) > MAX_REQUEST_BYTES:
        raise WireError(f"edge_init request of {len(body)} bytes, over {MAX_REQUEST_BYTES}")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise WireError(f'edge_init body must be JSON {{"method": NAME}}: {e}') from e
    method = data.get("method") if isinstance(data, dict) else None
    if not isinstance(method, str):
        raise WireError('edge_init body must be JSON {"method": NAME} with a method name')
    return method


def encode(init: EdgeInit) -> bytes:
    meta = {META_KEY: json.dumps(init.header(), sort_keys=True)}
    return bytes(save(init.state, metadata=meta))


def decode(data: bytes) -> EdgeInit:
    """An :class:`EdgeInit` from ``encode``'s bytes; :class:`WireError` if they are not that."""
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or n > len(data) - 8:
            raise ValueError("truncated header")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        header: dict[str, Any] = json.loads(meta[META_KEY])
        state = load(data)  # safetensors only: nothing is unpickled
    except (ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise WireError(
            f"the cloud's edge_init reply is not a mist-fed safetensors blob ({e}); "
            "is the cloud a `mist-fed cloud serve` of this version?"
        ) from e
    missing = [k for k in ("method", "backbone", "weights") if not isinstance(header.get(k), str)]
    if missing:
        raise WireError(f"the cloud's edge_init reply lacks {', '.join(missing)} in its metadata")
    return EdgeInit(
        header["method"], header["backbone"], header["weights"], dict(state), nbytes=len(data)
    )
