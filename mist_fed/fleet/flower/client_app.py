"""The Flower ClientApp of a fleet run: unpack the job, call the device function, pack the reply."""

from __future__ import annotations

import os
from functools import partial

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from mist_fed.device.source import FlightSource
from mist_fed.fleet.faults import maybe_fault
from mist_fed.fleet.flower.messages import train_reply, unpack_job
from mist_fed.fleet.runtime.cluster import host_node
from mist_fed.fleet.runtime.secrets import fleet_token
from mist_fed.fleet.runtime.stop import end_on_stop
from mist_fed.fleet.storage import resolve, run_name
from mist_fed.fleet.worker import run_device

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    job, state = unpack_job(msg)
    # The run's device storage on this node holds the device's own directory (fleet/storage.py).
    run = run_name(job.storage)
    storage = resolve(run)
    with end_on_stop(storage):
        maybe_fault(job.device, job.round, storage)
        source = partial(FlightSource, token=fleet_token(run))  # the run's keeper's, if any
        result, new_state = run_device(job, state, source, node=host_node())
    return train_reply(msg, result, new_state)
