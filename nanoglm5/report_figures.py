"""The main job's figures (report.md's plots), each with the caption that says what it computes.

Every plot shows the same quantity, with the same number, as the report's table beside it: where a curve and a
table entry measure different sets (SFT's own validation split during training vs the report's held-out
conversations), both are drawn and named; curves that lie on top of each other are said to; a bar chart whose
y axis does not start at zero says where it starts and labels its values.
"""

import json
import math
from pathlib import Path

import numpy as np

from nanoglm5.rl.evaluation import plot_reward_vs_time, plot_timeline


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _branch_gap(sft: list[dict], sft_fp: list[dict], key: str) -> float:
    """Largest |QAT − full precision| of `key` over the steps both branches evaluated (nan: none in common)."""
    a = {h["step"]: h[key] for h in sft if key in h}
    b = {h["step"]: h[key] for h in sft_fp if key in h}
    common = sorted(set(a) & set(b))
    return max(abs(a[s] - b[s]) for s in common) if common else math.nan


def val_loss_figure(plt, out: Path, rep: Path, res: dict) -> tuple[str, str]:
    """Pretraining val loss, then the pretraining val loss and SFT's own chat val loss during SFT (both branches),
    with the table's held-out chat losses (◆) at the last step."""
    pre = read_jsonl(out / "pretrain" / "metrics.jsonl")
    sft, sft_fp = read_jsonl(out / "sft" / "metrics.jsonl"), read_jsonl(out / "sft_fp" / "metrics.jsonl")
    n_pre = pre[-1]["step"] if pre else 0
    fig, ax = plt.subplots(figsize=(8, 4.2))
    pts = [(h["step"], h["val_loss"]) for h in pre if "val_loss" in h]
    if pts:
        ax.plot(*zip(*pts), marker="o", c="C0", label="pretraining val loss (pretraining)")
    for hist, label, ls, lw in ((sft, "QAT", "-", 2.5), (sft_fp, "full precision", "--", 1.2)):
        pts = [(n_pre + h["step"], h["pretrain_val_loss"]) for h in hist if "pretrain_val_loss" in h]
        if pts:
            ax.plot(*zip(*pts), marker="s", ls=ls, lw=lw, c="C1", label=f"pretraining val loss during SFT ({label})")
        pts = [(n_pre + h["step"], h["val_loss"]) for h in hist if "val_loss" in h]
        if pts:
            ax.plot(*zip(*pts), marker=".", ls=ls, lw=lw, c="C2", label=f"SFT's own chat val loss ({label})")
    c, last = res["chat_loss"], n_pre + (sft[-1]["step"] if sft else 0)
    for key, label, mk in (("sft_qat", "QAT (fake quant)", "D"), ("sft_fp", "full precision", "d")):
        ax.plot([last], [c[key]], mk, c="C3", ms=8, mec="black",
                label=f"table: held-out chat loss, {label} {c[key]:.3f}")
    ax.axhline(res["val_loss"]["unigram"], ls=":", c="gray", label="unigram baseline")
    gap = max(_branch_gap(sft, sft_fp, "val_loss"), _branch_gap(sft, sft_fp, "pretrain_val_loss"))
    over = f"; QAT (thick) and full-precision (dashed) curves overlap: they differ by ≤ {gap:.3f} nats" \
        if math.isfinite(gap) and gap < 0.05 else ""
    ax.set(xlabel="step (pretraining, then SFT)", ylabel="loss (nats)")
    ax.set_title(f"Validation losses{over}", fontsize=9)
    ax.legend(fontsize=7)
    path = _save(fig, rep / "val_loss.png")
    v = res["val_loss"]
    mix = read_json(out / "sft" / "train_config.json").get("sft_pretrain_mix", math.nan)
    first = next((h["pretrain_val_loss"] for h in sft if "pretrain_val_loss" in h), math.nan)
    first_step = next((h["step"] for h in sft if "pretrain_val_loss" in h), 0)
    own = next((h["val_loss"] for h in reversed(sft) if "val_loss" in h), math.nan)
    jump = (f": a jump, as SFT's first steps move the model to the chat distribution (a {mix:.1%} share of every "
            "SFT batch is pretraining text)" if first - v["pretrain"] > 0.02 else "")
    cap = (f"Pretraining val loss ends at {v['pretrain']:.3f}; SFT's first evaluation (SFT step {first_step}) reads "
           f"{first:.3f} ({first - v['pretrain']:+.3f}){jump}; it ends SFT at {v['after_sft']:.3f} "
           f"({v['after_sft'] - v['pretrain']:+.3f}; ≤ +0.3 allowed). The green curve is SFT's own chat val loss on "
           f"its validation split ({own:.3f} at the end); the ◆ are the table's held-out chat losses, measured by "
           f"the report on other held-out conversations (QAT {c['sft_qat']:.3f}, full precision {c['sft_fp']:.3f}): "
           "two held-out sets, so two numbers.")
    return path, cap


def expert_load_figure(plt, out: Path, rep: Path) -> tuple[str, str] | None:
    pre = read_jsonl(out / "pretrain" / "metrics.jsonl")
    loads = [(h["step"], np.asarray(h["expert_load"])) for h in pre if "expert_load" in h]
    if not loads:
        return None
    fig, axs = plt.subplots(1, 2, figsize=(10.5, 3.7))
    steps = [s for s, _ in loads]
    ratio = [ld.max(-1).mean() / ld.mean(-1).mean() for _, ld in loads]
    axs[0].plot(steps, ratio, marker=".")
    axs[0].axhline(1.0, ls=":", c="gray")
    axs[0].set(xlabel="pretraining step", ylabel="max / mean expert share")
    axs[0].set_title("busiest expert's token share over the mean share,\naveraged over MoE layers (1 = balanced)",
                     fontsize=9)
    last = loads[-1][1]
    im = axs[1].imshow(last, aspect="auto", cmap="viridis")
    n_main = len(last) - 1 if len(last) > 1 else len(last)  # the MTP layer's MoE is the last row
    axs[1].set_yticks(range(len(last)), [f"MoE {i}" for i in range(n_main)] + ["MTP"] * (len(last) - n_main))
    axs[1].set_xticks(range(last.shape[1]))
    axs[1].set(xlabel="routed expert")
    axs[1].set_title(f"share of a layer's routed tokens per expert at step {steps[-1]}\n(each row sums to 1; "
                     f"balanced = {1 / last.shape[1]:.3f})", fontsize=9)
    fig.colorbar(im, ax=axs[1])
    cap = (f"Left: per logged step, the largest expert's share of routed tokens divided by the mean share, averaged "
           f"over the MoE layers ({ratio[0]:.2f} at step {steps[0]}, {ratio[-1]:.2f} at step {steps[-1]}; the "
           "auxiliary-loss-free bias rule moves the routers toward 1 = balanced). Right: each layer's token shares per expert at the last "
           "logged step, from the same counts.")
    return _save(fig, rep / "expert_load.png"), cap


def indexer_kl_figure(plt, out: Path, rep: Path) -> tuple[str, str] | None:
    pre = read_jsonl(out / "pretrain" / "metrics.jsonl")
    kl = [(h["step"], h["indexer_kl"], h["stage"]) for h in pre if h.get("stage") in ("warmup", "sparse")]
    if not kl:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for stage in ("warmup", "sparse"):
        pts = [(s, k) for s, k, st in kl if st == stage]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=f"{stage} ({'over all keys' if stage == 'warmup' else 'over the selected top-k'})")
    ax.set(xlabel="pretraining step", ylabel="KL(p ‖ softmax(I))", title="DSA indexer KL (training batches)")
    ax.legend()
    cap = ("The indexer's KL to the attention distribution on the training batches: over all keys during the dense "
           "warm-up, over the selected top-k keys once attention is sparse (two different sets, so the curve steps).")
    return _save(fig, rep / "indexer_kl.png"), cap


def ptq_figure(plt, rep: Path, res: dict) -> tuple[str, str]:
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    names = ["sft_fp", "sft_ptq", "sft_qat", "sft_qat_int4"]
    labels = ["fp32 SFT", "PTQ int4\n(of fp32 SFT)", "QAT SFT\n(fake quant)", "QAT → int4"]
    vals = [res["chat_loss"][n] for n in names]
    bars = ax.bar(labels, vals, color=["gray", "tab:red", "tab:blue", "tab:green"])
    ax.bar_label(bars, labels=[f"{x:.4f}" for x in vals], fontsize=8)
    lo = math.floor(min(vals) * 0.98 * 100) / 100
    ax.set_ylim(lo, max(vals) + (max(vals) - lo) * 0.25 + 1e-3)
    ax.set(ylabel="held-out chat loss (nats)")
    ax.set_title(f"PTQ vs QAT (one SFT trunk, two branches); y axis starts at {lo:.2f}, not 0", fontsize=9)
    c = res["chat_loss"]
    cap = (f"The table's held-out chat losses, quantized or not. The y axis starts at {lo:.2f}: the differences "
           f"are PTQ {c['sft_ptq'] - c['sft_fp']:+.4f} and QAT → int4 {c['sft_qat_int4'] - c['sft_fp']:+.4f} nats "
           f"against fp32 ({c['sft_fp']:.4f}), small next to the losses themselves.")
    return _save(fig, rep / "ptq_vs_qat.png"), cap


def rl_figures(out: Path, rep: Path, res: dict) -> dict:
    """Reward against wall clock (sync vs async, the held-out evaluations marked) and the utilization timeline;
    {name: (path, caption)}; puts the measured utilization into res["rl"]."""
    made = {}
    runs = {m: read_jsonl(out / f"rl_{m}" / "metrics.jsonl") for m in ("sync", "async")}
    if any(runs.values()):
        p = res["pass1"]
        mark = lambda k, t, lab: (t, p[k]["sampled"], *p[k]["sampled_ci"], lab)  # noqa: E731
        end = {m: (h[-1]["time"] if h else 0.0) for m, h in runs.items()}
        evals = {"sync": [mark("sft", 0.0, "SFT"), mark("rl_sync", end["sync"], "sync after")],
                 "async": [mark("rl_async", end["async"], "async after")]}
        plot_reward_vs_time(runs, rep / "rl_reward.png", evals=evals)
        r = {m: [h["reward"] for h in hist] for m, hist in runs.items() if hist}
        rise = "; ".join(f"{m} {np.mean(x[:3]):.2f} → {np.mean(x[-3:]):.2f}" for m, x in r.items())
        made["rl_reward"] = (str(rep / "rl_reward.png"),
                             f"Mean reward of each trained batch (training tasks, sampled at temperature 1; first "
                             f"three steps → last three: {rise}) against wall clock and optimizer step; ◆ = held-out "
                             "sampled pass@1 with its 95% interval, before RL and after each run.")
    tls = {m: read_json(out / f"rl_{m}" / "timeline.json") for m in ("sync", "async")}
    if all(tls.values()):
        walls = {m: res["rl"][m].get("wall_s") for m in tls}
        util = plot_timeline(tls, rep / "rl_timeline.png", walls)
        for m, u in util.items():
            res["rl"][m]["utilization"] = u
        made["rl_timeline"] = (str(rep / "rl_timeline.png"),
                               "Who was busy when: the trainer (training) and each rollout worker (holding a group; "
                               "a judge call running), over each run's wall clock; white is waiting.")
    return made


def plots(out: Path, rep: Path, res: dict) -> tuple[dict, dict]:
    """The report's figures: ({name: path}, {name: caption}); puts the RL utilization into res["rl"]."""
    import matplotlib  # optional dependency: only the report's figures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = {"val_loss": val_loss_figure(plt, out, rep, res)}
    for name, fig in (("expert_load", expert_load_figure(plt, out, rep)), ("indexer_kl", indexer_kl_figure(plt, out, rep))):
        if fig is not None:
            made[name] = fig
    made.update(rl_figures(out, rep, res))
    made["ptq_vs_qat"] = ptq_figure(plt, rep, res)
    return {k: p for k, (p, _) in made.items()}, {k: c for k, (_, c) in made.items()}
