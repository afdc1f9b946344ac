"""``FeatureRequest``: the JSON ticket of ``do_get`` (and descriptor command of ``do_exchange``).

``{"task": "...", "split": "train|val|test", "gather": "mist|side|final|block", "k": INT,
"dtype": a wire name (mist_fed.wire.dtypes), "ids": [optional subset], "offset": optional}``. Parsing
checks every field and names the one at fault; the server checks ``k`` against its backbone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from mist_fed.core.specs import DEPTH_GATHERS, GATHERS, GatherSpec
from mist_fed.errors import WireError
from mist_fed.wire.dtypes import check_wire

SPLITS = ("train", "val", "test")
_KEYS = {"task", "split", "gather", "k", "dtype", "ids", "offset"}
MAX_REQUEST_BYTES = 1 << 20  # the cloud refuses a longer request
PART_BYTES = MAX_REQUEST_BYTES // 2  # a client splits a longer id list into requests of this


@dataclass(frozen=True)
class FeatureRequest:
    task: str | None  # None for uploads (do_exchange)
    split: str | None
    gather: str = "mist"
    k: int | None = None
    dtype: str = "float32"
    ids: tuple[str, ...] | None = None
    offset: int = 0

    def __post_init__(self) -> None:
        if self.gather not in GATHERS:
            raise WireError(f"unknown gather {self.gather!r}; choose one of {', '.join(GATHERS)}")
        check_wire(self.dtype, WireError)
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int)):
            raise WireError(f"k must be an integer, got {self.k!r}")
        if self.gather in DEPTH_GATHERS and self.k is None:
            raise WireError(f"gather {self.gather!r} needs an integer k")
        if self.gather not in DEPTH_GATHERS and self.k is not None:
            raise WireError(f"gather {self.gather!r} uses every block; leave k out")
        if self.task is not None and self.split not in SPLITS:
            raise WireError(f"unknown split {self.split!r}; choose one of {', '.join(SPLITS)}")
        if not isinstance(self.offset, int) or isinstance(self.offset, bool) or self.offset < 0:
            raise WireError(f"offset must be an integer >= 0, got {self.offset!r}")
        if self.ids is not None:
            if not all(isinstance(i, str) for i in self.ids):
                raise WireError("ids must be a list of strings")
            object.__setattr__(self, "ids", tuple(self.ids))

    @property
    def spec(self) -> GatherSpec:
        return GatherSpec(self.gather, self.k)

    def parts(self, max_bytes: int | None = None) -> list[FeatureRequest]:
        """This request as one or more, in order, each at most ``max_bytes`` long (default
        :data:`PART_BYTES`): a long ``ids`` list (a central reference's 54,000 images) is split,
        as the cloud refuses a request over :data:`MAX_REQUEST_BYTES`."""
        limit = PART_BYTES if max_bytes is None else max_bytes
        if self.ids is None or len(self.to_json()) <= limit:
            return [self]
        room = limit - len(replace(self, ids=()).to_json())
        parts: list[FeatureRequest] = []
        chunk: list[str] = []
        size = 0
        for i in self.ids:
            cost = len(json.dumps(i)) + 1  # the id and its comma
            if chunk and size + cost > room:
                parts.append(replace(self, ids=tuple(chunk)))
                chunk, size = [], 0
            chunk.append(i)
            size += cost
        parts.append(replace(self, ids=tuple(chunk)))
        return parts

    def check_depth(self, num_blocks: int) -> None:
        if self.k is not None and not 0 <= self.k <= num_blocks:
            raise WireError(f"k={self.k} is outside 0..{num_blocks} for this backbone")

    def to_json(self) -> bytes:
        d: dict[str, Any] = {k: v for k, v in asdict(self).items() if v is not None}
        if "ids" in d:
            d["ids"] = list(d["ids"])
        if not d.get("offset"):
            d.pop("offset", None)
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(
        cls, raw: bytes, max_bytes: int = MAX_REQUEST_BYTES, upload: bool = False
    ) -> FeatureRequest:
        if len(raw) > max_bytes:
            raise WireError(f"request is {len(raw)} bytes, over the limit of {max_bytes}")
        try:
            d = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:  # also ints over Python's digit limit
            raise WireError(f"malformed request: not JSON ({e})") from e
        except RecursionError as e:
            raise WireError("malformed request: JSON nested too deeply") from e
        if not isinstance(d, dict):
            raise WireError("malformed request: expected a JSON object")
        unknown = set(d) - _KEYS
        if unknown:
            raise WireError(
                f"malformed request: unknown keys {sorted(unknown)}; known {sorted(_KEYS)}"
            )
        if upload:
            d.pop("task", None)
            d.pop("split", None)
        elif not isinstance(d.get("task"), str) or not d["task"]:
            raise WireError("malformed request: 'task' (a task spec string) is required")
        ids = d.get("ids")
        if ids is not None and not isinstance(ids, list):
            raise WireError("malformed request: 'ids' must be a list of strings")
        try:
            return cls(
                task=d.get("task"),
                split=d.get("split"),
                gather=d.get("gather", "mist"),
                k=d.get("k"),
                dtype=d.get("dtype", "float32"),
                ids=None if ids is None else tuple(ids),
                offset=d.get("offset", 0),
            )
        except TypeError as e:
            raise WireError(f"malformed request: {e}") from e
