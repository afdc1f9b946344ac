"""What the fleet needs from Flower beyond its public API, kept in one place.

* :func:`local_identity`: Flower 1.42 builds every instruction ``Message`` (including those a
  strategy's ``configure_train`` returns) from the identity of the run the process belongs
  to, which only Flower's runtimes set. :class:`~mist_fed.fleet.flower.strategies.FlowerAggregator`
  drives Flower's strategies in the round loop, inside a runtime or not (the plain loop, the
  overhead benchmark's baseline, tests without Ray), so for each call it gives the process a
  run identity where none is set, as a runtime would, and restores it after.
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
* Flower 1.42's runtime, once its ServerApp has ended, waits for every busy ClientApp job
  before it shuts Ray down, and an interrupt that cuts that wait short shuts Ray down under
  jobs still running (with restartable actors a thread in ``ray.get`` on one then never
  returns). The run's one stop path ends busy jobs itself: see
  :mod:`mist_fed.fleet.runtime.stop` (the ClientApp runs each job inside its ``end_on_stop``).
  ``tests/test_flower_workarounds.py`` fails the day Flower's runtime stops waiting for busy
  jobs itself.
* :func:`check_app_environment`: with Flower 1.42's runtime dependency installation on (its
  default: no ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` where the SuperLink started),
  ``flwr run .`` has ``uv sync`` install the app's dependencies into a new environment and puts
  it ahead of the interpreter's own packages in the simulation process only (``sys.path``,
  ``VIRTUAL_ENV``). The ServerApp then runs on that second copy of torch, Ray and the rest,
  while Ray's worker processes, started from the interpreter, do not have it on their path.
  Issue #23 reports such a run: it logged round 1, sat 13 minutes with no Ray process and
  ended without results (the two copies are the likely cause; not reproduced here, where a
  real install downloads several GB). The ServerApp refuses such an environment at once, in
  one line naming the fix. ``tests/test_flwr_run.py`` runs
  ``flwr run .`` with the installation on (a stand-in ``uv`` installs one package) and finds
  the refusal within seconds.
* :func:`on_runtime_exit`: under ``flwr run .``, ``flwr stop`` makes Flower 1.42's runtime
  force its process out without shutting Ray down (Ray's agents outlive the run); the
  ServerApp's exit hook stops the fleet and Ray first. ``tests/test_flwr_run.py`` stops a run
  with and without it, and fails the day the runtime leaves nothing behind by itself.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from flwr.supercore.task_identity import TaskIdentity

from mist_fed.errors import ConfigError

LOCAL_RUN_ID = 0
LOCAL_NODE_ID = 0  # the "SuperLink" of strategies driven outside Flower's runtimes


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
    :func:`mist_fed.fleet.runtime.stop.end_on_stop`, which ends such jobs first. Call :func:`quiet_actor_retries` before
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


def separate_environment() -> tuple[Path, list[str]] | None:
    """The environment put ahead of this interpreter's own packages, and what it holds, when
    one is (Flower's runtime dependency installation does so); ``None`` otherwise.

    An activated virtual environment is the interpreter's own (``sys.prefix``): not one."""
    venv = os.environ.get("VIRTUAL_ENV")
    if not venv or Path(venv).resolve() == Path(sys.prefix).resolve():
        return None
    env = Path(venv).resolve()
    held: set[str] = set()
    for entry in sys.path:
        path = Path(entry or ".").resolve()
        if path.is_relative_to(env) and path.is_dir():
            held |= {
                p.name.split(".")[0]
                for p in path.iterdir()
                if not p.name.startswith(("_", ".")) and not p.name.endswith((".dist-info", ".pth"))
            }
    return (env, sorted(held)) if held else None


def check_app_environment() -> None:
    """Refuse, in one line naming the fix, to run where Flower installed the app's dependencies
    into an environment of their own (see the module docstring)."""
    found = separate_environment()
    if found is None:
        return
    env, held = found
    shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
    raise ConfigError(
        f"Flower's runtime dependency installation put a second copy of this app's "
        f"dependencies ({shown}) in {env}, which the devices' Ray workers do not use, so they "
        "would never answer: stop the local SuperLink (pkill -f flower-superlink) and run "
        "again with FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 in the environment "
        "(the app's dependencies are already installed), or run `mist-fed simulate`"
    )


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
