"""How an RL run is judged: held-out pass@1 (greedy and sampled, all tests pass, per turn) through the rollout engine, confidence
intervals for it and for RL's gain, and the figures of a run: reward against wall clock (a moving average
with its spread, the held-out evaluations marked) and the timeline of who was busy when (trainer and
workers: generating, judging, waiting)."""

from __future__ import annotations

import math
import threading
from dataclasses import replace

import numpy as np
import torch

from nanoglm5.rl.buffer import Lease
from nanoglm5.rl.envs import make_env
from nanoglm5.rl.rl_config import RLConfig
from nanoglm5.rl.rollout import Rollout, make_envs


# ---------------------------------------------------------------------------------------------- pass@1
class MemoJudge:
    """An environment whose judge runs each distinct (task, completion) once: the sampled draws of a confident
    model repeat themselves, and the code judge (a sandboxed Python process per program) is the costly part
    of an evaluation. Rewards are the judge's own (its test cases are fixed), so nothing changes but time."""

    def __init__(self, env):
        self.env, self.memo, self.lock = env, {}, threading.Lock()
        self.calls = self.hits = 0

    def __getattr__(self, name):  # make_tasks, reward, reset, step … of the wrapped environment
        return getattr(self.env, name)

    def judge(self, task, text: str):
        key = (task.task_id, text)
        with self.lock:
            self.calls += 1
            if key in self.memo:
                self.hits += 1
                return self.memo[key]
        out = self.env.judge(task, text)
        with self.lock:
            self.memo[key] = out
        return out


@torch.no_grad()
def evaluate(model, tokenizer, tasks, cfg: RLConfig, batch_groups: int = 16, samples: int = 0) -> dict:
    """Held-out accuracy over `tasks`, in-process: greedy pass@1 {"acc", "acc/<env>", "n"}, and with
    samples > 0 also the sampled pass@1 {"sampled", "sampled/<env>"}: the mean reward of `samples` draws
    per task at the rollout temperature, each seeded by (seed, task index, draw) so before and after see
    the same draws. Sampled pass@1 is what RL optimises (the policy's expected reward); greedy shows what
    it does to the mode, which the SFT model may already have right. "per_task" holds each task's greedy
    reward and mean sampled reward (in task order), for confidence intervals and paired differences
    (`mean_ci`, `gain`). "by_turn" is pass@1 per turn, {"acc": [...], "sampled": [...]}: entry k − 1 counts
    the episodes solved within k attempts (a multi-turn env's first attempt, after one revision, ...), length
    `cfg.max_turns`; the last equals "acc"/"sampled" when turn_discount is 1. Reads max_new_tokens, max_len,
    temperature, seed, env_threads, max_turns and allow_unsandboxed from `cfg`."""

    judged = {True: 0, False: 0}
    # pass@1 is "the program passes ALL its tests": the single-turn code env trains on the fraction passed,
    # but is judged here all-or-nothing, as code_mt always is
    envs = {**make_envs(cfg), "code": make_env("code", all_or_nothing=True, allow_unsandboxed=cfg.allow_unsandboxed)}
    envs = {name: (MemoJudge(env) if hasattr(env, "judge") else env) for name, env in envs.items()}

    def run(greedy: bool, g: int) -> list[list]:
        c = replace(cfg, group_size=g, worker_groups=batch_groups, env_latency_s=0.0)
        ro = Rollout(model, tokenizer, c, greedy=greedy, envs=envs)
        try:
            groups = ro.run([(Lease(i, 0, math.inf, 0), t) for i, t in enumerate(tasks)])
        finally:
            ro.close()
        for t in (t for grp in groups for t in grp.trajectories if t.meta.get("sandboxed") is not None):
            judged[t.meta["sandboxed"]] += 1
        return [[(t.reward, t.meta.get("turns", 1)) for t in grp.trajectories] for grp in groups]

    out = {"n": len(tasks), "samples": samples, "per_task": {}, "by_turn": {}}
    for key, episodes in [("acc", run(True, 1))] + ([("sampled", run(False, samples))] if samples > 0 else []):
        rewards = [float(np.mean([r for r, _ in eps])) for eps in episodes]
        out[key] = float(np.mean(rewards)) if rewards else float("nan")
        out["per_task"][key] = rewards
        out["by_turn"][key] = pass_by_turn(episodes, cfg.max_turns)
        for env in sorted({t.env for t in tasks}):
            out[f"{key}/{env}"] = float(np.mean([r for r, t in zip(rewards, tasks) if t.env == env]))
    out["judged_sandboxed"], out["judged_unsandboxed"] = judged[True], judged[False]
    memo = [e for e in envs.values() if isinstance(e, MemoJudge)]
    out["judge_runs"] = sum(e.calls - e.hits for e in memo)  # programs actually run (the rest were repeats)
    return out


def pass_by_turn(episodes: list[list[tuple[float, int]]], max_turns: int) -> list[float]:
    """Pass@1 within k attempts for k = 1..max_turns: per task the mean over its draws of the reward of an
    episode that ended by attempt k (0 for one still going), then the mean over tasks. `episodes` holds per
    task its draws' (reward, attempts used)."""
    if not episodes:
        return [float("nan")] * max_turns
    return [float(np.mean([np.mean([r if turns <= k else 0.0 for r, turns in eps]) for eps in episodes]))
            for k in range(1, max_turns + 1)]


def normal_ci(x, z: float = 1.96) -> tuple[float, float, float]:
    """(mean, low, high): the normal 95% interval of the mean of x."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    h = z * float(x.std(ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else math.nan
    return m, m - h, m + h


def mean_ci(x, z: float = 1.96) -> tuple[float, float, float]:
    """(mean, low, high): the 95% interval of a pass rate over tasks (per-task values in [0, 1]). Per-task 0/1
    results (greedy pass@1) get the Wilson score interval: the normal one has zero width when every task passes
    (or none does), and 128 passes out of 128 do not make the pass rate exactly 1. Other values (the mean of a
    task's draws) get the normal interval."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0 or not np.isin(x, (0.0, 1.0)).all():
        return normal_ci(x, z)
    n, m = len(x), float(x.mean())
    centre = (m + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(m * (1 - m) / n + z * z / (4 * n * n))
    return m, centre - half, centre + half


def gain(before: dict, after: dict, key: str = "sampled") -> tuple[float, float, float]:
    """after − before with its 95% interval, paired by task (the same tasks and the same seeded draws)."""
    b, a = before["per_task"][key], after["per_task"][key]
    if len(a) != len(b):
        raise ValueError(f"gain: {len(b)} tasks before, {len(a)} after: evaluate both on the same tasks")
    return normal_ci(np.asarray(a) - np.asarray(b))


def judged_line(sandboxed: int, unsandboxed: int) -> str:
    """How the code rewards were judged, for logs and reports: never claim a sandbox that did not run."""
    if sandboxed + unsandboxed == 0:
        return "no program was run by the judge"
    if unsandboxed == 0:
        return f"all {sandboxed} code judgements ran in the bubblewrap sandbox"
    return (f"{unsandboxed} of {sandboxed + unsandboxed} code judgements ran WITHOUT bubblewrap "
            "(--allow-unsandboxed: resource limits only)")


# ---------------------------------------------------------------------------------------------- timeline
def _union(spans) -> list[list[float]]:
    out = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def _length(spans) -> float:
    return sum(e - s for s, e in _union(spans))


def timeline_rows(tl: dict) -> dict:
    """controller.timeline() → per lane, the spans of each activity: {"trainer": {"training": […]},
    "worker i": {"busy": […], "judging": […]}}. A worker is busy while it holds a group (generating, or
    waiting for its judge); a group's judging span runs from its slowest judge call's start to its commit
    (group log "judge_s", when the controller recorded it)."""
    rows = {"trainer": {"training": [list(s) for s in tl.get("trainer", [])]}}
    for wid, spans in sorted(tl.get("workers", {}).items(), key=lambda kv: int(kv[0])):
        judging = [[g["t"] - g["judge_s"], g["t"]] for g in tl.get("groups", [])
                   if str(g.get("worker")) == str(wid) and g.get("judge_s")]
        rows[f"worker {wid}"] = {"busy": [list(s) for s in spans], "judging": judging}
    return rows


def utilization(tl: dict, wall: float | None = None) -> dict:
    """Busy fractions over the run's wall clock: the trainer (training), each worker (holding a group), and the
    share of worker time a judge call was running; wall defaults to the last recorded moment."""
    rows = timeline_rows(tl)
    ends = [e for lanes in rows.values() for spans in lanes.values() for _, e in spans]
    wall = wall or (max(ends) if ends else 0.0)
    if wall <= 0:
        return {}
    workers = [lanes for name, lanes in rows.items() if name.startswith("worker")]
    return {"wall_s": wall, "trainer_busy": _length(rows["trainer"]["training"]) / wall,
            "worker_busy": float(np.mean([_length(w["busy"]) / wall for w in workers])) if workers else 0.0,
            "worker_judging": float(np.mean([_length(w["judging"]) / wall for w in workers])) if workers else 0.0}


def plot_timeline(timelines: dict[str, dict], path, walls: dict | None = None) -> dict:
    """One panel per run (sync, async): a lane for the trainer (training / waiting for a batch) and one per
    worker (generating, judging, waiting), with the measured utilization in the title. Returns it per run."""
    import matplotlib  # optional dependency: only figures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    util = {name: utilization(tl, (walls or {}).get(name)) for name, tl in timelines.items()}
    fig, axes = plt.subplots(len(timelines), 1, figsize=(11, 1.0 + 1.1 * (len(timelines) + 2)), squeeze=False,
                             sharex=True)
    colors = {"training": "tab:blue", "busy": "tab:green", "judging": "tab:orange"}
    for ax, (name, tl) in zip(axes[:, 0], timelines.items()):
        rows = timeline_rows(tl)
        u = util[name]
        labels = list(rows)
        for y, lane in enumerate(labels):
            for kind, spans in rows[lane].items():
                h, off = (0.3, -0.35) if kind == "judging" else (0.6, -0.3)
                ax.broken_barh([(s, e - s) for s, e in spans], (y + off, h), color=colors[kind], lw=0)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylim(-0.6, len(labels) - 0.4)
        ax.invert_yaxis()
        if u:
            ax.set_xlim(0, u["wall_s"])
            ax.set_title(f"{name}: trainer busy {u['trainer_busy']:.0%}, workers busy {u['worker_busy']:.0%} "
                         f"(judging {u['worker_judging']:.0%}); white = waiting", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("wall clock (s)")
    axes[0, 0].legend(handles=[Patch(color=colors["training"], label="trainer: training"),
                               Patch(color=colors["busy"], label="worker: generating (holds a group)"),
                               Patch(color=colors["judging"], label="worker: judging")],
                      loc="upper right", fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return util


# ---------------------------------------------------------------------------------------------- reward
def moving(x, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Trailing moving average and standard deviation over up to `window` points."""
    x = np.asarray(x, dtype=np.float64)
    m = np.array([x[max(0, i - window + 1): i + 1].mean() for i in range(len(x))])
    s = np.array([x[max(0, i - window + 1): i + 1].std() for i in range(len(x))])
    return m, s


def plot_reward_vs_time(runs: dict[str, list[dict]], path, evals: dict | None = None, window: int = 5) -> str:
    """Mean batch reward against wall-clock seconds (and against steps), one line per run: the moving average
    over `window` steps with ± one standard deviation shaded, the raw points faint. `evals` marks held-out
    evaluations: {run: [(time_s, value, low, high, label)]}, drawn as points with their interval on the
    wall-clock panel (sampled pass@1 is an expected reward at the rollout temperature, like the batch reward).
    Returns the step panel's title: what it says when the runs' curves overlap ("" when they do not)."""
    import matplotlib  # optional dependency: only figures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (name, hist) in enumerate(runs.items()):
        if not hist:
            continue
        color = f"C{i}"
        r = [h["reward"] for h in hist]
        m, s = moving(r, window)
        for ax, x in ((axes[0], [h["time"] for h in hist]), (axes[1], [h["step"] for h in hist])):
            ax.plot(x, r, ".", color=color, alpha=0.3)
            ax.plot(x, m, "-", color=color, label=f"{name} (moving mean of {window})")
            ax.fill_between(x, m - s, m + s, color=color, alpha=0.15)
        for t, v, lo, hi, label in (evals or {}).get(name, []):
            yerr = [[v - lo], [hi - v]] if np.isfinite(lo) else None
            axes[0].errorbar([t], [v], yerr=yerr, fmt="D", color=color, ms=6, capsize=3, mec="black")
            # runs ending together at the same value would write their labels on top of each other ("afterafter"):
            # each run's labels sit at their own height
            # a label at the start goes right of its bar, the others left: never across the error bar itself
            start = t <= 0
            axes[0].annotate(label, (t, v), textcoords="offset points", xytext=(8 if start else -8, 8 - 14 * i),
                             fontsize=7, color=color, ha="left" if start else "right")
    axes[0].set_xlabel("wall clock (s)")
    axes[1].set_xlabel("optimizer step")
    for ax in axes:
        ax.set_ylabel("mean reward of the trained batch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if evals:
        axes[0].set_title("◆ held-out sampled pass@1 (95% CI) before and after", fontsize=9)
    curves = [[h["reward"] for h in hist] for hist in runs.values() if hist]
    title = ""
    if len(curves) > 1 and all(c == curves[0] for c in curves):  # say so, or one run looks missing
        title = f"{' and '.join(runs)}: the same rewards, the curves lie on top of each other"
    elif len(curves) > 1 and len({len(c) for c in curves}) == 1:
        gap = max(abs(a - b) for c in curves[1:] for a, b in zip(moving(curves[0], window)[0], moving(c, window)[0]))
        if gap <= 0.03:
            title = f"{' and '.join(runs)}: the moving means overlap (they differ by ≤ {gap:.3f})"
    axes[1].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return title
