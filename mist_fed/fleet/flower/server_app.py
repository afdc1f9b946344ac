"""The Flower ServerApps of a fleet run: the run session's rounds over the Grid.

``app`` is the component ``flwr run .`` loads: Flower's runtime owns the process and Ray; the
app converts its run-config into a :class:`~mist_fed.fleet.spec.FleetSpec` once, here, and
opens a :class:`~mist_fed.fleet.runtime.session.RunSession` (cloud, device storage, results
after every round) whose one stop ``flwr stop`` triggers through Flower's exit hook.
:func:`make_server_app` is the ServerApp of ``mist-fed simulate``
(:mod:`mist_fed.fleet.flower.simulation`), around a session that is already open.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from mist_fed.assets.defaults import cache_dir
from mist_fed.errors import ConfigError
from mist_fed.fleet.flower.grid import (
    GridTransport,
    in_flight_window,
    settled_nodes,
    wait_for_nodes,
)
from mist_fed.fleet.flower.workarounds import check_app_environment, on_runtime_exit
from mist_fed.fleet.runtime.cluster import clean_nodes, running_ray
from mist_fed.fleet.runtime.provision import resolve_assets
from mist_fed.fleet.runtime.session import RunSession
from mist_fed.fleet.runtime.stop import POLL_S, RunStop
from mist_fed.fleet.spec import spec_from_run_config
from mist_fed.fleet.transport import RunStopped

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
log = logging.getLogger(__name__)

EXIT_WAIT_S = 20.0  # bound on the fleet's own stop when Flower's runtime exits


def _rounds_on_grid(grid: Grid, session: RunSession, nodes: list[int] | None = None) -> None:
    """The session's rounds with device ``d`` on the Grid's ``d``-th node (sorted ids)."""
    spec, stop = session.spec, session.stop.event
    nodes = nodes or wait_for_nodes(grid, spec.num_devices, stop=stop)
    if len(nodes) < spec.num_devices:
        raise ConfigError(
            f"the fleet has {spec.num_devices} devices but only {len(nodes)} Flower nodes; "
            f"run with num-supernodes = {spec.num_devices} (or lower --devices)"
        )
    window = in_flight_window(spec)  # None: no Ray in this process (real SuperNodes)
    transport = GridTransport(grid, nodes, stop=stop, window=window, needs_ray=window is not None)
    transport.on_reply = session.progress.tick
    session.run_rounds(transport, progress_bars=session.progress.bar is not None)


def make_server_app(
    session: RunSession, began: threading.Event, finished: threading.Event
) -> ServerApp:
    """A ServerApp that runs ``session``'s rounds; ``began`` is set when it starts,
    ``finished`` when it ends, however it ends."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        began.set()
        try:
            _rounds_on_grid(grid, session)
        except RunStopped:  # stopped while waiting for the nodes
            pass
        finally:
            finished.set()

    return server


def wait_for_ray(timeout_s: float = 120.0, stop: threading.Event | None = None) -> None:
    """Until the runtime's Ray is up (Flower starts it in its main thread as the ServerApp
    starts): touching ``ray`` from this thread while that thread still imports it finds a
    partially initialised module (see :func:`~mist_fed.fleet.runtime.cluster.running_ray`)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if stop is not None and stop.is_set():
            raise RunStopped("the fleet run was stopped")
        if running_ray() is not None:
            return
        time.sleep(POLL_S)


def results_root(run_config: Mapping[str, Any]) -> Path:
    """``results-dir`` if absolute, else under the cache directory (never relative to the
    working directory of Flower's long-lived SuperLink, which is wherever it first started)."""
    given = Path(str(run_config.get("results-dir") or "results")).expanduser()
    return given if given.is_absolute() else cache_dir() / given


class _ToFlower(logging.Handler):
    """Our log records through Flower's logger, so ``flwr run --stream`` and ``flwr log``
    show the rounds."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("flwr").handle(record)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry of ``flwr run .``: Flower's runtime owns this process and Ray; the app owns the
    fleet's run session (its cloud, embedded unless ``cloud`` names one, device storage and
    results).

    ``devices = 0`` (the default) gives one device per SuperNode of the federation. Each
    completed round is written at once (``interrupted``/``rounds_completed`` in
    ``config.toml``); the finished run rewrites the files without them and adds the plots.
    """
    ours = logging.getLogger("mist_fed")
    if not any(isinstance(h, _ToFlower) for h in ours.handlers):
        ours.addHandler(_ToFlower())
        ours.setLevel(logging.INFO)
    check_app_environment()
    stop, finished = RunStop(), threading.Event()

    def on_exit() -> None:  # flwr stop, or a signal: end the fleet, then Ray (workarounds.py)
        stop.stop("flwr stop")
        if not finished.wait(EXIT_WAIT_S):
            log.warning("the fleet did not stop in %.0f s", EXIT_WAIT_S)
        ray = running_ray()
        if ray is not None:
            ray.shutdown()

    on_runtime_exit(on_exit)
    try:
        _run_app(grid, context, stop)
    except RunStopped:
        log.warning("run stopped before its rounds began")
    finally:
        finished.set()


def _run_app(grid: Grid, context: Context, stop: RunStop) -> None:
    rc = dict(context.run_config)
    nodes = settled_nodes(grid, stop=stop.event)
    wait_for_ray(stop=stop.event)
    if int(str(rc.get("devices") or 0)) <= 0:
        rc["devices"] = len(nodes)
    # Relative fleet paths resolve against the app's root (the installed FAB, or a checkout).
    app_root = Path(__file__).resolve().parents[3]
    spec = resolve_assets(spec_from_run_config(rc, base_dir=app_root))
    if spec.num_devices > len(nodes):
        raise ConfigError(
            f"the fleet has {spec.num_devices} devices but the federation {len(nodes)} "
            f'SuperNodes: run with --federation-config "num-supernodes={spec.num_devices}" '
            f"or --run-config devices={len(nodes)}"
        )
    cloud = str(rc.get("cloud") or "") or None
    results = results_root(rc)
    run_id = str(rc.get("run-id") or f"flwr-{context.run_id}")
    facts = {"engine": "flwr run", "flower_run_id": context.run_id}
    log.info("fleet of %d devices; results in %s", spec.num_devices, results / run_id)
    with RunSession(
        spec, results, run_id=run_id, cloud=cloud, facts=facts, stop=stop, sigint=False,
        raise_stopped=False,
    ) as session:  # fmt: skip
        _rounds_on_grid(grid, session, nodes)
        if session.completed and running_ray() is not None:
            # every job has replied: each node removes its copy (a stopped run's jobs may be
            # busy: this machine's only, when the session ends)
            clean_nodes(session.storage.name)
