"""nanoglm5/rl/evaluation.py without a model: intervals and paired gains, the judge memo, the timeline's
utilization, and both figures from a controller-shaped timeline and history."""

import numpy as np
import pytest

from nanoglm5.rl.evaluation import (
    MemoJudge,
    gain,
    mean_ci,
    moving,
    pass_by_turn,
    plot_reward_vs_time,
    plot_timeline,
    timeline_rows,
    utilization,
)


def test_mean_ci_and_paired_gain():
    m, lo, hi = mean_ci([0.25, 0.75] * 50)
    assert m == 0.5 and lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * np.std([0.25, 0.75] * 50, ddof=1) / 10)
    # 0/1 results: Wilson, which keeps a width when every task passes (the normal interval would be [1, 1])
    m, lo, hi = mean_ci([1.0] * 128)
    assert m == 1.0 and lo == pytest.approx(128 / (128 + 1.96**2)) and hi == pytest.approx(1.0)
    m, lo, hi = mean_ci([0.0, 1.0] * 50)
    assert m == 0.5 and lo == pytest.approx(0.5 - 0.0965, abs=1e-3) and hi == pytest.approx(0.5 + 0.0965, abs=1e-3)
    before = {"per_task": {"sampled": [0.2, 0.5, 0.9, 0.4]}}
    after = {"per_task": {"sampled": [0.3, 0.6, 1.0, 0.5]}}
    g, lo, hi = gain(before, after)
    assert g == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)  # paired: no spread
    flat = {"per_task": {"acc": [1.0] * 8}}  # differences of 0/1 results are not a pass rate: normal, not Wilson
    assert gain(flat, flat, "acc") == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same tasks"):
        gain(before, {"per_task": {"sampled": [0.1]}})


def test_memo_judge_runs_each_distinct_program_once():
    class Env:
        runs = 0

        def judge(self, task, text):
            Env.runs += 1
            return float(text == "ok"), {"sandboxed": True}

        def make_tasks(self, n):
            return list(range(n))

    class T:
        def __init__(self, i):
            self.task_id = i

    memo = MemoJudge(Env())
    outs = [memo.judge(T(i % 2), t) for i in range(6) for t in ("ok", "bad")]
    assert Env.runs == 4 and memo.calls == 12 and memo.hits == 8
    assert outs[0] == (1.0, {"sandboxed": True}) and memo.make_tasks(3) == [0, 1, 2]
    assert not hasattr(memo, "reset")  # an env without reset stays without it (rollout checks hasattr)


TIMELINE = {"trainer": [[2.0, 4.0], [6.0, 8.0]],
            "workers": {"0": [[0.0, 2.0], [4.0, 6.0]], "1": [[0.0, 1.0]]},
            "groups": [{"worker": 0, "t": 2.0, "judge_s": 0.5}, {"worker": 0, "t": 6.0, "judge_s": 1.0},
                       {"worker": 1, "t": 1.0, "judge_s": 0.0}]}


def test_timeline_rows_and_utilization():
    rows = timeline_rows(TIMELINE)
    assert list(rows) == ["trainer", "worker 0", "worker 1"]
    assert rows["worker 0"]["judging"] == [[1.5, 2.0], [5.0, 6.0]] and rows["worker 1"]["judging"] == []
    u = utilization(TIMELINE, wall=10.0)
    assert u["trainer_busy"] == pytest.approx(0.4) and u["worker_busy"] == pytest.approx((0.4 + 0.1) / 2)
    assert u["worker_judging"] == pytest.approx(0.15 / 2)


def test_figures(tmp_path):
    hist = [{"time": 1.0 + i, "step": i + 1, "reward": r} for i, r in enumerate([0.2, 0.4, 0.3, 0.5, 0.6, 0.4])]
    m, s = moving([h["reward"] for h in hist], 3)
    assert m[2] == pytest.approx(0.3) and s[0] == 0.0
    plot_reward_vs_time({"sync": hist, "async": hist[:3]}, tmp_path / "r.png",
                        evals={"sync": [(0.0, 0.3, 0.25, 0.35, "SFT"), (6.0, 0.5, 0.45, 0.55, "after")]})
    util = plot_timeline({"sync": TIMELINE, "async": TIMELINE}, tmp_path / "t.png", walls={"sync": 10.0})
    assert util["sync"]["wall_s"] == 10.0 and util["async"]["wall_s"] == 8.0
    assert (tmp_path / "r.png").stat().st_size > 1000 and (tmp_path / "t.png").stat().st_size > 1000


def test_reward_plot_says_when_the_two_runs_curves_overlap(tmp_path):
    hist = [{"time": 1.0 + i, "step": i + 1, "reward": r} for i, r in enumerate([0.2, 0.4, 0.3, 0.5, 0.6, 0.4])]
    near = [dict(h, reward=h["reward"] + 0.01) for h in hist]
    far = [dict(h, reward=h["reward"] + 0.2) for h in hist]
    assert "lie on top of each other" in plot_reward_vs_time({"sync": hist, "async": hist}, tmp_path / "a.png")
    assert "overlap (they differ by ≤ 0.010)" in plot_reward_vs_time({"sync": hist, "async": near}, tmp_path / "b.png")
    assert plot_reward_vs_time({"sync": hist, "async": far}, tmp_path / "c.png") == ""


def test_pass_by_turn_counts_an_episode_solved_at_attempt_2_within_2_not_within_1():
    # task 0: one draw solved at attempt 1, one at attempt 2; task 1: solved at 3; task 2: never solved
    episodes = [[(1.0, 1), (1.0, 2)], [(1.0, 3)], [(0.0, 3)]]
    by_turn = pass_by_turn(episodes, max_turns=3)
    assert by_turn == pytest.approx([0.5 / 3, 1.0 / 3, 2.0 / 3])
    # the last entry is the plain pass@1 (mean over tasks of the mean reward of its draws)
    assert by_turn[-1] == pytest.approx(np.mean([np.mean([r for r, _ in eps]) for eps in episodes]))
    assert pass_by_turn([[(1.0, 1)]], max_turns=2) == [1.0, 1.0]  # a single-turn env: flat
