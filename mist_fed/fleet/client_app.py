"""The Flower ClientApp of a fleet run: unpack the job, call the device function, pack the reply."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from mist_fed.fleet.device import run_device
from mist_fed.fleet.faults import maybe_fault
from mist_fed.fleet.flower import end_on_stop
from mist_fed.fleet.messages import train_reply, unpack_job

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    job, state = unpack_job(msg)
    # The run's device storage holds every device's own directory (runner.device_dir).
    with end_on_stop(Path(job.storage).parents[1] if job.storage else None):
        maybe_fault(job.device, job.round)
        result, new_state = run_device(job, state)
    return train_reply(msg, result, new_state)
