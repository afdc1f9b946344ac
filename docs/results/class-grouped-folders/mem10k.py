"""#22 memory check: a 10,000-row DINOv2-S/14-shaped (257x384, float16) split in a device cache,
trained one epoch and evaluated on the rpi4 profile through EdgeDevice; peak RSS rise over the
process once torch and the device code are imported (run from the code tree to test:
`cd TREE && PYTHONPATH=TREE python mem10k.py DIR prepare`, then without `prepare`)."""

import sys
import time
from pathlib import Path

import torch

from mist_fed.device.edge import EdgeDevice
from mist_fed.device.memory import peak_rss_mb, reset_peak_rss, rss_mb
from mist_fed.device.profiles import load_profile
from mist_fed.device.trainer import TrainConfig

storage = Path(sys.argv[1])
rows = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 10000
TOK, DIM = 257, 384


class Src:
    def __init__(self):
        from mist_fed.core.specs import Geometry

        self.g = Geometry("bench-vit", "random:bench", 12, DIM, TOK, num_heads=6)
        self.bytes_received = 0

    def geometry(self):
        return self.g

    def stream(self, task, split, spec, dtype, ids=None):
        import numpy as np

        from mist_fed.wire.codec import WireMeta, encode, feature_schema

        meta = WireMeta(self.g.backbone, self.g.weights, spec.kind, spec.k, dtype, (TOK, DIM))
        rng = np.random.default_rng(0)

        def it():
            for s in range(0, rows, 64):
                n = min(64, rows - s)
                b = encode(
                    meta,
                    [str(s + i) for i in range(n)],
                    [(s + i) * 10 // rows for i in range(n)],
                    rng.normal(size=(n, TOK, DIM)).astype("float32"),
                )
                self.bytes_received += b.nbytes
                yield b

        return feature_schema(meta), it()


src = Src()
if sys.argv[-1] == "prepare":
    with EdgeDevice(load_profile("laptop"), src, storage) as dev:
        dev.features("t", "test", "mist", 12, "float16")
    sys.exit()
reset_peak_rss()
base = rss_mb()
t0 = time.perf_counter()
with EdgeDevice(load_profile("rpi4"), src, storage) as dev:
    data = dev.features("t", "test", "mist", 12, "float16")
    torch.manual_seed(0)
    net = dev.new_net("mist", 10, 12, wire="float16")
    dev.train(net, data, TrainConfig(epochs=1))
    acc = dev.evaluate(net, data)
m = dev.report()
print(
    f"rows={rows} rise_over_torch={peak_rss_mb() - base:.0f}MB device_peak_mem_mb={m.peak_mem_mb:.0f} "
    f"feature_bytes={m.feature_bytes} acc={acc:.3f} wall={time.perf_counter() - t0:.0f}s"
)
