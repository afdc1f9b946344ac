"""Security: task-scoped tokens on every Flight method, no token in any log, TLS, no pickle."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import pickle
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

from mist_fed.assets.defaults import DEFAULT_HOST
from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.runner import running_cloud
from mist_fed.core.specs import Geometry
from mist_fed.data import get_task
from mist_fed.device.checkpoint import (
    WEIGHTS_FILE,
    EdgeModelConfig,
    build_net,
    load_checkpoint,
    save_checkpoint,
)
from mist_fed.errors import CloudAuthError, CloudUnavailableError, ConfigError
from mist_fed.wire.codec import UPLOAD_SCHEMA, encode_png
from mist_fed.wire.flight import FeatureClient
from mist_fed.wire.request import FeatureRequest

ROOT = Path(__file__).resolve().parents[1]
TOKENS = {"alice": "alice-Secret-0xA1", "bob": "bob-Secret-0xB22", "ops": "ops-Secret-0xC333"}
TASK, OTHER = "synthetic", "synthetic:classes=3,seed=7"


def _config(d: Path, **kw):
    (d / "tokens.toml").write_text(
        f'[tokens.alice]\ntoken = "{TOKENS["alice"]}"\ntasks = ["{TASK}"]\n'
        f'[tokens.bob]\ntoken = "{TOKENS["bob"]}"\ntasks = ["{OTHER}"]\n'
        f'[tokens.ops]\ntoken = "{TOKENS["ops"]}"\ntasks = ["*"]\n'
    )
    return ServeConfig(
        port=0,
        random_init=True,
        cache_dir=str(d / "store"),
        rows_per_batch=8,
        tasks=(TASK, OTHER),
        tokens=str(d / "tokens.toml"),
        **kw,
    )


def _opts(token: str) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])


def _desc(task: str) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(FeatureRequest(task, "val", "mist", 1).to_json())


@pytest.mark.network
def test_tokens_are_scoped_on_every_flight_method_and_never_logged(
    tiny_backbone, tmp_path, caplog, capfd
):
    caplog.set_level(logging.DEBUG)
    with running_cloud(_config(tmp_path), backbone=tiny_backbone) as loc:
        client = flight.connect(loc)
        alice, bob = _opts(TOKENS["alice"]), _opts(TOKENS["bob"])
        # list_flights: each token sees its own task only
        seen = {json.loads(i.descriptor.command)["task"] for i in client.list_flights(options=bob)}
        assert seen == {OTHER}
        # get_flight_info / do_get: the other task is refused, features and labels alike
        with pytest.raises(flight.FlightUnauthorizedError, match="not allowed to read task"):
            client.get_flight_info(_desc(TASK), bob)
        with pytest.raises(flight.FlightUnauthorizedError):
            client.do_get(
                flight.Ticket(FeatureRequest(TASK, "val", "mist", 1).to_json()), bob
            ).read_all()
        with pytest.raises(flight.FlightUnauthorizedError):
            client.get_flight_info(_desc(OTHER), alice)
        assert client.get_flight_info(_desc(OTHER), bob).total_records == 8
        # do_exchange: a task named in the descriptor grants nothing; no labels come back
        png = encode_png(get_task(TASK).split("val").image(0))
        desc = flight.FlightDescriptor.for_command(
            json.dumps({"task": TASK, "split": "val", "gather": "final"}).encode()
        )
        writer, reader = client.do_exchange(desc, bob)
        writer.begin(UPLOAD_SCHEMA)
        writer.write_batch(
            pa.record_batch([pa.array(["mine"]), pa.array([png])], schema=UPLOAD_SCHEMA)
        )
        out = reader.read_chunk().data
        writer.close()
        assert out.column("id").to_pylist() == ["mine"] and out.column("label").null_count == 1
        # no token, a wrong one, and a near miss: refused everywhere
        for opts in (None, _opts("nope-nope-nope"), _opts(TOKENS["alice"][:-1])):
            kw = {} if opts is None else {"options": opts}
            with pytest.raises(flight.FlightUnauthenticatedError):
                list(client.list_flights(**kw))
            with pytest.raises(flight.FlightUnauthenticatedError):
                client.get_flight_info(_desc(TASK), *(() if opts is None else (opts,)))
            with pytest.raises(flight.FlightUnauthenticatedError):
                w, r = client.do_exchange(desc, *(() if opts is None else (opts,)))
                w.begin(UPLOAD_SCHEMA)
                r.read_chunk()
        # the FeatureClient maps refusals to clear errors without echoing the token
        with pytest.raises(CloudAuthError) as refused:
            FeatureClient(loc, token=TOKENS["bob"]).get(TASK, "val", "mist", 1)
        assert len(FeatureClient(loc, token=TOKENS["alice"]).get(TASK, "val", "mist", 1)) == 8
        client.close()
    # Assert: no token (nor its secret part) in any log record, message or stream output
    captured = capfd.readouterr()
    text = caplog.text + captured.out + captured.err + str(refused.value)
    assert len(caplog.records) > 0
    for token in TOKENS.values():
        assert token not in text and token.split("-", 1)[1] not in text
    print(f"\nRELIABILITY security: log_records_checked={len(caplog.records)} token_leaks=0")


def _self_signed(d: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mist-fed test cloud")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(DEFAULT_HOST))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.network
def test_tls_with_a_self_signed_certificate(tiny_backbone, tmp_path):
    # Prepare
    cert, key = _self_signed(tmp_path)
    cfg = _config(tmp_path, tls_cert=str(cert), tls_key=str(key))
    # Execute
    with running_cloud(cfg, backbone=tiny_backbone) as loc:
        assert loc.startswith("grpc+tls://")
        trusted = FeatureClient(loc, token=TOKENS["alice"], tls_root_certs=cert.read_bytes())
        fs = trusted.get(TASK, "val", "mist", 1)
        untrusted = FeatureClient(loc, token=TOKENS["alice"], retries=0, timeout_s=5)
        plain = FeatureClient(loc.replace("grpc+tls", "grpc+tcp"), retries=0, timeout_s=5)
        # Assert: the right CA works; no CA, or no TLS at all, gets nothing
        assert len(fs) == 8
        with pytest.raises(CloudUnavailableError):
            untrusted.get(TASK, "val", "mist", 1)
        with pytest.raises(CloudUnavailableError):
            plain.get(TASK, "val", "mist", 1)


# -- nothing is unpickled ---------------------------------------------------------------------
UNSAFE = [
    (
        re.compile(r"^\s*(import|from)\s+(c?pickle|cloudpickle|dill|shelve|marshal)\b", re.M),
        "pickle import",
    ),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    (re.compile(r"PyExtensionType|py_extension_type"), "pickle-based Arrow extension type"),
]


def test_no_source_unpickles_or_torch_loads_without_weights_only():
    sources = sorted((ROOT / "mist_fed").rglob("*.py")) + sorted(
        (ROOT / "simulations").rglob("*.py")
    )
    assert len(sources) > 20
    found = []
    for path in sources:
        text = path.read_text()
        for pattern, what in UNSAFE:
            if pattern.search(text):
                found.append(f"{path.relative_to(ROOT)}: {what}")
        for call in re.finditer(r"torch\.load\(([^()]*(\([^()]*\))?[^()]*)\)", text):
            if "weights_only=True" not in call.group(1):
                found.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
    assert found == []


def test_checkpoints_are_safetensors_only(tmp_path, pickle_bomb):
    # Prepare
    geometry = Geometry("tiny", "random:tiny", num_blocks=3, embed_dim=8, num_tokens=5)
    cfg = EdgeModelConfig("mist", 3, geometry, k=2, edge_kwargs={"depth": 1, "qkv_dim": 4})
    path = save_checkpoint(build_net(cfg), cfg, tmp_path)
    # Assert: the weights file is safetensors (8-byte header length, then a JSON header)
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert path.name == WEIGHTS_FILE and "mist_fed.config" in header["__metadata__"]
    net, _ = load_checkpoint(tmp_path)
    assert isinstance(net, torch.nn.Module)
    # Execute: a pickle (a torch.save checkpoint) put in its place is refused, never run
    path.write_bytes(pickle.dumps(pickle_bomb()))
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path)
    assert not pickle_bomb.ran
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ConfigError, match="safetensors"):
        load_checkpoint(tmp_path)
