"""Fast unit tests of the fleet pieces, without Flower or Ray."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pytest

from mist_fed.cloud.backbone import BackboneSpec
from mist_fed.device.metrics import DeviceMetrics
from mist_fed.device.trainer import TrainConfig
from mist_fed.errors import ConfigError
from mist_fed.experiments.compare import CompareConfig
from mist_fed.fleet.job import DeviceJob, DeviceResult, StateDict
from mist_fed.fleet.scoring import central_config
from mist_fed.fleet.spec import (
    apply_overrides,
    assign_profiles,
    load_fleet,
    parse_profile_mix,
    spec_from_dict,
    spec_from_run_config,
    spec_to_dict,
)
from mist_fed.fleet.storage import RunStorage, device_storage, resolve, run_name
from mist_fed.fleet.worker import run_device
from mist_fed.report.results import DEVICE_COLUMNS, FLEET_COLUMNS, summary_table, write_run
from tests.fakes import TINY_DEVICE, MemorySource
from tests.fleets import hand_plan, make_rounds, run_all

FLEETS = Path(__file__).resolve().parents[1] / "simulations" / "fleets"

MINIMAL = {"fleets": [{"task": "synthetic", "devices": 4}], "profiles": "rpi4"}


# -- fleet spec ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "default.toml",
        "mixed.toml",
        "synthetic.toml",
        "population.toml",
        "cross-device-fmnist.toml",
        "async-vs-sync.toml",
        "async-vs-sync-digits.toml",
    ],
)
def test_shipped_fleets_load(name: str) -> None:
    # Execute
    spec = load_fleet(FLEETS / name)
    # Assert
    assert spec.num_devices >= 1


def test_spec_round_trips_through_its_toml_dict() -> None:
    # Prepare
    spec = spec_from_dict({**MINIMAL, "k": 3, "backbone": {"name": "x", "random_init": True}})
    # Execute
    again = spec_from_dict(spec_to_dict(spec))
    # Assert
    assert again == spec


def test_spec_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        spec_from_dict({**MINIMAL, "roundz": 3})
    with pytest.raises(ConfigError, match="aggregation"):
        spec_from_dict({"fleets": [{"task": "t", "devices": 2, "aggregation": "median"}]})
    with pytest.raises(ConfigError, match=r"dropout:P needs P in \[0, 1\)"):
        spec_from_dict({**MINIMAL, "availability": "dropout:1.5"})
    with pytest.raises(ConfigError, match=r"unknown key.*dropout"):
        spec_from_dict({**MINIMAL, "dropout": 0.1})  # one way only: availability
    with pytest.raises(ConfigError, match=r"\[backbone\]: give either a weights file"):
        spec_from_dict({**MINIMAL, "backbone": {"weights": "w.safetensors", "random_init": True}})
    with pytest.raises(ConfigError, match="unknown key"):
        spec_from_dict({**MINIMAL, "fallback_backbone": {"name": "x", "weightz": "w"}})


def test_the_central_reference_trains_with_the_devices_or_the_comparisons_recipe() -> None:
    # Prepare: devices at batch 8 and lr 0.005
    devices = spec_from_dict({**MINIMAL, "batch_size": 8, "lr": 0.005})
    comparison = dataclasses.replace(devices, central_recipe="comparison")
    # Execute
    own = central_config(devices, "mist_pool", epochs=3)
    paper = central_config(comparison, "mist_pool", epochs=3)
    # Assert: the comparison's recipe is what simulations/compare.py trains with
    recipe = TrainConfig.for_method("mist_pool", epochs=3, batch_size=CompareConfig.batch_size)
    assert (own.batch_size, own.lr, own.epochs) == (8, 0.005, 3)
    assert (paper.batch_size, paper.lr, paper.epochs) == (recipe.batch_size, recipe.lr, 3)
    assert (paper.batch_size, paper.lr) != (8, 0.005)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"central_recipe": "paper"},
            "central_recipe must be one of devices, comparison, got 'paper'",
        ),
        ({"protocol": "vtab"}, "protocol must be one of vtab-1k, full, got 'vtab'"),
        (
            {"fleets": [{"task": "synthetic", "devices": 4, "method": "lora"}]},
            "fleet 'synthetic': method must be one of mist, mist_pool, linear, partial1, side, "
            "got 'lora'",
        ),
    ],
)
def test_a_key_with_a_fixed_set_of_values_refuses_another_naming_them(
    change: dict[str, object], message: str
) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=f"^{message}$"):
        spec_from_dict({**MINIMAL, **change})


def test_backbone_name_defaults_to_the_offline_dinov2() -> None:
    # Execute
    bare = spec_from_dict(MINIMAL)
    nameless = spec_from_dict({**MINIMAL, "backbone": {"seed": 1}})
    # Assert
    assert bare.backbone == BackboneSpec("dinov2_s14_imgfocus")
    assert nameless.backbone == BackboneSpec("dinov2_s14_imgfocus", seed=1)


def test_overrides_spread_devices_and_replace_tasks() -> None:
    # Prepare
    spec = spec_from_dict(MINIMAL)
    # Execute
    out = apply_overrides(spec, tasks="a,b", devices=5, profile="rpi4:3,phone-low:2", rounds=7)
    # Assert
    assert [(f.task, f.devices) for f in out.fleets] == [("a", 3), ("b", 2)]
    assert out.profiles == (("rpi4", 3), ("phone-low", 2)) and out.rounds == 7


def test_run_config_is_converted_once_from_kebab_case() -> None:
    # Execute
    spec = spec_from_run_config(
        {"fleet": str(FLEETS / "default.toml"), "devices": 6, "local-epochs": 1, "deadline-s": 0}
    )
    # Assert
    assert spec.num_devices == 6 and spec.local_epochs == 1 and spec.deadline_s is None


def test_flwr_run_config_declares_every_override_and_its_defaults_keep_the_fleet_file() -> None:
    # Prepare: Flower refuses a --run-config key the app's config does not declare
    import tomllib

    from mist_fed.fleet.spec import OVERRIDES, load_fleet

    config = tomllib.loads((FLEETS.parents[1] / "pyproject.toml").read_text())
    declared = config["tool"]["flwr"]["app"]["config"]
    fleet = FLEETS.parents[1] / str(declared["fleet"])
    # Execute: the declared defaults, with the one-device-per-SuperNode count filled in
    spec = spec_from_run_config({**declared, "fleet": str(fleet), "devices": 10})
    base = load_fleet(fleet)
    # Assert
    assert {k.replace("_", "-") for k in OVERRIDES} <= set(declared)
    assert spec.num_devices == 10 and spec.rounds == declared["rounds"]
    assert spec.profiles == base.profiles
    assert (spec.lr, spec.local_epochs) == (base.lr, base.local_epochs)


def test_profile_mix_parsing_and_assignment() -> None:
    # Execute
    mix = parse_profile_mix("rpi4:30, phone-low:20")
    exact = assign_profiles(mix, 50)
    scaled = assign_profiles((("a", 1), ("b", 3)), 8)
    # Assert
    assert mix == (("rpi4", 30), ("phone-low", 20))
    assert exact.count("rpi4") == 30 and exact.count("phone-low") == 20
    assert exact[:5] != ["rpi4"] * 5  # interleaved, not blocked
    assert scaled.count("a") == 2 and scaled.count("b") == 6
    assert assign_profiles(parse_profile_mix("rpi4"), 3) == ["rpi4"] * 3
    with pytest.raises(ConfigError, match="profile mix"):
        parse_profile_mix("rpi4:lots")


# -- messages' payloads and results --------------------------------------------------------------


def test_device_job_round_trips_through_a_config_dict() -> None:
    # Prepare
    job = DeviceJob(
        device=3, fleet="f", task="synthetic", method="mist", profile="rpi4", round=2,
        train_ids=("a", "b"), test_ids=("c",), num_classes=4, cloud="grpc+tcp://127.0.0.1:1",
        storage="run-1/f/3",
    )  # fmt: skip
    # Execute
    again = DeviceJob.from_config(job.to_config())
    # Assert
    assert again == job and DeviceJob.from_config(dataclasses.replace(job, k=2).to_config()).k == 2


def _rows() -> tuple[list[dict], list[dict]]:
    devices = []
    for rnd in (1, 2):
        for dev, status in ((0, "ok"), (1, "failed")):
            r = DeviceResult(dev, rnd, status, "" if status == "ok" else "exceeds device memory")
            r.accuracy = 0.5
            r.metrics = DeviceMetrics(bytes_down=100, feature_bytes=80, images_down=4)
            devices.append(
                {"fleet": "t/mist", "task": "t", "method": "mist", "aggregation": "FedAvg",
                 "profile": "rpi4", **r.row()}
            )  # fmt: skip
    fleets = [
        {"round": rnd, "fleet": "t/mist", "task": "t", "method": "mist", "aggregation": "fedavg",
         "devices": 2, "ok": 1, "failed": 1, "dropped": 0, "stragglers": 0, "accuracy": 0.5 * rnd,
         "bytes_down": 200, "bytes_up": 50, "feature_bytes": 80, "images_down": 4,
         "bytes_per_image": 20.0, "transfer_s": 1.0, "compute_s": 2.0, "round_time_s": 3.0,
         "peak_mem_mb": 10.0}
        for rnd in (1, 2)
    ]  # fmt: skip
    return devices, fleets


def test_results_writer_writes_the_documented_files(tmp_path: Path) -> None:
    # Prepare
    devices, fleets = _rows()
    # Execute
    paths = write_run(
        tmp_path / "run", spec_to_dict(spec_from_dict(MINIMAL)), devices, fleets, {"wall_s": 1.0}
    )
    # Assert
    dev = pd.read_parquet(paths["devices"])
    assert list(dev.columns[: len(DEVICE_COLUMNS)]) == list(DEVICE_COLUMNS) and len(dev) == 4
    assert list(pd.read_parquet(paths["fleets"]).columns[: len(FLEET_COLUMNS)]) == list(
        FLEET_COLUMNS
    )
    assert load_fleet(paths["config"]) == spec_from_dict(MINIMAL)  # rerunnable
    summary = paths["summary"].read_text()
    assert "t/mist" in summary and "exceeds device memory" in summary


def test_summary_table_takes_the_last_round() -> None:
    # Execute
    table = summary_table(pd.DataFrame(_rows()[1]))
    # Assert
    assert table.loc[0, "accuracy"] == 1.0 and table.loc[0, "KB/image"] == pytest.approx(0.02)


def test_device_result_columns_are_the_shared_metric_names() -> None:
    # Prepare
    result = DeviceResult(1, 2, "ok", metrics=DeviceMetrics(requests=3, transfer_s=0.5))
    # Execute: as a transport's records carry it (ints may come back as floats)
    row = result.row()
    again = DeviceResult.from_row(
        {k: float(v) if isinstance(v, int) else v for k, v in row.items()}
    )
    # Assert: devices.parquet, metrics.json and compare.parquet share DeviceMetrics' names
    assert set(DeviceMetrics().as_dict()) <= set(row)
    assert again == result and isinstance(again.metrics.requests, int)


# -- the device worker: one EdgeDevice per device-round ------------------------------------------


def _job(storage: str, rnd: int, profile: str = "rpi4", device: int = 0) -> DeviceJob:
    return DeviceJob(
        device=device, fleet="t/mist", task="t", method="mist", profile=profile, round=rnd,
        train_ids=tuple(f"train-{i}" for i in range(12)), test_ids=("test-0", "test-1", "test-2"),
        num_classes=3, cloud="memory://", storage=storage, epochs=2, batch_size=4,
    )  # fmt: skip


def test_a_job_names_its_storage_relative_to_the_root_of_the_node_that_runs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the driver's run, under the driver's cache; the device's process has its own
    monkeypatch.setenv("MIST_FED_CACHE", str(tmp_path / "driver"))
    with device_storage() as run:
        job = _job(run.location("t/mist", 0), 1)
        monkeypatch.setenv("MIST_FED_CACHE", str(tmp_path / "node"))
        # Execute
        res, _ = run_device(job, None, lambda cloud, **kw: MemorySource())
        # Assert: the job names no path; the device stored under its own process's cache
        assert res.status == "ok", res.reason
        assert job.storage == f"{run.name}/t_mist/0" and run.name.startswith("run-")
        assert run.path == tmp_path / "driver" / "devices" / run.name and run.path.is_dir()
        assert (tmp_path / "node" / "devices" / job.storage / "features").is_dir()
        assert list(run.path.iterdir()) == []  # nothing of the device's in the driver's cache
        assert resolve(run_name(job.storage)) == tmp_path / "node" / "devices" / run.name
    assert not run.path.exists()  # the run's directory goes with the run


@pytest.mark.parametrize("storage", ["/tmp/devices/run-1/f/0", "run-1/../../etc", "..", ""])
def test_an_absolute_or_escaping_storage_is_refused(storage: str, tmp_path: Path) -> None:
    # Execute / Assert: in one line, and the device that gets such a job fails with it
    with pytest.raises(ConfigError, match="relative to a node's device storage") as e:
        resolve(storage, tmp_path)
    assert "\n" not in str(e.value)
    res, state = run_device(_job(storage, 1), None, lambda cloud, **kw: MemorySource(), tmp_path)
    assert res.status == "failed" and res.reason.startswith("ConfigError") and state is None
    assert list(tmp_path.iterdir()) == []


def test_a_device_pays_for_its_features_once_and_reads_its_cache_after(tmp_path: Path) -> None:
    # Prepare
    src = MemorySource()
    storage = RunStorage(tmp_path, "run-1").location("t/mist", 0)
    # Execute: two rounds of the same device, the second from the first's weights
    first, state = run_device(_job(storage, 1), None, lambda cloud, **kw: src, tmp_path)
    asked = len(src.streams)
    second, again = run_device(_job(storage, 2), state, lambda cloud, **kw: src, tmp_path)
    # Assert
    assert first.status == second.status == "ok", (first.reason, second.reason)
    assert state is not None and again is not None
    assert (
        first.metrics.feature_bytes > 0
        and first.metrics.images_down == 15
        and first.num_examples == 12
    )
    assert asked == 2 and len(src.streams) == 2  # round 2 read the device's cache
    assert second.metrics.feature_bytes == 0 and second.metrics.images_down == 0
    weights = sum(t.numel() * t.element_size() for t in state.values())
    assert second.metrics.bytes_down == weights and second.metrics.bytes_up == weights
    assert (
        first.metrics.bytes_down == first.metrics.feature_bytes
        and first.metrics.bytes_up == weights
    )
    assert (
        second.metrics.transfer_s > 0
        and second.metrics.compute_s > 0
        and second.metrics.train_steps == 2 * 3
    )
    assert (
        0 <= second.accuracy <= 1
        and second.metrics.peak_mem_mb >= 0
        and second.metrics.edge_params > 0
    )


def test_a_device_over_its_memory_cap_fails_and_sends_no_weights(tmp_path: Path) -> None:
    # Prepare
    tiny = tmp_path / "tiny-mem.toml"
    tiny.write_text(TINY_DEVICE)
    # Execute
    res, state = run_device(
        _job("dev", 1, str(tiny)), None, lambda c, **kw: MemorySource(), tmp_path
    )
    # Assert
    assert res.status == "failed" and "exceeds device memory" in res.reason
    assert state is None and res.metrics.bytes_up == 0 and res.metrics.mem_cap_mb == 1


def test_fleet_rounds_over_devices_with_their_own_storage(tmp_path: Path) -> None:
    # Prepare: two fedavg devices on a fake cloud, two rounds
    src = MemorySource()
    fleets = [{"task": "synthetic", "devices": 2}]
    spec = spec_from_dict({**MINIMAL, "fleets": fleets, "rounds": 2, "batch_size": 4})
    plan = hand_plan(spec, eval_ids=[f"test-{i}" for i in range(16)])
    jobs_sent: list[DeviceJob] = []

    # Execute
    def train(jobs: Sequence[DeviceJob], states: Sequence[StateDict]) -> list:
        jobs_sent.extend(jobs)
        return [
            run_device(j, s, lambda c, **kw: src, tmp_path)
            for j, s in zip(jobs, states, strict=True)
        ]

    rec, _ = run_all(make_rounds(plan, train, lambda c, **kw: src, tmp_path, stub=False))
    # Assert
    dev = pd.DataFrame(rec.devices).set_index(["round", "device"])
    assert (dev["status"] == "ok").all(), dev["reason"]
    assert (dev.loc[1, "feature_bytes"] > 0).all() and (dev.loc[2, "feature_bytes"] == 0).all()
    assert dev.loc[2, "received_digest"].nunique() == 1  # fedavg: one global model
    assert {j.storage for j in jobs_sent} == {
        "run-test/synthetic_mist/0",
        "run-test/synthetic_mist/1",
    }
    assert {p.name for p in (tmp_path / "run-test" / "synthetic_mist").iterdir()} == {"0", "1"}
    # train + test per device in round 1 only; the server: the union and the evaluation images
    assert len(src.streams) == 2 * 2 + 2
    fl = pd.DataFrame(rec.fleets)
    assert fl["central_sample_steps"].iloc[-1] == fl["sample_steps"].iloc[-1] == 2 * 2 * 12
    assert fl["eval_images"].eq(16).all() and fl["central_accuracy"].between(0, 1).all()


def test_the_device_worker_imports_no_backbone_code() -> None:
    # Execute: what a Ray worker imports to serve the fleet's ClientApp
    code = (
        "import sys, mist_fed.fleet.flower.client_app; "
        "print(sorted({'timm', 'mist_fed.cloud.backbone'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    # Assert
    assert out.stdout.strip() == "[]"


@pytest.mark.network
def test_the_default_fleet_falls_back_to_a_synthetic_task_that_runs_on_its_wire(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the shipped default fleet scaled down, its real task unavailable
    from mist_fed.cloud.config import ServeConfig
    from mist_fed.cloud.runner import running_cloud
    from mist_fed.fleet.runtime.provision import load_backbone, resolve_assets
    from mist_fed.fleet.runtime.session import run_plain

    monkeypatch.setenv("MIST_FED_CACHE", str(tmp_path / "cache"))
    shipped = load_fleet(FLEETS / "default.toml")
    small = apply_overrides(shipped, devices=2, rounds=1, local_epochs=1, eval_images=16)
    missing = dataclasses.replace(
        small, fleets=tuple(dataclasses.replace(f, task="no-such-task") for f in small.fleets)
    )
    # Execute: what a run does on a machine without the real assets
    spec = resolve_assets(missing)
    serve = ServeConfig(port=0, cache_dir=str(tmp_path / "store"), tasks=(spec.fleets[0].task,))
    with running_cloud(serve, backbone=load_backbone(spec.backbone)) as loc:
        records = run_plain(spec, cloud=loc).records
    # Assert: the fallback task and backbone, on the shipped wire, every device-round ok
    assert spec.fleets[0].task == shipped.fallback_task
    assert spec.backbone == shipped.fallback_backbone and spec.wire_dtype == shipped.wire_dtype
    assert [d["status"] for d in records.devices] == ["ok", "ok"]
    assert 0.0 <= records.fleets[-1]["central_accuracy"] <= 1.0
