"""End to end: a sampled population on the full protocol through Flower and Ray, on synthetic
data: 12 devices, 3 a round among those a trace has online, Dirichlet labels, 3 Flower nodes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mist_fed.fleet.spec import spec_from_dict

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.network]

BACKBONE = {
    "name": "vit_tiny_patch16_224",
    "random_init": True,
    "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 192, "num_heads": 3},
}
# devices 0-5 online the first simulated hour, 6-11 after it; 9 never
TRACE = "device,online\n" + "".join(
    f"{d},{'0-1' if d < 6 else '1-48'}\n" for d in range(12) if d != 9
)


@pytest.fixture(scope="module")
def population_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    from mist_fed.fleet.flower.simulation import simulate

    tmp = tmp_path_factory.mktemp("population")
    trace = tmp / "trace.csv"
    trace.write_text(TRACE)
    mp = pytest.MonkeyPatch()
    mp.setenv("MIST_FED_CACHE", str(tmp / "cache"))
    spec = spec_from_dict(
        {
            "fleets": [{"task": "synthetic:classes=4,train=96,test=16", "devices": 12}],
            "profiles": "rpi4",
            "backbone": BACKBONE,
            "protocol": "full",
            "partitioner": "Dirichlet",
            "partitioner_args": {"alpha": 0.5, "min_partition_size": 2},
            "per_round": 3,
            "availability": f"trace:{trace}",
            "test_per_device": 4,
            "eval_images": 16,
            "rounds": 2,
            "local_epochs": 1,
            "deadline_s": 4000.0,
        }
    )
    try:
        result = simulate(spec, tmp / "results", run_id="pop", ray_cpus=2, progress=False)
    finally:
        mp.undo()
    assert result.run_dir is not None
    return result.run_dir, result


def test_a_sampled_population_runs_on_slots_and_records_its_shares(population_run) -> None:
    # Prepare
    run_dir, _ = population_run
    # Execute
    dev = pd.read_parquet(run_dir / "devices.parquet")
    fl = pd.read_parquet(run_dir / "fleets.parquet")
    # Assert: 3 devices a round, all ok on 3 Flower nodes, among the devices online then
    assert list(dev.groupby("round").size()) == [3, 3] and (dev["status"] == "ok").all()
    assert set(dev["device"]) <= set(range(12)) - {9}
    assert list(fl["sampled"]) == [3, 3] and list(fl["devices"]) == [12, 12]
    assert (fl["sim_time_s"].diff().dropna() > 0).all()
    # the devices' shares are uneven and cover the full training split (96 images)
    assert fl["train_images"].iloc[0] == 96 == fl["train_slots"].iloc[0]
    for name in ("label_distribution.png", "share_sizes.png", "accuracy_vs_sim_time.png"):
        assert (run_dir / name).stat().st_size > 0
    config = (run_dir / "config.toml").read_text()
    assert 'protocol = "full"' in config and 'partitioner = "Dirichlet"' in config
    assert "per_round = 3" in config and "availability = " in config


def test_the_trace_decides_who_is_sampled_on_the_run_clock(population_run) -> None:
    # Prepare
    run_dir, _ = population_run
    dev = pd.read_parquet(run_dir / "devices.parquet")
    fl = pd.read_parquet(run_dir / "fleets.parquet")
    # Execute
    first = set(dev[dev["round"] == 1]["device"])
    second = set(dev[dev["round"] == 2]["device"])
    # Assert: round 1 starts at 0 h (devices 0-5); round 2 at the clock after round 1
    assert first <= set(range(6))
    started = fl["sim_time_s"].iloc[0] / 3600.0
    assert second <= (set(range(6)) if started < 1.0 else set(range(6, 12)) - {9})
