"""End to end: a 4-device, 2-task, 2-round fleet through Flower and Ray, on synthetic data."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mist_fed.fleet.spec import spec_from_dict
from mist_fed.report.results import DEVICE_COLUMNS, FLEET_COLUMNS
from tests.fakes import TINY_DEVICE

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.network]

# A tiny ViT, wide enough that the LAE's training state alone outgrows a 1 MB device.
BACKBONE = {
    "name": "vit_tiny_patch16_224",
    "random_init": True,
    "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 192, "num_heads": 3},
}


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    from mist_fed.fleet.flower.simulation import simulate

    tmp = tmp_path_factory.mktemp("fleet")
    tiny = tmp / "tiny-mem.toml"
    tiny.write_text(TINY_DEVICE)
    mp = pytest.MonkeyPatch()
    mp.setenv("MIST_FED_CACHE", str(tmp / "cache"))
    spec = spec_from_dict(
        {
            "fleets": [
                {"task": "synthetic:classes=4,train=32,test=16", "devices": 2},
                {
                    "task": "synthetic:classes=3,train=24,test=12,seed=1",
                    "devices": 2,
                    "aggregation": "local",
                },
            ],
            # Device 1 (fleet one, fedavg) is the tiny one; the others are Pi 4s.
            "profiles": f"{tiny}:1,rpi4:3",
            "backbone": BACKBONE,
            "train_per_device": 8,
            "test_per_device": 4,
            "rounds": 2,
            "local_epochs": 1,
        }
    )
    try:
        result = simulate(spec, tmp / "results", run_id="e2e", ray_cpus=2, progress=False)
    finally:
        mp.undo()
    assert result.run_dir is not None
    return result.run_dir, result


def test_run_writes_parquet_with_the_documented_columns(fleet_run) -> None:
    # Prepare
    run_dir, _ = fleet_run
    # Execute
    dev = pd.read_parquet(run_dir / "devices.parquet")
    fl = pd.read_parquet(run_dir / "fleets.parquet")
    # Assert
    assert set(DEVICE_COLUMNS) <= set(dev.columns) and len(dev) == 4 * 2
    assert set(FLEET_COLUMNS) <= set(fl.columns) and len(fl) == 2 * 2
    names = ("accuracy_vs_bytes.png", "accuracy_vs_sim_time.png", "device_time.png")
    for name in ("config.toml", "summary.md", *names):
        assert (run_dir / name).is_file()
    ok = dev[dev["status"] == "ok"]
    assert (ok["compute_s"] > 0).all() and (ok["transfer_s"] > 0).all()
    first = dev[dev["round"] == 1]
    assert (first["feature_bytes"] > 0).all()  # features stream once, in round 1
    assert (dev[dev["round"] == 2]["feature_bytes"] == 0).all()
    assert ok["accuracy"].between(0, 1).all()
    # every round's row carries its fleet's central reference; the clock only moves forward
    assert fl["central_accuracy"].between(0, 1).all()
    assert (fl.groupby("fleet")["sim_time_s"].diff().dropna() > 0).all()
    assert (fl["eval_images"] > 0).all()


def test_device_over_its_memory_cap_fails_and_the_rest_finish(fleet_run) -> None:
    # Prepare
    run_dir, _ = fleet_run
    # Execute
    dev = pd.read_parquet(run_dir / "devices.parquet")
    # Assert
    tiny = dev[dev["profile"].str.endswith("tiny-mem.toml")]
    assert (tiny["status"] == "failed").all() and len(tiny) == 2
    assert tiny["reason"].str.contains("exceeds device memory").all()
    rest = dev[~dev.index.isin(tiny.index)]
    assert (rest["status"] == "ok").all()
    fl = pd.read_parquet(run_dir / "fleets.parquet")
    assert fl.set_index(["round", "aggregation"]).loc[(2, "FedAvg"), "failed"] == 1


def test_fedavg_fleets_share_weights_and_local_ones_do_not(fleet_run) -> None:
    # Prepare
    run_dir, _ = fleet_run
    # Execute
    dev = pd.read_parquet(run_dir / "devices.parquet")
    second = dev[dev["round"] == 2]
    # Assert: what each device received for round 2
    shared = second[second["aggregation"] == "FedAvg"]["received_digest"]
    local = second[second["aggregation"] == "local"]["received_digest"]
    assert shared.nunique() == 1
    assert local.nunique() == 2
    assert not set(shared) & set(local)


def test_cloud_embeds_each_image_once(fleet_run) -> None:
    # Prepare
    _, result = fleet_run
    # Execute
    stats = result.cloud_stats
    # Assert: per fleet, 2 devices x 8 train and the whole test split (server-side scoring:
    # 16 and 12 images) = 60 distinct (task, split, id)
    assert 0 < stats["images_embedded"] <= 60
    assert stats["cache_misses"] == stats["images_embedded"]
