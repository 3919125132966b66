"""The main job's one progress line and what it expects: the prediction scales the published run's stage times by
the host's matmul rate, then by the stages measured so far; the report says whether the run met the 20-minute
target and whether its pass@1 figures lie within the published run's intervals."""

import copy

import pytest

from nanoglm5.progress import JobProgress, matmul_gflops
from nanoglm5.report import against_published

REF = {"stages": {"data": 50.0, "pretrain": 150.0, "rl": 100.0}, "host": {"matmul_gflops": 100.0},
       "total_seconds": 300.0, "config": {"preset": "tiny", "device": "cpu", "quick": False},
       "pass1": {"sft": {"greedy": 0.9, "greedy_ci": [0.85, 0.95], "sampled": 0.8, "sampled_ci": [0.75, 0.85]}}}


def test_matmul_probe_measures_a_positive_rate():
    assert 0.1 < matmul_gflops(1, n=128, seconds=0.1) < 1e5


def test_expected_time_scales_with_the_host_rate_then_with_the_measured_stages():
    slow = JobProgress(list(REF["stages"]), host_gflops=50.0, ref=REF)  # half the reference's rate: twice the time
    assert slow.expected_total() == pytest.approx(600.0)
    assert "over the 5-minute target" in slow.start_line(target_s=300) and "50 GFLOP/s" in slow.start_line(300)
    slow.done("data", 150.0)  # three times the reference: the rest is predicted from that, not from the probe
    assert slow.remaining() == pytest.approx(3 * 250.0)
    assert slow.line("pretrain").startswith("stage 2/3 pretrain:") and "to go" in slow.line("pretrain")
    slow.done("pretrain", 150.0, skipped=True)  # finished by an earlier run: says nothing about this host
    assert slow.remaining() == pytest.approx(3 * 100.0)


def test_without_a_comparable_published_run_nothing_is_predicted():
    p = JobProgress(list(REF["stages"]), host_gflops=50.0, ref=REF, comparable=False)
    assert p.expected_total() is None and p.remaining() is None
    assert "no published run" in p.start_line(300) and "to go" not in p.line("data")
    no_rate = JobProgress(list(REF["stages"]), 50.0, {**REF, "host": {}})
    assert no_rate.expected_total() == pytest.approx(300.0) and "recorded no rate" in no_rate.start_line(300)


def test_the_report_says_whether_the_run_met_the_target_and_the_published_results():
    run = copy.deepcopy(REF)
    run["host"]["matmul_gflops"] = 80.0
    assert against_published(run, REF).startswith("This run took 5.0 min: within the 20-minute target")
    assert "all 2 of its pass@1 figures lie within" in against_published(run, REF)
    run["pass1"]["sft"]["sampled"], run["total_seconds"] = 0.6, 1500.0
    line = against_published(run, REF)
    assert "over the 20-minute target" in line and "sft sampled 0.600 (published 0.800 [0.750, 0.850])" in line
    run["config"]["quick"] = True
    assert "No published run of this budget" in against_published(run, REF)
