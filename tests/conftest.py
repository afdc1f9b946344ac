"""Shared fixtures: tiny random ViTs, no network."""

import os
import signal

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

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
