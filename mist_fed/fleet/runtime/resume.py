"""A fleet run's checkpoint: what ``--resume RUN_ID`` continues from.

After each completed round the run session (:mod:`mist_fed.fleet.runtime.session`) writes
``results/<run>/checkpoint.pt`` with :func:`save`: the round engine's state and providers as
plain data (:func:`mist_fed.fleet.state.snapshot`: global and device models, strategy momentum
and moments, clocks, the central reference, every results row so far, the driver's random
generators), the run's spec and the name of its device storage. It is written atomically:
into a temporary file in the same folder, flushed and ``fsync``-ed, then ``os.replace``-d over
the last one (and the folder synced), so a run killed at any instant leaves either the last
round's checkpoint or the one before, never a torn one. A finished run removes it.

The file is one header line (``mist-fed checkpoint <format> sha256=<digest> bytes=<n>``) and a
``torch.save`` payload of plain data, read back with ``weights_only=True`` (no code in the file
runs). :func:`load` refuses, in one line (:class:`~mist_fed.errors.ConfigError`), a file whose
digest or length does not match (damaged), another checkpoint format, or one written under
another layout of the results tables (:func:`mist_fed.report.results.schema_id`);
:meth:`Checkpoint.check_spec` refuses a checkpoint of another spec.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mist_fed.errors import ConfigError
from mist_fed.files import atomic_path
from mist_fed.fleet.spec import FleetSpec, load_fleet, spec_from_dict, spec_to_dict
from mist_fed.report.results import schema_id

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
_MAGIC = b"mist-fed checkpoint"

# A test's hook into :func:`save`: called with "before" (nothing written yet), "during" (part
# of the temporary file written) and "after" (the new checkpoint in place).
StageHook = Callable[[str], None]


def spec_digest(spec: FleetSpec) -> str:
    """A digest of the resolved spec: equal specs, equal digests."""
    text = json.dumps(spec_to_dict(spec), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    """A run after round :attr:`round`: its state (plain data) and what it belongs to."""

    run_id: str
    round: int
    spec_digest: str
    storage: str  # the run's device storage (run-XXXX), reused when it is still there
    state: dict[str, Any]  # mist_fed.fleet.state.snapshot(...)
    facts: dict[str, Any] = field(default_factory=dict)  # config.toml's [run] so far
    spec: dict[str, Any] = field(default_factory=dict)  # spec_to_dict of the run's spec

    def check_spec(self, spec: FleetSpec) -> None:
        """Refuse to continue this checkpoint under another spec than its run's."""
        if spec_digest(spec) != self.spec_digest:
            raise ConfigError(
                f"the checkpoint of run {self.run_id} was written for another fleet spec than "
                f"this one; resume it with its own (results/{self.run_id}/config.toml, "
                "unchanged) and no fleet flags"
            )


def path_of(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system syncs a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save(run_dir: str | Path, ckpt: Checkpoint, hook: StageHook | None = None) -> Path:
    """Write ``ckpt`` atomically as ``run_dir/checkpoint.pt`` (see the module docstring)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "schema": schema_id(),
        "run_id": ckpt.run_id,
        "round": ckpt.round,
        "spec_digest": ckpt.spec_digest,
        "storage": ckpt.storage,
        "facts": json.loads(json.dumps(ckpt.facts, default=str)),
        "spec": json.loads(json.dumps(ckpt.spec, default=str)),
        "state": ckpt.state,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    header = _MAGIC + f" {FORMAT} sha256={digest} bytes={len(data)}\n".encode()
    final = path_of(run_dir)
    if hook:
        hook("before")
    tmp = run_dir / f".{CHECKPOINT}.{os.getpid()}.tmp"  # a torn one is found by this name
    with atomic_path(final, tmp), open(tmp, "wb") as f:  # the file closes before the rename
        f.write(header)
        f.write(data[: len(data) // 2])
        if hook:
            f.flush()
            hook("during")
        f.write(data[len(data) // 2 :])
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(run_dir)
    if hook:
        hook("after")
    return final


def _damaged(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"checkpoint {path} is damaged ({why}); it cannot be resumed: rerun the fleet "
        "from the start"
    )


def load(run_dir: str | Path) -> Checkpoint:
    """The checkpoint in ``run_dir``; one line (ConfigError) if missing, damaged or of
    another format or results layout."""
    path = path_of(run_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} has no checkpoint ({CHECKPOINT})") from None
    head, _, data = raw.partition(b"\n")
    parts = head.split()
    if not head.startswith(_MAGIC) or len(parts) != 5:
        raise _damaged(path, "no checkpoint header")
    try:
        fmt = int(parts[2])
        digest = parts[3].removeprefix(b"sha256=").decode()
        size = int(parts[4].removeprefix(b"bytes="))
    except ValueError:
        raise _damaged(path, "unreadable header") from None
    if fmt != FORMAT:
        raise ConfigError(
            f"checkpoint {path} has format {fmt}, this version of mist-fed reads {FORMAT}; "
            "resume it with the version that wrote it, or rerun the fleet"
        )
    if len(data) != size:
        raise _damaged(path, f"{len(data)} of {size} bytes")
    if hashlib.sha256(data).hexdigest() != digest:
        raise _damaged(path, "its sha256 does not match")
    try:
        payload = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # a file of the right digest that torch cannot read
        raise _damaged(path, f"{type(e).__name__}: {e}".splitlines()[0][:200]) from None
    if payload.get("schema") != schema_id():
        raise ConfigError(
            f"checkpoint {path} was written under results layout {payload.get('schema')}, "
            f"this version writes {schema_id()}; resume it with the version that wrote it, "
            "or rerun the fleet"
        )
    return Checkpoint(
        run_id=str(payload["run_id"]),
        round=int(payload["round"]),
        spec_digest=str(payload["spec_digest"]),
        storage=str(payload["storage"]),
        state=payload["state"],
        facts=dict(payload.get("facts") or {}),
        spec=dict(payload.get("spec") or {}),
    )


def clear_torn(run_dir: str | Path) -> None:
    """Remove the temporary files a write that was killed left (only when the run is not
    running: a resume)."""
    for torn in Path(run_dir).glob(f".{CHECKPOINT}.*.tmp"):
        torn.unlink(missing_ok=True)


def remove(run_dir: str | Path) -> None:
    """A finished run's checkpoint goes (nothing is left to resume)."""
    path_of(run_dir).unlink(missing_ok=True)


def open_run(results_dir: str | Path, run_id: str) -> tuple[FleetSpec, Checkpoint]:
    """What ``--resume RUN_ID`` continues: the run's spec, from its own ``config.toml`` (from
    the checkpoint when a kill came between the two files of its first round), and its
    checkpoint (its spec is checked against the checkpoint's when the run session opens)."""
    run_dir = Path(results_dir) / run_id
    config = run_dir / "config.toml"
    if not run_dir.is_dir():
        raise ConfigError(
            f"no run {run_id!r} under {results_dir}; name a folder of {results_dir}, or give "
            "--results where the run wrote its results"
        )
    if not path_of(run_dir).exists():
        if config.is_file() and "rounds_completed" not in config.read_text():
            raise ConfigError(f"run {run_id} completed all its rounds: nothing to resume")
        raise ConfigError(
            f"run {run_id} left no checkpoint ({CHECKPOINT}: it stopped before its first round "
            "ended, or ran a version without resume); rerun it from the start"
        )
    clear_torn(run_dir)
    ckpt = load(run_dir)
    if ckpt.run_id != run_id:
        raise ConfigError(
            f"{path_of(run_dir)} belongs to run {ckpt.run_id}, not {run_id}; "
            "resume it under its own name"
        )
    return (load_fleet(config) if config.is_file() else spec_from_dict(ckpt.spec)), ckpt
