"""How device jobs travel: the :class:`Transport` protocol the round loops drive.

Two transports exist: the Flower Grid's (:mod:`mist_fed.fleet.flower.grid`: Messages to the
devices' ClientApps, on Ray or on real SuperNodes) and the in-process one
(:class:`~mist_fed.fleet.worker.LocalTransport`). A loop submits jobs and consumes replies as
they come: all of a round at once (the synchronous loop), or a few at a time in any order (an
event-driven one).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from mist_fed.fleet.job import DeviceJob, DeviceResult, StateDict

Reply = tuple[DeviceResult, StateDict | None]  # a job's result, and its model when it has one


class RunStopped(Exception):
    """The run was stopped from outside (Ctrl-C, ``flwr stop``, or its runtime ended early)."""


class Transport(Protocol):
    """Carries device jobs out and their replies back."""

    def submit(self, jobs: Sequence[tuple[DeviceJob, StateDict]]) -> None:
        """Start these jobs, each with the model it trains from (the transport may queue some
        until others reply)."""
        ...

    def replies(self) -> Iterator[Reply]:
        """Each submitted job's reply as it arrives, in any order, until none is in flight.
        A job the transport gives up on comes back ``failed``; a stopped run raises
        :class:`RunStopped`."""
        ...
