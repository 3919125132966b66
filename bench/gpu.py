"""The script a GPU owner runs first: every stage briefly on one CUDA GPU, the checks that say the CUDA path computes
what the CPU path does, and the figures, written into docs/benchmarks.md ("gpu" section). Sized for under 10 minutes
on one H100 at `small` (not yet timed on a GPU: the dry run takes ~20 s on 2 CPU cores); exits 1 if a stage or a
check failed (every stage still runs and is reported).

    python -m bench.gpu [--preset small]             # on the GPU
    python -m bench.gpu --device cpu --dry-run       # the same logic at tiny, tiny step counts (CI runs this)

Stages (random weights: a speed and plumbing check, not a quality one):
  train   nanoglm5.training's Trainer on random tokens, bf16 autocast: tokens/s and MFU (model FLOPs from
          nanoglm5.scale.train_flops_per_token over the GPU's nominal bf16 peak, and over a measured bf16 matmul);
  decode  the engine in bf16: eager, CUDA graphs (one per batch bucket), CUDA graphs + MTP speculation; tokens/s at
          batch 1 and 32;
  rl      the learner's update (nanoglm5.rl.learner, fp32 masters under bf16 autocast, as rl.py on CUDA) on groups
          sampled by a bf16 engine: trained tokens/s, and |log π − log μ| on policy;
  int4    PTQ to packed int4 (nanoglm5.quant.ptq) and the packed forward: logit gap to full precision, weight bytes.
Checks (each "pass" or "FAIL" with its numbers):
  cuda_vs_cpu_fp32   the same fp32 weights on the device and on the CPU, TF32 off, dense attention: max |Δ logit|
                     < 1e-3 (fp32 in another summation order differs by ~1e-5 here; dense, because a DSA top-k
                     choice between near-equal index scores may flip between devices and move a logit by far more);
  graphs_eq_eager    greedy tokens with CUDA graphs == without, in bf16 (same kernels, replayed);
  learner_eq_worker  the experts and DSA keys the learner picks (fp32 masters, bf16 autocast) == a bf16 rollout
                     worker's copy (nanoglm5.precision.cast_model) on the same ids: router scores and index scores
                     are true fp32 on both (GLM-5 arXiv 2602.15763 §4.1: rollout and training must agree); ≥ 99 % of
                     choices equal (the worker's norm weights are bf16-rounded, so a near-tie may flip);
  mtp_lossless       greedy tokens with MTP speculation == without, in fp32 (lossless by construction, speculative.py).
--dry-run: --preset tiny, 2 timed steps of 2 × 64 tokens (the GPU run: 16 × 1024), 8 new tokens, decode batches 1
and 4 (the GPU run: 1 and 32), and the figures go to --doc (a temp file in the test) with
"dry run" in the title; on CPU the graphs are their eager form and "cuda vs cpu" compares the CPU with itself.
"""

import argparse
import copy
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from bench.report import BENCH_DOC, machine, write_section

# dense bf16 tensor-core peak in FLOP/s (vendor datasheets, without sparsity) by device-name substring
NOMINAL_BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                     "L4": 121e12, "RTX 4090": 165e12, "A10": 125e12}
LOGIT_TOL = 1e-3  # cuda_vs_cpu_fp32, see the docstring
CHOICE_AGREEMENT = 0.99  # learner_eq_worker


def _r(x: float) -> float:
    """4 significant digits (a random model's grad norm is ~1e-6: rounding to places would print 0)."""
    return float(f"{x:.4g}")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _model(args, dev, dtype):
    from nanoglm5.config import ModelConfig
    from nanoglm5.model import GLM5
    from nanoglm5.precision import cast_model

    torch.manual_seed(0)
    return cast_model(GLM5(ModelConfig.preset(args.preset)), dev, dtype).eval()  # routers stay fp32


def _prompts(model, n, T=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (T,), generator=g).tolist() for _ in range(n)]


def _low(dev):
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def matmul_peak(dev, dtype, n: int) -> float:
    """Measured FLOP/s of one n×n matmul in `dtype` (the best of 5 after a warm-up)."""
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        _sync(dev)
        t = time.perf_counter()
        a @ b
        _sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def stage_train(args, dev) -> dict:
    from nanoglm5.config import ModelConfig
    from nanoglm5.scale import train_flops_per_token
    from nanoglm5.training.loop import Trainer
    from nanoglm5.training.train_config import TrainConfig

    mc, T, B = ModelConfig.preset(args.preset), args.seq_len, args.batch_size
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "tokens").mkdir()
        toks = np.random.default_rng(0).integers(0, mc.vocab_size, 200_000).astype(np.uint16)
        toks.tofile(Path(d) / "tokens" / "train.bin")
        toks[:20_000].tofile(Path(d) / "tokens" / "val.bin")
        (Path(d) / "tokens" / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": mc.vocab_size}))
        cfg = TrainConfig(preset=args.preset, data_dir=d, out_dir=str(Path(d) / "out"), seq_len=T, batch_size=B,
                          micro_batch_size=B, max_steps=10**6, dense_steps=0, dsa_warmup_steps=0, sample_tokens=0,
                          device=str(dev), dtype="bf16" if dev.type == "cuda" else "fp32")
        tr = Trainer(cfg, quiet=True)
        tr.train_step(0)
        _sync(dev)
        t = time.perf_counter()
        for s in range(1, 1 + args.steps):
            rec = tr.train_step(s)
        _sync(dev)
        dt = time.perf_counter() - t
    tok_s = args.steps * B * T / dt
    flops = tok_s * train_flops_per_token(mc, T, sparse=True, include_mtp=True)["total"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    nominal = next((v for k, v in NOMINAL_BF16_PEAK.items() if k in name), None)
    measured = matmul_peak(dev, _low(dev), 8192 if dev.type == "cuda" else 512)
    return {"tokens_per_s": _r(tok_s), "model_tflops": _r(flops / 1e12),
            "mfu_nominal": _r(flops / nominal) if nominal else None,
            "mfu_measured_matmul": _r(flops / measured), "matmul_tflops": _r(measured / 1e12),
            **{k: _r(rec[k]) for k in ("loss", "grad_norm") if k in rec}}


def _decode(model, prompts, new_tokens, **kw) -> tuple[list, float]:
    from nanoglm5.engine import Engine, SamplingParams

    eng = Engine(model, max_batch=len(prompts), max_seq_len=len(prompts[0]) + new_tokens + 8, **kw)
    p = SamplingParams(max_tokens=new_tokens, temperature=0)
    eng.generate(prompts, p)  # warm-up: captures the graphs of the buckets used
    dev = next(model.parameters()).device
    _sync(dev)
    t = time.perf_counter()
    toks = [c.token_ids for c in eng.generate(prompts, p)]
    _sync(dev)
    return toks, time.perf_counter() - t


def stage_decode(args, dev) -> dict:
    model = _model(args, dev, _low(dev))
    graphs = "cuda" if dev.type == "cuda" else "eager"
    out = {}
    for batch in args.batches:
        prompts = _prompts(model, batch)
        for name, kw in [("eager", dict(graphs="off")), ("graphs", dict(graphs=graphs)),
                         ("graphs+mtp", dict(graphs=graphs, speculative="mtp"))]:
            toks, dt = _decode(model, prompts, args.new_tokens, **kw)
            out[f"{name}, batch {batch}"] = _r(sum(map(len, toks)) / dt)
    return {"tokens_per_s": out}


def _on_policy_groups(model, tok_model, args, dev):
    """4 groups × 4 samples from a bf16 engine (the worker), with its recorded log μ and random rewards."""
    from nanoglm5.engine import Engine, SamplingParams
    from nanoglm5.rl.buffer import Group, Trajectory
    from nanoglm5.rl.learner import attach_advantages

    prompts = _prompts(model, 4, T=32, seed=1)
    eng = Engine(tok_model, max_batch=16, max_seq_len=32 + args.new_tokens + 8, graphs="off")
    done = eng.generate([p for p in prompts for _ in range(4)],
                        SamplingParams(max_tokens=args.new_tokens, temperature=1.0, seed=0))
    rng, groups = np.random.default_rng(0), []
    for gid in range(4):
        trajs = [Trajectory(tokens=prompts[gid] + c.token_ids, logprobs=[0.0] * 32 + c.logprobs,
                            loss_mask=[0] * 32 + [1] * len(c.token_ids), reward=float(rng.random()), versions=[(0, 0)])
                 for c in done[4 * gid: 4 * gid + 4]]
        groups.append(Group(gid, 0, trajs))
        attach_advantages(groups[-1])
    return groups


def stage_rl(args, dev) -> dict:
    from nanoglm5.precision import cast_model
    from nanoglm5.rl.learner import Learner, pad_trajectories, sequence_logprobs
    from nanoglm5.rl.rl_config import RLConfig

    model = _model(args, dev, torch.float32)  # the learner's fp32 masters
    worker = cast_model(copy.deepcopy(model), dev, _low(dev))
    groups = _on_policy_groups(model, worker, args, dev)
    ids, mu, mask = pad_trajectories([t for g in groups for t in g.trajectories])
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        lp = sequence_logprobs(model, ids.to(dev)).cpu()
    gap = (lp - mu[:, 1:])[mask[:, 1:].bool()].abs()
    learner = Learner(model, RLConfig(micro_batch_size=16))
    _sync(dev)
    t = time.perf_counter()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        stats = learner.update(groups)
    _sync(dev)
    dt = time.perf_counter() - t
    return {"trained_tokens_per_s": _r(stats["trained_tokens"] / dt), "seconds": _r(dt),
            "logprob_gap_mean": _r(gap.mean()), "logprob_gap_max": _r(gap.max()),
            "loss": _r(stats["loss"]), "grad_norm": _r(stats["grad_norm"])}


def stage_int4(args, dev) -> dict:
    from nanoglm5.quant import ptq, weight_bytes

    model = _model(args, dev, torch.float32)
    packed = ptq(copy.deepcopy(model))
    x = torch.tensor(_prompts(model, 2, T=128), device=dev)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        ref, got = model(x).logits.float(), packed(x).logits.float()
    _sync(dev)
    return {"max_logit_gap": _r((ref - got).abs().max()), "int4_total_bytes": weight_bytes(packed)["total_bytes"],
            "fp32_total_bytes": weight_bytes(model)["total_bytes"]}


def check_cuda_vs_cpu_fp32(args, dev) -> dict:
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = _model(args, dev, torch.float32)
        x = torch.tensor(_prompts(model, 2, T=128))
        with torch.no_grad():
            on_dev = model(x.to(dev), sparse=False).logits.cpu()
            on_cpu = copy.deepcopy(model).cpu()(x, sparse=False).logits
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    gap = float((on_dev - on_cpu).abs().max())
    return {"ok": gap < LOGIT_TOL, "max_abs_logit_gap": gap, "tolerance": LOGIT_TOL}


def check_graphs_eq_eager(args, dev) -> dict:
    model = _model(args, dev, _low(dev))
    prompts = _prompts(model, max(args.batches))
    eager, _ = _decode(model, prompts, args.new_tokens, graphs="off")
    graphed, _ = _decode(model, prompts, args.new_tokens, graphs="cuda" if dev.type == "cuda" else "eager")
    return {"ok": eager == graphed, "sequences": len(prompts), "equal": sum(a == b for a, b in zip(eager, graphed))}


def _choices(model, ids, autocast: bool) -> tuple[list, list]:
    """The expert indices of every Router and the DSA keys of every layer's selection in one forward."""
    from nanoglm5.model import Router

    experts, keys, handles = [], [], []
    for m in model.modules():
        if isinstance(m, Router):
            handles.append(m.register_forward_hook(lambda mod, a, out: experts.append(out[1].sort(-1).values)))
        if hasattr(m, "select") and callable(m.select):
            def spy(*a, _f=m.select, **kw):
                out = _f(*a, **kw)
                keys.append(out.sort(-1).values)
                return out
            m.select = spy
    dev = next(model.parameters()).device
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        model(ids.to(dev), sparse=True, tie_break="stable")
    for h in handles:
        h.remove()
    for m in model.modules():
        m.__dict__.pop("select", None)
    return experts, keys


def check_learner_eq_worker(args, dev) -> dict:
    from nanoglm5.precision import cast_model

    learner = _model(args, dev, torch.float32)
    worker = cast_model(copy.deepcopy(learner), dev, _low(dev))
    ids = torch.tensor(_prompts(learner, 2, T=max(128, 2 * learner.config.index_topk)))  # T > index_topk: DSA selects
    le, lk = _choices(learner, ids, autocast=dev.type == "cuda")
    we, wk = _choices(worker, ids, autocast=dev.type == "cuda")
    same = lambda a, b: sum(float((x == y).all(-1).float().mean()) for x, y in zip(a, b)) / max(1, len(a))  # noqa: E731
    e, k = same(le, we), same(lk, wk)
    return {"ok": min(e, k) >= CHOICE_AGREEMENT and len(le) == len(we) > 0 and len(lk) == len(wk) > 0,
            "experts_equal": round(e, 4), "dsa_keys_equal": round(k, 4), "required": CHOICE_AGREEMENT}


def check_mtp_lossless(args, dev) -> dict:
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model = _model(args, dev, torch.float32)
        prompts = _prompts(model, 4)
        plain, _ = _decode(model, prompts, args.new_tokens, graphs="off")
        spec, _ = _decode(model, prompts, args.new_tokens, graphs="off", speculative="mtp")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"ok": plain == spec, "sequences": len(prompts), "equal": sum(a == b for a, b in zip(plain, spec))}


STAGES = {"train": stage_train, "decode": stage_decode, "rl": stage_rl, "int4": stage_int4}
CHECKS = {"cuda_vs_cpu_fp32": check_cuda_vs_cpu_fp32, "graphs_eq_eager": check_graphs_eq_eager,
          "learner_eq_worker": check_learner_eq_worker, "mtp_lossless": check_mtp_lossless}


def markdown(args, name: str, results: dict, seconds: float) -> str:
    title = "## One GPU, first run (`python -m bench.gpu`)" + (" — dry run on CPU, not a measurement" if args.dry_run
                                                              else "")
    lines = [title, "", f"{machine()}; device {name}; preset `{args.preset}`, {args.steps} timed training steps, "
             f"{args.new_tokens} new tokens per sequence; {seconds:.0f} s in all. Random weights.", "",
             "| | result |", "|---|---|"]
    for key, res in results.items():
        if isinstance(res, dict) and "ok" in res:
            verdict = "pass" if res["ok"] else "FAIL"
            res = f"**{verdict}** " + json.dumps({k: v for k, v in res.items() if k != "ok"})
        lines.append(f"| {key} | {res if isinstance(res, str) else json.dumps(res)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, help="default small (tiny with --dry-run)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 10; 2 with --dry-run)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per sequence (64; 8 with --dry-run)")
    ap.add_argument("--stages", default=",".join([*STAGES, *CHECKS]),
                    help="comma-separated subset of " + ",".join([*STAGES, *CHECKS]))
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (with --dry-run) to check the script")
    ap.add_argument("--dry-run", action="store_true", help="tiny preset, tiny step counts: checks the script runs")
    ap.add_argument("--doc", type=Path, default=BENCH_DOC, help="the markdown file whose 'gpu' section is written")
    args = ap.parse_args(argv)
    small = args.dry_run
    args.preset = args.preset or ("tiny" if small else "small")
    args.steps = args.steps or (2 if small else 10)
    args.new_tokens = args.new_tokens or (8 if small else 64)
    args.batches = (1, 4) if small else (1, 32)
    args.seq_len, args.batch_size = (64, 2) if small else (1024, 16)
    unknown = [s for s in args.stages.split(",") if s not in STAGES and s not in CHECKS]
    if unknown:
        ap.error(f"--stages: unknown {unknown}; choose from {','.join([*STAGES, *CHECKS])}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device on this machine (torch.cuda.is_available() is False); nothing was run. "
              "Run it on a GPU machine, or pass --device cpu --dry-run to check the script.")
        return 0
    if not args.device.startswith("cuda") and not args.dry_run:
        ap.error(f"--device {args.device}: figures off a GPU would go into docs/benchmarks.md; add --dry-run "
                 "(and --doc PATH) to check the script on this device")
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"bench.gpu on {name}, torch {torch.__version__}, preset {args.preset}", flush=True)
    failed, results, t0 = [], {}, time.perf_counter()
    for stage in args.stages.split(","):
        t = time.perf_counter()
        try:
            results[stage] = res = {**STAGES, **CHECKS}[stage](args, dev)
            if stage in CHECKS and not res["ok"]:
                failed.append(stage)
            print(f"[{stage}] {time.perf_counter() - t:.1f}s {json.dumps(res, default=str)}", flush=True)
        except Exception:  # report every stage, then fail the run
            failed.append(stage)
            results[stage] = "**FAILED** (traceback in the log)"
            print(f"[{stage}] FAILED\n{traceback.format_exc()}", flush=True)
    write_section("gpu", markdown(args, name, results, time.perf_counter() - t0), args.doc)
    print(f"bench.gpu: wrote the 'gpu' section of {args.doc}")
    if failed:
        print(f"bench.gpu: failed: {', '.join(failed)}")
        return 1
    print("bench.gpu: every stage ran and every check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
