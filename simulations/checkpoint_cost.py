#!/usr/bin/env python
"""What a fleet run's per-round checkpoint costs at the default fleet's scale:

    python simulations/checkpoint_cost.py

One FedAvgM fleet (momentum 0.9) whose global model has 0.38M float32 parameters (the paper's
LAE), 50 devices x 20 rounds of result rows; the checkpoint written 5 times as the run session
writes it (``mist_fed.fleet.runtime.resume.save``: atomic, fsync-ed) and read back once.
Prints its size, the median save time and the load time on this host.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from mist_fed.fleet import aggregation
from mist_fed.fleet.aggregation import Update
from mist_fed.fleet.rounds import RoundState, RunRecords
from mist_fed.fleet.runtime import resume as ckpt
from mist_fed.fleet.scoring import FleetClock
from mist_fed.fleet.state import snapshot

PARAMS, DEVICES, ROUNDS, REPEATS = 380_000, 50, 20, 5


def main() -> None:
    model = {"w": torch.randn(PARAMS)}
    agg = aggregation.build("FedAvgM", {"server_momentum": 0.9}, DEVICES)
    for rnd in (1, 2):  # momentum and current arrays exist from round 2 on
        chosen, _ = agg.sample(rnd, model, list(range(DEVICES)), rnd)
        updates = [Update(d, {"w": model["w"] + 0.01 * d}, 5) for d in chosen[:5]]
        model = agg.aggregate(rnd, model, updates) or model
    metrics = {f"metric_{i}": 1.0 for i in range(15)}
    rows = [
        {"round": r, "device": d, "status": "ok", "reason": "", "accuracy": 0.5,
         "received_digest": "0123456789ab", "node": "host", **metrics}
        for r in range(1, ROUNDS + 1)
        for d in range(DEVICES)
    ]  # fmt: skip
    state = RoundState(
        ROUNDS, {"f": model}, {}, {"f": FleetClock()}, {}, RunRecords(rows, rows[:ROUNDS])
    )
    saved = ckpt.Checkpoint("run", ROUNDS, "digest", "run-x", snapshot(state, {"f": agg}))
    with tempfile.TemporaryDirectory() as folder:
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            ckpt.save(folder, saved)
            times.append(time.perf_counter() - t0)
        size = os.path.getsize(ckpt.path_of(folder))
        t0 = time.perf_counter()
        ckpt.load(folder)
        load_s = time.perf_counter() - t0
    print(
        f"checkpoint {size / 1e6:.1f} MB; save median {sorted(times)[REPEATS // 2] * 1e3:.0f} ms "
        f"(min {min(times) * 1e3:.0f}); load {load_s * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
