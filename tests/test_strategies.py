"""Per-fleet aggregation by Flower's strategies: names, arguments, wiring (no Ray)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from mist_fed.errors import ConfigError
from mist_fed.fleet import aggregation
from mist_fed.fleet.flower.workarounds import in_runtime, local_identity
from mist_fed.fleet.job import DeviceJob, DeviceResult, StateDict, state_digest
from mist_fed.fleet.rounds import SyncRounds
from mist_fed.fleet.spec import TaskFleet, apply_overrides, spec_from_dict, spec_to_dict
from mist_fed.fleet.worker import run_device
from tests.fakes import MemorySource
from tests.fleets import hand_plan, make_rounds, run_all

MINIMAL = {"fleets": [{"task": "synthetic", "devices": 4}], "profiles": "rpi4"}


# -- names and arguments -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedadam", "FEDPROX", "FedMedian", "krum", "Local"])
def test_strategy_names_are_case_insensitive(name: str) -> None:
    # Execute
    fleet = TaskFleet("synthetic", 5, aggregation=name)
    # Assert
    assert fleet.aggregation in aggregation.names() and fleet.aggregation.lower() == name.lower()


def test_an_unknown_strategy_is_one_line_listing_what_exists() -> None:
    # Execute
    with pytest.raises(ConfigError) as e:
        TaskFleet("synthetic", 4, aggregation="FedFoo")
    # Assert
    msg = str(e.value)
    assert "\n" not in msg and "FedFoo" in msg and "FedAdam" in msg and "local" in msg


def test_strategy_arguments_are_checked_by_name_and_kind() -> None:
    # Execute / Assert: unknown argument names what it takes
    with pytest.raises(ConfigError, match=r"no argument\(s\) etaa.*eta"):
        TaskFleet("synthetic", 4, aggregation="FedAdam", aggregation_args={"etaa": 0.1})
    with pytest.raises(ConfigError, match="must be a number"):
        TaskFleet("synthetic", 4, aggregation="FedAdam", aggregation_args={"eta": "fast"})
    with pytest.raises(ConfigError, match="must be an integer"):
        TaskFleet("synthetic", 7, aggregation="Krum", aggregation_args={"num_malicious_nodes": 1.5})
    # the fleet owns the message layout and evaluation
    with pytest.raises(ConfigError, match="weighted_by_key"):
        TaskFleet("synthetic", 4, aggregation="FedAvg", aggregation_args={"weighted_by_key": "x"})
    # Flower's own checks come back as one line too, when the run builds its aggregators
    trimmed = TaskFleet("synthetic", 4, aggregation="FedTrimmedAvg", aggregation_args={"beta": 0.7})
    with pytest.raises(ConfigError, match="beta"):
        aggregation.build(trimmed.aggregation, trimmed.aggregation_args, trimmed.devices)
    with pytest.raises(ConfigError, match="min_available_nodes = 9"):
        aggregation.build("FedAvg", {"min_available_nodes": 9}, 4)


def test_strategy_and_arguments_round_trip_through_the_spec_toml() -> None:
    # Prepare
    fleets = [{"task": "synthetic", "devices": 4, "aggregation": "fedadam",
               "aggregation_args": {"eta": 0.01, "beta_1": 0.5}}]  # fmt: skip
    # Execute
    spec = spec_from_dict({**MINIMAL, "fleets": fleets})
    again = spec_from_dict(spec_to_dict(spec))
    # Assert
    assert again.fleets[0].aggregation == "FedAdam"
    assert again.fleets[0].aggregation_args == {"eta": 0.01, "beta_1": 0.5}


def test_cli_aggregation_replaces_the_strategy_and_drops_its_old_arguments() -> None:
    # Prepare
    fleets = [{"task": "synthetic", "devices": 4, "aggregation": "FedAdam",
               "aggregation_args": {"eta": 0.01}}]  # fmt: skip
    spec = spec_from_dict({**MINIMAL, "fleets": fleets})
    # Execute
    prox = apply_overrides(spec, aggregation="fedprox", aggregation_args='{"proximal_mu": 0.1}')
    plain = apply_overrides(spec, aggregation="FedMedian")
    # Assert
    assert prox.fleets[0].aggregation == "FedProx"
    assert prox.fleets[0].aggregation_args == {"proximal_mu": 0.1}
    assert plain.fleets[0].aggregation_args == {}
    with pytest.raises(ConfigError, match="JSON object"):
        apply_overrides(spec, aggregation_args="[1]")


def test_every_supported_strategy_builds_for_a_small_fleet() -> None:
    # Execute: the synchronous ones (FedBuff and FedAsync: tests/test_async_rounds.py)
    names = [n for n in aggregation.names() if not aggregation.is_async(n)]
    built: dict[str, Any] = {name: aggregation.build(name, {}, 7) for name in names}
    asynchronous = {type(aggregation.build_async(n, {}, 7)).__name__
                    for n in aggregation.names() if aggregation.is_async(n)}  # fmt: skip
    # Assert
    assert asynchronous == {"FedBuff", "FedAsync"}
    assert built.pop("local") is None
    assert all(type(s.strategy).__name__ == name for name, s in built.items())
    assert all(getattr(s.strategy, "fraction_evaluate", 0.0) == 0.0 for s in built.values())


# -- the workaround kept in fleet/flower/workarounds.py ------------------------------------------------------


def test_flower_still_needs_a_run_identity_to_build_a_message() -> None:
    """Fails the day Flower builds Messages outside its runtimes; then drop local_identity."""
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    # An in-process simulation earlier in this session leaves its identity set: clear it here.
    names = ("run_id", "node_id", "task_id")
    saved = {n: _identity(TaskIdentity, n) for n in names}
    for n in names:
        setattr(TaskIdentity, n, None)
    try:
        assert not in_runtime()
        with pytest.raises(RuntimeError, match="run_id"):
            Message(content=RecordDict(), dst_node_id=1, message_type="train")
        with local_identity():
            msg = Message(RecordDict(), dst_node_id=1, message_type="train")
            assert msg.metadata.dst_node_id == 1
        assert not in_runtime()  # restored
    finally:
        for n, v in saved.items():
            setattr(TaskIdentity, n, v)


def _identity(cls: Any, name: str) -> Any:
    try:
        return getattr(cls, name)
    except RuntimeError:  # unset
        return None


# -- wiring through the round loop ---------------------------------------------------------------


def _rounds(
    spec: Any, src: MemorySource, tmp_path: Path, train: Any, stub: bool = True
) -> SyncRounds:
    return make_rounds(hand_plan(spec), train, lambda c, **kw: src, tmp_path, stub=stub)


def test_fedavg_weights_each_device_by_its_num_examples(tmp_path: Path) -> None:
    # Prepare: three devices reply constant weights with different example counts
    spec = spec_from_dict({**MINIMAL, "fleets": [{"task": "synthetic", "devices": 3}], "rounds": 1})
    replies: list[tuple[float, int]] = []

    def train(jobs: Sequence[DeviceJob], states: Sequence[StateDict]) -> list:
        out = []
        for j, s in zip(jobs, states, strict=True):
            value, n = float(j.device + 1), 10 * (j.device + 1) ** 2
            replies.append((value, n))
            res = DeviceResult(j.device, j.round, "ok", num_examples=n)
            out.append((res, {k: torch.full_like(v, value) for k, v in s.items()}))
        return out

    # Execute
    rec, state = run_all(_rounds(spec, MemorySource(), tmp_path, train))
    # Assert: the example-weighted mean of the captured replies, not their plain mean
    want = sum(v * n for v, n in replies) / sum(n for _, n in replies)
    got = next(iter(state.global_state[spec.fleets[0].name].values()))
    assert torch.allclose(got, torch.full_like(got, want)) and abs(want - 2.0) > 0.1
    assert rec.fleets[0]["accuracy"] == pytest.approx(want, rel=1e-5)


def test_the_strategy_samples_the_round_repeatably_and_the_reference_matches_the_share(
    tmp_path: Path,
) -> None:
    # Prepare: half the fleet trains each round
    fleets = [{"task": "synthetic", "devices": 4, "aggregation_args": {"fraction_train": 0.5}}]
    spec = spec_from_dict({**MINIMAL, "fleets": fleets, "rounds": 4, "local_epochs": 2})
    picked: list[list[int]] = []

    def train(jobs: Sequence[DeviceJob], states: Sequence[StateDict]) -> list:
        picked.append([j.device for j in jobs])
        return [(DeviceResult(j.device, j.round, "ok", num_examples=6), dict(s))
                for j, s in zip(jobs, states, strict=True)]  # fmt: skip

    rounds = _rounds(spec, MemorySource(), tmp_path, train)
    # Execute
    _, state = run_all(rounds)
    name = spec.fleets[0].name
    again = [rounds.sample(name, r, state.global_state[name])[0] for r in range(1, 5)]
    # Assert
    assert all(len(p) == 2 for p in picked) and len({tuple(p) for p in picked}) > 1
    assert picked == [[d.device for d in ds] for ds in again]
    assert rounds.scorer.centrals == [4]  # type: ignore[attr-defined]  # 4 rounds x 2 epochs x half


def test_fleets_on_the_same_images_share_one_central_reference(tmp_path: Path) -> None:
    # Prepare: FedAvg and FedAvgM on the same devices' data; a linear fleet beside them
    fleets = [{"task": "synthetic", "devices": 3, "name": "avg"},
              {"task": "synthetic", "devices": 3, "name": "avgm", "aggregation": "FedAvgM"},
              {"task": "synthetic", "devices": 3, "name": "lin", "method": "linear"}]  # fmt: skip
    spec = spec_from_dict({**MINIMAL, "fleets": fleets, "rounds": 2})
    rounds = _rounds(spec, MemorySource(), tmp_path, lambda jobs, states: [])
    # Execute
    state = rounds.start()
    # Assert: trained twice (the linear fleet's net differs), the same result for both
    assert len(rounds.scorer.centrals) == 2  # type: ignore[attr-defined]
    assert state.central["avg"] is state.central["avgm"]
    assert state.central["lin"] is not state.central["avg"]


def test_fedprox_mu_reaches_the_device_and_changes_its_loss(tmp_path: Path) -> None:
    # Prepare
    fleets = [{"task": "synthetic", "devices": 2, "aggregation": "FedProx",
               "aggregation_args": {"proximal_mu": 5.0}}]  # fmt: skip
    spec = spec_from_dict({**MINIMAL, "fleets": fleets, "rounds": 1, "batch_size": 4})
    src = MemorySource()
    jobs: list[DeviceJob] = []
    starts: list[StateDict] = []

    def train(js: Sequence[DeviceJob], states: Sequence[StateDict]) -> list:
        jobs.extend(js)
        starts.extend({k: v.clone() for k, v in s.items()} for s in states)
        return [
            run_device(j, s, lambda c, **kw: src, tmp_path) for j, s in zip(js, states, strict=True)
        ]

    run_all(_rounds(spec, src, tmp_path, train))
    job, start = jobs[0], starts[0]
    # Execute: the same job with and without the proximal term
    free, w_free = run_device(_with(job, 0.0, "free/0"), start, lambda c, **kw: src, tmp_path)
    prox, w_prox = run_device(_with(job, 50.0, "prox/0"), start, lambda c, **kw: src, tmp_path)
    # Assert
    assert job.proximal_mu == 5.0
    assert free.status == prox.status == "ok" and prox.train_loss > free.train_loss
    assert w_free is not None and w_prox is not None
    assert _dist(w_prox, start) < _dist(w_free, start)


def _with(job: DeviceJob, mu: float, storage: str) -> DeviceJob:
    import dataclasses

    return dataclasses.replace(job, proximal_mu=mu, storage=storage, epochs=3)


def _dist(a: StateDict, b: StateDict) -> float:
    return float(
        sum((a[k].float() - b[k].float()).pow(2).sum() for k in b if b[k].is_floating_point())
    )


def _poisoned_fleet(aggregation: str, tmp_path: Path, poison: bool, seed: int = 0) -> float:
    """Accuracy of a 7-device fleet's global model after 2 rounds; device 0 sends noise."""
    args = {"num_malicious_nodes": 1} if aggregation in ("Krum", "Bulyan") else {}
    fleets = [{"task": "synthetic", "devices": 7, "aggregation": aggregation,
               "aggregation_args": args, "method": "linear"}]  # fmt: skip
    spec = spec_from_dict({**MINIMAL, "fleets": fleets, "rounds": 4, "batch_size": 4,
                           "lr": 0.05, "local_epochs": 3, "eval_images": 16})  # fmt: skip
    src = MemorySource(rows={"train": 48, "val": 24, "test": 16}, seed=seed)

    def train(jobs: Sequence[DeviceJob], states: Sequence[StateDict]) -> list:
        out = [
            run_device(j, s, lambda c, **kw: src, tmp_path)
            for j, s in zip(jobs, states, strict=True)
        ]
        if poison:
            gen = torch.Generator().manual_seed(0)
            res, st = out[0]
            assert st is not None
            out[0] = (
                res,
                {k: v + 100 * torch.randn(v.shape, generator=gen) for k, v in st.items()},
            )
        return out

    rec, _ = run_all(_plan_rounds(spec, src, tmp_path, train))
    return float(rec.fleets[-1]["accuracy"])


def _plan_rounds(spec: Any, src: MemorySource, tmp_path: Path, train: Any) -> SyncRounds:
    """The real scorer on the 16 test images every device also holds a share of."""
    plan = hand_plan(spec, eval_ids=[f"test-{i}" for i in range(16)])
    return make_rounds(plan, train, lambda c, **kw: src, tmp_path, stub=False)


def test_krum_and_bulyan_keep_a_poisoned_device_out_where_fedavg_does_not(tmp_path: Path) -> None:
    # Execute: 7 devices, one assumed malicious (Bulyan needs n >= 4f + 3), device 0 poisoned
    clean = _poisoned_fleet("FedAvg", tmp_path / "clean", poison=False)
    krum = _poisoned_fleet("Krum", tmp_path / "krum", poison=True)
    bulyan = _poisoned_fleet("Bulyan", tmp_path / "bulyan", poison=True)
    fedavg = _poisoned_fleet("FedAvg", tmp_path / "fedavg", poison=True)
    # Assert: Krum keeps one device's model, so it may miss a few of the 16 test images the
    # clean average gets (up to 3 over data seeds 0-11); Bulyan's trimmed mean of Krum-selected
    # models stays near the clean average too; the poisoned plain average loses most of them
    assert clean > 0.8
    assert krum >= clean - 0.2
    assert bulyan >= clean - 0.2
    assert fedavg < clean - 0.5


@pytest.mark.parametrize("name", [n for n in aggregation.names() if not aggregation.is_async(n)])
def test_a_small_fleet_runs_on_each_strategy_and_records_it(name: str, tmp_path: Path) -> None:
    # Prepare: 7 devices (Krum's family needs n > 2f + 2; Bulyan n >= 4f + 3), a linear head,
    # two rounds
    from mist_fed.report.results import write_run

    args = {"proximal_mu": 0.1} if name == "FedProx" else {}
    args = {"num_malicious_nodes": 1} if name == "Bulyan" else args
    fleets = [{"task": "synthetic", "devices": 7, "aggregation": name, "method": "linear",
               "aggregation_args": args}]  # fmt: skip
    spec = spec_from_dict({**MINIMAL, "fleets": fleets, "rounds": 2, "batch_size": 4,
                           "lr": 0.05, "eval_images": 16})  # fmt: skip
    src = MemorySource(rows={"train": 48, "val": 24, "test": 16})

    def train(jobs: Sequence[DeviceJob], states: Sequence[StateDict]) -> list:
        return [
            run_device(j, s, lambda c, **kw: src, tmp_path)
            for j, s in zip(jobs, states, strict=True)
        ]

    rounds = _plan_rounds(spec, src, tmp_path, train)
    state = rounds.start()
    before = state_digest(state.global_state[spec.fleets[0].name])
    # Execute
    rec = rounds.run(state)
    paths = write_run(tmp_path / "run", spec_to_dict(spec), rec.devices, rec.fleets, {})
    # Assert: every round aggregated (the strategy returned a new global model each time)
    assert [r["round"] for r in rec.fleets] == [1, 2]
    assert all(r["ok"] == 7 and 0 <= r["accuracy"] <= 1 for r in rec.fleets)
    digests = {d["received_digest"] for d in rec.devices if d["round"] == 2}
    after = state_digest(state.global_state[spec.fleets[0].name])
    if name == "local":  # each device goes on from its own model
        assert len(digests) == 7 and before not in digests
    else:
        assert len(digests) == 1 and before not in digests and after not in digests | {before}
    config = paths["config"].read_text()
    assert f'aggregation = "{name}"' in config
    assert ("proximal_mu = 0.1" in config) == (name == "FedProx")
    assert ("num_malicious_nodes = 1" in config) == (name == "Bulyan")


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--aggregation", "FedFoo"], "unknown aggregation 'FedFoo'; choose one of FedAvg"),
        (["--aggregation", "FedAdam", "--aggregation-args", '{"etaa": 1}'], "takes beta_1"),
        (["--aggregation-args", "{eta"], "must be a JSON object"),
    ],
)
def test_the_cli_refuses_a_bad_strategy_in_one_line(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: refused while the spec loads, before any cloud or Ray starts
    from mist_fed.cli import main

    code = main(["simulate", "--no-progress", *flags])
    # Assert
    err = capsys.readouterr().err.strip()
    assert code == 2 and says in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("name", ["FedAvg", "FedAvgM", "FedProx", "Krum"])
def test_per_round_samples_through_the_strategy_among_the_available_only(name: str) -> None:
    # Prepare: 100 devices, 40 of them online; a strategy that would wait for 60 nodes
    agg = aggregation.build(name, {"min_available_nodes": 60, "min_train_nodes": 2}, 100)
    online = list(range(0, 100, 5)) + list(range(1, 100, 5))
    state = {"w": torch.zeros(2)}
    # Execute
    picks = [agg.sample(r, state, online, seed=r, wanted=5)[0] for r in (1, 2)]
    again = agg.sample(1, state, online, seed=1, wanted=5)[0]
    few = agg.sample(3, state, [7, 9], seed=3, wanted=5)[0]
    every = agg.sample(4, state, online, seed=4)[0]  # no per_round: the strategy's own count
    none = agg.sample(5, state, [], seed=5, wanted=5)[0]
    # Assert: exactly 5, all online, repeatable, different across rounds; never waits
    assert all(len(p) == 5 and set(p) <= set(online) for p in picks)
    assert again == picks[0] != picks[1]
    assert sorted(few) == [7, 9] and len(every) == 40 and none == []
    strategy = agg.strategy  # type: ignore[attr-defined]
    assert (strategy.min_available_nodes, strategy.min_train_nodes) == (60, 2)
    assert strategy.fraction_train == 1.0  # the strategy's own values, restored


def test_per_round_and_a_fraction_train_are_not_given_together() -> None:
    fleets = [{"task": "synthetic", "devices": 4, "aggregation_args": {"fraction_train": 0.5}}]
    with pytest.raises(ConfigError, match="give per_round or aggregation_args fraction_train"):
        spec_from_dict({**MINIMAL, "fleets": fleets, "per_round": 2})
