"""The paper-table comparison: every row one EdgeDevice job, through the real pipeline or a fake."""

from __future__ import annotations

import dataclasses
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.runner import running_cloud
from mist_fed.commands.compare import config_from_args, parser, resumed_rows
from mist_fed.core.cost import edge_cost
from mist_fed.core.methods import METHODS
from mist_fed.data import get_task
from mist_fed.data.tasks import Task
from mist_fed.device.metrics import DeviceMetrics
from mist_fed.device.profiles import load_profile
from mist_fed.errors import ConfigError
from mist_fed.experiments.compare import (
    CompareConfig,
    Comparison,
    Variant,
    default_variants,
    few_shot_ids,
    run_compare,
)
from mist_fed.experiments.rows import RowResult
from mist_fed.report.comparison import (
    COMPARE_COLUMNS,
    accuracy_vs_bytes_figure,
    aggregate,
    choose_wire,
    markdown_table,
    paired_differences,
    pareto_front,
    write_compare,
)
from mist_fed.wire.flight import FeatureClient
from tests.conftest import TINY_VIT
from tests.fakes import GEOMETRY, MemorySource

TASK = "synthetic:classes=3,train=12,val=6,test=9"
METRICS = set(DeviceMetrics().as_dict())


def _cfg(tmp_path, **kw):
    base = dict(
        tasks=(TASK,),
        backbone="vit_tiny_patch16_224",
        backbone_kwargs=dict(TINY_VIT),
        random_init=True,
        epochs=1,
        cache_dir=str(tmp_path / "store"),
        device_dir=str(tmp_path / "device"),
        profile="rpi4",
    )
    return CompareConfig(**{**base, **kw})


# -- the fast lane: MemorySource, no server, no backbone ---------------------------------------


class _Split:
    """A task split whose ids and labels are MemorySource's (``"{split}-{i}"``, ``i % 3``)."""

    def __init__(self, name: str, n: int) -> None:
        self.ids = [f"{name}-{i}" for i in range(n)]
        self.labels = [i % 3 for i in range(n)]

    def image(self, i: int):
        raise NotImplementedError("features come from MemorySource")

    def __len__(self) -> int:
        return len(self.ids)


ROWS = {"train": 48, "val": 24, "test": 30}
FAKE_TASK = Task("fake", 3, {s: _Split(s, n) for s, n in ROWS.items()})


def _fake(tmp_path, source, **kw):
    cfg = _cfg(tmp_path, **{"epochs": 3, **kw})
    return Comparison(
        cfg,
        FAKE_TASK,
        "fake",
        GEOMETRY.num_blocks,
        source,
        load_profile("rpi4"),
        lambda m, k: 1000 + (k or 0),
    )


FAST_VARIANTS = (
    Variant("linear", "linear"),
    Variant("mist", "mist", k="select"),
    Variant("mist k=N/3", "mist", k=0, group="k"),
    Variant("mist", "mist", dtype="int8", k="mist", group="wire"),
)


def test_every_row_is_one_device_job_with_the_devices_metrics(tmp_path):
    # Prepare: a comparison whose device pulls from an in-memory cloud
    source = MemorySource()
    cmp = _fake(tmp_path, source)
    # Execute
    rows = [r.as_dict() for r in cmp.run_seed(FAST_VARIANTS, seed=0)]
    # Assert: one row per variant, carrying every DeviceMetrics column
    assert [(r["label"], r["wire_dtype"]) for r in rows] == [
        (v.label, v.dtype) for v in FAST_VARIANTS
    ]
    for r in rows:
        assert set(r) >= METRICS and r["profile"] == "rpi4"
        assert 0 <= r["accuracy"] <= 1 and r["train_steps"] > 0
        assert r["compute_s"] > 0 and r["host_compute_s"] > 0 and r["peak_mem_mb"] >= 0
        # a fresh device paid for its three splits: bytes per image is what it downloaded
        assert r["images_down"] == sum(ROWS.values())
        assert r["bytes_per_image"] == pytest.approx(r["feature_bytes"] / r["images_down"])
        # edge params and MACs are those of the net the device trained
        cost = edge_cost(r["method"], GEOMETRY, 3, r["k"])
        assert (r["edge_params"], r["edge_macs"]) == (cost.edge_params, cost.edge_macs)
        assert r["cloud_macs"] == 1000 + (r["k"] or 0)
    by = {(r["label"], r["wire_dtype"]): r for r in rows}
    assert by["linear", "float32"]["k"] is None
    assert by["mist k=N/3", "float32"]["k"] == 1
    # int8 streams a quarter of the bytes (plus a scale per token)
    assert by["mist", "int8"]["bytes_per_image"] < 0.5 * by["mist", "float32"]["bytes_per_image"]


def test_mist_is_the_k_best_on_val_and_each_k_trains_once(tmp_path):
    # Prepare
    source = MemorySource()
    cmp = _fake(tmp_path, source)
    # Execute
    rows = list(cmp.run_seed(FAST_VARIANTS[1:], seed=0))
    # Assert: the mist row is the candidate best on val (ties: smaller k); the int8 row runs
    # at that k; the k=N/3 row reuses the selection's fit (each (method, dtype, k) trains once)
    mist, k1, int8 = rows
    assert mist.k in (1, 2, 3) and int8.k == mist.k
    fp32_trains = [s for s in source.streams if s[1] == "train" and s[3] == "float32"]
    assert sorted(s[2].k for s in fp32_trains) == [1, 2, 3]
    assert k1.k == 1
    if mist.k == 1:
        assert k1.accuracy == mist.accuracy and k1.device is mist.device


def test_a_rerun_on_the_same_device_dir_downloads_nothing(tmp_path):
    # Prepare: a first run fills the device's cache
    (first,) = _fake(tmp_path, MemorySource()).run_seed(FAST_VARIANTS[:1], seed=0)
    # Execute: a new comparison (a rerun or --resume) with the same device directory
    source = MemorySource()
    (again,) = _fake(tmp_path, source).run_seed(FAST_VARIANTS[:1], seed=0)
    # Assert: nothing streamed, nothing paid; the row's bytes per image still the wire's
    assert source.streams == [] and source.bytes_received == 0
    assert again.device.feature_bytes == 0 and again.device.images_down == 0
    assert again.bytes_per_image == first.bytes_per_image
    assert again.device.edge_params == first.device.edge_params > 0


def test_limits_and_few_shot_ask_for_the_rows_they_use(tmp_path):
    # Prepare: the first 10 test images, and a 2-shot train set
    source = MemorySource()
    cmp = _fake(tmp_path, source, limits={"test": 10, "val": 100})
    # Execute
    (row,) = cmp.run_seed(FAST_VARIANTS[:1], seed=0, shots=2)
    # Assert: 2 per class for train, all val (the limit exceeds it), 10 test rows
    assert row.shots == 2 and row.device.images_down == 3 * 2 + ROWS["val"] + 10
    assert cmp.ids["val"] is None and cmp.ids["test"] == [f"test-{i}" for i in range(10)]


def test_a_planning_comparison_cannot_train(tmp_path):
    cmp = Comparison(_cfg(tmp_path), FAKE_TASK, "fake", GEOMETRY.num_blocks)
    with pytest.raises(ConfigError, match="feature source"):
        list(cmp.run_seed(FAST_VARIANTS[:1], seed=0))


# -- through the real cloud and wire (a tiny random ViT) ------------------------------------------


@pytest.fixture(scope="module")
def table_rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    cfg = _cfg(tmp, seeds=2)
    rows = [r.as_dict() for r in run_compare(cfg)]
    return cfg, rows


@pytest.mark.slow
@pytest.mark.network
def test_every_method_and_wire_has_a_row_per_seed(table_rows):
    # Prepare / Execute: the module fixture ran every default variant for 2 seeds
    _, rows = table_rows
    df = pd.DataFrame(rows)
    # Assert: every method of the registry appears, each variant once per seed
    assert set(METHODS) <= set(df["method"])
    variants = {(v.label, v.dtype) for v in default_variants()}
    assert set(zip(df["label"], df["wire_dtype"], strict=True)) == variants
    assert (df.groupby(["label", "wire_dtype"])["seed"].nunique() == 2).all()
    assert df["accuracy"].between(0, 1).all()
    assert (df["peak_mem_mb"] >= 0).all() and (df["compute_s"] > 0).all()
    assert (df["edge_params"] > 0).all() and (df["cloud_macs"] > 0).all()


@pytest.mark.slow
@pytest.mark.network
def test_table_bytes_equal_the_bytes_streamed(table_rows, tiny_backbone):
    # Prepare: the rows' bytes per image, and a fresh client on the same store
    cfg, rows = table_rows
    df = pd.DataFrame(rows)
    # seed 0 paid for features (once each: rows sharing a gather and dtype read the device's
    # cache), seed 1 read them all from the cache; every row still has its wire cost
    assert df[df["seed"] == 0]["feature_bytes"].sum() > 0
    assert (df[df["seed"] == 1]["feature_bytes"] == 0).all()
    assert (df["bytes_per_image"] > 0).all()
    df = df.drop_duplicates(["method", "wire_dtype", "k"])
    task = get_task(TASK)
    serve = ServeConfig(
        port=0,
        tasks=(TASK,),
        cache_dir=cfg.cache_dir,
        random_init=True,
        backbone=cfg.backbone,
        model_kwargs=dict(TINY_VIT),
    )
    with running_cloud(serve, backbone=tiny_backbone) as loc, FeatureClient(loc) as client:
        for _, r in df.iterrows():
            k = None if pd.isna(r["k"]) else int(r["k"])
            spec = METHODS[r["method"]].gather(tiny_backbone.num_blocks, k)
            total = rows_n = 0
            # Execute: stream the same splits again, summing the client's wire accounting
            for split in ("train", "val", "test"):
                fs = client.get(
                    TASK, split, spec.kind, spec.k, r["wire_dtype"], ids=list(task.split(split).ids)
                )
                total += fs.meta["wire"]["bytes"]
                rows_n += fs.meta["wire"]["rows"]
            # Assert: the table reports exactly those bytes per image
            assert r["bytes_per_image"] == pytest.approx(total / rows_n)
        stats = client.stats()
    assert stats["images_embedded"] == 0  # everything came from the precomputed store


@pytest.mark.slow
@pytest.mark.network
def test_wire_formats_order_bytes(table_rows, tiny_backbone):
    _, rows = table_rows
    df = pd.DataFrame(rows)
    mist = df[df["label"] == "mist"].groupby("wire_dtype")["bytes_per_image"].mean()
    assert mist["int8"] < mist["float16"] < mist["float32"]
    assert mist["float32"] / mist["int8"] == pytest.approx(4, rel=0.1)
    # per-channel scales: one float32 per channel instead of one per token
    tokens, dim = tiny_backbone.num_tokens, tiny_backbone.embed_dim
    assert mist["int8ch"] - mist["int8"] == pytest.approx(4 * (dim - tokens))
    side = df[df["method"] == "side"]["bytes_per_image"].mean()
    levels = TINY_VIT["depth"] + 1
    assert side / mist["float32"] == pytest.approx(levels, rel=0.05)
    linear = df[df["method"] == "linear"]["bytes_per_image"].mean()
    assert linear < mist["int8"]
    # 2x2 pooling keeps the class token and a quarter of the 4x4 patch grid: 5 of 17 tokens
    # (plus the per-row ids and labels, a few % here)
    pool = df[df["label"] == "mist_pool"].groupby("wire_dtype")["bytes_per_image"].mean()
    for dtype in ("float16", "int8"):
        assert pool[dtype] / mist[dtype] == pytest.approx(5 / 17, rel=0.1)  # + row overhead
    assert pool["int8ch"] - pool["int8"] == pytest.approx(4 * (dim - 5))  # D scales, not 5


@pytest.mark.slow
@pytest.mark.network
def test_mist_row_is_the_k_row_best_on_validation(table_rows):
    _, rows = table_rows
    df = pd.DataFrame(rows)
    for _seed, g in df.groupby("seed"):
        ks = g[g["group"] == "k"]
        best = ks.sort_values(["val_accuracy", "k"], ascending=[False, True]).iloc[0]
        mist = g[(g["label"] == "mist") & (g["wire_dtype"] == "float32")].iloc[0]
        assert mist["k"] == best["k"] and mist["accuracy"] == best["accuracy"]
        # ablation blocks and compressed wires run at MIST's k
        for label in ("mist_mlp", "mist_dwconv", "mist_pool"):
            assert g[g["label"] == label].iloc[0]["k"] == mist["k"]
        assert set(g[(g["label"] == "mist")]["k"]) == {mist["k"]}


@pytest.mark.slow
@pytest.mark.network
def test_write_compare_outputs(table_rows, tmp_path):
    _, rows = table_rows
    paths = write_compare(rows, tmp_path / "run", header="# test")
    table = pd.read_parquet(paths["table"])
    assert list(table.columns[: len(COMPARE_COLUMNS)]) == list(COMPARE_COLUMNS)
    assert len(table) == len(default_variants())  # one task: one row per method x wire
    md = paths["markdown"].read_text()
    assert md.startswith("# test") and "| mist | int8 |" in md and "±" in md
    assert paths["plot"].stat().st_size > 0


def test_the_plot_has_a_panel_per_task_and_each_tasks_reference():
    # Prepare: two tasks, the second (a run in progress) lacking one row; a JPEG per task
    agg = pd.DataFrame(
        [
            {"label": label, "wire_dtype": wire, "task": task, "bytes_per_image": nbytes,
             "accuracy": acc, "accuracy_std": 0.01}
            for task, acc in (("a", 0.7), ("b", 0.9))
            for label, wire, nbytes in (("linear", "float32", 1e3), ("mist", "int8", 1e5))
            if (task, label) != ("b", "mist")
        ]
    )  # fmt: skip
    refs = {"JPEG of the a test images": 4000.0, "JPEG of the b test images": 3000.0}
    # Execute
    fig = accuracy_vs_bytes_figure(agg, refs)
    # Assert: one panel per task, its own rows and its own JPEG line; one legend naming every
    # row once (taken from all panels), the task-specific reference once
    a, b = fig.axes
    assert (a.get_title(), b.get_title()) == ("a", "b")
    assert [ln.get_xdata()[0] for ln in a.lines if ln.get_linestyle() == "-."] == [4000.0]
    assert [ln.get_xdata()[0] for ln in b.lines if ln.get_linestyle() == "-."] == [3000.0]
    assert len(a.containers) == 2 and len(b.containers) == 1  # the error bars: a row each
    names = [t.get_text() for t in b.get_legend().get_texts()]
    want = ["linear [float32]", "mist [int8]", "Pareto front", "JPEG of the task test images"]
    assert sorted(names) == sorted(want)
    plt.close(fig)


@pytest.mark.slow
@pytest.mark.network
def test_few_shot_mode(tmp_path):
    cfg = _cfg(
        tmp_path,
        tasks=("synthetic:classes=3,train=24,val=6,test=9",),
        variants=(Variant("linear", "linear"), Variant("mist", "mist", k="select")),
        few_shot=(1, 2),
        seeds=2,
    )
    rows = [r.as_dict() for r in run_compare(cfg)]
    df = pd.DataFrame(rows)
    assert set(df["shots"]) == {1, 2} and len(df) == 2 * 2 * 2
    # the train bytes are counted too: fewer train rows, same bytes per image
    paths = write_compare(rows, tmp_path / "few")
    assert "1-shot" in paths["markdown"].read_text()
    assert paths["plot"].name == "accuracy_vs_shots.png"


def test_few_shot_ids_draws_per_class():
    ids = [f"i{n}" for n in range(30)]
    labels = [n % 3 for n in range(30)]
    got = few_shot_ids(ids, labels, 4, seed=1)
    assert len(got) == 12 and len(set(got)) == 12
    assert sorted(labels[ids.index(i)] for i in got) == [0] * 4 + [1] * 4 + [2] * 4
    assert got == few_shot_ids(ids, labels, 4, seed=1)
    assert got != few_shot_ids(ids, labels, 4, seed=2)


def test_pareto_front():
    pts = [(1.0, 0.5), (0.1, 0.7), (0.5, 0.8), (2.0, 0.8), (3.0, 0.9)]
    assert [pts[i] for i in pareto_front(pts)] == [(0.1, 0.7), (0.5, 0.8), (3.0, 0.9)]


def _seed_row(**kw):
    """One per-seed result row as ``aggregate`` reads it; ``kw`` sets what a test varies."""
    return (
        dict(
            label="mist",
            method="mist",
            wire_dtype="int8",
            group="wire",
            task="t",
            bytes_per_image=10.0,
            edge_params=1,
            edge_macs=2,
            cloud_macs=3,
            peak_mem_mb=5.0,
            compute_s=2.0,
            host_compute_s=1.0,
            transfer_s=0.5,
            profile="laptop",
            k=4,
            shots=None,
        )
        | kw
    )


def test_aggregate_mean_and_spread():
    seeds = pd.DataFrame([_seed_row(seed=0, accuracy=0.5), _seed_row(seed=1, accuracy=0.7)])
    agg = aggregate(seeds)
    assert len(agg) == 1
    assert agg.iloc[0]["accuracy"] == pytest.approx(0.6)
    assert agg.iloc[0]["accuracy_std"] == pytest.approx(math.sqrt(0.02))
    assert "60.0 ± 14.1" in markdown_table(agg)


def test_table_k_lists_every_task_and_seed_k_in_order():
    # Prepare: one row whose k was chosen per seed (12 on one task; 4, 12, 8 on the other)
    fits = [("a", 0, 12), ("a", 1, 12), ("b", 0, 4), ("b", 1, 12), ("b", 2, 8)]
    seeds = pd.DataFrame(
        [
            _seed_row(wire_dtype="float32", group="paper", task=t, seed=s, k=k, accuracy=0.5)
            for t, s, k in fits
        ]
    )
    # Execute
    agg = aggregate(seeds)
    table = markdown_table(agg)
    # Assert: per task in numeric order, and the table's one cell lists them all
    assert list(agg["ks"]) == ["12", "4,8,12"]
    assert "| mist | float32 | 4,8,12 |" in table


def test_cli_config_filters_methods():
    args = parser().parse_args(["--tasks", TASK, "--methods", "mist", "linear", "--wire", "int8"])
    cfg = config_from_args(args)
    labels = {(v.label, v.dtype) for v in cfg.variants}
    assert ("linear", "float32") in labels and ("mist", "int8") in labels
    assert ("side", "float32") not in labels and ("mist", "float16") not in labels
    assert ("mist k=N/3", "float32") in labels
    few = config_from_args(parser().parse_args(["--tasks", TASK, "--few-shot"]))
    assert few.few_shot == (1, 2, 4, 8, 16) and few.seeds == 3
    # every row runs on a host-like device by default, with one device directory per run
    assert cfg.profile == "laptop"
    named = config_from_args(parser().parse_args(["--tasks", TASK]), run_id="r1")
    assert named.storage.parts[-2:] == ("compare", "r1")
    mine = parser().parse_args(["--tasks", TASK, "--profile", "rpi4", "--device-dir", "/x/d"])
    assert config_from_args(mine).profile == "rpi4"
    assert str(config_from_args(mine).storage) == "/x/d"
    with pytest.raises(SystemExit):  # an unknown wire dtype is refused by the parser
        parser().parse_args(["--wire", "int3"])
    new = parser().parse_args(["--tasks", TASK, "--wire", "int4ch", "int8ch+zstd"])  # #17 names
    assert new.wire == ["int4ch", "int8ch+zstd"]


def test_fixed_mist_k_trains_mist_at_that_k_only(tmp_path, tiny_backbone):
    # Prepare: MIST and its int8ch wire with k fixed at 1 (no selection, no k rows)
    args = parser().parse_args(
        ["--tasks", TASK, "--methods", "mist", "--wire", "int8ch", "--mist-k", "1"]
    )
    cfg = config_from_args(args)
    assert {v.group for v in cfg.variants} == {"paper", "wire"}
    cfg = _cfg(tmp_path, variants=cfg.variants, mist_k=1)
    # the cloud precomputes that k alone, not the other candidates (2 and 3) as well
    cmp = Comparison(cfg, get_task(TASK), TASK, tiny_backbone.num_blocks)
    assert {(s.k, d) for s, d in cmp.pairs(cfg.variants)} == {(1, "float32"), (1, "int8ch")}
    # Execute
    rows = [r.as_dict() for r in run_compare(cfg)]
    # Assert: one fit per row, every one at k=1
    assert [(r["label"], r["wire_dtype"], r["k"]) for r in rows] == [
        ("mist", "float32", 1),
        ("mist", "int8ch", 1),
    ]
    with pytest.raises(ConfigError, match="deeper"):
        run_compare(_cfg(tmp_path, variants=cfg.variants, mist_k=99))


@pytest.fixture
def fits(monkeypatch) -> list[tuple[str, str, int | None]]:
    """Every fit a comparison makes from here on: (method, wire dtype, k)."""
    made: list[tuple[str, str, int | None]] = []
    fit = Comparison.train_eval

    def recorded(self, v, k, seed, train_ids):
        made.append((v.method, v.dtype, k))
        return fit(self, v, k, seed, train_ids)

    monkeypatch.setattr(Comparison, "train_eval", recorded)
    return made


def test_a_wire_row_at_a_fixed_k_trains_no_float32_mist_to_read_k(tmp_path, tiny_backbone, fits):
    # Prepare: only the pooled MIST on int8ch, k fixed; every fit the comparison makes is recorded
    args = parser().parse_args(
        ["--tasks", TASK, "--methods", "mist_pool", "--wire", "int8ch", "--mist-k", "2"]
    )
    cfg = _cfg(tmp_path, variants=config_from_args(args).variants, mist_k=2)
    # Execute
    rows = [r.as_dict() for r in run_compare(cfg)]
    # Assert: the one row asked for, at the fixed k, and no other fit (a float32 MIST row was
    # trained only to read k before, pulling 257-token float32 maps of every split)
    assert fits == [("mist_pool", "int8ch", 2)]
    assert [(r["label"], r["wire_dtype"], r["k"]) for r in rows] == [("mist_pool", "int8ch", 2)]


def test_resume_runs_only_the_rows_an_earlier_run_lacks(tmp_path):
    # Prepare: an earlier run of one seed, stopped before its second
    out = tmp_path / "results"
    common = ["--tasks", TASK, "--methods", "linear", "--epochs", "1", "--out", str(out)]
    common += ["--run-id", "r", "--random-init", "--backbone", "vit_tiny_patch16_224"]
    common += ["--cache-dir", str(tmp_path / "store"), "--device-dir", str(tmp_path / "dev")]
    common += ["--profile", "rpi4"]
    args = parser().parse_args([*common, "--seeds", "1"])
    cfg = dataclasses.replace(config_from_args(args), backbone_kwargs=dict(TINY_VIT))
    first = [r.as_dict() for r in run_compare(cfg)]
    write_compare(first, out / "r")
    # Execute: resume with two seeds
    cfg2 = dataclasses.replace(cfg, seeds=2)
    rows = resumed_rows(out / "r")
    new = [r.as_dict() for r in run_compare(cfg2, prior=rows)]
    # Assert: seed 0 kept from the earlier run (read back whole), only seed 1 trained now, on
    # cached features
    assert [r["seed"] for r in rows] == [0] and [r["seed"] for r in new] == [1]
    assert RowResult.from_dict(rows[0]).as_dict() == pytest.approx(first[0], nan_ok=True)
    assert first[0]["feature_bytes"] > 0 and new[0]["feature_bytes"] == 0
    assert new[0]["bytes_per_image"] == first[0]["bytes_per_image"]
    with pytest.raises(ConfigError, match="does not exist"):
        resumed_rows(out / "missing")
    old = out / "old"  # a run written before the device metrics: start a new run instead
    old.mkdir()
    pd.DataFrame([{"task": TASK, "seed": 0, "transfer_bytes_per_image": 1.0}]).to_parquet(
        old / "compare.parquet"
    )
    with pytest.raises(ConfigError, match="new --run-id"):
        resumed_rows(old)


def test_a_seed_stopped_midway_resumes_at_its_first_missing_row(tmp_path, fits):
    # Prepare: a whole seed on the fake cloud, then what a run stopped after its first two rows
    # (linear, and MIST with its selected k) left in compare.parquet; every later fit recorded
    (*full,) = _fake(tmp_path, MemorySource()).run_seed(FAST_VARIANTS, seed=0)
    write_compare([r.as_dict() for r in full[:2]], tmp_path / "run")
    prior = [RowResult.from_dict(r) for r in resumed_rows(tmp_path / "run")]
    before = len(fits)
    # Execute
    rows = list(_fake(tmp_path, MemorySource()).run_seed(FAST_VARIANTS, seed=0, prior=prior))
    # Assert: only the two missing rows come out; the int8 row runs at the kept MIST row's k,
    # and no fit is repeated (the k=N/3 row is the kept fit when MIST chose k=1)
    mist = prior[1]
    assert [(r.label, r.wire_dtype) for r in rows] == [("mist k=N/3", "float32"), ("mist", "int8")]
    assert rows[1].k == mist.k == full[1].k
    assert fits[before:] == [("mist", "float32", 1)] * (mist.k != 1) + [("mist", "int8", mist.k)]
    if mist.k == 1:
        assert rows[0].accuracy == mist.accuracy


def _seed_rows(label, wire, nbytes, test, val):
    return [
        {"label": label, "wire_dtype": wire, "task": "t", "seed": s, "bytes_per_image": nbytes,
         "accuracy": a, "val_accuracy": v}
        for s, (a, v) in enumerate(zip(test, val, strict=True))
    ]  # fmt: skip


def test_paired_differences_pair_by_seed_and_the_wire_is_chosen_on_validation_only():
    # Prepare: float32 MIST and three wires over three seeds. "small" is best on test but
    # worst on validation; "big" is best on validation but over the byte budget.
    rows = _seed_rows("mist", "float32", 400_000, [0.80, 0.82, 0.84], [0.80, 0.80, 0.80])
    rows += _seed_rows("mist_pool", "small", 2_000, [0.90, 0.92, 0.94], [0.70, 0.70, 0.70])
    rows += _seed_rows("mist_pool", "ok", 9_000, [0.79, 0.82, 0.83], [0.795, 0.80, 0.79])
    rows += _seed_rows("mist", "big", 50_000, [0.85, 0.87, 0.89], [0.85, 0.85, 0.85])
    seeds = pd.DataFrame(rows)
    # Execute
    paired = paired_differences(seeds).set_index("wire_dtype")
    chosen = choose_wire(paired.reset_index())
    # Assert: paired per seed (0.79-0.80, 0.82-0.82, 0.83-0.84), t interval over 3 seeds
    d = np.array([-0.01, 0.0, -0.01])
    assert paired.loc["ok", "test_diff"] == pytest.approx(d.mean())
    half = 4.303 * d.std(ddof=1) / np.sqrt(3)
    assert paired.loc["ok", "ci95_low"] == pytest.approx(d.mean() - half)
    assert paired.loc["ok", "val_diff"] == pytest.approx(-0.005)
    assert paired.loc["small", "test_diff"] == pytest.approx(0.10)
    assert chosen is not None and chosen["wire_dtype"] == "ok"
    # nothing qualifies under a budget below every MIST row's bytes
    assert choose_wire(paired.reset_index(), budget=1_000) is None
    assert paired_differences(seeds[seeds["label"] != "mist"]).empty  # no reference, no pairs


def test_a_wire_is_chosen_among_mist_rows_only():
    # Prepare: linear probing is cheap and, here, better on validation than MIST
    rows = _seed_rows("mist", "float32", 400_000, [0.80, 0.82], [0.80, 0.80])
    rows += _seed_rows("linear", "float32", 1_600, [0.81, 0.83], [0.85, 0.85])
    rows += _seed_rows("mist_pool", "pca64-int4ch", 2_400, [0.80, 0.81], [0.80, 0.80])
    # Execute
    chosen = choose_wire(paired_differences(pd.DataFrame(rows)))
    # Assert
    assert chosen is not None and (chosen["label"], chosen["wire_dtype"]) == (
        "mist_pool",
        "pca64-int4ch",
    )


def test_two_runs_pair_seed_by_seed():
    import pandas as pd

    from mist_fed.report.comparison import paired_runs

    # Prepare: the same two rows over three seeds; the other run is 1 point higher on mist only
    def run(shift):
        return pd.DataFrame(
            [
                {
                    "label": label,
                    "wire_dtype": "float16",
                    "task": "t",
                    "seed": seed,
                    "accuracy": 0.7 + 0.01 * seed + (shift if label == "mist" else 0.0),
                    "val_accuracy": 0.7,
                    "bytes_per_image": 100.0,
                }
                for label in ("linear", "mist")
                for seed in range(3)
            ]
        )

    # Execute
    paired = paired_runs(run(0.0), run(0.01)).set_index("label")
    # Assert
    assert list(paired["pairs"]) == [3, 3]
    assert paired.loc["mist", "test_diff"] == pytest.approx(0.01)
    assert paired.loc["linear", "test_diff"] == pytest.approx(0.0)
    assert paired.loc["mist", "ci95_low"] == pytest.approx(0.01)  # no spread: a point interval
