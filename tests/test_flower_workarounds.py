"""The Ray workarounds kept in ``mist_fed/fleet/flower/workarounds.py`` and the device side of
the run's one stop (``fleet/runtime/stop.py``), and the Flower behaviour behind them.

The ``upstream`` tests run Flower's own simulation (public ``run_simulation``, a ServerApp and a
ClientApp of a few lines, one Ray actor) and fail the day Flower changes what a workaround
works around: then the workaround, its test and its lines in ``fleet/flower/`` go or change.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from mist_fed.errors import ConfigError
from mist_fed.fleet.flower.workarounds import (
    actor_options,
    check_app_environment,
    quiet_actor_retries,
)
from mist_fed.fleet.runtime.stop import STOP_FILE, JobStopped, RunStop, end_on_stop
from mist_fed.fleet.storage import RunStorage, resolve, run_name

BUSY_S = 4.0  # a job the ServerApp leaves running when it ends
RUN_LIMIT_S = 240  # one small simulation, Ray start included, on a loaded host


# -- in-process parts -----------------------------------------------------------------------------


def _stop(storage: str | Path) -> None:
    """The run's one stop, as its session would call it, on ``storage``."""
    stop = RunStop()
    stop.attach(Path(storage))
    stop.stop("test")


def test_a_job_does_not_start_in_a_stopping_run(tmp_path) -> None:
    # Prepare: the ClientApp finds the run's storage on its node from a device's location
    run = RunStorage(tmp_path, "run-1")
    run.path.mkdir()
    watched = resolve(run_name(run.location("fleet one", 3)), tmp_path)
    assert watched == run.path
    # Execute / Assert
    with end_on_stop(watched):
        pass  # no stop yet: the job runs (no Ray here, so nothing watches it)
    _stop(run.path)
    assert (run.path / STOP_FILE).is_file()
    with pytest.raises(JobStopped), end_on_stop(watched):
        pytest.fail("a job started in a stopping run")
    _stop(tmp_path / "gone")  # a run whose storage is gone: nothing to do, no error


@pytest.mark.parametrize("when", ["after", "before", "never"])
def test_the_run_stop_reaches_this_machines_jobs_whenever_it_comes(tmp_path, when) -> None:
    # Prepare
    stop = RunStop()
    # Execute: a stop before the run's storage exists reaches the jobs once it does
    if when == "before":
        stop.stop("test")
    stop.attach(tmp_path)
    if when == "after":
        stop.stop("test")
    # Assert
    assert (tmp_path / STOP_FILE).exists() == (when != "never") == stop.is_set()


@pytest.mark.parametrize("holds", ["a dependency", "nothing", "own venv"])
def test_an_environment_ahead_of_the_interpreters_own_packages_is_refused_in_one_line(
    tmp_path, monkeypatch, holds
) -> None:
    # Prepare: what Flower's runtime dependency installation does to its process
    env = tmp_path / "runtime-envs" / "42"
    site = env / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    if holds == "a dependency":
        (site / "torch").mkdir()
        (site / "torch-2.14.1.dist-info").mkdir()
    monkeypatch.setenv("VIRTUAL_ENV", str(env))
    monkeypatch.syspath_prepend(str(site))
    if holds == "own venv":  # an activated venv is the interpreter's own
        monkeypatch.setattr(sys, "prefix", str(env))
        (site / "torch").mkdir()
    # Execute / Assert
    if holds != "a dependency":
        check_app_environment()
        return
    with pytest.raises(ConfigError) as e:
        check_app_environment()
    msg = str(e.value)
    assert "\n" not in msg and "(torch)" in msg and str(env) in msg
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in msg and "mist-fed simulate" in msg


# -- Flower's behaviour behind the workarounds (one small simulation each) ------------------------


def _client_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        step = msg.content.config_records["step"]
        if step["act"] == "die":
            os._exit(17)  # the worker process dies, as on a segfault or the OOM killer
        if step["act"] == "busy":
            Path(str(step["dir"]), "started").touch()
            watch = end_on_stop(str(step["dir"])) if step["watch"] else contextlib.nullcontext()
            with watch:
                time.sleep(float(step["s"]))
            Path(str(step["dir"]), "ended").touch()
        return Message(RecordDict(), reply_to=msg)

    return app


def _server_app(steps: list[dict], replies: list[str]) -> ServerApp:
    """Sends ``steps`` in turn to the one node; the last one it leaves running and ends."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        end = time.monotonic() + 60
        while not grid.get_node_ids() and time.monotonic() < end:
            time.sleep(0.1)
        [node] = grid.get_node_ids()
        for step in steps:
            content = RecordDict({"step": ConfigRecord(step)})
            msg = Message(content, dst_node_id=node, message_type="train")
            if step["act"] == "busy":
                grid.push_messages([msg])
                started = Path(str(step["dir"]), "started")
                while not started.exists() and time.monotonic() < end:
                    time.sleep(0.05)
                if step["watch"]:
                    _stop(str(step["dir"]))
                return  # the ServerApp ends with the job still running
            [reply] = grid.send_and_receive([msg], timeout=90)
            replies.append(reply.error.reason if reply.has_error() else "ok")

    return app


def _simulate(steps: list[dict], client_resources: dict) -> tuple[list[str], float]:
    """Flower's in-process simulation on a one-CPU Ray of its own: replies, seconds taken."""
    from flwr.simulation import run_simulation

    replies: list[str] = []
    out: dict = {}
    backend_config = {
        "client_resources": client_resources,
        "init_args": {"num_cpus": 1, "include_dashboard": False, "log_to_driver": False},
    }

    def run() -> None:
        try:
            run_simulation(
                server_app=_server_app(steps, replies),
                client_app=_client_app(),
                num_supernodes=1,
                backend_config=backend_config,  # type: ignore[arg-type]
            )
        except BaseException as e:  # surfaced below
            out["error"] = e

    t0 = time.monotonic()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(RUN_LIMIT_S)
    assert not t.is_alive(), f"the simulation did not end in {RUN_LIMIT_S} s"
    assert "error" not in out, out.get("error")
    return replies, time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.ray
def test_upstream_still_sends_jobs_to_a_dead_actor() -> None:
    """Fails the day Flower replaces a dead actor itself: then drop actor_options."""
    # Execute: the first job kills its worker; Flower's pool keeps the dead actor
    replies, _ = _simulate([{"act": "die"}, {"act": "ok"}], {"num_cpus": 1})
    # Assert: the next job, another device's, fails too
    assert len(replies) == 2 and "ActorDied" in replies[0], replies
    assert "ActorDied" in replies[1], replies


@pytest.mark.slow
@pytest.mark.ray
def test_upstream_takes_actor_options_and_waits_for_busy_jobs(tmp_path, monkeypatch) -> None:
    """Fails the day Flower stops passing client_resources into the actor's options (the dead
    worker's next job fails), or stops waiting for a job still running when the ServerApp ends
    (then RunStop's stop file and end_on_stop may go)."""
    # Prepare
    monkeypatch.delenv("RAY_enable_output_error_log_if_still_retry", raising=False)
    quiet_actor_retries()
    busy = {"act": "busy", "dir": str(tmp_path), "s": BUSY_S, "watch": False}
    # Execute
    replies, _ = _simulate(
        [{"act": "die"}, {"act": "ok"}, busy], {"num_cpus": 1, **actor_options()}
    )
    # Assert: Ray restarted the actor (only the dying job failed) ...
    assert len(replies) == 2 and "Actor" in replies[0] and replies[1] == "ok", replies
    # ... and Flower returned only once the job the ServerApp left behind had ended
    assert (tmp_path / "ended").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_a_busy_job_ends_when_its_run_asks(tmp_path, monkeypatch) -> None:
    # Prepare: a job that would run for minutes, watching the run's stop file
    monkeypatch.delenv("RAY_enable_output_error_log_if_still_retry", raising=False)
    quiet_actor_retries()
    busy = {"act": "busy", "dir": str(tmp_path), "s": 600.0, "watch": True}
    # Execute: the ServerApp asks it to stop and ends
    replies, took = _simulate([{"act": "ok"}, busy], {"num_cpus": 1, **actor_options()})
    # Assert: the actor ended the job; Flower did not wait for it
    assert replies == ["ok"]
    assert not (tmp_path / "ended").exists() and took < RUN_LIMIT_S
