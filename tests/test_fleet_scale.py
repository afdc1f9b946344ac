"""Fleets at scale, without Flower's runtime or Ray: the transport's window, shared images in
the summary."""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from mist_fed.fleet.flower import grid as flower_grid
from mist_fed.fleet.flower.grid import GridTransport
from mist_fed.fleet.job import OK, DeviceJob, DeviceResult
from mist_fed.report.results import write_run


class _QueueGrid:
    """A Grid that answers each pushed message on the second poll after it was pushed."""

    def __init__(self) -> None:
        self.in_flight: dict[str, int] = {}  # message id -> polls seen
        self.most = 0
        self.pushed = 0

    def push_messages(self, messages: list[Any]) -> list[str]:
        ids = []
        for _ in messages:
            ids.append(f"m{self.pushed}")
            self.in_flight[ids[-1]] = 0
            self.pushed += 1
        self.most = max(self.most, len(self.in_flight))
        return ids

    def pull_messages(self, ids: list[str]) -> list[Any]:
        assert set(ids) == set(self.in_flight)  # only what is in flight is asked for
        out = []
        for mid in list(self.in_flight):
            self.in_flight[mid] += 1
            if self.in_flight[mid] >= 2:
                del self.in_flight[mid]
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid)))
        return out


def _job(device: int) -> DeviceJob:
    return DeviceJob(
        device=device, fleet="f", task="synthetic", method="mist", profile="rpi4", round=1,
        train_ids=("a",), test_ids=("b",), num_classes=2, cloud="grpc+tcp://127.0.0.1:1",
        storage=f"run-1/f/{device}",
    )  # fmt: skip


def test_transport_keeps_at_most_its_window_in_flight_and_gets_every_reply(monkeypatch) -> None:
    # Prepare (Messages need a live Flower run: jobs and replies travel as placeholders here)
    made: list[Any] = []

    def message(job: DeviceJob, weights: Any, node: int) -> Any:
        made.append(weights)
        return SimpleNamespace(job=job)

    monkeypatch.setattr(flower_grid, "job_message", message)
    monkeypatch.setattr(
        flower_grid, "unpack_train_reply", lambda m, job: (DeviceResult(job.device, 1, OK), None)
    )
    monkeypatch.setattr(flower_grid, "POLL_S", 0.0)
    grid = _QueueGrid()
    jobs = [_job(d) for d in range(25)]
    state = {"w": torch.zeros(3)}
    # Execute
    transport = GridTransport(grid, list(range(25)), window=4)  # type: ignore[arg-type]
    transport.submit([(j, state) for j in jobs])
    out = list(transport.replies())
    # Assert: 4 at most in flight, every device answered in job order, one weights record
    assert grid.most == 4 and grid.pushed == 25
    assert [r.device for r, _ in out] == list(range(25)) and {r.status for r, _ in out} == {OK}
    assert len({id(w) for w in made}) == 1


def test_summary_and_config_say_when_devices_share_images(tmp_path: Path) -> None:
    # Prepare: one fleet row of a fleet with more slots than images, one without
    base = {"round": 1, "task": "t", "method": "mist", "aggregation": "FedAvg", "devices": 2}
    fleets = [
        {**base, "fleet": "big", "train_slots": 16000, "train_images": 800},
        {**base, "fleet": "small", "train_slots": 800, "train_images": 800},
    ]
    # Execute
    paths = write_run(tmp_path / "run", {}, [], fleets, {"wall_s": 1.0})
    # Assert
    text = paths["summary"].read_text()
    assert "* big: devices share images: 16,000 slots over 800 images" in text
    assert "small: devices share" not in text
    config = tomllib.loads(paths["config"].read_text())
    assert config["run"]["shared_images"] == {"big": {"train_slots": 16000, "train_images": 800}}
