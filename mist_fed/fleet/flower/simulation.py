"""``mist-fed simulate``: a run session whose rounds run on Flower's simulation runtime on Ray.

:func:`simulate` is what ``simulations/run.py`` and ``mist-fed simulate`` call. The run session
(:class:`~mist_fed.fleet.runtime.session.RunSession`) finds or embeds the cloud, makes the
device storage, writes the results after every round and owns the one stop (the first Ctrl-C);
this module adds Ray (a local one with a bounded CPU count, or a named cluster:
:func:`~mist_fed.fleet.runtime.cluster.ray_runtime`) and Flower's runtime, whose ServerApp runs
the session's rounds over the Grid and whose ClientApps run the devices' jobs on Ray actors.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from mist_fed.assets.defaults import DEFAULT_HOST
from mist_fed.fleet.runtime.cluster import client_resources, fit_cluster, ray_runtime
from mist_fed.fleet.runtime.provision import resolve_assets
from mist_fed.fleet.runtime.session import RunResult, RunSession
from mist_fed.fleet.spec import FleetSpec

log = logging.getLogger(__name__)

SERVER_STOP_S = 10.0  # bound on waiting for the ServerApp thread after the runtime ends


def simulate(
    spec: FleetSpec,
    results_dir: str | Path | None = "results",
    *,
    run_id: str | None = None,
    cloud: str | None = None,
    ray_address: str | None = None,
    ray_cpus: int | None = None,
    cloud_bind: str = DEFAULT_HOST,
    cloud_advertise: str | None = None,
    progress: bool = True,
    verbose: int = 0,
) -> RunResult:
    """Run ``spec`` on Flower's Ray backend and write ``results_dir/<run-id>/``.

    ``cloud_bind`` / ``cloud_advertise``: where the embedded cloud listens and the host the
    devices dial (default: the bind host; for ``0.0.0.0`` this machine's Ray node IP).
    ``verbose``: 0 keeps Flower and Ray quiet, 1 lets Ray workers log, 2 adds Flower's debug log.
    On Ctrl-C the run stops, writes the completed rounds (``config.toml`` records
    ``interrupted`` and ``rounds_completed``) and raises :class:`~mist_fed.errors.Interrupted`.
    """
    from flwr.simulation import run_simulation

    from mist_fed.fleet.flower.client_app import app as client_app
    from mist_fed.fleet.flower.server_app import make_server_app
    from mist_fed.fleet.flower.workarounds import actor_options, quiet_actor_retries

    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose > 1 else logging.ERROR)
    spec = resolve_assets(spec)
    facts = {"engine": "flower+ray", "ray_address": ray_address}
    began, finished = threading.Event(), threading.Event()
    with RunSession(
        spec, results_dir, run_id=run_id, cloud=cloud, cloud_bind=cloud_bind,
        cloud_advertise=cloud_advertise, facts=facts, progress=progress,
    ) as session:  # fmt: skip
        quiet_actor_retries()
        with ray_runtime(ray_address, ray_cpus, verbose, session.location, session.storage.name):
            res = fit_cluster(client_resources(spec))
            log.info("Ray client resources per device: %s", res)
            # Ray restarts a device's dead worker (flower/workarounds.py says why it must).
            backend_config: dict[str, Any] = {
                "client_resources": {**res, **actor_options()},
                "init_args": {},
            }
            app = make_server_app(session, began, finished)
            try:
                run_simulation(
                    server_app=app,
                    client_app=client_app,
                    num_supernodes=spec.num_devices,
                    backend_config=backend_config,
                    verbose_logging=verbose > 1,
                )
            finally:
                # However the runtime ended, the ServerApp's thread must not outlive it.
                if began.is_set() and not finished.is_set():
                    session.stop.stop("the simulation runtime ended")
                    if not finished.wait(SERVER_STOP_S):
                        log.warning("the ServerApp thread did not stop in %.0f s", SERVER_STOP_S)
    assert session.result is not None
    return session.result
