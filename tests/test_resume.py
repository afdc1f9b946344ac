"""Resume, its parts: the checkpoint's plain-data codec, the Flower strategies' state, the file
(atomic, damaged or mismatched ones refused in one line) and the round loop going on from a
checkpoint. No servers: a hand-made plan, a plain training function, a stub scorer."""

from __future__ import annotations

import argparse
import copy
import io
import math
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mist_fed.errors import ConfigError
from mist_fed.fleet import aggregation
from mist_fed.fleet.aggregation import Update
from mist_fed.fleet.flower.strategies import RUN_STATE, STRATEGIES, FlowerAggregator
from mist_fed.fleet.job import OK, DeviceJob, DeviceResult, StateDict
from mist_fed.fleet.rounds import RoundState, RunRecords
from mist_fed.fleet.runtime import resume as ckpt
from mist_fed.fleet.scoring import CentralResult, FleetClock
from mist_fed.fleet.spec import spec_from_dict
from mist_fed.fleet.state import from_plain, snapshot, to_plain
from tests.fakes import MemorySource
from tests.fleets import hand_plan, make_rounds

ARGS = {
    "FedAvgM": {"server_momentum": 0.9},
    "Krum": {"num_malicious_nodes": 1},
    "MultiKrum": {"num_malicious_nodes": 1, "num_nodes_to_select": 3},
    "Bulyan": {"num_malicious_nodes": 1},
    "FedTrimmedAvg": {"beta": 0.2},
}
DEVICES = 7  # enough for Bulyan with one malicious node (n >= 4f + 3)


def _model(seed: int) -> StateDict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def _round(agg: FlowerAggregator, rnd: int, current: StateDict) -> StateDict:
    """One round of ``agg`` over made-up updates that depend on the round only."""
    chosen, _ = agg.sample(rnd, current, list(range(DEVICES)), seed=rnd)
    updates = []
    for d in chosen:
        step = _model(100 * rnd + d)
        updates.append(Update(d, {k: current[k] + 0.1 * step[k] for k in current}, 5 + d))
    new = agg.aggregate(rnd, current, updates)
    assert new is not None
    return new


def _through_a_file(x: object) -> object:
    """``x`` as a checkpoint stores it: plain data, saved, loaded weights-only, decoded."""
    buf = io.BytesIO()
    torch.save(to_plain(x), buf)
    buf.seek(0)
    return from_plain(torch.load(buf, weights_only=True))


# -- the codec -------------------------------------------------------------------------------


def test_round_state_comes_back_equal_through_a_weights_only_file() -> None:
    # Prepare: every kind of value the rounds keep
    records = RunRecords(
        devices=[{"round": 1, "device": 0, "accuracy": 0.5, "reason": "", "node": "h"}],
        fleets=[{"round": 1, "fleet": "a", "accuracy": math.nan, "sampled": np.int64(3)}],
    )
    state = RoundState(
        round=2, global_state={"a": _model(0)}, device_state={3: _model(1)},
        clocks={"a": FleetClock(12.5, 0.25, 48)},
        central={"a": CentralResult(0.75, 96, 4, 24, 1.5)}, records=records,
    )  # fmt: skip
    # Execute
    back = _through_a_file(state)
    # Assert
    assert isinstance(back, RoundState) and back.round == 2
    assert torch.equal(back.global_state["a"]["w"], state.global_state["a"]["w"])
    assert torch.equal(back.device_state[3]["b"], state.device_state[3]["b"])
    assert back.clocks["a"] == FleetClock(12.5, 0.25, 48)
    assert back.central["a"] == CentralResult(0.75, 96, 4, 24, 1.5)
    assert back.records.devices == records.devices
    assert math.isnan(back.records.fleets[0]["accuracy"]) and back.records.fleets[0]["sampled"] == 3


def test_numpy_arrays_and_tuples_come_back_with_their_dtype_shape_and_kind() -> None:
    # Prepare
    x = {"m": np.arange(6, dtype=np.float32).reshape(2, 3), "e": np.zeros(0, np.int64),
         "t": (1, "a", None), "l": [np.uint32(7)]}  # fmt: skip
    # Execute
    back = _through_a_file(x)
    # Assert
    assert isinstance(back, dict)
    assert back["m"].dtype == np.float32 and back["m"].shape == (2, 3)
    assert np.array_equal(back["m"], x["m"]) and back["m"].flags.writeable
    assert back["e"].shape == (0,) and back["e"].dtype == np.int64
    assert back["t"] == (1, "a", None) and back["l"] == [7]


def test_state_of_another_version_of_a_class_is_refused_in_one_line() -> None:
    # Prepare: a FleetClock as a version with another field would have saved it
    plain = to_plain(FleetClock(1.0, 0.5, 3))
    plain["battery"] = 0.5
    # Execute / Assert
    with pytest.raises(ConfigError, match="FleetClock does not fit") as e:
        from_plain(plain)
    assert "\n" not in str(e.value)


def test_an_unregistered_class_is_refused_in_one_line() -> None:
    class Opaque:
        pass

    # Execute / Assert
    with pytest.raises(ConfigError, match="not plain data") as e:
        to_plain({"x": Opaque()})
    assert "\n" not in str(e.value)


# -- Flower strategies' state ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_strategy_changes_nothing_but_its_run_state_as_rounds_run(name: str) -> None:
    # Prepare
    fresh = aggregation.build(name, ARGS.get(name, {}), DEVICES)
    used = aggregation.build(name, ARGS.get(name, {}), DEVICES)
    assert isinstance(fresh, FlowerAggregator) and isinstance(used, FlowerAggregator)
    # Execute: two rounds
    current = _model(0)
    for rnd in (1, 2):
        current = _round(used, rnd, current)
    # Assert: whatever Flower changed is an attribute the checkpoint saves
    before, after = vars(fresh.strategy), vars(used.strategy)
    changed = {k for k in after if k not in before or not _same(before[k], after[k])}
    assert changed <= set(RUN_STATE), f"{name} changed {changed - set(RUN_STATE)}"
    assert set(before) == set(after)


def _same(a: object, b: object) -> bool:
    try:
        return pickle.dumps(a) == pickle.dumps(b)
    except Exception:
        return a is b


@pytest.mark.parametrize("name", ["FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "FedAvg"])
def test_a_restored_strategy_aggregates_as_the_one_that_never_stopped(name: str) -> None:
    # Prepare: two rounds, then the state through a checkpoint file into a new strategy
    args = ARGS.get(name, {})
    going = aggregation.build(name, args, DEVICES)
    assert isinstance(going, FlowerAggregator)
    current = _model(0)
    for rnd in (1, 2):
        current = _round(going, rnd, current)
    saved = _through_a_file(going.state_dict())
    restored = aggregation.build(name, args, DEVICES)
    assert isinstance(restored, FlowerAggregator)
    restored.load_state_dict(saved)  # type: ignore[arg-type]
    lost = aggregation.build(name, args, DEVICES)  # a resume that forgot the state
    assert isinstance(lost, FlowerAggregator)
    # Execute: round 3 on each
    a = _round(going, 3, {k: v.clone() for k, v in current.items()})
    b = _round(restored, 3, {k: v.clone() for k, v in current.items()})
    c = _round(lost, 3, {k: v.clone() for k, v in current.items()})
    # Assert: equal to the bit; and where there is state, forgetting it would show
    assert all(torch.equal(a[k], b[k]) for k in a)
    if name != "FedAvg":
        assert going.state_dict() and not all(torch.equal(a[k], c[k]) for k in a)
    else:
        assert going.state_dict() == {}


def test_state_for_another_strategy_is_refused() -> None:
    # Prepare
    avg = aggregation.build("FedAvg", {}, DEVICES)
    assert isinstance(avg, FlowerAggregator)
    # Execute / Assert
    with pytest.raises(ConfigError, match="momentum_vector for FedAvg"):
        avg.load_state_dict({"momentum_vector": [np.zeros(3)]})


# -- the file --------------------------------------------------------------------------------

SPEC = spec_from_dict({
    "fleets": [{"task": "synthetic:classes=3,train=40,test=12", "devices": 3,
                "aggregation": "FedAvgM", "aggregation_args": {"server_momentum": 0.9}}],
    "profiles": "laptop", "rounds": 4, "train_per_device": 6, "test_per_device": 2,
    "local_epochs": 1, "batch_size": 4, "seed": 5,
})  # fmt: skip


def _checkpoint(round_: int = 1) -> ckpt.Checkpoint:
    state = RoundState(round=round_, global_state={"f": _model(round_)})
    return ckpt.Checkpoint("run-a", round_, ckpt.spec_digest(SPEC), "run-x",
                           snapshot(state, {}), {"wall_s": 1.5})  # fmt: skip


def test_a_checkpoint_is_replaced_atomically_and_read_back(tmp_path: Path) -> None:
    # Prepare
    stages: list[str] = []
    ckpt.save(tmp_path, _checkpoint(1))
    # Execute
    ckpt.save(tmp_path, _checkpoint(2), hook=stages.append)
    back = ckpt.load(tmp_path)
    # Assert
    assert stages == ["before", "during", "after"]
    assert back.round == 2 and back.storage == "run-x" and back.facts == {"wall_s": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.CHECKPOINT]
    back.check_spec(SPEC)


class Killed(BaseException):
    """A kill -9 as a hook can make one: nothing after it runs, no clean-up."""


def test_a_write_killed_midway_leaves_the_last_checkpoint(tmp_path: Path) -> None:
    # Prepare
    ckpt.save(tmp_path, _checkpoint(1))

    def kill(stage: str) -> None:
        if stage == "during":
            raise Killed

    # Execute
    with pytest.raises(Killed):
        ckpt.save(tmp_path, _checkpoint(2), hook=kill)
    leftovers = [p.name for p in tmp_path.glob(".*.tmp")]
    back = ckpt.load(tmp_path)
    ckpt.clear_torn(tmp_path)  # as a resume does
    # Assert: round 1's, whole; the torn temporary file is gone once cleared
    assert len(leftovers) == 1 and back.round == 1
    assert list(tmp_path.glob(".*.tmp")) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path: Path, damage: str) -> None:
    # Prepare
    path = ckpt.save(tmp_path, _checkpoint(1))
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) - 100]
    else:
        raw = raw[raw.index(b"\n") + 1 :]
    path.write_bytes(bytes(raw))
    # Execute / Assert
    with pytest.raises(ConfigError, match="is damaged") as e:
        ckpt.load(tmp_path)
    assert "\n" not in str(e.value)


def test_a_pickle_that_would_run_code_is_never_unpickled(tmp_path: Path, pickle_bomb) -> None:
    # Prepare: a well-formed header with the right digest over a pickle that runs code
    data = pickle.dumps({"state": pickle_bomb()})
    buf = io.BytesIO()
    torch.save({"x": 1}, buf)  # a zip torch can open, whose data.pkl we replace
    import hashlib
    import zipfile

    zbuf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(zbuf, "w") as dst:
        for item in src.infolist():
            body = data if item.filename.endswith("data.pkl") else src.read(item.filename)
            dst.writestr(item, body)
    payload = zbuf.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    header = f"mist-fed checkpoint {ckpt.FORMAT} sha256={digest} bytes={len(payload)}\n"
    (tmp_path / ckpt.CHECKPOINT).write_bytes(header.encode() + payload)
    # Execute / Assert
    with pytest.raises(ConfigError, match="damaged"):
        ckpt.load(tmp_path)
    assert pickle_bomb.ran is False


def test_another_format_schema_or_spec_is_refused(tmp_path: Path, monkeypatch) -> None:
    # Prepare
    ckpt.save(tmp_path, _checkpoint(1))
    other = spec_from_dict({**_spec_dict(), "lr": 0.5})
    # Execute / Assert: another spec
    with pytest.raises(ConfigError, match="another fleet spec"):
        ckpt.load(tmp_path).check_spec(other)
    # another layout of the results tables
    monkeypatch.setattr(ckpt, "schema_id", lambda: "2-000000000000")
    with pytest.raises(ConfigError, match="results layout"):
        ckpt.load(tmp_path)
    monkeypatch.undo()
    # another checkpoint format
    monkeypatch.setattr(ckpt, "FORMAT", 2)
    with pytest.raises(ConfigError, match="has format 1"):
        ckpt.load(tmp_path)


def _spec_dict() -> dict:
    from mist_fed.fleet.spec import spec_to_dict

    return copy.deepcopy(spec_to_dict(SPEC))


def test_resume_takes_no_fleet_flags() -> None:
    # Prepare
    from mist_fed.commands.simulate import DEFAULT_FLEET, resume_spec

    args = argparse.Namespace(fleet=str(DEFAULT_FLEET), rounds=10, lr=None, resume="r",
                              results="results")  # fmt: skip
    # Execute / Assert
    with pytest.raises(ConfigError, match="leave out --rounds"):
        resume_spec(args)


def test_a_run_that_completed_or_never_was_is_refused(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "config.toml").write_text('rounds = 2\n[run]\nengine = "plain"\n')
    # Execute / Assert
    with pytest.raises(ConfigError, match="completed all its rounds"):
        ckpt.open_run(tmp_path, "done")
    with pytest.raises(ConfigError, match="no run 'nope'"):
        ckpt.open_run(tmp_path, "nope")


# -- the round loop going on from a checkpoint -----------------------------------------------


def _train(jobs: Sequence[DeviceJob], states: Sequence[StateDict]) -> list:
    """A device's 'training': a step that depends on its device, round and seed only."""
    out = []
    for job, st in zip(jobs, states, strict=True):
        g = torch.Generator().manual_seed(job.seed * 1000 + job.device * 10 + job.round)
        new = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in st.items()}
        out.append((DeviceResult(job.device, job.round, OK, num_examples=6), new))
    return out


@pytest.mark.parametrize("after", [1, 2, 3, 4])
def test_rounds_resumed_from_any_round_match_the_rounds_that_never_stopped(
    tmp_path: Path, after: int
) -> None:
    # Prepare: FedAvgM with momentum; a third of the devices sampled each round
    spec = spec_from_dict({**_spec_dict(), "fleets": [{
        **_spec_dict()["fleets"][0], "devices": 6,
        "aggregation_args": {"server_momentum": 0.9, "fraction_train": 0.5}}]})  # fmt: skip
    plan = hand_plan(spec)
    src = MemorySource()
    source = lambda c, **kw: src  # noqa: E731
    saved: list[dict] = []
    whole = make_rounds(plan, _train, source, tmp_path / "a",
                        on_round=lambda s: saved.append(snapshot(s, whole.providers)))  # fmt: skip
    full = whole.run(whole.start())
    # Execute: a new loop (new strategies) from the checkpoint after round ``after``
    again = make_rounds(plan, _train, source, tmp_path / "b")
    state = again.resume(_through_a_file(saved[after - 1]))  # type: ignore[arg-type]
    resumed = again.run(state)
    # Assert: the same models, samples and rows as the run that never stopped
    assert state.round == spec.rounds
    assert pd.DataFrame(resumed.fleets).equals(pd.DataFrame(full.fleets))  # NaN == NaN
    assert [(r["device"], r["round"], r["received_digest"]) for r in resumed.devices] == [
        (r["device"], r["round"], r["received_digest"]) for r in full.devices
    ]
    name = plan.spec.fleets[0].name
    a, b = resumed.final_states[name], full.final_states[name]
    assert all(torch.equal(a[k], b[k]) for k in a)
