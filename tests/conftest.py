"""Shared fixtures: tiny random ViTs, no network."""

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

TINY_VIT = {
    "img_size": 32,
    "patch_size": 8,
    "depth": 3,
    "embed_dim": 48,
    "num_heads": 3,
}


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
    from mist_fed.model.backbone import create_backbone

    return create_backbone("vit_tiny_patch16_224", random_init=True, seed=0, **TINY_VIT)
