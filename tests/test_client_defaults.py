"""`mist-fed client` defaults follow the committed wire study, and its help says so."""

from __future__ import annotations

import dataclasses

import pytest

from mist_fed.assets.defaults import STUDIED_METHOD, STUDIED_WIRE
from mist_fed.commands import build_parser
from mist_fed.core.specs import Geometry
from mist_fed.device.client import ClientConfig, default_dtype

WIDE = Geometry("dinov2", "w", 12, 384, 257, 1, 224, 6)


def test_client_defaults_to_the_studied_method_and_wire():
    args = build_parser().parse_args(["client", "--task", "fashion-mnist"])
    assert args.method == STUDIED_METHOD == "mist_pool"
    assert args.dtype is None  # resolved against the cloud's backbone
    assert default_dtype(args.method, WIDE) == STUDIED_WIRE == "pca192task-int4ch"
    assert ClientConfig("t", "c", "rpi4", "o").dtype is None


def test_default_wire_falls_back_where_the_projection_cannot_feed_the_method():
    narrow = dataclasses.replace(WIDE, embed_dim=48)  # a tiny ViT: fewer than 192 channels
    assert default_dtype("mist_pool", narrow) == "float16"
    for method in ("linear", "partial1", "side"):  # need the backbone's own channels
        assert default_dtype(method, WIDE) == "float16"
    assert default_dtype("mist", WIDE) == STUDIED_WIRE


def test_flags_override_and_help_names_the_source(capsys):
    args = build_parser().parse_args(
        ["client", "--task", "t", "--method", "mist", "--dtype", "float16"]
    )
    assert (args.method, args.dtype) == ("mist", "float16")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["client", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "wires-fashion-mnist-10k" in text and STUDIED_WIRE in text
