"""`mist-fed compare`: the comparison of simulations/compare.py as a subcommand, same flags."""

from __future__ import annotations

import pandas as pd
import pytest

from mist_fed.cli import main

TASK = "synthetic:classes=3,train=12,val=6,test=9"


def test_compare_help_is_the_compare_parsers(capsys):
    # Execute
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--help"])
    # Assert
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith("usage: mist-fed compare")
    assert "--few-shot" in out and "--methods" in out and "--random-init" in out


@pytest.mark.slow
@pytest.mark.network
def test_compare_command_runs_a_tiny_random_init_table(tmp_path, capsys):
    # Prepare: one method, one seed, one epoch, a small random ViT on a synthetic task
    argv = ["compare", "--tasks", TASK, "--backbone", "vit_tiny_patch16_224", "--random-init"]
    argv += ["--methods", "linear", "--wire", "--epochs", "1", "--seeds", "1"]
    argv += ["--cache-dir", str(tmp_path / "store"), "--out", str(tmp_path), "--run-id", "cli"]
    argv += ["--device-dir", str(tmp_path / "device")]
    # Execute
    rc = main(argv)
    # Assert
    assert rc == 0, capsys.readouterr().err
    run_dir = tmp_path / "cli"
    df = pd.read_parquet(run_dir / "compare.parquet")
    # accuracy is a fraction: right answers over the task's 9 test images
    acc = float(df["accuracy"].iloc[0])
    assert len(df) == 1 and 0.0 <= acc <= 1.0 and abs(acc * 9 - round(acc * 9)) < 1e-6
    md = (run_dir / "compare.md").read_text()
    assert "linear" in md and "profile `laptop`" in md  # the default, host-like device
    assert set(df.columns) >= {"bytes_per_image", "peak_mem_mb", "compute_s", "edge_params"}
    assert any((tmp_path / "device" / "features").glob("*.arrow"))  # the device's own cache
