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


@pytest.fixture(scope="session")
def tiny_backbone():
    from mist_fed.model.backbone import create_backbone

    return create_backbone("vit_tiny_patch16_224", random_init=True, seed=0, **TINY_VIT)
