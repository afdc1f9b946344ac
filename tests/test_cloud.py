"""The Flight feature server on 127.0.0.1 (ephemeral ports), its store, auth and client."""

import dataclasses
import json
import socket
from typing import ClassVar

import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.runner import running_cloud
from mist_fed.cloud.server import FeatureServer
from mist_fed.data import get_task
from mist_fed.errors import (
    CloudAuthError,
    CloudRequestError,
    CloudUnavailableError,
    ConfigError,
    WireError,
)
from mist_fed.wire import edge_init
from mist_fed.wire.codec import UPLOAD_SCHEMA, decode, encode_png
from mist_fed.wire.flight import FeatureClient
from mist_fed.wire.request import FeatureRequest
from tests.conftest import served_id

pytestmark = pytest.mark.network

TASK = "synthetic"


def _config(tmp_path, **kw):
    return ServeConfig(
        port=0, random_init=True, cache_dir=str(tmp_path / "store"), rows_per_batch=8, **kw
    )


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cloud")


@pytest.fixture(scope="module")
def cloud(tiny_backbone, store_dir):
    with running_cloud(_config(store_dir), backbone=tiny_backbone) as location:
        yield location


def _ticket(**kw):
    base = {"task": TASK, "split": "val", "gather": "mist", "k": 2, "dtype": "float32"}
    base.update(kw)
    return flight.Ticket(json.dumps(base).encode())


def test_plain_pyarrow_client_reads_features(cloud, tiny_backbone):
    # Prepare
    client = flight.connect(cloud)
    # Execute
    table = client.do_get(_ticket()).read_all()
    # Assert
    split = get_task(TASK).split("val")
    assert table.column("id").to_pylist() == list(split.ids)
    assert table.column("label").to_pylist() == list(split.labels)
    assert table.schema.field("features").type.shape == [
        tiny_backbone.num_tokens,
        tiny_backbone.embed_dim,
    ]
    assert table.schema.metadata[b"mist_fed.weights"] == served_id(tiny_backbone).encode()
    assert decode(table).features.shape == (
        len(split),
        tiny_backbone.num_tokens,
        tiny_backbone.embed_dim,
    )


def test_second_request_is_served_from_the_store(cloud, tiny_backbone):
    # Prepare
    client = FeatureClient(cloud)
    before = client.stats()
    # Execute: first request embeds, every other candidate k is then a store hit
    first = client.get(TASK, "test", "mist", 3, "float16")
    mid = client.stats()
    second = client.get(TASK, "test", "mist", 1, "float16")  # another candidate k
    after = client.stats()
    # Assert
    n = len(first)
    assert mid["images_embedded"] - before["images_embedded"] == n
    assert after["images_embedded"] == mid["images_embedded"]
    assert after["cache_hits"] - mid["cache_hits"] == n
    assert not (first.features == second.features).all()
    payload = n * tiny_backbone.num_tokens * tiny_backbone.embed_dim * 2
    assert payload <= first.meta["wire"]["bytes"] <= payload + 64 * n  # ids and labels aside


def test_store_survives_a_restart(tiny_backbone, tmp_path):
    # Prepare
    cfg = _config(tmp_path)
    with running_cloud(cfg, backbone=tiny_backbone) as loc:
        want = FeatureClient(loc).get(TASK, "val", "final", None, "int8")
    # Execute
    with running_cloud(cfg, backbone=tiny_backbone) as loc:
        client = FeatureClient(loc)
        got = client.get(TASK, "val", "final", None, "int8")
        stats = client.stats()
    # Assert
    assert stats["images_embedded"] == 0 and stats["cache_hits"] == len(want)
    assert (got.features == want.features).all()


def test_each_gather_and_ids_subset(cloud, tiny_backbone):
    client = FeatureClient(cloud)
    n, t, d = tiny_backbone.num_blocks, tiny_backbone.num_tokens, tiny_backbone.embed_dim
    side = client.get(TASK, "val", "side", None, "float16", ids=["val-000003", "val-000001"])
    assert side.ids == ["val-000003", "val-000001"] and side.labels.tolist() == [3, 1]
    assert side.features.shape == (2, n + 1, t, d)
    block = client.get(TASK, "val", "block", n - 1, "float32", ids=["val-000001"])
    assert block.features.shape == (1, t, d)


def test_a_long_id_list_goes_in_several_requests_and_comes_back_in_order(cloud, monkeypatch):
    # Prepare: requests of about 3 ids each (the cloud refuses one over 1 MiB: a central
    # reference's 54,000 ids are 1.5 MB)
    from mist_fed.wire import request

    client = FeatureClient(cloud)
    ids = list(reversed(get_task(TASK).split("val").ids))
    whole = client.get(TASK, "val", "mist", 2, "float32", ids=ids)
    bare = len(FeatureRequest(TASK, "val", "mist", 2, "float32", ()).to_json())
    monkeypatch.setattr(request, "PART_BYTES", bare + 3 * len(json.dumps(ids[0]) + ","))
    parts = FeatureRequest(TASK, "val", "mist", 2, "float32", tuple(ids)).parts()
    # Execute
    split_up = client.get(TASK, "val", "mist", 2, "float32", ids=ids)
    # Assert: every id once, in order, each request within the limit; the same rows back
    assert len(parts) >= 3 and [i for p in parts for i in p.ids or ()] == ids
    assert all(len(p.to_json()) <= request.PART_BYTES for p in parts)
    assert split_up.ids == whole.ids == ids
    assert torch.equal(split_up.features, whole.features)
    assert client.last.rows == len(ids)


def test_upload_reports_bad_images_and_serves_the_rest(cloud, tiny_backbone):
    # Prepare
    split = get_task(TASK).split("val")
    images = [(i, encode_png(split.image(n))) for n, i in enumerate(split.ids[:3])]
    images.insert(1, ("broken", b"\x89PNG not really"))
    client = FeatureClient(cloud)
    # Execute
    fs = client.embed(images, "mist", 2, "float32")
    # Assert: same pixels as the task's own images, hence the same features
    assert fs.ids == list(split.ids[:3])
    assert set(fs.meta["errors"]) == {"broken"} and "does not decode" in fs.meta["errors"]["broken"]
    ref = client.get(TASK, "val", "mist", 2, "float32", ids=list(split.ids[:3]))
    assert (fs.features == ref.features).all()


@pytest.mark.parametrize(
    ("ticket", "match"),
    [
        (b"{not json", "not JSON"),
        (json.dumps({"task": "no-such-task", "split": "val", "k": 1}).encode(), "unknown task"),
        (json.dumps({"task": TASK, "split": "val", "k": 99}).encode(), "k=99 is outside"),
        (json.dumps({"task": TASK, "split": "val", "k": 1, "dtype": "int3"}).encode(), "dtype"),
        (json.dumps({"task": TASK, "split": "val", "k": 1, "ids": ["nope"]}).encode(), "not in"),
    ],
)
def test_bad_requests_fail_clearly_and_server_keeps_serving(cloud, ticket, match):
    client = flight.connect(cloud)
    with pytest.raises(flight.FlightServerError, match=match):
        client.do_get(flight.Ticket(ticket)).read_all()
    assert client.do_get(_ticket(ids=["val-000000"])).read_all().num_rows == 1


def test_feature_client_maps_refusals_to_mist_errors(cloud):
    with pytest.raises(CloudRequestError, match="k=99"):
        FeatureClient(cloud).get(TASK, "val", "mist", 99)


def test_upload_limits(tiny_backbone, tmp_path):
    cfg = _config(tmp_path, max_upload_images=2, max_image_bytes=10_000)
    png = encode_png(get_task(TASK).split("val").image(0))
    with running_cloud(cfg, backbone=tiny_backbone) as loc:
        client = FeatureClient(loc, upload_batch=2)
        fs = client.embed([("a", png), ("huge", b"x" * 20_000)], "final")
        assert "over the limit" in fs.meta["errors"]["huge"]
        with pytest.raises(CloudRequestError, match="more than 2 images"):
            client.embed([("a", png)] * 3, "final")


def test_list_flights_and_flight_info(cloud, tiny_backbone):
    client = flight.connect(cloud)
    infos = list(client.list_flights())
    assert {json.loads(i.descriptor.command)["split"] for i in infos} == {"train", "val", "test"}
    req = FeatureRequest(TASK, "val", "mist", 1, "int8")
    info = client.get_flight_info(flight.FlightDescriptor.for_command(req.to_json()))
    t, d = tiny_backbone.num_tokens, tiny_backbone.embed_dim
    assert info.total_records == 8 and info.total_bytes == 8 * (t * d + 4 * t)
    assert info.schema.field("scale").type.shape == [t]


def test_stats_action_counts_bytes_per_client(cloud):
    client = flight.connect(cloud)
    client.do_get(_ticket()).read_all()
    stats = json.loads(next(iter(client.do_action(flight.Action("stats", b"")))).body.to_pybytes())
    assert (
        stats["bytes_served"] > 0
        and sum(stats["bytes_per_client"].values()) == stats["bytes_served"]
    )


# -- edge_init: the weights a method's edge net starts from -----------------------------------
def _edge_init_action(method):
    return flight.Action(edge_init.ACTION, json.dumps({"method": method}).encode())


def test_edge_init_serves_the_backbones_last_block(cloud, tiny_backbone):
    # Prepare
    client = flight.connect(cloud)
    # Execute
    (result,) = list(client.do_action(_edge_init_action("partial1")))
    init = edge_init.decode(result.body.to_pybytes())
    # Assert: exactly the served backbone's last block and final norm, and whose they are
    assert (init.method, init.backbone, init.weights) == (
        "partial1",
        tiny_backbone.name,
        served_id(tiny_backbone),
    )
    for prefix, module in (
        ("block", tiny_backbone.model.blocks[-1]),
        ("norm", tiny_backbone.model.norm),
    ):
        want = module.state_dict()
        got = {
            k.removeprefix(f"{prefix}."): v
            for k, v in init.state.items()
            if k.startswith(f"{prefix}.")
        }
        assert got.keys() == want.keys()
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    assert len(init.state) == len(tiny_backbone.model.blocks[-1].state_dict()) + 2


def test_feature_client_edge_init_checks_the_backbone(cloud, tiny_backbone):
    # Prepare
    seen = []
    pinned = FeatureClient(
        cloud,
        expect_backbone=tiny_backbone.name,
        expect_weights=served_id(tiny_backbone),
        on_batch=seen.append,
    )
    # Execute
    init = pinned.edge_init("partial1")
    scratch = pinned.edge_init("mist")
    # Assert: its bytes reach the shaper hook; a method that starts from scratch gets nothing
    assert seen == [init.nbytes, scratch.nbytes] and init.nbytes > 4 * sum(
        v.numel() for v in init.state.values()
    )
    assert scratch.state == {} and scratch.weights == served_id(tiny_backbone)
    with pytest.raises(WireError, match="weights 'random:"):
        FeatureClient(cloud, expect_weights="file:0123").edge_init("partial1")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (json.dumps({"method": "partial2"}).encode(), "unknown method 'partial2'"),
        (b"{not json", "must be JSON"),
        (json.dumps({"method": 7}).encode(), "a method name"),
        (json.dumps(["partial1"]).encode(), "a method name"),
        (b"x" * 5000, "over"),
    ],
)
def test_edge_init_bad_requests_fail_clearly_and_server_keeps_serving(cloud, body, match):
    client = flight.connect(cloud)
    with pytest.raises(flight.FlightServerError, match=match):
        list(client.do_action(flight.Action(edge_init.ACTION, body)))
    assert len(list(client.do_action(_edge_init_action("linear")))) == 1
    with pytest.raises(CloudRequestError, match="unknown method"):
        FeatureClient(cloud).edge_init("no-such-method")


# -- auth ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secured(tiny_backbone, tmp_path_factory):
    d = tmp_path_factory.mktemp("auth")
    (d / "tokens.toml").write_text(
        '[tokens.alice]\ntoken = "alice-secret-1"\ntasks = ["synthetic"]\n'
        '[tokens.bob]\ntoken = "bob-secret-22"\ntasks = ["fashion-mnist"]\n'
        '[tokens.ops]\ntoken = "ops-secret-333"\ntasks = ["*"]\n'
    )
    with running_cloud(_config(d, tokens=str(d / "tokens.toml")), backbone=tiny_backbone) as loc:
        yield loc


def _with_token(token):
    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])


def test_auth_scopes_tokens_to_tasks(secured):
    client = flight.connect(secured)
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.do_get(_ticket()).read_all()
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.do_get(_ticket(), _with_token("wrong-token")).read_all()
    with pytest.raises(flight.FlightUnauthorizedError, match="bob"):
        client.do_get(_ticket(), _with_token("bob-secret-22")).read_all()
    assert client.do_get(_ticket(), _with_token("alice-secret-1")).read_all().num_rows == 8
    assert client.do_get(_ticket(), _with_token("ops-secret-333")).read_all().num_rows == 8
    # list_flights shows each token its own tasks only (bob's fashion-mnist when its data is here)
    listed = client.list_flights(options=_with_token("bob-secret-22"))
    assert {json.loads(i.descriptor.command)["task"] for i in listed} <= {"fashion-mnist"}


def test_edge_init_needs_a_token_but_no_task_scope(secured, tiny_backbone):
    with pytest.raises(CloudAuthError):
        FeatureClient(secured).edge_init("partial1")
    with pytest.raises(CloudAuthError):
        FeatureClient(secured, token="wrong-token").edge_init("partial1")
    # backbone weights are not a task's data: any valid token may fetch them
    init = FeatureClient(secured, token="bob-secret-22").edge_init("partial1")
    assert init.weights == served_id(tiny_backbone) and init.state


def test_feature_client_sends_token(secured, caplog):
    assert len(FeatureClient(secured, token="alice-secret-1").get(TASK, "val", "mist", 1)) == 8
    with pytest.raises(CloudAuthError):
        FeatureClient(secured).get(TASK, "val", "mist", 1)
    assert "alice-secret-1" not in caplog.text


# -- client robustness -------------------------------------------------------------------------
def test_unreachable_cloud_retries_then_fails_clearly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = FeatureClient(f"grpc+tcp://127.0.0.1:{port}", retries=2, backoff_s=0.01, timeout_s=2)
    with pytest.raises(CloudUnavailableError, match="after 3 tries"):
        client.get(TASK, "val", "mist", 1)


class _CutOnce(FeatureServer):
    """Breaks the first stream after one batch, as a dropped connection would."""

    offsets: ClassVar[list[int]] = []

    def _stream(self, context, principal, req, split, rows, *rest):
        type(self).offsets.append(req.offset)
        inner = super()._stream(context, principal, req, split, rows, *rest)
        if len(type(self).offsets) > 1:
            yield from inner
            return
        yield next(inner)
        raise flight.FlightUnavailableError("connection dropped")


def test_cut_stream_resumes_from_last_received_row(tiny_backbone, tmp_path):
    with running_cloud(_config(tmp_path), backbone=tiny_backbone, server_cls=_CutOnce) as loc:
        client = FeatureClient(loc, backoff_s=0.01)
        fs = client.get(TASK, "test", "mist", 1)
    assert fs.ids == list(get_task(TASK).split("test").ids)
    assert _CutOnce.offsets == [0, 8]  # resumed after the one whole batch it kept


class _CutEveryStream(FeatureServer):
    """Breaks every stream after one batch: a flaky link that still makes progress."""

    def _stream(self, context, principal, req, split, rows, *rest):
        inner = super()._stream(context, principal, req, split, rows, *rest)
        yield next(inner)
        for _ in inner:
            raise flight.FlightUnavailableError("connection dropped")


def test_retry_budget_renews_while_a_cut_stream_makes_progress(tiny_backbone, tmp_path):
    # Prepare: more cuts than retries, but every attempt delivers one more batch
    want = list(get_task(TASK).split("train").ids)
    with running_cloud(
        _config(tmp_path), backbone=tiny_backbone, server_cls=_CutEveryStream
    ) as loc:
        # Execute
        fs = FeatureClient(loc, retries=1, backoff_s=0.01).get(TASK, "train", "mist", 1)
    # Assert
    assert len(want) > 2 * 8  # at least three batches, so at least two cuts
    assert fs.ids == want


class _WrongK(FeatureServer):
    def _parse(self, raw, upload=False):
        req = super()._parse(raw, upload)
        return FeatureRequest(req.task, req.split, req.gather, 3, req.dtype, req.ids, req.offset)


def test_client_refuses_other_backbone_or_k(cloud, tiny_backbone, tmp_path):
    with pytest.raises(WireError, match="backbone"):
        FeatureClient(cloud, expect_backbone="vit_base_patch16_224").get(TASK, "val", "mist", 1)
    with (
        running_cloud(_config(tmp_path), backbone=tiny_backbone, server_cls=_WrongK) as loc,
        pytest.raises(WireError, match="k 3"),
    ):
        FeatureClient(loc).get(TASK, "val", "mist", 1)


def test_upload_schema_is_checked(cloud):
    client = flight.connect(cloud)
    desc = flight.FlightDescriptor.for_command(b'{"gather": "final"}')
    writer, reader = client.do_exchange(desc)
    bad = pa.record_batch([pa.array(["a"])], names=["name"])
    with pytest.raises(flight.FlightServerError, match="upload schema"):
        writer.begin(bad.schema)
        writer.write_batch(bad)
        reader.read_chunk()
    assert UPLOAD_SCHEMA.names == ["id", "image"]


def test_config_from_toml_and_validation(tmp_path):
    p = tmp_path / "serve.toml"
    p.write_text('[server]\nport = 0\ntasks = ["synthetic"]\n[store]\ndefault_dtype = "int8"\n')
    cfg = ServeConfig.from_toml(p).override(port=1234, weights=None)
    assert cfg.port == 1234 and cfg.default_dtype == "int8" and cfg.tasks == ("synthetic",)
    p.write_text("[server]\nprot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        ServeConfig.from_toml(p)
    with pytest.raises(ConfigError, match="tls"):
        ServeConfig(tls_cert="c.pem")


def test_bench_measures_both_ratios(tiny_backbone):
    from mist_fed.assets.defaults import DEFAULT_HOST
    from mist_fed.cloud.bench import BenchConfig, bench_embed, bench_stream

    cfg = BenchConfig(images=8, batch=4, reps=1, stream_reps=2)
    stream = bench_stream(tiny_backbone, cfg, DEFAULT_HOST)
    embed = bench_embed(tiny_backbone, cfg)
    assert stream["stream_ratio"] > 0 and stream["stream_bytes"] > 0
    assert embed["embed_ratio"] > 0


def test_cli_has_cloud_serve_and_bench():
    from mist_fed.commands import build_parser

    args = build_parser().parse_args(["cloud", "serve", "--port", "0", "--random-init"])
    assert args.port == 0 and args.random_init
    args = build_parser().parse_args(["bench", "cloud", "--images", "8"])
    assert args.images == 8


def test_backbone_device_is_validated_and_cpu_serves(tiny_backbone, tmp_path):
    import torch

    with pytest.raises(ConfigError, match="device"):
        ServeConfig(device="tpu")
    assert ServeConfig(device="auto").torch_device().type == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            ServeConfig(device="cuda").torch_device()
    cfg = dataclasses.replace(_config(tmp_path), device="cpu")
    with running_cloud(cfg, backbone=tiny_backbone) as loc:
        fs = FeatureClient(loc).get(TASK, "val", "mist", 1)
    assert len(fs) == len(get_task(TASK).split("val"))


def test_warm_by_ids_or_limit_fills_the_store_so_a_stream_embeds_nothing(tiny_backbone, tmp_path):
    # Prepare: a fresh store; two ids of the train split
    ids = list(get_task(TASK).split("train").ids)
    n_val = len(get_task(TASK).split("val"))
    with running_cloud(_config(tmp_path), backbone=tiny_backbone) as loc:
        client = FeatureClient(loc)
        # Execute: warm those two ids, then the first 5 rows of val, two pairs at once
        by_ids = client.warm(TASK, "train", [("mist", 2, "float16")], ids=[ids[3], ids[7]])
        by_limit = client.warm(TASK, "val", [("mist", 2, "int8"), ("final", None, "float16")], 5)
        before = client.stats()["images_embedded"]
        fs = client.get(TASK, "train", "mist", 2, "float16", ids=[ids[7], ids[3]])
        client.get(TASK, "val", "final", None, "float16")
        after = client.stats()["images_embedded"]
        body = {"task": TASK, "split": "val", "pairs": [{}], "ids": [1]}
        with pytest.raises(flight.FlightServerError, match="warm ids must be a list of strings"):
            list(flight.connect(loc).do_action(flight.Action("warm", json.dumps(body).encode())))
    # Assert: warm embedded exactly what it was asked; streaming the warmed rows embeds none
    assert by_ids == {"images_embedded": 2, "rows": 2}
    assert by_limit == {"images_embedded": 5, "rows": 5}
    assert fs.ids == [ids[7], ids[3]]
    assert after - before == n_val - 5  # only the val rows past the warmed five
