"""A fleet on a token-protected cloud: the token comes from a file or ``MIST_FED_CLOUD_TOKEN``,
reaches the devices on Ray through the run's keeper actor, and appears in no results file, log,
Ray session file, process command line or process environment while the fleet runs."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pandas as pd
import pytest

from mist_fed.commands.common import TOKEN_ENV, read_cloud_token
from mist_fed.errors import CloudAuthError, ConfigError
from mist_fed.fleet.runtime.provision import cloud_service
from mist_fed.fleet.spec import spec_from_dict
from mist_fed.wire.flight import FeatureClient
from tests import leaks
from tests.procs import tagged_pids

ROOT = Path(__file__).resolve().parents[1]
RUN_S = 420  # Ray start, embedding, 3 devices x 2 rounds, on a loaded host
TASK = "synthetic:classes=3,train=24,test=12"
FLEET = f"""\
profiles = "rpi4"
train_per_device = 6
test_per_device = 3
rounds = 2
local_epochs = 1
seed = 0

[[fleets]]
task = "{TASK}"
devices = 3

[backbone]
name = "vit_tiny_patch16_224"
random_init = true
model_kwargs = {{ img_size = 32, patch_size = 8, depth = 2, embed_dim = 32, num_heads = 2 }}
"""


def _token_file(d: Path, token: str, mode: int = 0o600) -> Path:
    p = d / "cloud.token"
    p.write_text(token + "\n")
    p.chmod(mode)
    return p


def test_the_token_comes_from_a_file_or_the_environment_which_then_forgets_it(
    tmp_path, monkeypatch, caplog
):
    token = secrets.token_urlsafe(24)
    # a file: its first line; the variable is dropped even so (no child inherits it)
    monkeypatch.setenv(TOKEN_ENV, "from-the-env")
    assert read_cloud_token(_token_file(tmp_path, token)) == token
    assert TOKEN_ENV not in os.environ
    # the variable alone
    monkeypatch.setenv(TOKEN_ENV, f" {token} ")
    assert read_cloud_token(None) == token and TOKEN_ENV not in os.environ
    assert read_cloud_token(None) is None
    # a file others may read: used, with the fix named; an empty or missing one: refused
    with caplog.at_level(logging.WARNING):
        assert read_cloud_token(_token_file(tmp_path, token, 0o644)) == token
    assert "chmod 600" in caplog.text and token not in caplog.text
    with pytest.raises(ConfigError, match="empty"):
        read_cloud_token(_token_file(tmp_path, ""))
    with pytest.raises(ConfigError, match="cannot read"):
        read_cloud_token(tmp_path / "missing")


@pytest.mark.network
def test_an_embedded_cloud_given_a_token_requires_it(monkeypatch, tmp_path):
    monkeypatch.setenv("MIST_FED_CACHE", str(tmp_path / "cache"))
    spec = spec_from_dict(
        {
            "fleets": [{"task": TASK, "devices": 1}],
            "backbone": {"name": "vit_tiny_patch16_224", "random_init": True,
                         "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2,
                                          "embed_dim": 32, "num_heads": 2}},
        }
    )  # fmt: skip
    token = secrets.token_urlsafe(24)
    with cloud_service(spec, None, token=token) as (loc, stats):
        with pytest.raises(CloudAuthError), FeatureClient(loc, retries=0) as open_client:
            open_client.stats()
        with FeatureClient(loc, token, retries=0) as client:
            assert len(client.get(TASK, "test", "mist", 1, ids=["test-000000"])) == 1
        assert stats()["images_embedded"] >= 1  # the run's own counters, with the token


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.network
@pytest.mark.timeout(RUN_S + 120)
def test_a_token_protected_fleet_runs_and_the_token_appears_nowhere(tmp_path):
    # Prepare: a token in an owner-only file; Ray's session files in a folder of the test's own
    # (short: Ray's socket paths must fit 107 bytes)
    token = secrets.token_urlsafe(32)
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir(mode=0o700)
    token_file = _token_file(secret_dir, token)
    (tmp_path / "fleet.toml").write_text(FLEET)
    ray_tmp = Path(tempfile.mkdtemp(prefix="mft-", dir="/tmp"))
    tag = f"mist-fed-token-{uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0",
           "MIST_FED_CACHE": str(tmp_path / "cache"), "RAY_TMPDIR": str(ray_tmp),
           "MIST_FED_TEST_TAG": tag}  # fmt: skip
    env.pop(TOKEN_ENV, None)
    cmd = [sys.executable, str(ROOT / "simulations" / "run.py"), "-v"]
    cmd += ["--fleet", str(tmp_path / "fleet.toml"), "--results", str(tmp_path / "results")]
    cmd += ["--run-id", "guarded", "--no-progress", "--cloud-token-file", str(token_file)]
    # Execute: the run, with every process watched while it goes
    with leaks.watching_processes([token]) as seen:
        proc = subprocess.Popen(
            cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )  # fmt: skip
        try:
            out, err = proc.communicate(timeout=RUN_S)
        except subprocess.TimeoutExpired:
            out, err = "", ""
    try:
        assert proc.returncode == 0, err[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pid in tagged_pids(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # Assert: the run completed on the protected cloud (every device-round ok: the devices on
    # Ray sent the token, or the cloud would have refused them)
    run_dir = tmp_path / "results" / "guarded"
    dev = pd.read_parquet(run_dir / "devices.parquet")
    assert len(dev) == 6 and set(dev["status"]) == {"ok"}, dev[["status", "reason"]]
    # ... and the token is nowhere: results, the run's output, Ray's session files and logs,
    # the device storage, any process while it ran
    found = {
        "results": leaks.in_files(run_dir, [token]),
        "ray_session": leaks.in_files(ray_tmp, [token]),
        "cache": leaks.in_files(tmp_path / "cache", [token]),
    }
    in_output = leaks.in_text(out + err, [token])
    token_leaks = sum(n for n, _ in found.values()) + in_output + seen["found"]
    files = {k: n for k, (_, n) in found.items()}
    assert files["results"] >= 5 and files["ray_session"] >= 10  # the scans read something
    assert leaks.in_files(secret_dir, [token]) == (1, 1)  # the scanner finds it where it is
    assert seen["scans"] >= 3
    assert token_leaks == 0, (found, in_output, seen)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    print(
        f"\nRELIABILITY cloud_token: device_rounds_ok={len(dev)} results_files={files['results']} "
        f"ray_session_files={files['ray_session']} output_chars={len(out + err)} "
        f"process_scans={seen['scans']} (up to {seen['max_procs']} processes) "
        f"token_leaks={token_leaks}"
    )


@pytest.mark.network
def test_the_client_command_reads_the_token_file_and_trains_on_a_protected_cloud(
    tiny_backbone, tmp_path, capsys
):
    from mist_fed.cli import main
    from mist_fed.cloud.config import ServeConfig
    from mist_fed.cloud.runner import running_cloud

    # Prepare: a cloud that requires the token; the token in an owner-only file
    token = secrets.token_urlsafe(24)
    (tmp_path / "tokens.toml").write_text(f'[tokens.dev]\ntoken = "{token}"\ntasks = ["{TASK}"]\n')
    serve = ServeConfig(port=0, random_init=True, cache_dir=str(tmp_path / "store"),
                        rows_per_batch=8, tasks=(TASK,), tokens=str(tmp_path / "tokens.toml"))  # fmt: skip
    argv = ["client", "--task", TASK, "--profile", "laptop", "--k", "2", "--dtype", "float16"]
    argv += ["--epochs", "1", "--device-dir", str(tmp_path / "device"), "--json"]
    with running_cloud(serve, backbone=tiny_backbone) as loc:
        # Execute: without the token, then with its file
        refused = main([*argv, "--cloud", loc, "--out", str(tmp_path / "no")])
        err = capsys.readouterr().err
        code = main([*argv, "--cloud", loc, "--out", str(tmp_path / "yes"),
                     "--cloud-token-file", str(_token_file(tmp_path, token))])  # fmt: skip
    out = capsys.readouterr()
    # Assert: refused in one line, then served; the token in no output and no file written
    assert refused != 0 and "refused the token" in err
    assert code == 0 and (tmp_path / "yes" / "lae.safetensors").is_file()
    written = (
        leaks.in_files(tmp_path / "yes", [token])[0]
        + leaks.in_files(tmp_path / "device", [token])[0]
    )
    assert leaks.in_text(out.out + out.err + err, [token]) == 0 and written == 0
