"""The main job: the whole GLM-5 recipe (arXiv 2602.15763) at tiny scale, one command, with a report.

    python -m nanoglm5.speedrun                       # tiny preset, CPU, ~20 minutes on 2 cores
    python -m nanoglm5.speedrun --preset small --device cuda --out-dir out/small
    python -m nanoglm5.speedrun --quick               # a few-minute smoke run of the same chain (CI)

Stages, each the same command a user would type, run one after another (docs/design.md):
    data       python data/prepare.py                  corpus → filters → mixture → tokenizer → shards
    pretrain   python train.py --stage pretrain        dense → DSA warm-up (indexer only) → sparse; MoE; MTP
    sft_trunk  python train.py --stage sft --until-step N   chat SFT in full precision, pretraining text mixed in
    sft        python train.py --stage sft --resume sft_trunk/ckpt --qat int4 --qat-start-step N
                                                       the last steps with INT4 fake quantization (GLM-5 §2.4.3)
    sft_fp     python train.py --stage sft --resume sft_trunk/ckpt   the same last steps in full precision:
                                                       the PTQ baseline; nothing before the branch is computed twice
    rl_sync    python rl.py --mode sync --env code_mt  synchronous multi-turn code RL of the QAT model (fake quant
                                                       in the learner and the workers; docs/rl_tasks.md), held-out
                                                       pass@1 (all tests pass, per turn) before and after
    rl_async   python rl.py --mode async --env code_mt asynchronous RL, the same steps, the same cores
    int4       python -m nanoglm5.quant convert        packed int4 of the async RL model, with its QAT recipe:
                                                       logits equal to the RL model's bit for bit
    eval       (in process, nanoglm5/report.py)        what the stages did not measure, then report.md, plots
                                                       and results.json

Resumable: a finished stage leaves DONE.json in its directory and is skipped next time; an interrupted
training stage continues from its last checkpoint (--resume). A stage whose input is missing or broken
stops the job with one line naming the stage and what to delete. The code judge runs model-written
programs in bubblewrap; without it the job stops before the first stage unless --allow-unsandboxed.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nanoglm5 import report
from nanoglm5.progress import JobProgress, matmul_gflops, published
from nanoglm5.checkpoint import CheckpointError
from nanoglm5.report import SpeedrunError, check_ckpt, rl_device
from nanoglm5.rl.sandbox import SandboxUnavailable, check_sandbox

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Budget:
    """Per-stage sizes. The full budget fits ~20 minutes of a quiet 2-core CPU with the tiny preset."""
    data: list
    pretrain: list
    sft: list  # flags shared by the trunk and both branches (they must agree for the branches to resume it)
    sft_steps: int  # the SFT schedule's length: trunk + branch
    sft_branch: int  # the last steps, trained twice: with QAT (sft) and in full precision (sft_fp)
    rl: list
    rl_seconds: int  # a safety cap per RL stage; the step count is what binds on the reference host
    eval_tasks: int
    eval_samples: int
    eval_seqs: int = 32  # pretraining-val windows (those train.py evaluates on) and held-out chats
    seq_len: int = 256
    extra: dict = field(default_factory=dict)


BUDGETS = {
    "full": Budget(data=[], pretrain=["--max-steps", "400"], sft=[], sft_steps=600, sft_branch=60,
                   rl=["--max-steps", "20", "--env", "code_mt"], rl_seconds=900, eval_tasks=128, eval_samples=8),
    "quick": Budget(data=["--budget-mb", "0.3", "--max-docs", "150", "--vocab-size", "600"],
                    pretrain=["--max-steps", "12", "--dense-steps", "6", "--dsa-warmup-steps", "2", "--batch-size", "4",
                              "--micro-batch-size", "4", "--eval-every", "6", "--eval-seqs", "4",
                              "--sample-tokens", "8", "--index-topk", "16"],
                    sft=["--batch-size", "4", "--micro-batch-size", "4", "--sft-examples", "60",
                         "--eval-every", "3", "--eval-seqs", "4", "--sample-tokens", "8", "--sft-pretrain-mix", "0.25"],
                    sft_steps=6, sft_branch=2,
                    rl=["--max-steps", "2", "--group-size", "2", "--groups-per-step", "2", "--max-new-tokens", "12",
                        "--n-train-tasks", "20", "--env", "code_mt"],
                    rl_seconds=60, eval_tasks=6, eval_samples=2, eval_seqs=4, seq_len=96),
}

TRAINING = ("pretrain", "sft_trunk", "sft", "sft_fp", "rl_sync", "rl_async")


# ---------------------------------------------------------------------------------------------- checks
def check_data(d: Path, out: Path) -> Path:
    if not (d / "tokens" / "meta.json").exists() or not (d / "tokenizer.json").exists():
        raise SpeedrunError(f"prepared data missing in {d} (no tokens/meta.json or tokenizer.json). Delete {d} and "
                            f"re-run `python -m nanoglm5.speedrun --out-dir {out}` (or run `python data/prepare.py "
                            f"--out-dir {d}`)")
    return d


INPUTS = {  # stage → the checkpoints it reads: (stage that writes it, what it is)
    "sft_trunk": [("pretrain", "pretraining checkpoint")],
    "sft": [("sft_trunk", "SFT trunk checkpoint")],
    "sft_fp": [("sft_trunk", "SFT trunk checkpoint")],
    "rl_sync": [("sft", "QAT SFT checkpoint")],
    "rl_async": [("sft", "QAT SFT checkpoint")],
    "int4": [("rl_async", "async RL checkpoint")],
}


def inputs_of(name: str, out: Path):
    """Check what stage `name` reads before starting it."""
    if name in ("pretrain", "sft_trunk", "sft", "sft_fp"):
        check_data(out / "data", out)
    for stage, what in INPUTS.get(name, []):
        check_ckpt(out / stage / "ckpt", what, stage, out)


# ---------------------------------------------------------------------------------------------- stages
def stage_commands(a, b: Budget) -> list[tuple[str, list[str], str]]:
    """(name, argv, what it produces) for every subprocess stage, in order."""
    out, py = a.out_dir, sys.executable
    data = str(out / "data")
    common = ["--preset", a.preset, "--device", a.device, "--data-dir", data, "--seed", str(a.seed),
              "--threads", str(a.threads)]
    # the branches name the trunk's --checkpoint too: the model config comes from it (and checkpoint is resume-neutral)
    sft = common + ["--stage", "sft", "--checkpoint", str(out / "pretrain" / "ckpt"), "--max-steps", str(b.sft_steps),
                    "--seq-len", str(b.seq_len)] + b.sft
    branch = b.sft_steps - b.sft_branch
    qat = ["--qat", "int4", "--qat-layers", a.qat_layers, "--qat-group-size", str(a.group_size),
           "--qat-start-step", str(branch)]
    trunk = str(out / "sft_trunk" / "ckpt")
    rl = ["--time-budget-s", str(b.rl_seconds), "--workers", str(a.rl_workers), "--seed", str(a.seed),
          "--device", rl_device(a.device)] + b.rl
    rl += ["--allow-unsandboxed"] if a.allow_unsandboxed else []
    evals = ["--n-eval-tasks", str(b.eval_tasks), "--eval-samples", str(b.eval_samples)]
    return [
        ("data", [py, "data/prepare.py", "--out-dir", data, "--seed", str(a.seed)] + b.data, "token shards"),
        ("pretrain", [py, "train.py", "--stage", "pretrain", "--out-dir", str(out / "pretrain"), "--seq-len",
                      str(b.seq_len)] + common + b.pretrain, "pretraining checkpoint"),
        ("sft_trunk", [py, "train.py", "--out-dir", str(out / "sft_trunk"), "--until-step", str(branch)] + sft,
         "SFT trunk checkpoint"),
        ("sft", [py, "train.py", "--resume", trunk, "--out-dir", str(out / "sft")] + sft + qat, "QAT SFT checkpoint"),
        ("sft_fp", [py, "train.py", "--resume", trunk, "--out-dir", str(out / "sft_fp")] + sft,
         "full-precision SFT checkpoint"),
        # the sync run evaluates the SFT model before and itself after; the async run's evaluation is the eval
        # stage's, so the SFT model is evaluated once
        ("rl_sync", [py, "rl.py", "--checkpoint", str(out / "sft" / "ckpt"), "--mode", "sync",
                     "--out-dir", str(out / "rl_sync")] + rl + evals, "sync RL checkpoint"),
        ("rl_async", [py, "rl.py", "--checkpoint", str(out / "sft" / "ckpt"), "--mode", "async",
                      "--out-dir", str(out / "rl_async"), "--n-eval-tasks", "0"] + rl, "async RL checkpoint"),
        ("int4", [py, "-m", "nanoglm5.quant", "convert", "--checkpoint", str(out / "rl_async" / "ckpt"),
                  "--out", str(out / "int4")], "int4 checkpoint"),
    ]


def _with_resume(argv: list[str], ckpt: Path) -> list[str]:
    """argv continuing its own interrupted checkpoint (instead of the one it started from)."""
    out = []
    skip = False
    for x in argv:
        if skip:
            skip = False
            continue
        if x == "--resume":
            skip = True
            continue
        out.append(x)
    return out + ["--resume", str(ckpt)]


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_stage(name: str, argv: list[str], what: str, out: Path, log: dict, prog: JobProgress) -> float:
    d = out / name
    done = d / "DONE.json"
    if done.exists():
        print(f"[speedrun] {prog.line(name)}: done earlier ({done}), skipping")
        rec = json.loads(done.read_text())
        log[name] = {k: rec[k] for k in ("load_before", "load_after", "cpu_s") if k in rec}
        prog.done(name, rec.get("seconds", 0.0), skipped=True)
        return rec.get("seconds", 0.0)
    inputs_of(name, out)
    if name in TRAINING and (d / "ckpt" / "config.json").exists():
        print(f"[speedrun] {name}: a checkpoint from an interrupted run exists, resuming it")
        argv = _with_resume(argv, d / "ckpt")
    if name == "int4" and d.exists():
        shutil.rmtree(d)  # conversion is quick and all-or-nothing: redo it
    print(f"[speedrun] {prog.line(name)}\n[speedrun] {name}: {' '.join(argv[1:])}", flush=True)
    t0, load0, cpu0 = time.time(), os.getloadavg()[0], _child_cpu()
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
    # CPU seconds of the stage's processes, workers included but not the programs the judge runs in bubblewrap (their
    # usage does not reach RUSAGE_CHILDREN through the sandbox's PID namespace): on a busy machine the wall time grows
    # with the other load, the CPU time much less, so the report gives both
    log[name] = {"load_before": load0, "load_after": os.getloadavg()[0], "cpu_s": _child_cpu() - cpu0}
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({"seconds": secs, "argv": argv[1:], **log[name]}, indent=2))
    prog.done(name, secs)
    print(f"[speedrun] {name}: finished in {secs:.0f}s (load average {log[name]['load_after']:.1f})")
    return secs


def job_progress(a, names: list[str]) -> JobProgress:
    """Measure this host's matmul rate and predict the job's time from the published run (nanoglm5/progress.py)."""
    a.matmul_gflops = round(matmul_gflops(a.threads), 1)
    ref = published()
    cfg = ref.get("config", {})
    # the published run predicts only a run of the same budget on the same kind of device
    same = cfg.get("preset") == a.preset and cfg.get("device") == a.device and bool(cfg.get("quick")) == a.quick
    prog = JobProgress(names, a.matmul_gflops, ref, comparable=same)
    print(f"[speedrun] {prog.start_line(report.TARGET_S)}", flush=True)
    return prog


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu", help="every stage: cpu, cuda or auto (training, RL with its workers, "
                   "and the evaluation)")
    p.add_argument("--out-dir", type=Path, default=None, help="default: out/speedrun (out/speedrun-quick with --quick)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the training stages")
    p.add_argument("--rl-workers", type=int, default=2)
    p.add_argument("--qat-layers", default="all_but_head", help="INT4 QAT/PTQ scope (int4.prepare_qat)")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--allow-unsandboxed", action="store_true",
                   help="let the code judge run model-written programs without bubblewrap (resource limits only); "
                        "by default the job stops before its first stage when bubblewrap cannot run")
    p.add_argument("--quick", action="store_true", help="tiny budgets everywhere: checks the chain, learns nothing")
    a = p.parse_args(argv)
    a.out_dir = (a.out_dir or Path("out") / ("speedrun-quick" if a.quick else "speedrun")).resolve()
    b = BUDGETS["quick" if a.quick else "full"]
    t0 = time.time()
    try:
        try:  # the RL stages and the evaluation run the code judge: fail now, not 10 minutes in
            sandboxed = check_sandbox(a.allow_unsandboxed)
        except SandboxUnavailable as e:
            raise SpeedrunError(f"the code judge cannot run: {e} (or pass --allow-unsandboxed to run the judged "
                                "programs with resource limits only)") from None
        print(f"[speedrun] {a.out_dir}: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; code judge "
              f"{'in bubblewrap' if sandboxed else 'WITHOUT bubblewrap (--allow-unsandboxed)'}", flush=True)
        stages = stage_commands(a, b)
        prog = job_progress(a, [name for name, _, _ in stages] + ["eval"])
        secs, loads = {}, {}
        for name, cmd, what in stages:
            secs[name] = run_stage(name, cmd, what, a.out_dir, loads, prog)
        child0 = _child_cpu()
        t, load0, r0 = time.time(), os.getloadavg()[0], resource.getrusage(resource.RUSAGE_SELF)
        print(f"[speedrun] {prog.line('eval')}\n[speedrun] eval: what the stages did not measure, then the report",
              flush=True)
        res = report.evaluate_all(a, b)  # keeps its costly parts in out/eval/, so a re-run only rewrites the report
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        done = a.out_dir / "eval" / "DONE.json"
        if done.exists():  # the evaluation's time is that of the run that computed it
            loads["eval"] = json.loads(done.read_text())
        else:
            loads["eval"] = {"seconds": time.time() - t, "load_before": load0, "load_after": os.getloadavg()[0],
                             "cpu_s": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime + _child_cpu() - child0}
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(loads["eval"], indent=2))
        secs["eval"] = loads["eval"].pop("seconds")
        path = report.write_report(a, b, secs, loads, res)
    except (SpeedrunError, CheckpointError) as e:
        print(f"[speedrun] error: {e}", file=sys.stderr)
        return 1
    print(f"\n[speedrun] all stages done in {time.time() - t0:.0f}s this run ({sum(secs.values()):.0f}s of stage time "
          f"in all); report: {path}")
    print(f"[speedrun] serve the result:  python serve.py --checkpoint {a.out_dir / 'int4'}")
    print(f"[speedrun] extend the context (GLM-5's mid-training stage; not part of the 20 minutes):  python train.py "
          f"--stage long_context --checkpoint {a.out_dir / 'pretrain' / 'ckpt'} --data-dir {a.out_dir / 'data'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
