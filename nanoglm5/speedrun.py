"""The main job: the whole GLM-5 recipe at tiny scale, one command, with a report.

    python -m nanoglm5.speedrun                       # tiny preset, CPU, ~40 minutes on 2 cores
    python -m nanoglm5.speedrun --preset small --device cuda --out-dir out/small
    python -m nanoglm5.speedrun --quick               # a 2-minute smoke run of the same chain (CI)

Stages, each the same command a user would type, run one after another (DESIGN.md §1):
    data      python data/prepare.py                  corpus → filters → mixture → tokenizer → shards
    pretrain  python train.py --stage pretrain        dense → DSA warm-up (indexer only) → sparse; MoE; MTP
    sft       python train.py --stage sft --qat int4  chat SFT with INT4 fake quantization (GLM-5 §2.4.3)
    sft_fp    python train.py --stage sft             the same SFT in full precision: the PTQ baseline
    rl_sync   python rl.py --mode sync                synchronous RL from the QAT SFT model
    rl_async  python rl.py --mode async               asynchronous RL, same budget, same cores
    int4      python -m nanoglm5.quant convert        packed int4 weights of the RL model
    eval      (in process)                            losses, task accuracy, PTQ vs QAT, report.md + plots

Resumable: a finished stage leaves DONE.json in its directory and is skipped next time; an interrupted
training stage continues from its last checkpoint (--resume). A stage whose input is missing or broken
stops the job with one line naming the stage and what to delete.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


class SpeedrunError(RuntimeError):
    """An earlier stage is missing or broken; the message says what to run or delete."""


@dataclass
class Budget:
    """Per-stage sizes. The default fits ~40 minutes of a 2-core CPU with the tiny preset."""
    data: list
    pretrain: list
    sft: list
    rl_seconds: int
    rl: list
    eval_tasks: int
    eval_seqs: int


BUDGETS = {
    "full": Budget(data=[], pretrain=["--max-steps", "400"], sft=[], rl_seconds=240,
                   rl=["--max-steps", "1000"], eval_tasks=128, eval_seqs=64),
    "quick": Budget(data=["--budget-mb", "0.3", "--max-docs", "150", "--vocab-size", "600"],
                    pretrain=["--max-steps", "12", "--dense-steps", "6", "--dsa-warmup-steps", "2", "--batch-size", "4",
                              "--micro-batch-size", "4", "--seq-len", "96", "--eval-every", "6", "--eval-seqs", "4",
                              "--sample-tokens", "8", "--index-topk", "16"],
                    sft=["--max-steps", "6", "--batch-size", "4", "--micro-batch-size", "4", "--seq-len", "96",
                         "--sft-examples", "60", "--eval-every", "3", "--eval-seqs", "4", "--sample-tokens", "8"],
                    rl_seconds=25, rl=["--max-steps", "2", "--group-size", "2", "--groups-per-step", "2",
                                       "--max-new-tokens", "12", "--n-train-tasks", "20"],
                    eval_tasks=6, eval_seqs=4),
}


# ---------------------------------------------------------------------------------------------- checks
def check_ckpt(path: Path, what: str, stage: str, out: Path) -> Path:
    """A checkpoint directory that loads: config.json parses and its tensors open."""
    from nanoglm5.checkpoint import CheckpointError, load_state, read_config

    try:
        read_config(path)
        load_state(path)
    except CheckpointError as e:
        raise SpeedrunError(f"{what} missing or broken ({e}). Delete {out / stage} and re-run "
                            f"`python -m nanoglm5.speedrun --out-dir {out}` to redo the {stage} stage") from None
    return path


def check_data(d: Path, out: Path) -> Path:
    if not (d / "tokens" / "meta.json").exists() or not (d / "tokenizer.json").exists():
        raise SpeedrunError(f"prepared data missing in {d} (no tokens/meta.json or tokenizer.json). Delete {d} and "
                            f"re-run `python -m nanoglm5.speedrun --out-dir {out}` (or run `python data/prepare.py "
                            f"--out-dir {d}`)")
    return d


# ---------------------------------------------------------------------------------------------- stages
def stage_commands(a, b: Budget) -> list[tuple[str, list[str], str]]:
    """(name, argv, what it produces) for every subprocess stage, in order."""
    out, py = a.out_dir, sys.executable
    data = str(out / "data")
    threads = ["--threads", str(a.threads)]
    common = ["--preset", a.preset, "--device", a.device, "--data-dir", data, "--seed", str(a.seed)] + threads
    qat = ["--qat", "int4", "--qat-layers", a.qat_layers, "--qat-group-size", str(a.group_size)]
    rl = ["--time-budget-s", str(b.rl_seconds), "--workers", str(a.rl_workers), "--seed", str(a.seed),
          "--n-eval-tasks", "0"] + b.rl
    return [
        ("data", [py, "data/prepare.py", "--out-dir", data, "--seed", str(a.seed)] + b.data, "token shards"),
        ("pretrain", [py, "train.py", "--stage", "pretrain", "--out-dir", str(out / "pretrain")] + common + b.pretrain,
         "pretraining checkpoint"),
        ("sft", [py, "train.py", "--stage", "sft", "--init-from", str(out / "pretrain" / "ckpt"),
                 "--out-dir", str(out / "sft")] + common + qat + b.sft, "QAT SFT checkpoint"),
        ("sft_fp", [py, "train.py", "--stage", "sft", "--init-from", str(out / "pretrain" / "ckpt"),
                    "--out-dir", str(out / "sft_fp")] + common + b.sft, "full-precision SFT checkpoint"),
        ("rl_sync", [py, "rl.py", "--init-from", str(out / "sft" / "ckpt"), "--mode", "sync",
                     "--out-dir", str(out / "rl_sync")] + rl, "sync RL checkpoint"),
        ("rl_async", [py, "rl.py", "--init-from", str(out / "sft" / "ckpt"), "--mode", "async",
                      "--out-dir", str(out / "rl_async")] + rl, "async RL checkpoint"),
        ("int4", [py, "-m", "nanoglm5.quant", "convert", "--checkpoint", str(out / "rl_async" / "ckpt"),
                  "--out", str(out / "int4"), "--layers", a.qat_layers, "--group-size", str(a.group_size)],
         "int4 checkpoint"),
    ]


def inputs_of(name: str, out: Path):
    """Check what stage `name` reads before starting it."""
    if name in ("pretrain",):
        check_data(out / "data", out)
    if name in ("sft", "sft_fp"):
        check_data(out / "data", out)
        check_ckpt(out / "pretrain" / "ckpt", "pretraining checkpoint", "pretrain", out)
    if name in ("rl_sync", "rl_async"):
        check_ckpt(out / "sft" / "ckpt", "QAT SFT checkpoint", "sft", out)
    if name == "int4":
        check_ckpt(out / "rl_async" / "ckpt", "async RL checkpoint", "rl_async", out)


def run_stage(name: str, argv: list[str], what: str, out: Path) -> float:
    d = out / name
    done = d / "DONE.json"
    if done.exists():
        print(f"[speedrun] {name}: done earlier ({done}), skipping")
        return json.loads(done.read_text()).get("seconds", 0.0)
    inputs_of(name, out)
    if name in ("pretrain", "sft", "sft_fp", "rl_sync", "rl_async") and (d / "ckpt" / "config.json").exists():
        print(f"[speedrun] {name}: a checkpoint from an interrupted run exists, resuming it")
        argv = argv + ["--resume"]
    if name == "int4" and d.exists():
        import shutil

        shutil.rmtree(d)  # conversion is quick and all-or-nothing: redo it
    print(f"[speedrun] {name}: {' '.join(argv[1:])}", flush=True)
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rc = subprocess.call(argv, cwd=ROOT, env=env)
    if rc != 0:
        raise SpeedrunError(f"stage {name} failed (exit {rc}); its output is above. Re-run "
                            f"`python -m nanoglm5.speedrun --out-dir {out}` to resume it, or delete {d} to redo it")
    secs = time.time() - t0
    if name == "data":
        check_data(d, out)
    else:
        check_ckpt(d if name == "int4" else d / "ckpt", what, name, out)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({"seconds": secs, "argv": argv[1:]}, indent=2))
    print(f"[speedrun] {name}: finished in {secs:.0f}s")
    return secs


# ---------------------------------------------------------------------------------------------- evaluation
def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def lm_val_loss(model, tokens: np.ndarray, n_seqs: int, seq_len: int) -> float:
    """Mean next-token loss over n evenly spaced windows of the validation shard (sparse attention), the
    windows train.py evaluates on."""
    import torch

    from nanoglm5.train_utils import TokenBatches

    tot, n = 0.0, 0
    with torch.no_grad():
        for x, y in TokenBatches(tokens, seq_len, seed=0).eval_batches(n_seqs, 8):
            tot += model(x, y, mtp_weight=0.0).lm_loss.item() * y.numel()
            n += y.numel()
    return tot / max(n, 1)


def chat_val_loss(model, tokenizer, convs: list[dict], seq_len: int) -> float:
    """Loss on the assistant tokens of held-out conversations (what SFT optimizes)."""
    import torch

    from nanoglm5.train_utils import chat_example

    tot, n = 0.0, 0
    with torch.no_grad():
        for c in convs:
            ids, mask = tokenizer.render_chat(c["messages"])
            x, y = chat_example(ids, mask, seq_len)
            k = int((y >= 0).sum())
            if k == 0:
                continue
            out = model(torch.from_numpy(x)[None], torch.from_numpy(y)[None], mtp_weight=0.0)
            tot += out.lm_loss.item() * k
            n += k
    return tot / max(n, 1)


def task_accuracy(model, tokenizer, n_tasks: int, seed: int, samples: int) -> dict:
    """Pass@1 on held-out code tasks (the RL environment; eval split, judged by running the code in the
    sandbox): greedy ("acc") and the mean over `samples` seeded draws at temperature 1 ("sampled")."""
    from nanoglm5.rl.envs import make_env
    from nanoglm5.rl.rollout import RolloutSettings
    from nanoglm5.rl.trainer import evaluate

    tasks = make_env("code").make_tasks(n_tasks, seed, "eval")
    model.set_tie_break("stable")
    return evaluate(model, tokenizer, tasks, RolloutSettings(max_new_tokens=48, seed=seed), samples=samples)


def evaluate_all(a, b: Budget) -> dict:
    import torch

    from nanoglm5 import quant
    from nanoglm5.checkpoint import load_hf
    from nanoglm5.corpus import load_tokens
    from nanoglm5.sft_data import build_conversations
    from nanoglm5.tokenizer import Tokenizer
    from nanoglm5.train_utils import unigram_entropy

    out = a.out_dir
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    data = out / "data"
    tok = Tokenizer.load(data / "tokenizer.json")
    val, train = load_tokens(data, "val"), load_tokens(data, "train")
    seq_len = 96 if a.quick else 256
    convs = build_conversations(max(8, b.eval_seqs), seed=a.seed + 10_000, data_dir=data)
    res = {"unigram_loss": unigram_entropy(train, tok.vocab_size)}
    models = {}
    for name in ("pretrain", "sft", "sft_fp", "rl_sync", "rl_async"):
        models[name] = load_hf(check_ckpt(out / name / "ckpt", f"{name} checkpoint", name, out))
    models["int4"] = load_hf(check_ckpt(out / "int4", "int4 checkpoint", "int4", out))
    # PTQ baseline: the full-precision SFT model quantized after training; QAT: the QAT SFT model converted
    models["sft_ptq"] = quant.ptq(load_hf(out / "sft_fp" / "ckpt"), layers=a.qat_layers, group_size=a.group_size)
    models["sft_qat_int4"] = quant.ptq(load_hf(out / "sft" / "ckpt"), layers=a.qat_layers, group_size=a.group_size)
    for name, m in models.items():
        m.eval()
        res[f"{name}/val_loss"] = lm_val_loss(m, val, b.eval_seqs, seq_len)
        if name != "pretrain":
            res[f"{name}/chat_loss"] = chat_val_loss(m, tok, convs, seq_len)
        print(f"[speedrun] eval {name}: val loss {res[f'{name}/val_loss']:.3f}", flush=True)
    for name in ("sft", "rl_sync", "rl_async", "int4"):
        acc = task_accuracy(models[name], tok, b.eval_tasks, a.seed, samples=2 if a.quick else 8)
        res.update({f"{name}/{k}": v for k, v in acc.items()})
        print(f"[speedrun] eval {name}: held-out code pass@1 greedy {acc['acc']:.3f}, sampled {acc['sampled']:.3f} "
              f"on {acc['n']} tasks", flush=True)
    res["int4/weight_bytes"] = quant.weight_bytes(models["int4"])["total_bytes"]
    res["fp32/weight_bytes"] = sum(p.numel() * 4 for p in models["rl_async"].parameters())
    return res


# ---------------------------------------------------------------------------------------------- report
def plots(out: Path, rep: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    pre = read_jsonl(out / "pretrain" / "metrics.jsonl")
    sft = read_jsonl(out / "sft" / "metrics.jsonl")
    res = json.loads((rep / "results.json").read_text())

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for runs, label in ((pre, "pretrain"), (sft, "sft (QAT)")):
        pts = [(h["step"], h["val_loss"]) for h in runs if "val_loss" in h]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(res["unigram_loss"], ls="--", c="gray", label="unigram baseline")
    ax.set(xlabel="step", ylabel="validation loss (nats)", title="Validation loss")
    ax.legend()
    made.append(_save(fig, rep / "val_loss.png"))

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
        made.append(_save(fig, rep / "expert_load.png"))

    kl = [(h["step"], h["indexer_kl"], h["stage"]) for h in pre if h.get("stage") in ("warmup", "sparse")]
    if kl:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for stage in ("warmup", "sparse"):
            pts = [(s, k) for s, k, st in kl if st == stage]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=f"{stage} ({'full' if stage == 'warmup' else 'selected set'})")
        ax.set(xlabel="step", ylabel="KL(p ‖ softmax(I))", title="DSA indexer KL")
        ax.legend()
        made.append(_save(fig, rep / "indexer_kl.png"))

    runs = {m: read_jsonl(out / f"rl_{m}" / "metrics.jsonl") for m in ("sync", "async")}
    if any(runs.values()):
        from nanoglm5.rl.controller import plot_reward_vs_time

        plot_reward_vs_time(runs, rep / "rl_reward.png")
        made.append(str(rep / "rl_reward.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["sft_fp", "sft_ptq", "sft", "sft_qat_int4"]
    labels = ["fp32 SFT", "PTQ int4\n(of fp32 SFT)", "QAT SFT\n(fake quant)", "QAT → int4"]
    vals = [res.get(f"{n}/chat_loss", float("nan")) for n in names]
    ax.bar(labels, vals, color=["gray", "tab:red", "tab:blue", "tab:green"])
    ax.set(ylabel="held-out chat loss (nats)", title="PTQ vs QAT (same SFT budget)")
    ax.set_ylim(min(vals) * 0.95, max(vals) * 1.03)
    made.append(_save(fig, rep / "ptq_vs_qat.png"))
    return made


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def write_report(a, secs: dict, res: dict) -> Path:
    out = a.out_dir
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    (rep / "results.json").write_text(json.dumps({**res, "seconds": secs}, indent=2))
    pngs = plots(out, rep)
    sync, asyn = (json.loads((out / f"rl_{m}" / "summary.json").read_text()).get("summary", {}) for m in ("sync", "async"))
    pre = read_jsonl(out / "pretrain" / "metrics.jsonl")
    f = lambda k, d=3: "n/a" if k not in res or res[k] != res[k] else f"{res[k]:.{d}f}"  # noqa: E731
    gap = res.get("sft_ptq/chat_loss", math.nan) - res.get("sft_fp/chat_loss", math.nan)
    rec = (res.get("sft_ptq/chat_loss", math.nan) - res.get("sft_qat_int4/chat_loss", math.nan)) / gap
    recovered = f"QAT recovers {rec:.0%} of the PTQ gap" if gap > 0.005 else \
        f"the PTQ gap ({gap:+.4f}) is too small here to measure a recovery"
    tps = lambda s: s.get("trained_tokens_per_s", float("nan"))  # noqa: E731
    acc = lambda m: f"greedy {f(m + '/acc')}, sampled {f(m + '/sampled')}"  # noqa: E731
    meta = json.loads((out / "data" / "tokens" / "meta.json").read_text())
    rows = [  # (stage, what it achieved, the stages whose wall time it took)
        ("data", f"{meta['n_train_tokens']:,} train tokens after the quality, dedup, language and math-judge "
                 "filters (see data/report.md)", ["data"]),
        ("pretrain", f"val loss {f('pretrain/val_loss')} nats vs the unigram baseline {f('unigram_loss')} after "
                     f"{pre[-1]['step'] if pre else '?'} steps (dense → DSA warm-up → sparse)", ["pretrain"]),
        ("SFT with INT4 QAT", f"held-out chat loss {f('sft/chat_loss')} (fp32 eval of the QAT weights); "
                              f"code pass@1 {acc('sft')}", ["sft"]),
        ("PTQ vs QAT", f"int4 chat loss: PTQ {f('sft_ptq/chat_loss')}, QAT {f('sft_qat_int4/chat_loss')}, "
                       f"fp32 SFT {f('sft_fp/chat_loss')}: {recovered}", ["sft_fp"]),
        ("RL, sync", f"code pass@1 {acc('rl_sync')}; {tps(sync):.1f} trained tokens/s", ["rl_sync"]),
        ("RL, async", f"code pass@1 {acc('rl_async')}; {tps(asyn):.1f} trained tokens/s "
                      f"({tps(asyn) / max(tps(sync), 1e-9):.2f}× sync)", ["rl_async"]),
        ("int4 conversion", f"code pass@1 {acc('int4')}, val loss {f('int4/val_loss')}; weights "
                            f"{res['int4/weight_bytes'] / 1e6:.2f} MB vs {res['fp32/weight_bytes'] / 1e6:.2f} MB fp32",
         ["int4"]),
        ("evaluation", "every number on this page", ["eval"]),
    ]
    lines = [f"# nanoGLM5 speedrun report ({a.preset}, {a.device}{', quick' if a.quick else ''})", "",
             f"Written by `python -m nanoglm5.speedrun` into `{out}` on {time.strftime('%Y-%m-%d %H:%M')}. "
             "Code pass@1: held-out tasks of the RL code environment (unseen constants; the judge runs the "
             "code in the sandbox), greedy and the mean of 8 seeded samples at temperature 1.",
             "", "| stage | what it achieved | wall time |", "|---|---|---|"]
    for name, text, keys in rows:
        lines.append(f"| {name} | {text} | {sum(secs.get(k, 0.0) for k in keys):.0f}s |")
    lines += ["", f"Total: {sum(secs.values()):.0f}s.", ""]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in pngs]
    lines += ["", "Raw numbers: `results.json` beside this file."]
    path = rep / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu", help="training stages: cpu, cuda or auto (RL and eval run on the CPU)")
    p.add_argument("--out-dir", type=Path, default=None, help="default: out/speedrun (out/speedrun-quick with --quick)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the training stages")
    p.add_argument("--rl-workers", type=int, default=2)
    p.add_argument("--qat-layers", default="all_but_head", help="INT4 QAT/PTQ scope (quant.prepare_qat)")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="tiny budgets everywhere: checks the chain, learns nothing")
    a = p.parse_args(argv)
    a.out_dir = (a.out_dir or Path("out") / ("speedrun-quick" if a.quick else "speedrun")).resolve()
    b = BUDGETS["quick" if a.quick else "full"]
    t0 = time.time()
    try:
        secs = {}
        for name, cmd, what in stage_commands(a, b):
            secs[name] = run_stage(name, cmd, what, a.out_dir)
        t = time.time()
        print("[speedrun] eval: losses, task accuracy, PTQ vs QAT", flush=True)
        res = evaluate_all(a, b)
        secs["eval"] = time.time() - t
        report = write_report(a, secs, res)
    except SpeedrunError as e:
        print(f"[speedrun] error: {e}", file=sys.stderr)
        return 1
    print(f"\n[speedrun] all stages done in {time.time() - t0:.0f}s this run; report: {report}")
    print(f"[speedrun] serve the result:  python serve.py --checkpoint {a.out_dir / 'int4'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
