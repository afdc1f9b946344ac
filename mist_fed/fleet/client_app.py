"""The Flower ClientApp of a fleet run: unpack the job, call the device function, pack the reply."""

from __future__ import annotations

import os

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from mist_fed.fleet.device import evaluate_device, run_device
from mist_fed.fleet.faults import maybe_fault
from mist_fed.fleet.messages import eval_reply, train_reply, unpack_job

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    job, state = unpack_job(msg)
    maybe_fault(job.device, job.round)
    result, new_state = run_device(job, state)
    return train_reply(msg, result, new_state)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    job, state = unpack_job(msg)
    return eval_reply(msg, evaluate_device(job, state))
