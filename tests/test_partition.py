"""Devices' data from Flower Datasets' partitioners, the full protocol, availability traces and a
population whose unsampled devices hold nothing; no Flower, no Ray, no cloud."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from mist_fed.data import get_task
from mist_fed.errors import ConfigError
from mist_fed.fleet.availability import load_trace, parse
from mist_fed.fleet.job import DeviceJob, DeviceResult, StateDict
from mist_fed.fleet.partition import Shares, pool_indices, shares
from mist_fed.fleet.plan import plan_fleet
from mist_fed.fleet.spec import FleetSpec, TaskFleet, apply_overrides, spec_from_dict, spec_to_dict
from tests.fakes import MemorySource
from tests.fleets import make_rounds, run_all

LABELS = [i % 10 for i in range(2000)]
MINIMAL = {"fleets": [{"task": "synthetic", "devices": 4}], "profiles": "rpi4"}


def _sizes(name: str, args: dict, devices: int = 20) -> tuple[Shares, list[list[int]]]:
    held = shares(LABELS, pool_indices(len(LABELS), None, 0), name, args, devices, seed=0)
    return held, [held.indices(d) for d in range(devices)]


def _classes(parts: list[list[int]]) -> float:
    return float(np.mean([len({LABELS[i] for i in p}) for p in parts]))


# -- each partitioner by name, with its arguments ------------------------------------------------


def test_iid_cuts_the_seeded_pool_into_even_disjoint_shares() -> None:
    # Execute
    _, parts = _sizes("Iid", {})
    # Assert
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(2000)) and {len(p) for p in parts} == {100}
    assert _classes(parts) == 10  # 100 shuffled images cover every class


@pytest.mark.parametrize("spelling", ["Dirichlet", "dirichlet", "DirichletPartitioner"])
def test_dirichlet_skews_labels_by_alpha(spelling: str) -> None:
    # Execute
    _, skewed = _sizes(spelling, {"alpha": 0.1, "min_partition_size": 0})
    _, even = _sizes("Dirichlet", {"alpha": 1000.0})
    # Assert
    assert sorted(i for p in skewed for i in p) == list(range(2000))
    assert _classes(skewed) < 6 < _classes(even)


def test_inner_dirichlet_keeps_the_sizes_it_is_given() -> None:
    # Execute
    _, even = _sizes("InnerDirichlet", {"alpha": 0.5}, devices=4)
    _, given = _sizes("InnerDirichlet", {"alpha": 0.5, "partition_sizes": [100, 200, 300, 400]}, 4)
    # Assert
    assert [len(p) for p in even] == [500] * 4 and [len(p) for p in given] == [100, 200, 300, 400]


def test_pathological_gives_each_device_its_few_classes() -> None:
    # Execute
    _, parts = _sizes("Pathological", {"num_classes_per_partition": 2})
    # Assert
    assert max(len({LABELS[i] for i in p}) for p in parts) <= 2 and all(parts)


def test_shard_gives_each_device_its_shards_of_sorted_labels() -> None:
    # Execute
    _, parts = _sizes("Shard", {"num_shards_per_partition": 2, "shard_size": 50})
    # Assert
    assert {len(p) for p in parts} == {100} and _classes(parts) <= 4


@pytest.mark.parametrize("name", ["Linear", "Square", "Exponential"])
def test_size_partitioners_give_uneven_growing_shares(name: str) -> None:
    # Execute: 5 devices (Square and Exponential need few partitions for 2,000 images)
    _, parts = _sizes(name, {}, devices=5)
    # Assert
    sizes = [len(p) for p in parts]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] and sum(sizes) <= 2000


# -- refusals: one line, naming what exists ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "args", "says"),
    [
        ("Nope", {}, "unknown partitioner 'Nope'; choose one of Iid, Dirichlet, InnerDirichlet"),
        ("Dirichlet", {"alpah": 0.3}, "has no argument(s) alpah; it takes alpha"),
        ("Dirichlet", {"alpha": -1.0}, "partitioner Dirichlet:"),
        ("Pathological", {}, "needs num_classes_per_partition"),
        ("Iid", {"alpha": 1}, "Iid has no argument(s) alpha; it takes no arguments"),
    ],
)
def test_bad_partitioners_are_refused_in_one_line_when_the_spec_loads(
    name: str, args: dict, says: str
) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError) as e:
        spec_from_dict({**MINIMAL, "partitioner": name, "partitioner_args": args})
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_partitioner_that_cannot_split_the_pool_is_refused_when_the_run_is_planned() -> None:
    # Prepare: Square over 40 devices of 32 images has empty partitions
    spec = FleetSpec(fleets=(TaskFleet("synthetic", 40),), partitioner="Square")
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"partitioner Square: .*not greater than 0"):
        plan_fleet(spec)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--partitioner", "Foo"], "unknown partitioner 'Foo'; choose one of Iid"),
        (["--partitioner", "Dirichlet", "--partitioner-args", "{alpha"], "must be a JSON object"),
        (["--partitioner-args", "[1]"], "partitioner args must be a JSON object"),
        (["--availability", "sometimes"], "availability 'sometimes' not understood"),
        (["--availability", "trace:/no/such.csv"], "availability trace /no/such.csv not found"),
        (["--protocol", "full", "--train-per-device", "0", "--per-round", "-1"], None),
    ],
)
def test_the_cli_refuses_bad_population_flags_in_one_line(
    flags: list[str], says: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    from mist_fed.commands.simulate import add_fleet_args, load_spec

    if says is None:  # the good flags parse into the spec (0 / -1 unset a count)
        import argparse

        p = argparse.ArgumentParser()
        add_fleet_args(p)
        spec = load_spec(p.parse_args(flags))
        assert spec.protocol == "full" and spec.train_per_device is None
        assert spec.per_round is None
        return
    from mist_fed.cli import main

    # Execute: refused while the spec loads, before any cloud or Ray starts
    code = main(["simulate", "--no-progress", *flags])
    # Assert
    err = capsys.readouterr().err.strip()
    assert code == 2 and says in err and len(err.splitlines()) == 1


def test_partitioner_and_its_arguments_round_trip_and_a_new_one_drops_the_old_arguments() -> None:
    # Prepare
    spec = spec_from_dict(
        {**MINIMAL, "partitioner": "dirichlet", "partitioner_args": {"alpha": 0.3}}
    )
    # Execute
    again = spec_from_dict(spec_to_dict(spec))
    iid = apply_overrides(spec, partitioner="Iid")
    # Assert
    assert again.partitioner == "Dirichlet" and again.partitioner_args == {"alpha": 0.3}
    assert iid.partitioner == "Iid" and iid.partitioner_args == {}


# -- pools: the full protocol, explicit image sharing ----------------------------------------------


def test_the_full_protocol_partitions_the_whole_training_split() -> None:
    # Prepare: digits (offline): VTAB-1k's 800 training images against the full split
    base = {"fleets": [{"task": "digits", "devices": 10}], "partitioner": "Dirichlet",
            "partitioner_args": {"alpha": 0.5, "min_partition_size": 5}}  # fmt: skip
    vtab = plan_fleet(spec_from_dict(base))
    full = plan_fleet(spec_from_dict({**base, "protocol": "full"}))
    name = "digits/mist"
    n_full = len(get_task("digits", protocol="full").split("train"))
    # Execute
    jobs = [full.job(d) for d in range(10)]
    # Assert
    assert vtab.sharing(name) == (800, 800) and full.sharing(name) == (n_full, n_full)
    assert n_full > 1000 and sum(len(j.train_ids) for j in jobs) == n_full
    assert len({len(j.train_ids) for j in jobs}) > 1  # uneven
    assert {j.task for j in jobs} == {"digits@full"}
    assert set(full.union(name)) == set(get_task("digits@full").split("train").ids)


def test_a_synthetic_task_runs_under_the_full_protocol() -> None:
    # Prepare
    spec = FleetSpec(
        fleets=(TaskFleet("synthetic:classes=10,train=5000,test=100,size=8", 50),),
        protocol="full", partitioner="Dirichlet", partitioner_args={"alpha": 0.3},
    )  # fmt: skip
    # Execute
    plan = plan_fleet(spec)
    # Assert
    assert plan.sharing(spec.fleets[0].name) == (5000, 5000)
    assert sum(len(plan.job(d).train_ids) for d in range(50)) == 5000


def test_image_sharing_is_an_explicit_recorded_choice() -> None:
    # Prepare: 8 devices x 8 images of a 40-image split
    fleet = (TaskFleet(task="synthetic:classes=4,train=40,test=20", devices=8),)
    refused = FleetSpec(fleets=fleet, train_per_device=8, test_per_device=4, eval_images=12)
    shared = FleetSpec(fleets=fleet, train_per_device=8, test_per_device=4, eval_images=12,
                       share_images=True)  # fmt: skip
    # Execute
    with pytest.raises(ConfigError, match="share_images = true"):
        plan_fleet(refused)
    plan = plan_fleet(shared)
    jobs = [plan.job(d) for d in range(8)]
    # Assert: 64 slots over 40 images; each device's images distinct; the choice is in the TOML
    assert plan.sharing(fleet[0].name) == (64, 40) and "share_images = true" in str(
        spec_to_dict(shared)
    ).replace("'share_images': True", "share_images = true")
    assert all(len(set(j.train_ids)) == len(j.train_ids) >= 6 for j in jobs)
    uses = Counter(i for j in jobs for i in j.train_ids)
    assert set(uses) == set(plan.union(fleet[0].name)) and max(uses.values()) <= 2
    evals = set(plan.eval_ids[fleet[0].task])
    assert len(evals) == 12 and all(len(set(j.test_ids)) == 4 for j in jobs)
    assert set().union(*(j.test_ids for j in jobs)) <= evals


# -- availability traces ---------------------------------------------------------------------------


def _trace(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(body)
    return path


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("device,online\n1,0-2;1.5-3\n", "device 1 has overlapping intervals 0-2 and 1.5-3"),
        ("device,online\n7,0-1\n", "device 7 is not in the population of 5 devices (0..4)"),
        ("device,online\n1,0-1\n1,2-3\n", "device 1 has a second row"),
        ("device,online\n1,2-1\n", "needs 0 <= start < end"),
        ("device,online\n1,x-1\n", "is not START-END in hours"),
        ("dev,hours\n1,0-1\n", "the first row must be the header `device,online`"),
    ],
)
def test_a_bad_trace_is_refused_in_one_line(tmp_path: Path, body: str, says: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError) as e:
        load_trace(_trace(tmp_path, body), population=5)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_trace_is_read_and_repeats_by_whole_days(tmp_path: Path) -> None:
    # Prepare
    path = _trace(tmp_path, "# online while charging\ndevice,online\n0,1-2;20-26\n2,0-24\n")
    model = parse(f"trace:{path}").bind(3)
    devices = np.arange(3)
    # Execute
    at = {h: model.online(devices, h * 3600.0).tolist() for h in (0.5, 1.5, 21, 25, 49.5)}
    # Assert: the period is 48 h (the last end, 26 h, rounded up to whole days)
    assert at == {
        0.5: [False, False, True], 1.5: [True, False, True], 21: [True, False, True],
        25: [True, False, False], 49.5: [True, False, True],
    }  # fmt: skip


def test_diurnal_devices_are_online_their_hours_a_day_spread_over_the_day() -> None:
    # Prepare
    model = parse("diurnal:6")
    devices = np.arange(1000)
    # Execute
    share = [model.online(devices, h * 3600.0).mean() for h in range(24)]
    per_device = np.mean([model.online(devices, h * 3600.0) for h in range(24)], axis=0)
    # Assert
    assert all(0.2 < s < 0.3 for s in share) and set(per_device.round(3)) <= {0.25, 0.292, 0.208}


# -- a population whose unsampled devices hold nothing ---------------------------------------------


def _live(kind: type) -> int:
    gc.collect()
    return sum(type(o) is kind for o in gc.get_objects())


def _population_run(population: int, tmp_path: Path) -> dict[str, int]:
    """Two rounds of 5 devices a round out of ``population``: the most DeviceJobs alive while a
    round's jobs are out, the device directories made, the plan's own fields."""
    spec = FleetSpec(
        fleets=(TaskFleet("synthetic:classes=10,train=20000,test=100,size=8", population),),
        protocol="full", per_round=5, rounds=2, local_epochs=1, eval_images=8,
        test_per_device=2, central=False,
    )  # fmt: skip
    plan = plan_fleet(spec)
    seen: dict[str, int] = {"jobs": 0}

    def train(jobs: Sequence[DeviceJob], states: Sequence[StateDict]) -> list:
        seen["jobs"] = max(seen["jobs"], _live(DeviceJob))
        for j in jobs:  # a device's storage appears when it first runs
            (tmp_path / j.storage).mkdir(parents=True, exist_ok=True)
        return [(DeviceResult(j.device, j.round, "ok", num_examples=len(j.train_ids)), dict(s))
                for j, s in zip(jobs, states, strict=True)]  # fmt: skip

    src = MemorySource(classes=10)
    rounds = make_rounds(plan, train, lambda c, **kw: src, tmp_path)
    records, _ = run_all(rounds)
    dirs = [p for p in tmp_path.rglob("*") if p.is_dir() and p.name.isdigit()]
    return {
        "jobs": seen["jobs"],
        "dirs": len(dirs),
        "device_rows": len(records.devices),
        "plan_containers": sum(
            len(v) for v in vars(plan).values() if isinstance(v, dict | list | tuple)
        ),
    }


def test_memory_is_flat_in_the_population_by_object_counts(tmp_path: Path) -> None:
    # Execute: the same run over 100 and 10,000 devices
    small = _population_run(100, tmp_path / "small")
    large = _population_run(10_000, tmp_path / "large")
    # Assert: no object, directory or plan entry per unsampled device
    assert small == large
    assert large["jobs"] <= 2 * 5 and large["dirs"] <= 10 and large["device_rows"] == 10
