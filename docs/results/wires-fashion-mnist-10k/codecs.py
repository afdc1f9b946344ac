"""Bytes per image of the chosen wire with Arrow IPC compression (lossless: same decoded features).

Run from the repository root after the comparison (its store holds the features):
``.venv/bin/python docs/results/wires-fashion-mnist-10k/codecs.py > docs/results/wires-fashion-mnist-10k/codecs.txt``
Each wire's test split is pulled over Flight by a fresh EdgeDevice; bytes are what its client
counted (compressed IPC bodies for the +codec wires).
"""

import tempfile
from pathlib import Path

import numpy as np

from mist_fed.assets.defaults import default_backbone
from mist_fed.cloud.backbone import create_backbone
from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.runner import running_cloud
from mist_fed.device.edge import EdgeDevice
from mist_fed.device.profiles import load_profile
from mist_fed.device.source import FlightSource

bb = create_backbone(default_backbone())
cfg = ServeConfig(port=0, tasks=("fashion-mnist",), backbone=default_backbone())
d = Path(tempfile.mkdtemp())
with running_cloud(cfg, backbone=bb) as loc, FlightSource(loc) as src:
    base = None
    for wire in ("pca192task-int4ch", "pca192task-int4ch+zstd", "pca192task-int4ch+lz4"):
        dev = EdgeDevice(load_profile("laptop"), src, d / wire)
        with dev:
            s = dev.features("fashion-mnist", "test", "mist_pool", 12, wire)
            x = np.concatenate([b.features.numpy() for b in s.chunks()])
        same = "" if base is None else f", decoded features identical: {np.array_equal(base, x)}"
        base = x if base is None else base
        print(
            f"{wire}: {s.paid_bytes / s.rows:,.0f} bytes per image over {s.rows} test images{same}"
        )
