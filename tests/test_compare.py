"""The paper-table comparison: every method through the real cloud -> wire -> edge pipeline."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest

from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.precompute import precompute
from mist_fed.cloud.runner import running_cloud
from mist_fed.data import get_task
from mist_fed.errors import ConfigError
from mist_fed.experiments.cli import config_from_args, parser, resumed_rows
from mist_fed.experiments.compare import (
    CompareConfig,
    Comparison,
    Fetcher,
    Variant,
    default_variants,
    few_shot_ids,
    run_compare,
)
from mist_fed.model.gather import GatherSpec
from mist_fed.core.methods import METHODS
from mist_fed.report.compare import (
    COMPARE_COLUMNS,
    aggregate,
    markdown_table,
    pareto_front,
    write_compare,
)
from mist_fed.wire.client import FeatureClient
from tests.conftest import TINY_VIT

TASK = "synthetic:classes=3,train=12,val=6,test=9"


def _cfg(tmp_path, **kw):
    base = dict(
        tasks=(TASK,),
        backbone="vit_tiny_patch16_224",
        backbone_kwargs=dict(TINY_VIT),
        random_init=True,
        epochs=1,
        cache_dir=str(tmp_path / "store"),
    )
    return CompareConfig(**{**base, **kw})


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
    assert (df["edge_peak_mem_mb"] >= 0).all()
    assert (df["edge_params"] > 0).all() and (df["cloud_macs"] > 0).all()


@pytest.mark.slow
@pytest.mark.network
def test_table_bytes_equal_the_bytes_streamed(table_rows, tiny_backbone):
    # Prepare: the rows' bytes per image, and a fresh client on the same store
    cfg, rows = table_rows
    df = pd.DataFrame(rows).drop_duplicates(["method", "wire_dtype", "k"])
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
            assert r["transfer_bytes_per_image"] == pytest.approx(total / rows_n)
        stats = client.stats()
    assert stats["images_embedded"] == 0  # everything came from the precomputed store


@pytest.mark.slow
@pytest.mark.network
def test_wire_formats_order_bytes(table_rows, tiny_backbone):
    _, rows = table_rows
    df = pd.DataFrame(rows)
    mist = df[df["label"] == "mist"].groupby("wire_dtype")["transfer_bytes_per_image"].mean()
    assert mist["int8"] < mist["float16"] < mist["float32"]
    assert mist["float32"] / mist["int8"] == pytest.approx(4, rel=0.1)
    # per-channel scales: one float32 per channel instead of one per token
    tokens, dim = tiny_backbone.num_tokens, tiny_backbone.embed_dim
    assert mist["int8ch"] - mist["int8"] == pytest.approx(4 * (dim - tokens))
    side = df[df["method"] == "side"]["transfer_bytes_per_image"].mean()
    levels = TINY_VIT["depth"] + 1
    assert side / mist["float32"] == pytest.approx(levels, rel=0.05)
    linear = df[df["method"] == "linear"]["transfer_bytes_per_image"].mean()
    assert linear < mist["int8"]
    # 2x2 pooling keeps the class token and a quarter of the 4x4 patch grid: 5 of 17 tokens
    # (plus the per-row ids and labels, a few % here)
    pool = df[df["label"] == "mist_pool"].groupby("wire_dtype")["transfer_bytes_per_image"].mean()
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


def test_aggregate_mean_and_spread():
    base = dict(
        label="mist",
        method="mist",
        wire_dtype="int8",
        group="wire",
        task="t",
        transfer_bytes_per_image=10.0,
        edge_params=1,
        edge_macs=2,
        cloud_macs=3,
        edge_peak_mem_mb=5.0,
        edge_feature_mb=1.0,
        k=4,
        train_seconds=1.0,
        shots=None,
    )
    seeds = pd.DataFrame(
        [{**base, "seed": 0, "accuracy": 0.5}, {**base, "seed": 1, "accuracy": 0.7}]
    )
    agg = aggregate(seeds)
    assert len(agg) == 1
    assert agg.iloc[0]["accuracy"] == pytest.approx(0.6)
    assert agg.iloc[0]["accuracy_std"] == pytest.approx(math.sqrt(0.02))
    assert "60.0 ± 14.1" in markdown_table(agg)


@pytest.mark.slow
@pytest.mark.network
def test_fetcher_counts_every_chunk(tmp_path, tiny_backbone):
    # Prepare: a store filled by precompute
    task = get_task(TASK)
    serve = ServeConfig(
        port=0,
        tasks=(TASK,),
        cache_dir=str(tmp_path),
        random_init=True,
        model_kwargs=dict(TINY_VIT),
        backbone="vit_tiny_patch16_224",
    )
    spec = GatherSpec("side")
    split = task.split("train")
    n = precompute(tiny_backbone, serve.store_dir, split, range(len(split)), [(spec, "float32")])
    assert n == len(split)
    with running_cloud(serve, backbone=tiny_backbone) as loc, FeatureClient(loc) as client:
        # Execute: fetch in chunks of 5 with fp16 residency
        fetch = Fetcher(client, TASK, chunk=5)
        fs = fetch.get("train", list(split.ids), spec, "float32", resident="float16")
        stats = client.stats()
    # Assert: every chunk counted, features re-cast, nothing recomputed
    assert len(fs) == len(split) and fs.features.dtype.is_floating_point
    assert str(fs.features.dtype) == "torch.float16"
    assert fetch.rows == len(split) and fetch.bytes == client.total.bytes
    assert stats["bytes_served"] == fetch.bytes and stats["images_embedded"] == 0


def test_cli_config_filters_methods():
    args = parser().parse_args(["--tasks", TASK, "--methods", "mist", "linear", "--wire", "int8"])
    cfg = config_from_args(args)
    labels = {(v.label, v.dtype) for v in cfg.variants}
    assert ("linear", "float32") in labels and ("mist", "int8") in labels
    assert ("side", "float32") not in labels and ("mist", "float16") not in labels
    assert ("mist k=N/3", "float32") in labels
    few = config_from_args(parser().parse_args(["--tasks", TASK, "--few-shot"]))
    assert few.few_shot == (1, 2, 4, 8, 16) and few.seeds == 3
    with pytest.raises(SystemExit):  # an unknown wire dtype is refused by the parser
        parser().parse_args(["--wire", "int4"])


def test_fixed_mist_k_trains_mist_at_that_k_only(tmp_path, tiny_backbone):
    # Prepare: MIST and its int8ch wire with k fixed at 1 (no selection, no k rows)
    args = parser().parse_args(
        ["--tasks", TASK, "--methods", "mist", "--wire", "int8ch", "--mist-k", "1"]
    )
    cfg = config_from_args(args)
    assert {v.group for v in cfg.variants} == {"paper", "wire"}
    cfg = _cfg(tmp_path, variants=cfg.variants, mist_k=1)
    # the cloud precomputes that k alone, not the other candidates (2 and 3) as well
    cmp = Comparison(cfg, tiny_backbone, None, get_task(TASK), TASK)  # type: ignore[arg-type]
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


def test_resume_runs_only_the_seeds_an_earlier_run_lacks(tmp_path):
    # Prepare: an earlier run of one seed, stopped before its second
    out = tmp_path / "results"
    common = ["--tasks", TASK, "--methods", "linear", "--epochs", "1", "--out", str(out)]
    common += ["--run-id", "r", "--random-init", "--backbone", "vit_tiny_patch16_224"]
    common += ["--cache-dir", str(tmp_path / "store")]
    args = parser().parse_args([*common, "--seeds", "1"])
    cfg = dataclasses.replace(config_from_args(args), backbone_kwargs=dict(TINY_VIT))
    first = [r.as_dict() for r in run_compare(cfg)]
    write_compare(first, out / "r")
    # Execute: resume with two seeds
    cfg2 = dataclasses.replace(cfg, seeds=2)
    rows, done = resumed_rows(out / "r", cfg2)
    new = [r.as_dict() for r in run_compare(cfg2, skip=done)]
    # Assert: seed 0 kept from the earlier run, only seed 1 trained now
    assert done == {(TASK, None, 0)}
    assert [r["seed"] for r in rows] == [0] and [r["seed"] for r in new] == [1]
    assert rows[0]["accuracy"] == first[0]["accuracy"]
    with pytest.raises(ConfigError, match="does not exist"):
        resumed_rows(out / "missing", cfg2)
