"""The main job's evaluation and report (nanoglm5/speedrun.py runs the stages, then this):

  `evaluate_all`  reads what the stages measured themselves (pretraining and SFT losses from metrics.jsonl,
                  held-out pass@1 before and after sync RL from rl_sync/summary.json) and measures only the
                  rest: PTQ vs QAT chat losses, the async RL model's pass@1, the int4 model's bit-identity
                  with it (and its greedy pass@1, re-measured), 95% confidence intervals and RL's gains;
  `write_report`  report/results.json (machine-readable), report/report.md and its figures;
  `publish`       copies a run's report into docs/ (results.md, results/*.png, results.json), so
                  "raw numbers beside this file" holds there too, and rewrites README's results block from
                  that results.json:  python -m nanoglm5.report out/speedrun docs

Every pass@1 is on held-out tasks of the RL code environment (unseen constants), judged by running the code
(in the bubblewrap sandbox unless --allow-unsandboxed); greedy, and sampled = the mean over seeded draws at
temperature 1 (the same draws before and after RL, so gains are paired by task).
"""

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nanoglm5 import quant
from nanoglm5.checkpoint import CheckpointError, load_hf, load_state, read_config
from nanoglm5.data.sft import build_conversations
from nanoglm5.data.shards import load_tokens
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.progress import published
from nanoglm5.report_figures import plots, read_json, read_jsonl
from nanoglm5.rl.evaluation import evaluate, gain, judged_line, mean_ci
from nanoglm5.rl.learner import load_policy
from nanoglm5.rl.rl_config import RLConfig
from nanoglm5.rl.task_source import TaskSource
from nanoglm5.training.batches import TokenBatches, chat_example
from nanoglm5.training.metrics import token_weighted_loss, unigram_entropy

PNGS = ("val_loss", "expert_load", "indexer_kl", "rl_reward", "rl_timeline", "ptq_vs_qat")


class SpeedrunError(RuntimeError):
    """An earlier stage is missing or broken; the message says what to run or delete."""


def check_ckpt(path: Path, what: str, stage: str, out: Path) -> Path:
    """A checkpoint directory that loads: config.json parses and its tensors open."""
    try:
        read_config(path)
        load_state(path)
    except CheckpointError as e:
        raise SpeedrunError(f"{what} missing or broken ({e}). Delete {out / stage} and re-run "
                            f"`python -m nanoglm5.speedrun --out-dir {out}` to redo the {stage} stage") from None
    return path


def host() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


# ---------------------------------------------------------------------------------------------- evaluation
def _last(hist: list[dict], key: str) -> float:
    vals = [h[key] for h in hist if key in h]
    return vals[-1] if vals else math.nan


def _pass1(ev: dict) -> dict:
    """greedy / sampled pass@1 with their 95% intervals over tasks."""
    out = {}
    for key, name in (("acc", "greedy"), ("sampled", "sampled")):
        if key in ev:
            m, lo, hi = mean_ci(ev["per_task"][key]) if "per_task" in ev else (ev[key], math.nan, math.nan)
            out[name], out[f"{name}_ci"] = ev[key], [max(0.0, lo), min(1.0, hi)]  # a pass rate stays in [0, 1]
    return out


def _cached(path: Path, fn):
    """fn()'s result, kept in `path` so an interrupted evaluation does not redo it."""
    if path.exists():
        return json.loads(path.read_text())
    res = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return res


def rl_device(device: str) -> str:
    """--device as the RL stages and the evaluation take it (cpu or cuda: the learner and the workers share
    GPU 0): "auto" is cuda when torch sees a GPU, "cuda:N" is cuda (pick the GPU with CUDA_VISIBLE_DEVICES)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" or device.startswith("cuda"):
        return "cpu" if device == "cpu" else "cuda"
    raise SpeedrunError(f"--device {device}: choose cpu, cuda or auto")


@torch.no_grad()
def evaluate_all(a, b) -> dict:
    out = a.out_dir
    torch.manual_seed(a.seed)
    torch.set_num_threads(1)  # as rl.py's evaluation (--trainer-threads 1): the same numerics for every model
    data = out / "data"
    tok = Tokenizer.load(data / "tokenizer.json")
    ck = {s: check_ckpt(out / s / "ckpt", f"{s} checkpoint", s, out)
          for s in ("pretrain", "sft", "sft_fp", "rl_sync", "rl_async")}
    ck["int4"] = check_ckpt(out / "int4", "int4 checkpoint", "int4", out)
    res = {}

    # losses the training stages measured on the same pretraining-val windows
    pre, sft, sft_fp = (read_jsonl(out / s / "metrics.jsonl") for s in ("pretrain", "sft", "sft_fp"))
    val, train = load_tokens(data, "val"), load_tokens(data, "train")
    windows = list(TokenBatches(val, b.seq_len, seed=0).eval_batches(b.eval_seqs, 8))
    res["val_loss"] = {"pretrain": _last(pre, "val_loss"), "after_sft": _last(sft, "pretrain_val_loss"),
                       "after_sft_fp": _last(sft_fp, "pretrain_val_loss"),
                       "unigram": unigram_entropy(train, tok.vocab_size)}

    # PTQ vs QAT: held-out chat loss of the two branches, quantized
    convs = build_conversations(max(8, 2 * b.eval_seqs), seed=a.seed + 10_000, data_dir=data)
    chats = [chat_example(*tok.render_chat(c["messages"]), b.seq_len) for c in convs]

    def chat_loss(m):
        return token_weighted_loss(m.eval(), ((torch.from_numpy(x)[None], torch.from_numpy(y)[None]) for x, y in chats))

    qat = load_policy(ck["sft"])  # fake quant: the int4 SFT model
    res["chat_loss"] = {"sft_fp": chat_loss(load_hf(ck["sft_fp"])),
                        "sft_ptq": chat_loss(quant.ptq(load_hf(ck["sft_fp"]), a.qat_layers, a.group_size)),
                        "sft_qat": chat_loss(qat), "sft_qat_int4": chat_loss(quant.convert_qat(qat))}
    print(f"[speedrun] eval: chat loss {json.dumps({k: round(v, 4) for k, v in res['chat_loss'].items()})}", flush=True)

    # held-out pass@1: the SFT and sync-RL models as rl.py measured them; the async model here, the same way
    sync = read_json(out / "rl_sync" / "summary.json")
    if not sync.get("eval_before") or not sync.get("eval_after"):
        raise SpeedrunError(f"{out / 'rl_sync' / 'summary.json'} lacks the before/after evaluation; delete "
                            f"{out / 'rl_sync'} and re-run the speedrun")
    cfg = RLConfig(**{**read_json(out / "rl_sync" / "rl_config.json"), "allow_unsandboxed": a.allow_unsandboxed})
    tasks = TaskSource(cfg).eval_tasks()
    ev = {"sft": sync["eval_before"], "rl_sync": sync["eval_after"]}
    t = time.time()
    dev = rl_device(a.device)  # where rl.py evaluated the SFT and sync models (fp32 weights, as there)
    ev["rl_async"] = _cached(out / "eval" / "rl_async.json", lambda: evaluate(
        load_policy(ck["rl_async"]).to(dev), tok, tasks, cfg, samples=cfg.eval_samples))
    print(f"[speedrun] eval: async RL model pass@1 greedy {ev['rl_async']['acc']:.3f}, sampled "
          f"{ev['rl_async']['sampled']:.3f} ({time.time() - t:.0f}s)", flush=True)

    # int4: the packed model of the async RL run has its logits, bit for bit; its greedy pass@1 re-measured
    int4, rl_async = load_hf(ck["int4"]).eval(), load_policy(ck["rl_async"])
    same = all(torch.equal(int4(x, sparse=True).logits, rl_async(x, sparse=True).logits) for x, _ in windows[:2])
    ev["int4"] = _cached(out / "eval" / "int4.json", lambda: evaluate(load_hf(ck["int4"]).eval().to(dev), tok, tasks,
                                                                       cfg, samples=0))
    res["val_loss"]["after_rl_int4"] = token_weighted_loss(int4, windows, sparse=True)
    res["int4"] = {"bit_identical_logits": same, "weight_bytes": quant.weight_bytes(int4)["total_bytes"],
                   "fp32_weight_bytes": sum(p.numel() * 4 for p in rl_async.parameters()),
                   "greedy_equals_rl_async": ev["int4"]["acc"] == ev["rl_async"]["acc"]}

    res["pass1"] = {k: _pass1(v) for k, v in ev.items()}
    # pass@1 within 1, 2, ... attempts (code_mt: the first attempt, after one revision, ...)
    res["pass1_by_turn"] = {k: v.get("by_turn", {}).get("acc") for k, v in ev.items()}
    res["pass1_by_turn_sampled"] = {k: v.get("by_turn", {}).get("sampled") for k, v in ev.items()}
    if same:  # equal logits → equal samples: the sampled pass@1 is the RL model's
        res["pass1"]["int4"].update({k: res["pass1"]["rl_async"][k] for k in ("sampled", "sampled_ci")},
                                    sampled_from="rl_async (bit-identical logits)")
    res["rl_gain"] = {m: {name: dict(zip(("mean", "low", "high"), gain(ev["sft"], ev[m], key)))
                          for key, name in (("acc", "greedy"), ("sampled", "sampled"))} for m in ("rl_sync", "rl_async")}
    # tasks are drawn from the held-out distribution, so prompts recur (a one-constant template has few): an
    # unbiased pass rate of that distribution, with intervals over independent draws; how many differ is stated
    res["eval"] = {"tasks": len(tasks), "distinct_prompts": len({json.dumps(t.messages) for t in tasks}),
                   "draws": cfg.eval_samples, "seed": cfg.seed, "split": "eval",
                   "ci": "95% interval over tasks: Wilson for greedy (0/1 per task), normal for sampled (the mean of "
                         "a task's draws); gains normal, paired by task (same tasks, same seeded draws)", "judge_runs": {k: v.get("judge_runs") for k, v in ev.items()}}
    sandboxed = sum(v.get("judged_sandboxed", 0) for v in ev.values())
    unsandboxed = sum(v.get("judged_unsandboxed", 0) for v in ev.values())

    # the RL runs: throughput, utilization, how the code was judged
    res["rl"] = {}
    for m in ("sync", "async"):
        s = read_json(out / f"rl_{m}" / "summary.json").get("summary", {})
        sandboxed, unsandboxed = sandboxed + s.get("judged_sandboxed", 0), unsandboxed + s.get("judged_unsandboxed", 0)
        res["rl"][m] = {k: s.get(k) for k in ("steps", "wall_s", "samples_per_s", "trained_tokens_per_s", "groups_per_s",
                                              "trainer_idle_frac", "rollout_idle_frac", "staleness_hist",
                                              "wasted_token_frac", "wasted_tokens", "judged_sandboxed",
                                              "judged_unsandboxed")}
    res["judged"] = {"sandboxed": sandboxed, "unsandboxed": unsandboxed, "line": judged_line(sandboxed, unsandboxed)}
    return res


# ---------------------------------------------------------------------------------------------- report
def _fmt(x, d=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}f}"


def _load_span(loads: dict) -> tuple[float, float]:
    """(1-min load average before the first stage, the highest before or after any stage) of {stage: loads}.
    The first is other jobs' load; the later ones include the stages' own processes."""
    seen = [x[k] for x in loads.values() for k in ("load_before", "load_after") if x.get(k) is not None]
    return (seen[0], max(seen)) if seen else (math.nan, math.nan)


def _machine_line(loads: dict, cores: int) -> str:
    """Whether the run had the machine to itself, as far as the 1-minute load average before its first stage
    tells (after that the load mixes the stages' own processes with anything else, which it cannot tell apart)."""
    start, peak = _load_span(loads)
    if start <= cores:
        return (f"The machine was quiet when the run started (load average {start:.1f}); after that the load average "
                f"reached {peak:.0f}, the stages' own processes (RL's workers and sandboxed programs) and whatever "
                f"else ran beside them, which a load average cannot tell apart.")
    return (f"That run shared its {cores} cores with other jobs (load average {start:.0f} when it started, up to "
            f"{peak:.0f}), so its wall times are an upper bound.")


CPU_LEAVES_OUT = ("not the programs the judge runs in bubblewrap: their CPU time is not reported back to the stage, "
                  "so RL's and the evaluation's figures are low")


def _sign(gain: dict) -> str:
    """Where a gain's 95% interval lies: what the report and README may claim of it."""
    return "above zero" if gain["low"] > 0 else "below zero" if gain["high"] < 0 else "not distinguishable from zero"


def _ci(p: dict, k: str) -> str:
    lo, hi = p.get(f"{k}_ci", [math.nan, math.nan])
    return f"{_fmt(p.get(k))}" + (f" [{_fmt(lo)}, {_fmt(hi)}]" if math.isfinite(lo) else "")


def results_json(a, b, secs: dict, loads: dict, res: dict) -> dict:
    """The machine-readable summary (report/results.json)."""
    stages = {k: round(v, 1) for k, v in secs.items()}
    cpu = {k: round(v["cpu_s"], 1) for k, v in loads.items() if v.get("cpu_s") is not None}
    return {"total_seconds": round(sum(secs.values()), 1), "stages": stages, "stages_cpu_seconds": cpu,
            "pass1": res["pass1"], "pass1_by_turn": res["pass1_by_turn"],
            "pass1_by_turn_sampled": res["pass1_by_turn_sampled"],
            "rl_gain": res["rl_gain"], "val_loss": res["val_loss"], "chat_loss": res["chat_loss"], "int4": res["int4"],
            "rl": res["rl"], "judged": res["judged"], "eval": res["eval"],
            "seeds": {"run": a.seed, "eval": res["eval"]["seed"], "rl_runs": 1,
                      "ci": "one RL run per mode; intervals over held-out tasks (see report.md)"},
            "host": {**host(), "matmul_gflops": getattr(a, "matmul_gflops", None),
                     "load_average": {k: v for k, v in loads.items()}},
            "config": {"preset": a.preset, "device": a.device, "quick": a.quick, "threads": a.threads,
                       "rl_workers": a.rl_workers, "qat_layers": a.qat_layers, "group_size": a.group_size,
                       "sft_steps": b.sft_steps, "sft_branch": b.sft_branch, "allow_unsandboxed": a.allow_unsandboxed},
            "written": time.strftime("%Y-%m-%d %H:%M")}


def against_published(rj: dict, pub: dict) -> str:
    """One sentence: did this run meet the 20-minute target, and do its pass@1 figures fall within the published
    run's 95% intervals (docs/results.json)? What a student needs to tell a normal run from a broken one."""
    total = rj["total_seconds"]
    met = (f"This run took {total / 60:.1f} min: " + ("within" if total <= TARGET_S else "over")
           + f" the {TARGET_S // 60}-minute target")
    rate, ref_rate = rj["host"].get("matmul_gflops"), pub.get("host", {}).get("matmul_gflops")
    if rate:
        met += f" (this host multiplies fp32 matrices at {rate:.0f} GFLOP/s" + (
            f", the published run's host at {ref_rate:.0f})" if ref_rate else "; the published run recorded no rate)")
    same = pub and {k: pub.get("config", {}).get(k) for k in ("preset", "device", "quick")} == \
        {k: rj["config"].get(k) for k in ("preset", "device", "quick")}
    if not same:
        return met + ". No published run of this budget to compare its results with."
    out, n = [], 0
    for stage, p in rj["pass1"].items():
        q = pub["pass1"].get(stage, {})
        for k in ("greedy", "sampled"):
            lo, hi = q.get(f"{k}_ci", [math.nan, math.nan])
            if p.get(k) is None or not math.isfinite(lo):
                continue
            n += 1
            if not lo - 1e-9 <= p[k] <= hi + 1e-9:
                out.append(f"{stage} {k} {_fmt(p[k])} (published {_fmt(q[k])} [{_fmt(lo)}, {_fmt(hi)}])")
    tail = (f"all {n} of its pass@1 figures lie within the published run's 95% intervals" if not out else
            f"{len(out)} of its {n} pass@1 figures lie outside the published run's 95% intervals: " + "; ".join(out)
            + " (the intervals cover the evaluation's noise, not the run-to-run spread of training)")
    return f"{met}; {tail}."


def _eval_by_turn(out: Path) -> dict:
    """{stage: by_turn} of each stage's held-out evaluation that has it ({"acc": [pass within 1 attempt, within 2,
    ...], "sampled": [...]}: the multi-turn code environment's evaluation); {} when none does."""
    sync = read_json(out / "rl_sync" / "summary.json")
    evs = {"sft": sync.get("eval_before", {}), "rl_sync": sync.get("eval_after", {}),
           "rl_async": read_json(out / "eval" / "rl_async.json")}
    return {k: ev["by_turn"] for k, ev in evs.items() if ev.get("by_turn")}


def by_turn_lines(out: Path) -> list[str]:
    """Held-out pass@1 per turn before and after RL, and the share of episodes a failed first attempt recovers."""
    bt = _eval_by_turn(out)
    if not bt:
        return []
    n = max(len(v.get(k, [])) for v in bt.values() for k in ("acc", "sampled"))
    head = [f"within {i + 1} attempt{'s' * (i > 0)}" for i in range(n)]
    lines = ["Held-out pass@1 by turn (all tests pass within k attempts, the failing test fed back after each):", "",
             "| model | " + " | ".join(f"greedy {h}" for h in head) + " | " + " | ".join(f"sampled {h}" for h in head)
             + " |", "|---" * (1 + 2 * n) + "|"]
    for stage, v in bt.items():
        cells = [_fmt(x) for k in ("acc", "sampled") for x in (list(v.get(k, [])) + [math.nan] * n)[:n]]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")

    def recovered(xs):  # of the episodes whose first attempt failed, the share that passed later
        return (xs[-1] - xs[0]) / (1 - xs[0]) if len(xs) > 1 and xs[0] < 1 else math.nan

    rec = {s: recovered(v.get("sampled", [])) for s, v in bt.items()}
    if "sft" in rec and math.isfinite(rec["sft"]):
        after = ", ".join(f"{s} {_fmt(r)}" for s, r in rec.items() if s != "sft")
        lines += ["", f"Of the sampled episodes whose first attempt failed, the share that passed after feedback: SFT "
                      f"{_fmt(rec['sft'])}, after RL {after} (revising after feedback is what SFT never showed; RL "
                      "has to discover it)."]
    return lines + [""]


def episode_lines(out: Path) -> list[str]:
    """One trained episode turn by turn (attempt, the judge's observation, revision), as the RL run kept it."""
    for m in ("async", "sync"):
        ep = read_json(out / f"rl_{m}" / "episode.json")
        if ep:
            text = ep["text"].replace("~~~", "~ ~ ~")  # (a fence inside would end the block)
            return [f"One episode the {m} run trained (step {ep['step']}, {ep['turns']} attempt"
                    f"{'s' * (ep['turns'] != 1)}, reward {ep['reward']:.2f}), token for token as the model saw it: "
                    "its attempt, the judge's observation (loss mask 0), its revision:", "", "~~~text", text.strip(),
                    "~~~", ""]
    return []


def why_async_lines(rl: dict) -> list[str]:
    """One sentence on why async wins here (or not), from the measured idle fractions and samples/s."""
    us, ua = (rl[m].get("utilization", {}) for m in ("sync", "async"))
    if not (us and ua):
        return []
    sps = {m: rl[m].get("samples_per_s") or math.nan for m in ("sync", "async")}
    ratio = sps["async"] / max(sps["sync"], 1e-9)
    idle = {m: (1 - u["trainer_busy"], 1 - u["worker_busy"]) for m, u in (("sync", us), ("async", ua))}
    measured = (f"sync's trainer waited {idle['sync'][0]:.0%} of its wall clock and its workers {idle['sync'][1]:.0%} "
                f"(a judge call running {us['worker_judging']:.0%}); async's {idle['async'][0]:.0%} and "
                f"{idle['async'][1]:.0%} ({ua['worker_judging']:.0%})")
    if ratio > 1.05:
        why = ("async trains while its workers generate and refills the decode batch with the next groups where sync "
               "waits for its slowest episodes, so the idle time sync pays for becomes trained samples")
    else:
        why = ("async keeps the trainer busy, but the trainer, the workers and the judge's sandboxed programs share "
               "the same cores: what the overlap gains, the rollouts lose to the competition for CPU")
    waste = {m: rl[m].get("wasted_token_frac") for m in ("sync", "async")}
    wasted = "; generated and never trained: " + ", ".join(f"{m} {w:.1%}" for m, w in waste.items() if w is not None)
    return [f"Why async wins or not (rl_timeline.png): async trained {ratio:.2f}× the samples per second of sync "
            f"({_fmt(sps['async'], 2)} vs {_fmt(sps['sync'], 2)}); {measured}: {why}{wasted}.", ""]


def reward_vs_heldout_lines(out: Path, g: dict) -> list[str]:
    """Where the training reward and the held-out pass@1 disagree, one sentence on why."""
    out_lines = []
    for m in ("sync", "async"):
        r = [h["reward"] for h in read_jsonl(out / f"rl_{m}" / "metrics.jsonl")]
        if len(r) < 6:
            continue
        rise, gs = float(np.mean(r[-3:]) - np.mean(r[:3])), g[f"rl_{m}"]["sampled"]
        if rise > 0.05 and not gs["low"] > 0:
            out_lines.append(f"{m}: the training reward rose {np.mean(r[:3]):.2f} → {np.mean(r[-3:]):.2f} while the "
                             f"held-out sampled gain is {gs['mean']:+.3f} [{gs['low']:+.3f}, {gs['high']:+.3f}]")
    if not out_lines:
        return []
    return ["Training reward and held-out pass@1 disagree (" + "; ".join(out_lines) + "): the training reward is "
            "measured on the training tasks the policy is updated on, which recur, so it rises as RL fits them, "
            "while held-out pass@1 is measured on tasks RL never trains on and moves only as far as what RL learned "
            "transfers.", ""]


def write_report(a, b, secs: dict, loads: dict, res: dict) -> Path:
    out = a.out_dir
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    pngs, captions = plots(out, rep, res)
    rj = results_json(a, b, secs, loads, res)
    (rep / "results.json").write_text(json.dumps(rj, indent=2))
    p, v, c, g, rl = res["pass1"], res["val_loss"], res["chat_loss"], res["rl_gain"], res["rl"]
    pre = read_jsonl(out / "pretrain" / "metrics.jsonl")
    meta = read_json(out / "data" / "tokens" / "meta.json")
    # the two gaps, not a "QAT recovers x% of the PTQ gap" ratio: on a model this small the gap is of the order of
    # the evaluation's noise, and a ratio over noise reads 1000% (bench/int4.py measures them over seeds)
    recovered = (f"int4 minus full precision: PTQ {c['sft_ptq'] - c['sft_fp']:+.4f}, QAT "
                 f"{c['sft_qat_int4'] - c['sft_fp']:+.4f} nats (one run; bench/int4.py gives their spread over seeds)")
    acc = lambda m: f"greedy {_ci(p[m], 'greedy')}, sampled {_ci(p[m], 'sampled')}"  # noqa: E731
    tps = lambda m: rl[m].get("trained_tokens_per_s") or math.nan  # noqa: E731
    sps = lambda m: rl[m].get("samples_per_s") or math.nan  # noqa: E731
    steps = lambda m: rl[m].get("steps")  # noqa: E731
    gl = lambda m, k: f"{g[m][k]['mean']:+.3f} [{g[m][k]['low']:+.3f}, {g[m][k]['high']:+.3f}]"  # noqa: E731
    rows = [  # (stage, what it achieved, the stages whose wall time it took)
        ("data", f"{meta.get('n_train_tokens', 0):,} train tokens after the quality, dedup, language and math-judge "
                 "filters (see data/report.md)", ["data"]),
        ("pretrain", f"val loss {_fmt(v['pretrain'])} nats vs the unigram baseline {_fmt(v['unigram'])} after "
                     f"{pre[-1]['step'] if pre else '?'} steps (dense → DSA warm-up → sparse)", ["pretrain"]),
        ("SFT trunk", f"{b.sft_steps - b.sft_branch} of {b.sft_steps} SFT steps in full precision, pretraining "
                      "windows mixed into every batch", ["sft_trunk"]),
        ("SFT with INT4 QAT", f"the last {b.sft_branch} steps with fake quant: held-out chat loss {_fmt(c['sft_qat'])}; "
                              f"pretraining val loss {_fmt(v['after_sft'])} (was {_fmt(v['pretrain'])}); code pass@1 "
                              f"{acc('sft')}", ["sft"]),
        ("PTQ vs QAT", f"the same {b.sft_branch} steps in full precision; int4 chat loss: PTQ {_fmt(c['sft_ptq'])}, QAT "
                       f"{_fmt(c['sft_qat_int4'])}, fp32 SFT {_fmt(c['sft_fp'])}: {recovered}", ["sft_fp"]),
        ("RL, sync", f"{steps('sync')} steps of the QAT model: code pass@1 {acc('rl_sync')}; gain over SFT "
                     f"sampled {gl('rl_sync', 'sampled')}, greedy {gl('rl_sync', 'greedy')}; {sps('sync'):.2f} "
                     f"trained samples/s ({tps('sync'):.1f} trained tokens/s)", ["rl_sync"]),
        ("RL, async", f"{steps('async')} steps: code pass@1 {acc('rl_async')}; gain sampled {gl('rl_async', 'sampled')}, "
                      f"greedy {gl('rl_async', 'greedy')}; {sps('async'):.2f} trained samples/s "
                      f"(**{sps('async') / max(sps('sync'), 1e-9):.2f}× sync**; {tps('async'):.1f} trained tokens/s)",
         ["rl_async"]),
        ("int4 conversion", f"logits {'bit-identical to' if res['int4']['bit_identical_logits'] else 'DIFFERENT from'} "
                            f"the async RL model's; code pass@1 greedy {_fmt(p['int4']['greedy'])} (re-measured), "
                            f"pretraining val loss {_fmt(v['after_rl_int4'])}; weights "
                            f"{res['int4']['weight_bytes'] / 1e6:.2f} MB vs {res['int4']['fp32_weight_bytes'] / 1e6:.2f} "
                            "MB fp32", ["int4"]),
        ("evaluation", "what the stages had not measured: PTQ vs QAT, the async model, int4, the report", ["eval"]),
    ]
    e = res["eval"]
    h = rj["host"]
    lines = [f"# nanoGLM5 speedrun report ({a.preset}, {a.device}{', quick' if a.quick else ''})", "",
             f"Written by `python -m nanoglm5.speedrun` into `{os.path.relpath(out)}` on {rj['written']}, on {h['cpu']} "
             f"({h['cores']} cores{', ' + h['gpu'] if h['gpu'] else ''}). {_machine_line(loads, h['cores'])} "
             "Code pass@1: "
             f"{e['tasks']} held-out tasks of the RL code environment (unseen constants; {e.get('distinct_prompts', '?')} "
             "distinct prompts: tasks are drawn from the held-out distribution, where one-constant templates recur), "
             f"greedy and the mean of {e['draws']} seeded draws "
             f"at temperature 1, with 95% intervals over tasks; {res['judged']['line']}.",
             "", "| stage | what it achieved | wall time (CPU time) |", "|---|---|---|"]
    cpu = rj["stages_cpu_seconds"]
    for name, text, keys in rows:
        c = f" ({sum(cpu[k] for k in keys):.0f}s)" if all(k in cpu for k in keys) else ""
        lines.append(f"| {name} | {text} | {sum(secs.get(k, 0.0) for k in keys):.0f}s{c} |")
    lines += ["", f"Total: {sum(secs.values()):.0f}s ({sum(secs.values()) / 60:.1f} min) of wall time, "
              f"{sum(cpu.values()):.0f}s of CPU time (the stages' processes, but {CPU_LEAVES_OUT}; on a busy machine "
              "the wall time grows with the other load, the CPU time much less).", "",
              against_published(rj, published()), ""]
    lines += by_turn_lines(out) + episode_lines(out) + why_async_lines(rl) + reward_vs_heldout_lines(out, g)
    sig = lambda m: _sign(g[m]["sampled"])  # noqa: E731
    lines += [f"How sure: RL's gain is measured where SFT leaves room, the sampled pass@1 ({_fmt(p['sft']['sampled'])} "
              f"after SFT, against a greedy {_fmt(p['sft']['greedy'])}): sync {gl('rl_sync', 'sampled')} "
              f"({sig('rl_sync')}), async {gl('rl_async', 'sampled')} ({sig('rl_async')}). The intervals are paired by "
              f"task ({e['tasks']} held-out tasks × {e['draws']} seeded draws, the same before and after), so they "
              "cover the evaluation's noise; the two RL runs (same steps, same seed, different schedules) show the "
              "run-to-run spread, which the intervals do not. One run per mode with enough draws, rather than three "
              "seeds of shorter runs: within the 20-minute budget three seeds per mode would leave each run a third "
              "of its steps, and the evaluation (a few seconds per 1,000 judged programs with the judge memo) is the "
              "cheap part to make precise.", ""]
    for k, pth in pngs.items():
        lines += [f"![{k}]({Path(pth).name})", "", f"*{k}.png*: {captions[k]}", ""]
    lines += ["", "Raw numbers: `results.json` beside this file."]
    path = rep / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


README_BEGIN = "<!-- results: written by `python -m nanoglm5.report` from docs/results.json; do not edit by hand -->"
README_END = "<!-- /results -->"
TARGET_S = 20 * 60  # the student's run: README's promise on a 2-core CPU


def readme_results(r: dict) -> str:
    """README's "Results of the main job" section, every figure read from a run's results.json."""
    h, st, cpu, p, v = r["host"], r["stages"], r.get("stages_cpu_seconds", {}), r["pass1"], r["val_loss"]
    acc = lambda m: f"code pass@1 greedy {_fmt(p[m]['greedy'])}, sampled {_ci(p[m], 'sampled')}"  # noqa: E731
    g = r["rl_gain"]
    sig = lambda m: _sign(g[m]["sampled"])  # noqa: E731
    what = {
        "data": "token shards after the quality, dedup, language and math-judge filters",
        "pretrain": f"val loss {_fmt(v['pretrain'])} nats vs the unigram baseline {_fmt(v['unigram'])} "
                    "(dense → DSA warm-up → sparse)",
        "sft_trunk": "SFT in full precision, shared by both branches (pretraining text mixed in)",
        "sft": f"QAT branch; {acc('sft')}; pretraining val loss after SFT {_fmt(v['after_sft'])}",
        "sft_fp": "full-precision branch, the PTQ baseline",
        "rl_sync": f"RL on the QAT model; {acc('rl_sync')}",
        "rl_async": acc("rl_async"),
        "int4": f"int4 conversion of the async RL model: logits "
                f"{'bit-identical to it' if r['int4']['bit_identical_logits'] else 'DIFFERENT from it'}; greedy "
                f"pass@1 {_fmt(p['int4']['greedy'])}",
        "eval": "what the stages did not measure themselves",
    }
    total, threads = r["total_seconds"], r["config"]["threads"]
    lines = [README_BEGIN, "",
             f"Written from [docs/results.json](docs/results.json), the machine-readable output of the last full "
             f"`python -m nanoglm5.speedrun` ({r['config']['preset']} preset, {r['config']['device']}; host: "
             f"{h['cpu']}, {h['cores']} cores, torch {h['torch']}, {threads} torch thread{'s' * (threads != 1)}, "
             f"{r['written']}); the report with its plots and confidence intervals is "
             "[docs/results.md](docs/results.md). "
             + _machine_line(h.get("load_average", {}), h["cores"])
             + f" CPU seconds of the stage's processes in brackets ({CPU_LEAVES_OUT}).", "",
             "| stage | what it achieved | wall time (CPU) |", "|---|---|---|"]
    lines += [f"| {k} | {what.get(k, '')} | {s:.0f} s" + (f" ({cpu[k]:.0f} s)" if k in cpu else "") + " |"
              for k, s in st.items()]
    lines += ["", f"Total: {total:.0f} s ({total / 60:.1f} min), "
              + ("within the 20-minute target." if total <= TARGET_S else
                 f"over the 20-minute target by {(total - TARGET_S) / 60:.1f} min.")
              + f" Pass@1 is on {r['eval']['tasks']} held-out code tasks drawn from the held-out distribution "
              f"(unseen constants; {r['eval'].get('distinct_prompts', '?')} distinct prompts, as templates with one "
              "constant recur), greedy and sampled "
              f"({r['eval']['draws']} seeded draws per task, 95% interval), {r['judged']['line']}. In this run SFT "
              + ("kept" if v["after_sft"] - v["pretrain"] <= 0.3 else "did not keep")
              + f" pretraining (val loss {_fmt(v['pretrain'])} → {_fmt(v['after_sft'])}; 0.3 nats allowed), the int4 model "
              + ("is the model RL trained, bit for bit" if r["int4"]["bit_identical_logits"] else
                 "differs from the model RL trained")
              + ", and RL's sampled gain over SFT was "
              + (f"{sig('rl_sync')} for both sync and async " if sig("rl_sync") == sig("rl_async") else
                 f"{sig('rl_sync')} for sync and {sig('rl_async')} for async ")
              + "(paired intervals in docs/results.md; docs/LOG.md compares this run with earlier ones).", "", README_END]
    return "\n".join(lines)


def write_readme_results(readme: Path, r: dict) -> None:
    """Replace README's results block (between README_BEGIN and README_END) with the one for `r`."""
    text = readme.read_text()
    i, j = text.find(README_BEGIN), text.find(README_END)
    if i < 0 or j < i:
        raise SpeedrunError(f"{readme} has no results block ({README_BEGIN!r} … {README_END!r}) to replace")
    readme.write_text(text[:i] + readme_results(r) + text[j + len(README_END):])


def publish(run_dir: Path, docs: Path, readme: Path | None = None) -> None:
    """A run's report into docs/: results.md (figures under results/), results.json beside it; README's results
    block rewritten from that results.json."""
    rep = Path(run_dir) / "report"
    figs = Path(docs) / "results"
    figs.mkdir(parents=True, exist_ok=True)
    text = (rep / "report.md").read_text()
    for name in PNGS:
        if (rep / f"{name}.png").exists():
            shutil.copyfile(rep / f"{name}.png", figs / f"{name}.png")
            text = text.replace(f"]({name}.png)", f"](results/{name}.png)")
    (Path(docs) / "results.md").write_text(text)
    shutil.copyfile(rep / "results.json", Path(docs) / "results.json")
    if readme is not None:
        write_readme_results(readme, json.loads((rep / "results.json").read_text()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="copy a speedrun's report into docs/ (results.md, results/, results.json)")
    p.add_argument("run_dir", type=Path, help="the speedrun's --out-dir (holds report/)")
    p.add_argument("docs", type=Path, nargs="?", default=Path("docs"))
    p.add_argument("--readme", type=Path, default=Path("README.md"),
                   help="whose results block to rewrite from results.json ('' to leave README alone)")
    a = p.parse_args(argv)
    readme = a.readme if str(a.readme) not in ("", ".") else None
    try:
        publish(a.run_dir, a.docs, readme)
    except (OSError, SpeedrunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {a.docs / 'results.md'}, {a.docs / 'results.json'} and {a.docs / 'results'}/"
          + (f"; the results block of {readme}" if readme else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
