"""The one way a fleet run stops, whatever asks: Ctrl-C, ``flwr stop``, or a runtime that ended.

:meth:`RunStop.stop` is the path. It sets one event, which the round loop and every transport
check between waits (they end with :class:`~mist_fed.fleet.transport.RunStopped`), and leaves a
stop file in the run's device storage, which every busy device job on this machine watches
(:func:`end_on_stop`): inside a Ray actor the job ends its own actor (public ``ray.kill``), so
nothing waits on a device still training or hanging. Flower 1.42's runtime waits for every
busy job before it shuts Ray down, and an interrupt that cut that wait short would shut Ray
down under jobs still running (see :mod:`mist_fed.fleet.flower.workarounds`); ending the jobs
first lets it end as after a completed run. Each node has its own device storage
(:mod:`mist_fed.fleet.storage`), so the file reaches only the jobs on the driver's machine; on
a cluster, jobs elsewhere run to their end.

What triggers it: :func:`stop_on_sigint` (the first Ctrl-C of ``mist-fed simulate``), the
ServerApp's exit hook under ``flwr run .`` (``flwr stop``), and the run session itself when its
rounds end, however they end (then only busy jobs are told: the run's outcome is already
decided).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mist_fed.errors import MistError
from mist_fed.fleet.runtime.cluster import running_ray

log = logging.getLogger(__name__)

STOP_FILE = ".stop"  # in the root of a run's device storage: the run is stopping
POLL_S = 0.05  # how often anything that waits looks at the stop (transports, node waits, jobs)


class JobStopped(MistError):
    """A device job reached a run that is stopping: it does not start."""


class RunStop:
    """One run's stop: an event for the driver's loops, a file for its devices' jobs."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""
        self.storage: Path | None = None

    def attach(self, storage: Path) -> None:
        """The run's device storage on this machine, once it exists (a stop that came first
        reaches the jobs at once)."""
        self.storage = storage
        if self.event.is_set():
            self.end_jobs()

    def is_set(self) -> bool:
        return self.event.is_set()

    def stop(self, reason: str) -> None:
        """Stop the run: its loops end at their next check, its busy jobs here end now."""
        if not self.event.is_set():
            self.reason = reason
            log.warning("%s: stopping the fleet", reason)
            # Flower logs each ended job as an error with its traceback: noise here, since
            # what ended the run is reported. -vv shows everything.
            flwr_log = logging.getLogger("flwr")
            if flwr_log.level != logging.DEBUG:
                flwr_log.setLevel(logging.CRITICAL)
            self.event.set()
        self.end_jobs()

    def end_jobs(self) -> None:
        """Tell this machine's busy device jobs to end (the stop file)."""
        if self.storage is not None:
            with contextlib.suppress(OSError):  # the run's storage is gone: nothing runs
                (self.storage / STOP_FILE).touch()


@contextlib.contextmanager
def stop_on_sigint(stop: RunStop) -> Iterator[None]:
    """The first Ctrl-C stops the run (:meth:`RunStop.stop`); a second one interrupts
    (``KeyboardInterrupt``), the way out of a run that does not stop. Outside the main thread
    it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if not stop.is_set():
            stop.stop("interrupted (Ctrl-C again: now)")
            return
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def end_on_stop(storage: str | Path) -> Iterator[None]:
    """Around one device job: end it when its run stops (:meth:`RunStop.stop`).

    ``storage``: the run's device storage on this machine. A job that starts in a stopping run
    raises :class:`JobStopped`. Inside a Ray actor, a watcher thread ends the actor
    (``ray.kill``, no restart) once the stop file appears, so the job's ``ray.get`` in Flower's
    runtime fails at once instead of waiting for the job; elsewhere (in-process runs) it only
    checks at the start.
    """
    stop_file = Path(storage) / STOP_FILE
    if stop_file.exists():
        raise JobStopped("the fleet run is stopping")
    actor = _current_actor()
    if actor is None:
        yield
        return
    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(POLL_S):
            if stop_file.exists():
                import ray

                log.info("the fleet run is stopping: ending this device's job")
                ray.kill(actor, no_restart=True)
                return

    watcher = threading.Thread(target=watch, name="mist-fed-stop-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        finished.set()
        watcher.join()


def _current_actor() -> Any:
    """This process's Ray actor handle, when it runs one (as Flower's ClientApp actors do)."""
    ray = running_ray()
    if ray is None:
        return None
    context = ray.get_runtime_context()
    return context.current_actor if context.get_actor_id() is not None else None
