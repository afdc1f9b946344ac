"""Test-only fault injection for fleet runs, selected by the ``MIST_FED_FAULTS`` variable.

``MIST_FED_FAULTS="exit:device=1,round=1"`` makes that device's ClientApp end its worker
process with ``os._exit`` (no cleanup, as a killed Ray worker) when it receives that round's
train job; ``hang:device=1,round=1`` makes it sleep ``HANG_S`` instead (a device that never
answers, to interrupt a run mid-round; once per run: given the run's device storage, it
leaves a mark there, so the same run resumed does not hang again). Unset (the default),
:func:`maybe_fault` does nothing. The variable travels to Ray
workers with the run's environment (:func:`mist_fed.fleet.runtime.cluster.worker_env`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mist_fed.errors import ConfigError

ENV = "MIST_FED_FAULTS"
KINDS = ("exit", "hang")
HANG_S = 3600.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fault:
    kind: str
    device: int
    round: int

    @classmethod
    def parse(cls, text: str) -> Fault:
        kind, _, rest = text.strip().partition(":")
        if kind not in KINDS:
            raise ConfigError(f"{ENV}: unknown fault {kind!r}; known: {', '.join(KINDS)}")
        opts: dict[str, int] = {}
        for part in filter(None, rest.split(",")):
            key, _, value = part.partition("=")
            if key not in ("device", "round") or not value.strip().lstrip("-").isdigit():
                raise ConfigError(f"{ENV}: expected '{kind}:device=N,round=R', got {text!r}")
            opts[key] = int(value)
        if set(opts) != {"device", "round"}:
            raise ConfigError(f"{ENV}: expected '{kind}:device=N,round=R', got {text!r}")
        return cls(kind, opts["device"], opts["round"])


def configured() -> list[Fault]:
    """The faults of ``MIST_FED_FAULTS`` (``;``-separated), none when it is unset."""
    raw = os.environ.get(ENV, "")
    return [Fault.parse(t) for t in raw.split(";") if t.strip()]


def maybe_fault(device: int, rnd: int, run_storage: Path | None = None) -> None:
    """Inject the configured fault for ``device`` in round ``rnd``, if any (a hang only once
    in ``run_storage``, when given)."""
    for f in configured():
        if f.device != device or f.round != rnd:
            continue
        mark = None if run_storage is None else run_storage / f".fault-{f.kind}-{device}-{rnd}"
        if f.kind == "hang" and mark is not None:
            if mark.exists():
                continue
            mark.touch()
        if f.kind == "exit":
            log.warning("fault injection: device %d exits its worker in round %d", device, rnd)
            os._exit(17)
        if f.kind == "hang":
            log.warning("fault injection: device %d hangs in round %d", device, rnd)
            time.sleep(HANG_S)
