"""A Ray worker dies mid-round: that device is recorded as failed, the run and its files finish."""

from __future__ import annotations

import re
import threading

import pandas as pd
import pytest

from mist_fed.errors import ConfigError
from mist_fed.fleet.faults import ENV, Fault, configured
from mist_fed.fleet.spec import spec_from_dict
from mist_fed.report.results import DEVICE_COLUMNS, FLEET_COLUMNS

BACKBONE = {
    "name": "vit_tiny_patch16_224",
    "random_init": True,
    "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 3},
}
RUN_LIMIT_S = 300


def test_fault_spec_parses_and_rejects_typos(monkeypatch):
    monkeypatch.setenv(ENV, "exit:device=1,round=2")
    assert configured() == [Fault("exit", 1, 2)]
    monkeypatch.delenv(ENV)
    assert configured() == []
    with pytest.raises(ConfigError, match="exit:device=N"):
        Fault.parse("exit:dev=1")
    with pytest.raises(ConfigError, match="unknown fault"):
        Fault.parse("segv:device=1,round=1")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.network
def test_dead_ray_worker_fails_one_device_and_the_round_completes(tmp_path, monkeypatch):
    from mist_fed.fleet.flower.simulation import simulate

    # Prepare: device 1's ClientApp calls os._exit in round 1
    monkeypatch.setenv(ENV, "exit:device=1,round=1")
    faults = configured()
    monkeypatch.setenv("MIST_FED_CACHE", str(tmp_path / "cache"))
    spec = spec_from_dict(
        {
            "fleets": [{"task": "synthetic:classes=3,train=24,test=12", "devices": 3}],
            "profiles": "rpi4:1",
            "backbone": BACKBONE,
            "train_per_device": 6,
            "test_per_device": 3,
            "rounds": 2,
            "local_epochs": 1,
        }
    )
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = simulate(
                spec, tmp_path / "results", run_id="fault", ray_cpus=2, progress=False
            )
        except BaseException as e:  # surfaced below
            out["error"] = e

    # Execute (bounded: a hang fails the test instead of the suite)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(RUN_LIMIT_S)
    # Assert
    assert not t.is_alive(), f"simulation did not finish in {RUN_LIMIT_S} s"
    assert "error" not in out, out.get("error")
    run_dir = out["result"].run_dir
    dev = pd.read_parquet(run_dir / "devices.parquet")
    fl = pd.read_parquet(run_dir / "fleets.parquet")
    assert set(DEVICE_COLUMNS) <= set(dev.columns) and len(dev) == 3 * 2
    assert set(FLEET_COLUMNS) <= set(fl.columns) and len(fl) == 2
    for name in ("config.toml", "summary.md"):
        assert (run_dir / name).is_file()
    st = dev.set_index(["round", "device"])["status"]
    reason = dev.set_index(["round", "device"])["reason"]
    # Ray says the actor died, or (restarting it) that it was unavailable mid-job
    assert st[(1, 1)] == "failed" and re.search("Actor(Died|Unavailable)", reason[(1, 1)])
    others = st.drop(index=(1, 1))
    assert (others == "ok").all(), others  # the dead worker was restarted; nobody else failed
    assert fl.set_index("round").loc[1, "failed"] == 1 and fl.set_index("round").loc[2, "ok"] == 3
    failed = int((st == "failed").sum())
    print(
        f"\nRELIABILITY ray_worker_killed: faults={len(faults)} "
        f"failed_device_rounds={failed} ok_device_rounds={int((others == 'ok').sum())}"
    )
