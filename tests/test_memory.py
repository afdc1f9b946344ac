"""The memory cap: the guard measures peak RSS and refuses jobs over the device memory."""

import pytest
import torch

from mist_fed.device.memory import (
    MemoryGuard,
    check_fits,
    estimate_train_mb,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
)
from mist_fed.errors import ResourceLimitError


def test_guard_stops_a_job_that_grows_past_the_cap():
    # Prepare
    cap = rss_mb() + 60
    # Execute / Assert
    with (
        pytest.raises(ResourceLimitError, match="exceeds device memory") as err,
        MemoryGuard(cap, "test") as guard,
    ):
        big = torch.ones(200 * 2**20 // 4)  # 200 MB, touched
        guard.check()
        assert big.numel() == 0  # not reached
    assert "measured peak RSS" in str(err.value)


def test_guard_passes_a_job_under_the_cap():
    with MemoryGuard(rss_mb() + 500, "test") as guard:
        x = torch.ones(10 * 2**20 // 4)
        guard.check()
    assert guard.baseline_mb <= guard.peak_mb < guard.cap_mb
    del x


def test_hard_limit_turns_a_runaway_allocation_into_a_clear_error():
    with (
        pytest.raises(ResourceLimitError, match="exceeds device memory"),
        MemoryGuard(rss_mb() + 50, "test", hard=True, hard_slack_mb=50),
    ):
        torch.ones(2 * 2**30 // 4)  # 2 GB: the allocator fails under RLIMIT_DATA


def test_estimate_refuses_before_allocating():
    need = estimate_train_mb(10_000, (197, 768), 4, micro_batch=8)
    assert need > 5_000  # 10k fp32 ViT-B maps are 5.8 GB
    with pytest.raises(ResourceLimitError, match="--dtype"):
        check_fits(need, 4096, "rpi4")
    check_fits(estimate_train_mb(1_000, (197, 768), 2, micro_batch=8), 4096, "rpi4")


def test_peak_rss_resets():
    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here")
    assert peak_rss_mb() <= rss_mb() + 5


def test_bench_edge_measures_each_case_in_a_fresh_process():
    # Prepare / Execute: tiny shapes, the same code path as `mist-fed bench edge`
    from mist_fed.device.bench import bench_edge, report_lines

    r = bench_edge(tokens=17, dim=48, batch=8, classes=4, steps=2, rows=40)
    # Assert
    for case in ("imports", "train-naive", "train", "infer"):
        assert r[case]["peak_mb"] >= r[case]["baseline_mb"] > 0
    assert "paper Pi 4 total" in "\n".join(report_lines(r))
