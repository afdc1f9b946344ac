"""The cloud's bearer token on its way to a fleet's devices, seen by no one on the way.

The token reaches the driver from a file or ``MIST_FED_CLOUD_TOKEN``
(:func:`mist_fed.commands.common.read_cloud_token`, which takes the variable out of the driver's
environment, so no process it starts, Ray's and the embedded cloud's included, inherits it). It is never a command-line argument, a job's
``runtime_env`` variable, a field of a device job (Flower messages, ``config.toml``), a log
line or a results file.

Devices on Ray get it from a keeper (:func:`keep_token`): a Ray actor of the run, named after
the run's device storage (``mist-fed-cloud-token-run-XXXX``), created by the driver with no
arguments and handed the token in a method call. Ray passes a call's arguments through its
object store and shows none of them: its dashboard and state API list an actor's class, name,
resources and ``runtime_env``, a task's function name and state, never their arguments; and the
keeper has no ``__repr__`` of its own (the dashboard's "repr name"). A device's process asks the
keeper once per run (:func:`fleet_token`) and keeps the answer in memory. The keeper lives as
long as the driver's Ray connection: a non-detached actor ends with its owner. Anyone who may
run code on the Ray cluster may read it, as they may read anything of the run's: the cluster
is the trust boundary (docs/cluster.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from mist_fed.fleet.runtime.cluster import running_ray

KEEPER_PREFIX = "mist-fed-cloud-token-"

_known: dict[str, str | None] = {}  # run -> token, in a device's process


def keeper_name(run: str) -> str:
    return f"{KEEPER_PREFIX}{run}"


class TokenKeeper:
    """Holds one run's token in a Ray actor (no ``__repr__``: the dashboard shows none)."""

    def __init__(self) -> None:
        self._token: str | None = None

    def put(self, token: str) -> bool:
        self._token = token
        return True

    def token(self) -> str | None:
        return self._token


@contextlib.contextmanager
def keep_token(token: str | None, run: str) -> Iterator[None]:
    """While the block runs, devices of ``run`` on the connected Ray get ``token``
    (:func:`fleet_token`); nothing to keep (``None``), nothing started."""
    if token is None:
        yield
        return
    import ray

    actor: Any = ray.remote(num_cpus=0, max_restarts=0)(TokenKeeper)
    keeper = actor.options(name=keeper_name(run), lifetime=None).remote()
    ray.get(keeper.put.remote(token))
    try:
        yield
    finally:
        if ray.is_initialized():  # Flower's runtime may have shut Ray down, keeper and all
            with contextlib.suppress(Exception):
                ray.kill(keeper)


def fleet_token(run: str) -> str | None:
    """The token the driver keeps for ``run`` (:func:`keep_token`), asked once per process;
    None outside Ray or when the run keeps none."""
    if run in _known:
        return _known[run]
    ray = running_ray()
    token = None
    if ray is not None:
        try:
            keeper = ray.get_actor(keeper_name(run))
        except ValueError:  # no keeper: the run's cloud is open
            keeper = None
        if keeper is not None:
            token = ray.get(keeper.token.remote())
    _known[run] = token
    return token
