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
from nanoglm5.rl.evaluation import evaluate, gain, judged_line, mean_ci, plot_reward_vs_time, plot_timeline
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


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


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
        res["rl"][m] = {k: s.get(k) for k in ("steps", "wall_s", "trained_tokens_per_s", "groups_per_s",
                                              "trainer_idle_frac", "rollout_idle_frac", "staleness_hist",
                                              "wasted_token_frac", "judged_sandboxed", "judged_unsandboxed")}
    res["judged"] = {"sandboxed": sandboxed, "unsandboxed": unsandboxed, "line": judged_line(sandboxed, unsandboxed)}
    return res


# ---------------------------------------------------------------------------------------------- figures
def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plots(out: Path, rep: Path, res: dict) -> dict:
    """The report's figures; returns {name: path} and puts the RL utilization into res["rl"]."""
    import matplotlib  # optional dependency: only the report's figures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = {}
    pre = read_jsonl(out / "pretrain" / "metrics.jsonl")
    sft, sft_fp = read_jsonl(out / "sft" / "metrics.jsonl"), read_jsonl(out / "sft_fp" / "metrics.jsonl")
    n_pre = pre[-1]["step"] if pre else 0

    fig, ax = plt.subplots(figsize=(7, 3.8))
    pts = [(h["step"], h["val_loss"]) for h in pre if "val_loss" in h]
    if pts:
        ax.plot(*zip(*pts), marker="o", label="pretraining val loss (pretrain)")
    for hist, label, ls in ((sft, "QAT branch", "-"), (sft_fp, "full-precision branch", "--")):
        pts = [(n_pre + h["step"], h["pretrain_val_loss"]) for h in hist if "pretrain_val_loss" in h]
        if pts:
            ax.plot(*zip(*pts), marker="s", ls=ls, label=f"pretraining val loss during SFT ({label})")
        pts = [(n_pre + h["step"], h["val_loss"]) for h in hist if "val_loss" in h]
        if pts:
            ax.plot(*zip(*pts), marker=".", ls=ls, label=f"SFT chat val loss ({label})")
    ax.axhline(res["val_loss"]["unigram"], ls=":", c="gray", label="unigram baseline")
    ax.set(xlabel="step (pretraining, then SFT)", ylabel="loss (nats)", title="Validation losses")
    ax.legend(fontsize=7)
    made["val_loss"] = _save(fig, rep / "val_loss.png")

    loads = [(h["step"], np.asarray(h["expert_load"])) for h in pre if "expert_load" in h]
    if loads:
        fig, axs = plt.subplots(1, 2, figsize=(10, 3.5))
        steps = [s for s, _ in loads]
        axs[0].plot(steps, [ld.max(-1).mean() / ld.mean(-1).mean() for _, ld in loads])
        axs[0].set(xlabel="step", ylabel="max / mean expert load", title="MoE balance (bias rule at work)")
        last = loads[-1][1]
        im = axs[1].imshow(last, aspect="auto", cmap="viridis")
        n_main = len(last) - 1 if len(last) > 1 else len(last)  # the MTP layer's MoE is the last row
        axs[1].set_yticks(range(len(last)), [f"MoE {i}" for i in range(n_main)] + ["MTP"] * (len(last) - n_main))
        axs[1].set_xticks(range(last.shape[1]))
        axs[1].set(xlabel="expert", title=f"token share per expert at step {steps[-1]}")
        fig.colorbar(im, ax=axs[1])
        made["expert_load"] = _save(fig, rep / "expert_load.png")

    kl = [(h["step"], h["indexer_kl"], h["stage"]) for h in pre if h.get("stage") in ("warmup", "sparse")]
    if kl:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for stage in ("warmup", "sparse"):
            pts = [(s, k) for s, k, st in kl if st == stage]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=f"{stage} ({'full' if stage == 'warmup' else 'selected set'})")
        ax.set(xlabel="step", ylabel="KL(p ‖ softmax(I))", title="DSA indexer KL")
        ax.legend()
        made["indexer_kl"] = _save(fig, rep / "indexer_kl.png")

    runs = {m: read_jsonl(out / f"rl_{m}" / "metrics.jsonl") for m in ("sync", "async")}
    if any(runs.values()):
        p = res["pass1"]
        mark = lambda k, t, lab: (t, p[k]["sampled"], *p[k]["sampled_ci"], lab)  # noqa: E731
        end = {m: (h[-1]["time"] if h else 0.0) for m, h in runs.items()}
        evals = {"sync": [mark("sft", 0.0, "SFT"), mark("rl_sync", end["sync"], "after")],
                 "async": [mark("rl_async", end["async"], "after")]}
        plot_reward_vs_time(runs, rep / "rl_reward.png", evals=evals)
        made["rl_reward"] = str(rep / "rl_reward.png")
    tls = {m: read_json(out / f"rl_{m}" / "timeline.json") for m in ("sync", "async")}
    if all(tls.values()):
        walls = {m: res["rl"][m].get("wall_s") for m in tls}
        util = plot_timeline(tls, rep / "rl_timeline.png", walls)
        for m, u in util.items():
            res["rl"][m]["utilization"] = u
        made["rl_timeline"] = str(rep / "rl_timeline.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["sft_fp", "sft_ptq", "sft_qat", "sft_qat_int4"]
    labels = ["fp32 SFT", "PTQ int4\n(of fp32 SFT)", "QAT SFT\n(fake quant)", "QAT → int4"]
    vals = [res["chat_loss"][n] for n in names]
    ax.bar(labels, vals, color=["gray", "tab:red", "tab:blue", "tab:green"])
    ax.set(ylabel="held-out chat loss (nats)", title="PTQ vs QAT (one SFT trunk, two branches)")
    ax.set_ylim(min(vals) * 0.95, max(vals) * 1.03)
    made["ptq_vs_qat"] = _save(fig, rep / "ptq_vs_qat.png")
    return made


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
    tells (after that the load is the stages' own)."""
    start, peak = _load_span(loads)
    if start <= cores:
        return (f"The machine was quiet when the run started (load average {start:.1f}); the load after that was "
                f"the stages' own (up to {peak:.0f} while RL's workers and sandboxed programs ran).")
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


def write_report(a, b, secs: dict, loads: dict, res: dict) -> Path:
    out = a.out_dir
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    pngs = plots(out, rep, res)
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
    util = lambda m: rl[m].get("utilization", {})  # noqa: E731
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
                     f"sampled {gl('rl_sync', 'sampled')}, greedy {gl('rl_sync', 'greedy')}; {tps('sync'):.1f} "
                     "trained tokens/s", ["rl_sync"]),
        ("RL, async", f"{steps('async')} steps: code pass@1 {acc('rl_async')}; gain sampled {gl('rl_async', 'sampled')}, "
                      f"greedy {gl('rl_async', 'greedy')}; {tps('async'):.1f} trained tokens/s "
                      f"({tps('async') / max(tps('sync'), 1e-9):.2f}× sync)", ["rl_async"]),
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
    us, ua = util("sync"), util("async")
    if us and ua:
        ratio = tps("async") / max(tps("sync"), 1e-9)
        why = ("async overlaps generation with training, so the trainer waits less for a batch" if ratio > 1.05 else
               "async does keep the trainer busy, but the trainer and both workers are three processes on the same "
               "cores: the training it overlaps competes with generation and with the judge's sandboxed programs "
               "(CPU work too, not waiting) for the same CPU, so the rollouts slow down by about what the overlap "
               "gains. Async pays off when the workers wait instead (a remote or slow judge, long-tailed lengths: "
               "bench/rl_throughput.py)")
        lines += [f"Why async wins or not (rl_timeline.png): async trained {ratio:.2f}× the tokens per second of sync. "
                  f"Sync keeps the trainer busy {us['trainer_busy']:.0%} of its wall clock and the workers "
                  f"{us['worker_busy']:.0%} (a judge call running {us['worker_judging']:.0%}); async "
                  f"{ua['trainer_busy']:.0%} and {ua['worker_busy']:.0%} ({ua['worker_judging']:.0%}). Here {why}.", ""]
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
    lines += [f"![{k}]({Path(pth).name})" for k, pth in pngs.items()]
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
