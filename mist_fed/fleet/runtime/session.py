"""One fleet run from start to results, whichever engine runs its rounds.

:class:`RunSession` is the run's lifecycle, the same under ``mist-fed simulate`` (Flower's
simulation on Ray, :func:`mist_fed.fleet.flower.simulation.simulate`), ``flwr run .`` (the
ServerApp of :mod:`mist_fed.fleet.flower.server_app`, where Flower's runtime owns the process
and Ray), the plain in-process loop (:func:`run_plain`) and ``mist-fed bench sim``: it plans the
devices, makes the run's device storage, finds or starts the cloud, owns the run's one stop
(:class:`~mist_fed.fleet.runtime.stop.RunStop`), runs the rounds over the transport an engine
gives it (:meth:`RunSession.run_rounds`: the synchronous fleets' rounds, then the
asynchronous fleets' server steps on the virtual clock, over the same transport), writes a checkpoint and the results tables after
every round or server step (``checkpoint.pt``, :mod:`mist_fed.fleet.runtime.resume`; ``config.toml`` says
``interrupted`` and ``rounds_completed`` until the run ends) and, at the end, the finished run
with its plots, or what a stopped run completed.

A session opened with ``resume=`` (a :class:`~mist_fed.fleet.runtime.resume.Checkpoint`)
goes on from the checkpoint's round or server step: the engine's state and providers come back from it,
the central reference is not trained again, and the run's device storage is used again where
it is still there. A run that stops, fails or is killed before its end keeps its checkpoint
and its device storage (``--resume RUN_ID`` continues it); a finished one removes both.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from mist_fed.assets.defaults import DEFAULT_HOST
from mist_fed.device.source import FlightSource
from mist_fed.errors import ConfigError, Interrupted, MistError
from mist_fed.fleet.async_rounds import AsyncRounds
from mist_fed.fleet.job import DeviceResult
from mist_fed.fleet.plan import FleetPlan, plan_fleet
from mist_fed.fleet.rounds import RoundState, RunRecords, SyncRounds
from mist_fed.fleet.runtime import resume as ckpt
from mist_fed.fleet.runtime.provision import cloud_service
from mist_fed.fleet.runtime.stop import STOP_FILE, RunStop, stop_on_sigint
from mist_fed.fleet.scoring import Scorer
from mist_fed.fleet.spec import FleetSpec, spec_to_dict
from mist_fed.fleet.state import StateProvider, snapshot
from mist_fed.fleet.storage import RunStorage, device_storage
from mist_fed.fleet.transport import RunStopped, Transport
from mist_fed.fleet.worker import LocalTransport, SourceFactory

log = logging.getLogger(__name__)

CLOUD_FACTS = ("images_embedded", "cache_hits", "cache_misses", "bytes_served", "rows_served")


@dataclass
class RunResult:
    run_dir: Path | None
    wall_s: float
    records: RunRecords
    cloud_stats: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


class Progress:
    """A tqdm bar over device-rounds (off when ``enabled`` is false).

    :meth:`tick` advances it as each reply arrives; calling it with a result (after stragglers
    and dropouts are decided) updates the status counts.
    """

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="dev-round", dynamic_ncols=True, leave=False)
        self.counts: dict[str, int] = {}
        self.ticked = 0
        self.done = 0

    def tick(self) -> None:
        self.ticked += 1
        if self.bar is not None and self.ticked > self.done:
            self.bar.update(1)

    def __call__(self, res: DeviceResult) -> None:
        self.counts[res.status] = self.counts.get(res.status, 0) + 1
        self.done += 1
        if self.bar is not None:
            if self.done > self.ticked:
                self.bar.update(1)
                self.ticked = self.done
            self.bar.set_postfix(self.counts, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_results(
    spec: FleetSpec,
    records: RunRecords,
    results_dir: str | Path | None,
    run_id: str,
    facts: dict[str, Any],
    plots: bool = True,
    plan: FleetPlan | None = None,
) -> Path | None:
    """Write the run's files and (``plots``) its plots, with ``plan``'s per-device label
    distribution and share sizes; ``results_dir=None`` writes nothing."""
    if results_dir is None:
        return None
    from mist_fed.report.plots import plot_run
    from mist_fed.report.results import device_frame, fleet_frame, write_run

    run_dir = Path(results_dir) / run_id
    write_run(run_dir, spec_to_dict(spec), records.devices, records.fleets, facts)
    if plots:
        plot_run(run_dir, device_frame(records.devices), fleet_frame(records.fleets))
        if plan is not None:
            plan.plot_shares(run_dir)
        log.info("results in %s", run_dir)
    return run_dir


class RunSession:
    """One fleet run (see the module docstring); a context manager.

    ``cloud``: a running cloud's address, else one is embedded (listening on ``cloud_bind``,
    dialled at ``cloud_advertise``; see :func:`~mist_fed.fleet.runtime.provision.cloud_service`).
    ``stop``: the run's stop, when a trigger exists before the session (else its own);
    ``sigint``: the first Ctrl-C stops the run; ``cloud_token``: the bearer token the run's
    devices and server send the cloud (an embedded cloud requires it; never written or logged,
    :mod:`~mist_fed.fleet.runtime.secrets`). On leaving, a completed run is written with
    its plots (:attr:`result`); a stopped one keeps its completed rounds and, with
    ``raise_stopped``, raises :class:`~mist_fed.errors.Interrupted` saying where.
    ``resume``: the checkpoint to go on from (its spec must be ``spec``);
    ``checkpoint_hook``: a test's hook into each checkpoint's write
    (:data:`~mist_fed.fleet.runtime.resume.StageHook`).
    """

    def __init__(
        self,
        spec: FleetSpec,
        results_dir: str | Path | None,
        *,
        run_id: str | None = None,
        cloud: str | None = None,
        cloud_bind: str = DEFAULT_HOST,
        cloud_advertise: str | None = None,
        facts: dict[str, Any] | None = None,
        progress: bool = False,
        stop: RunStop | None = None,
        sigint: bool = True,
        raise_stopped: bool = True,
        resume: ckpt.Checkpoint | None = None,
        checkpoint_hook: ckpt.StageHook | None = None,
        cloud_token: str | None = None,
    ) -> None:
        from mist_fed.report.results import new_run_id

        self.spec = spec
        self.results_dir = results_dir
        self.run_id = run_id or new_run_id()
        self.cloud_args = (cloud, cloud_bind, cloud_advertise)
        self.cloud_token = cloud_token  # in memory only: no fact, file or log line holds it
        self.facts = {"cloud": cloud or "embedded", **(facts or {})}
        self.resume = resume
        self.checkpoint_hook = checkpoint_hook
        self._saved = False  # a checkpoint of this run is on disk: its storage is kept
        self._wall_before = 0.0  # the run's wall time in the sessions before this one
        done = 0
        if resume is not None:
            resume.check_spec(spec)
            if run_id is not None and run_id != resume.run_id:
                raise ConfigError(f"--run-id {run_id} cannot resume run {resume.run_id}")
            self.run_id, done, self._saved = resume.run_id, resume.round, True
            self._wall_before = float(resume.facts.get("wall_s", 0.0))
            resumes = int(resume.facts.get("resumes", 0)) + 1
            self.facts.update(resumes=resumes, resumed_from_round=done)
        total = sum(
            max(spec.rounds_of(f.name) - done, 0) * spec.per_round_of(f) for f in spec.fleets
        )
        self.progress = Progress(total, progress)
        self.stop = stop or RunStop()
        self.sigint = sigint
        self.raise_stopped = raise_stopped
        self.records = RunRecords()
        self.plan: FleetPlan = plan_fleet(spec)
        self.completed = False
        self.result: RunResult | None = None
        self._stack = contextlib.ExitStack()
        self._t0 = 0.0
        self.location = ""
        self.storage: RunStorage
        self._providers: dict[str, StateProvider] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> RunSession:
        self._t0 = time.perf_counter()
        stack = self._stack.__enter__()
        try:
            name = self.resume.storage if self.resume is not None else None
            keep = lambda: self._saved and not self.completed  # noqa: E731
            self.storage = stack.enter_context(device_storage(name, keep))
            (self.storage.path / STOP_FILE).unlink(missing_ok=True)  # a stopped run's
            self.stop.attach(self.storage.path)
            self.location, self._stats = stack.enter_context(
                cloud_service(self.spec, *self.cloud_args, token=self.cloud_token)
            )
            if self.sigint:
                stack.enter_context(stop_on_sigint(self.stop))
        except BaseException:
            self._stack.__exit__(None, None, None)
            self.progress.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt | RunStopped)
        stopped = not self.completed and (interrupted or self.stop.is_set())
        self.stop.end_jobs()  # nothing of this run goes on waiting on a busy job
        try:
            cloud_stats = self._stats() if (self.completed or stopped) else {}
        finally:
            self._stack.__exit__(None, None, None)  # the cloud stops, the storage goes
            self.progress.close()
        if exc_type is not None and not interrupted:
            return  # an error: the rounds checkpointed so far stay as they are
        wall = time.perf_counter() - self._t0
        facts = self._facts(**{f"cloud_{k}": v for k, v in cloud_stats.items() if k in CLOUD_FACTS})
        if self.completed:
            run_dir = write_results(
                self.spec, self.records, self.results_dir, self.run_id, facts, plan=self.plan
            )
            if run_dir is not None:
                ckpt.remove(run_dir)  # nothing is left to resume
            self.result = RunResult(run_dir, wall, self.records, cloud_stats, facts)
            return
        if not stopped:
            raise MistError("the fleet run ended without results; rerun with -v to see its log")
        done = self.records.rounds_completed
        if done == 0 and self.resume is None:
            message = f"stopped before any of {self.spec.rounds} rounds completed; nothing written"
            run_dir = None
        else:
            done = max(done, self.resume.round if self.resume is not None else 0)
            facts = {**facts, "interrupted": True, "rounds_completed": done}
            run_dir = None
            if self.records.fleets:  # else the files on disk already say it
                run_dir = write_results(
                    self.spec, self.records, self.results_dir, self.run_id, facts
                )
            elif self.results_dir is not None:
                run_dir = Path(self.results_dir) / self.run_id
            where = f"; partial results in {run_dir}" if run_dir is not None else ""
            message = f"stopped after {done} of {self.spec.rounds} rounds{where}{self._how()}"
        self.result = RunResult(run_dir, wall, self.records, cloud_stats, facts)
        if self.raise_stopped:
            raise Interrupted(message, run_dir) from None
        log.warning("run %s", message)

    def _how(self) -> str:
        """How to go on with this stopped run, when it can be."""
        if not self._saved or self.results_dir is None:
            return ""
        where = "" if str(self.results_dir) == "results" else f" --results {self.results_dir}"
        return f"; continue it with: mist-fed simulate --resume {self.run_id}{where}"

    def _facts(self, **more: Any) -> dict[str, Any]:
        """``config.toml``'s ``[run]``: how the run was made, its wall time so far (over
        every session of a resumed run), ``more``."""
        wall = round(self._wall_before + time.perf_counter() - self._t0, 2)
        counts = {"devices": self.spec.num_devices, "rounds": self.spec.rounds}
        return {**self.facts, "wall_s": wall, **counts, **more}

    # -- the rounds --------------------------------------------------------------------------
    def source(self) -> SourceFactory:
        """How this process's devices (the server's, in-process ones) reach the cloud."""
        return partial(FlightSource, token=self.cloud_token)

    def checkpoint(self, state: RoundState) -> None:
        """After each round or asynchronous server step: the checkpoint (written atomically),
        then its tables, marked as a run still going (``rounds_completed``: of the fleet
        furthest on). No results directory: neither."""
        facts = self._facts(interrupted=True, rounds_completed=state.records.rounds_completed)
        if self.results_dir is None:
            return
        saved = ckpt.Checkpoint(
            run_id=self.run_id,
            round=state.round,
            spec_digest=ckpt.spec_digest(self.spec),
            storage=self.storage.name,
            state=snapshot(state, self._providers),
            facts=facts,
            spec=spec_to_dict(self.spec),
        )
        ckpt.save(Path(self.results_dir) / self.run_id, saved, self.checkpoint_hook)
        self._saved = True
        write_results(self.spec, state.records, self.results_dir, self.run_id, facts, plots=False)

    def run_rounds(self, transport: Transport, progress_bars: bool = False) -> None:
        """Every round over ``transport``; rows land in :attr:`records` as rounds complete.
        A stop ends it quietly (the session's exit reports it); busy jobs are told to end
        however it ends. ``progress_bars``: the server's own bars (downloads, central)."""
        start = time.perf_counter()
        scorer = Scorer(self.plan, self.location, self.storage.path / "_server",
                        source=self.source(), progress=progress_bars)  # fmt: skip
        rounds = SyncRounds(
            self.plan, transport, scorer, self.location, self.storage, stop=self.stop.event,
            on_result=self.progress, on_round=self.checkpoint,
        )  # fmt: skip
        self._providers = rounds.providers
        try:
            if self.resume is None:
                self.records.timing["start"] = start
                state = rounds.start(self.records)
            else:
                state = rounds.resume(self.resume.state)
                self.records = state.records
                self.records.timing["start"] = start
                log.info("run %s resumes after round %d", self.run_id, state.round)
            rounds.run(state)
            AsyncRounds(rounds, on_step=self.checkpoint).run(state)
            self.completed = True
            self.records.timing["end"] = time.perf_counter()
        except RunStopped:
            log.info("the fleet run stopped after %d rounds", self.records.rounds_completed)
        finally:
            self.stop.end_jobs()


def run_plain(
    spec: FleetSpec,
    results_dir: str | Path | None = None,
    *,
    cloud: str | None = None,
    run_id: str | None = None,
    progress: bool = False,
    resume: ckpt.Checkpoint | None = None,
    cloud_token: str | None = None,
) -> RunResult:
    """The same rounds with no Flower and no Ray: every device in this process, in turn
    (``resume``: the checkpoint a stopped run goes on from)."""
    facts = {"engine": "plain"}
    with RunSession(
        spec, results_dir, run_id=run_id, cloud=cloud, progress=progress, facts=facts,
        resume=resume,
        cloud_token=cloud_token,
    ) as session:  # fmt: skip
        session.run_rounds(LocalTransport(session.source(), stop=session.stop.event))
    assert session.result is not None
    return session.result
