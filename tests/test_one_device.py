"""One device, three entry points: the client, a one-device fleet and the comparison agree.

The same images, task, method, k, seed, epochs and threads through ``run_client``, the fleet's
``run_device`` and the comparison's ``train_eval`` give identical bytes, parameters and MACs,
and accuracies within 0.3 points (they are one EdgeDevice path, so here they are equal).
"""

import json

import pytest

from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.runner import running_cloud
from mist_fed.data import get_task
from mist_fed.device.client import ClientConfig, run_client
from mist_fed.device.profiles import load_profile
from mist_fed.device.source import FlightSource
from mist_fed.device.trainer import TrainConfig
from mist_fed.experiments.compare import CompareConfig, Comparison, Variant
from mist_fed.fleet.job import DeviceJob
from mist_fed.fleet.scoring import Scorer
from mist_fed.fleet.spec import FleetSpec, TaskFleet
from mist_fed.fleet.worker import run_device
from tests.fleets import hand_plan

pytestmark = [pytest.mark.network, pytest.mark.slow]

TASK = "synthetic:train=48,val=16,test=40"
EPOCHS, K, DTYPE, PROFILE = 3, 3, "float16", "laptop"


def _paid(storage):
    """Bytes each split's cache file cost over the link, by split."""
    out = {}
    for side in (storage / "features").glob("*.json"):
        info = json.loads(side.read_text())
        out[info["what"]["split"]] = info["paid_bytes"]
    return out


def test_client_fleet_and_comparison_measure_one_device_alike(tiny_backbone, tmp_path):
    # Prepare: one cloud; each path gets its own empty device storage
    task = get_task(TASK)
    serve = ServeConfig(
        port=0, random_init=True, cache_dir=str(tmp_path / "store"), rows_per_batch=8, tasks=(TASK,)
    )
    with running_cloud(serve, backbone=tiny_backbone) as loc:
        # Execute 1: the client (k fixed, so it trains once)
        client = run_client(
            ClientConfig(
                TASK, loc, PROFILE, str(tmp_path / "out"), dtype=DTYPE, ks=(K,),
                device_dir=str(tmp_path / "client"), train=TrainConfig(epochs=EPOCHS),
            )
        )  # fmt: skip
        # Execute 2: a one-device fleet's first round, on the same images
        job = DeviceJob(
            device=0, fleet="f", task=TASK, method="mist", profile=PROFILE, round=1,
            train_ids=tuple(task.split("train").ids), test_ids=tuple(task.split("test").ids),
            num_classes=task.num_classes, cloud=loc, storage="fleet",
            k=K, wire_dtype=DTYPE, epochs=EPOCHS, seed=0,
        )  # fmt: skip
        spec = FleetSpec(fleets=(TaskFleet(TASK, 1),), k=K, wire_dtype=DTYPE, seed=0)
        server = Scorer(hand_plan(spec), loc, tmp_path / "server")
        state = server.initial_state(spec.fleets[0], task.num_classes)
        fleet, _ = run_device(job, state, root=tmp_path)
        # Execute 3: the comparison's row
        cfg = CompareConfig(
            tasks=(TASK,), backbone=tiny_backbone.name, epochs=EPOCHS, micro_batch=8,
            profile=PROFILE, device_dir=str(tmp_path / "compare"),
        )  # fmt: skip
        with FlightSource(loc) as src:
            cmp = Comparison(cfg, task, TASK, tiny_backbone.num_blocks, src, load_profile(PROFILE))
            row = cmp.train_eval(Variant("mist", "mist", DTYPE, k=2), K, 0, None)
    # Assert
    assert fleet.status == "ok", fleet.reason
    paid = {name: _paid(tmp_path / name) for name in ("client", "fleet", "compare")}
    assert paid["client"] == paid["compare"] == {**paid["fleet"], "val": paid["client"]["val"]}
    assert client["feature_bytes"] == row.device.feature_bytes == sum(paid["client"].values())
    assert fleet.metrics.feature_bytes == paid["fleet"]["train"] + paid["fleet"]["test"]
    assert client["edge_params"] == fleet.metrics.edge_params == row.device.edge_params > 0
    assert client["edge_macs"] == fleet.metrics.edge_macs == row.device.edge_macs > 0
    accs = [client["accuracy"], fleet.accuracy, row.accuracy]
    assert max(accs) - min(accs) <= 0.003, accs
