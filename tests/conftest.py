"""Shared fixtures: tiny random ViTs, no network, no leaked state, no quiet skips in CI.

* Offline: every test runs with the hub's and mist-fed's offline switches on (inherited by the
  servers and workers tests start), and a connection from this process to anything but a
  loopback or local-socket address fails the test (:func:`no_network`).
* State: torch's thread counts and the hub's reachability cache are restored after each test,
  so tests pass in any order (``pytest-randomly`` shuffles them; ``-p no:randomly`` does not).
* Time: every test has ``pytest-timeout``'s limit: pyproject's default, ``SLOW_TIMEOUT_S`` for a
  ``slow`` one, or its own ``@pytest.mark.timeout(...)``.
* ``MIST_FED_NO_SKIP=1`` (set by ``.ci/run``) turns a skipped test into a failed one: CI must run
  every test, real Fashion-MNIST and the ``ray`` command included.
"""

import ipaddress
import os
import signal
import socket
import sys

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ["HF_HUB_OFFLINE"] = "1"  # no model hub: weights come from disk or random init
os.environ["MIST_FED_OFFLINE"] = "1"  # no dataset mirror: real data from disk only
NO_SKIP_ENV = "MIST_FED_NO_SKIP"
SLOW_TIMEOUT_S = 600  # a slow-marked test's limit unless it names its own (pyproject: 300 s)

TINY_VIT = {
    "img_size": 32,
    "patch_size": 8,
    "depth": 3,
    "embed_dim": 48,
    "num_heads": 3,
}


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` for a child that a test Ctrl-Cs: SIGINT back to its default disposition.

    A job started in the background by a non-interactive shell (``cmd &``, as CI runners and
    ``nohup`` do) inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt
    handler: the child would never see the test's Ctrl-C, as it should not from a terminal.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class PickleBomb:
    """A pickle payload that records whether it ran: loaders under test must never unpickle it."""

    ran = False

    def __reduce__(self):
        return (PickleBomb.trigger, ())

    @staticmethod
    def trigger():
        PickleBomb.ran = True
        return {}


@pytest.fixture
def pickle_bomb():
    PickleBomb.ran = False
    return PickleBomb


@pytest.fixture(scope="session")
def tiny_backbone():
    from mist_fed.cloud.backbone import create_backbone

    return create_backbone("vit_tiny_patch16_224", random_init=True, seed=0, **TINY_VIT)


def served_id(backbone) -> str:
    """The identity a default-configured cloud serves ``backbone``'s features under: its weights
    and the numerics and runtime the cloud picks on this host (``@bfloat16-openvino`` on a CPU
    with bfloat16)."""
    from mist_fed.cloud.config import ServeConfig
    from mist_fed.cloud.numerics import features_id

    numerics, runtime, _ = ServeConfig().backbone_numerics()
    return features_id(backbone.weights_id, numerics, runtime)


def _local(address: object) -> bool:
    """A loopback IP, a local (AF_UNIX) socket path, or ``localhost``."""
    if isinstance(address, str | bytes):  # AF_UNIX
        return True
    host = str(address[0]) if isinstance(address, tuple) and address else ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """A test that dials a non-loopback address from this process fails, naming it."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(address: object) -> None:
        if not _local(address):
            pytest.fail(f"the test dialled {address!r}: tests stay offline (tests/conftest.py)")

    def connect(self, address):
        refuse(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        refuse(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


@pytest.fixture(autouse=True)
def restore_global_state():
    """Undo what a test leaves in process-wide state: torch's thread counts, the hub's
    reachability cache."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    hub = sys.modules.get("mist_fed.assets.net")
    if hub is not None:
        hub._can_connect.cache_clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ``MIST_FED_NO_SKIP=1`` a skip (not an expected failure) is reported as a failure."""
    outcome = yield
    rep = outcome.get_result()
    if os.environ.get(NO_SKIP_ENV) == "1" and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped, which {NO_SKIP_ENV}=1 (CI) forbids: {reason}"


def pytest_collection_modifyitems(config, items):
    """A slow-marked test without a limit of its own gets ``SLOW_TIMEOUT_S``."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
