"""What the fleet needs from Flower beyond its public API, kept in one place.

* :func:`local_identity`: Flower 1.42 builds every instruction ``Message`` (including those a
  strategy's ``configure_train`` returns) from the identity of the run the process belongs
  to, which only Flower's runtimes set. The in-process plain loop (the overhead benchmark's
  baseline, and tests without Ray) runs Flower's strategies outside any runtime, so for its
  duration it gives the process a run identity, as a runtime would, and restores it after.
  ``tests/test_strategies.py`` fails the day a Message can be built without it.
* :func:`actor_options`: Flower 1.42's Ray backend puts the actor of a failed job back into
  its pool even when the actor's worker process is gone (a segfault, the OOM killer,
  ``os._exit``), so every later job sent to it fails with ``ActorDiedError``. Flower passes
  the backend config's ``client_resources`` straight into ``ClientAppActor.options(...)``;
  with these Ray actor options in it, Ray restarts a dead actor itself; the job that was
  running is tried once more, then only that device's reply is an error.
  ``tests/test_flower_workarounds.py`` fails the day Flower stops passing them through (then
  this no longer helps) or replaces dead actors itself (then it can go). Under ``flwr run .``
  the federation config carries only ``num-cpus`` / ``num-gpus``, so there it cannot apply.
* :func:`request_stop` / :func:`end_on_stop`: Flower 1.42's runtime, once its ServerApp has
  ended, waits for every busy ClientApp job before it shuts Ray down, and an interrupt that
  cuts that wait short shuts Ray down under jobs still running (with restartable actors a
  thread in ``ray.get`` on one then never returns, and the interpreter cannot exit). So a
  stopping run asks its busy jobs to end: :func:`request_stop` leaves a file in the run's
  device storage, and every job, through :func:`end_on_stop`, ends its own actor (public
  ``ray.kill``) when that file appears. Each node has its own device storage
  (``fleet/storage.py``), so the file reaches only the jobs on the driver's machine; on a
  cluster, jobs elsewhere run to their end. ``tests/test_flower_workarounds.py`` fails the day
  Flower's runtime stops waiting for busy jobs itself.
* :func:`on_runtime_exit`: under ``flwr run .``, ``flwr stop`` makes Flower 1.42's runtime
  force its process out without shutting Ray down (Ray's agents outlive the run); the
  ServerApp's exit hook stops the fleet and Ray first. ``tests/test_flwr_run.py`` stops a run
  with and without it, and fails the day the runtime leaves nothing behind by itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flwr.supercore.task_identity import TaskIdentity

from mist_fed.errors import MistError
from mist_fed.fleet.ray_env import running_ray

log = logging.getLogger(__name__)

LOCAL_RUN_ID = 0
LOCAL_NODE_ID = 0  # the plain loop's "SuperLink"
STOP_FILE = ".stop"  # in the root of a run's device storage: the run is stopping
STOP_POLL_S = 0.25  # how often a busy job looks for it


def actor_options() -> dict[str, int]:
    """Ray actor options to merge into ``backend_config["client_resources"]``.

    ``max_restarts=-1``: Ray restarts a ClientApp actor whose worker died, so the handle that
    Flower's pool keeps stays usable. ``max_task_retries=1``: the job that was running when
    the worker died is tried once more on the restarted actor (a device that kills its worker
    every time fails after that, with a ``RayActorError`` that Flower replies to that one
    device as an error Message), and a job Flower sends while Ray restarts the actor waits
    for it (with 0, Ray fails such a job at once: "The actor is restarting"). Flower's pool
    sizing reads only ``num_cpus`` / ``num_gpus``; its validation takes any int or float.
    A restartable actor's busy job never resolves once Ray is shut down: see
    :func:`end_on_stop`, which ends such jobs first. Call :func:`quiet_actor_retries` before
    Ray starts.
    """
    return {"max_restarts": -1, "max_task_retries": 1}


def quiet_actor_retries() -> None:
    """Before ``ray.init``: no "Task ... failed. There are 1 retries remaining" per actor.

    Flower ends each idle actor with a task that calls ``exit_actor()``; with the retry of
    :func:`actor_options`, Ray reports that intentional exit as a failed task it will retry,
    once per actor at the end of every run. Ray's own switch (an environment variable, read
    when the driver connects) turns off only those reports of retries still to come; a job
    that fails for good still reaches its device as an error.
    """
    os.environ.setdefault("RAY_enable_output_error_log_if_still_retry", "0")


class JobStopped(MistError):
    """A device job reached a run that is stopping: it does not start."""


def request_stop(storage: str | Path) -> None:
    """Ask the busy device jobs of the run whose device storage is ``storage`` to end."""
    with contextlib.suppress(OSError):  # the run's storage is already gone: nothing runs
        (Path(storage) / STOP_FILE).touch()


@contextlib.contextmanager
def end_on_stop(storage: str | Path) -> Iterator[None]:
    """Around one device job: end it when its run asks to stop (:func:`request_stop`).

    ``storage``: the run's device storage on this machine. A job that starts in a stopping run
    raises :class:`JobStopped`. Inside a Ray actor, a watcher thread ends the
    actor (``ray.kill``, no restart) once the stop file appears, so the job's ``ray.get`` in
    Flower's runtime fails at once instead of waiting for the job; elsewhere (in-process
    runs) it only checks at the start.
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
        while not finished.wait(STOP_POLL_S):
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


def in_runtime() -> bool:
    """Whether this process has a Flower run identity (a runtime set it, or we did)."""
    try:
        TaskIdentity.run_id  # noqa: B018  (reading raises when unset)
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def local_identity() -> Iterator[None]:
    """A run identity for strategies driven outside Flower's runtimes (none if one is set)."""
    if in_runtime():
        yield
        return
    TaskIdentity.run_id = LOCAL_RUN_ID
    TaskIdentity.node_id = LOCAL_NODE_ID
    TaskIdentity.task_id = LOCAL_RUN_ID
    try:
        yield
    finally:
        # Back to "unset" through the same public setters (they take any value).
        TaskIdentity.run_id = None  # type: ignore[assignment]
        TaskIdentity.node_id = None  # type: ignore[assignment]
        TaskIdentity.task_id = None  # type: ignore[assignment]


def on_runtime_exit(callback: Callable[[], None]) -> None:
    """Run ``callback`` when Flower's runtime exits this process on a signal, first.

    ``flwr stop`` (and SIGINT/SIGTERM) end a Flower 1.42 simulation by raising ``SystemExit``
    in the runtime's main thread, which then waits for its worker threads, still in
    ``ray.get`` on busy devices, until a forced ``os._exit`` a few seconds later: Ray is never
    shut down and its agent processes can outlive the run (measured without this hook:
    ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` still up 45 s after ``flwr stop`` on
    this host, though not on every CI run, so no test pins it). Flower runs the handlers
    registered with ``add_exit_handler(..., run_before_force_exit=True)`` before that timer
    starts; the ServerApp's callback ends the fleet and shuts Ray down there.
    ``tests/test_flwr_run.py`` runs ``flwr stop`` on a busy run and finds no process left.
    """
    from flwr.supercore.exit import add_exit_handler

    add_exit_handler(callback, run_before_force_exit=True)
