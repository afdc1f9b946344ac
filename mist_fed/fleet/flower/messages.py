"""Packing and unpacking the Flower Messages of a fleet run (jobs, weights, results).

Federation messages carry only edge-net weights and small configs, never features.
:func:`strategy_reply` is a device's reply as Flower's strategies read it (one ArrayRecord,
one MetricRecord with the example count they weight by), whichever way the reply travelled.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from mist_fed.fleet.job import FAILED, DeviceJob, DeviceResult, StateDict

TRAIN = MessageType.TRAIN
WEIGHT_KEY = "num-examples"  # the MetricRecord key Flower's strategies weight replies by
TEXT_FIELDS = ("status", "reason", "node")  # a result's text: a reply's ConfigRecord


def job_message(
    job: DeviceJob, state: StateDict | ArrayRecord, node_id: int, kind: str = TRAIN
) -> Message:
    """The job and its weights (an ArrayRecord already made from them is used as it is)."""
    arrays = state if isinstance(state, ArrayRecord) else ArrayRecord.from_torch_state_dict(state)
    content = RecordDict({"job": ConfigRecord(job.to_config()), "weights": arrays})
    return Message(content=content, dst_node_id=node_id, message_type=kind)


def unpack_job(msg: Message) -> tuple[DeviceJob, StateDict]:
    job = DeviceJob.from_config(msg.content.config_records["job"])
    return job, to_state(msg.content.array_records["weights"])


def train_reply(msg: Message, result: DeviceResult, state: StateDict | None) -> Message:
    row = result.row()
    text = {k: row.pop(k) for k in TEXT_FIELDS}
    content = RecordDict({"result": MetricRecord(row), "status": ConfigRecord(text)})
    if state is not None:
        content["weights"] = ArrayRecord.from_torch_state_dict(state)
    return Message(content=content, reply_to=msg)


def unpack_train_reply(reply: Message, job: DeviceJob) -> tuple[DeviceResult, StateDict | None]:
    if reply.has_error():
        return (
            DeviceResult(job.device, job.round, FAILED, f"client error: {reply.error.reason}"),
            None,
        )
    c = reply.content
    row: dict[str, Any] = {**c.metric_records["result"], **c.config_records["status"]}
    result = DeviceResult.from_row(row)
    state = to_state(c.array_records["weights"]) if "weights" in c.array_records else None
    return result, state


def strategy_reply(state: StateDict, num_examples: int, node_id: int) -> Message:
    """A device's trained weights as the reply a Flower strategy aggregates."""
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({WEIGHT_KEY: int(num_examples)}),
        }
    )
    return Message(content=content, dst_node_id=node_id, message_type=TRAIN)


def to_state(arrays: ArrayRecord) -> StateDict:
    return dict(arrays.to_torch_state_dict())
