"""#22 reference: the client's chosen job retrained on the whole train split held in memory
(FeatureClient.get: the cloud's order, shuffled in memory by FeatureSet.batches), same seed,
scored on the same cached test split. Usage: python ref22.py RUN_DIR CLOUD DEVICE_DIR"""

import json
import sys
from pathlib import Path

import torch

from mist_fed.device.edge import EdgeDevice
from mist_fed.device.profiles import load_profile
from mist_fed.device.source import FlightSource
from mist_fed.device.trainer import TrainConfig
from mist_fed.wire.flight import FeatureClient

run, cloud, device_dir = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
m = json.loads((run / "metrics.json").read_text())
task, method, k, dtype = m["task"], m["method"], m["k"], m["dtype"]
cfg = TrainConfig(**m["train_config"])
num_classes = len(json.loads((run / "lae.json").read_text()).get("classes", [])) or 10
with FlightSource(cloud) as src, EdgeDevice(load_profile("laptop"), src, device_dir) as dev:
    spec = dev.spec(method, k)
    with FeatureClient(cloud) as client:
        held = client.get(task, "train", spec.kind, spec.k, dtype)
    test = dev.features(task, "test", method, k, dtype)
    torch.manual_seed(cfg.seed)
    net = dev.new_net(method, num_classes, k, wire=dtype)
    dev.train(net, held, cfg)
    acc = dev.evaluate(net, test)
print(
    json.dumps(
        {
            "run": run.name,
            "task": task,
            "method": method,
            "k": k,
            "streamed_acc": m["accuracy"],
            "in_memory_acc": acc,
            "train_rows": len(held),
        }
    )
)
