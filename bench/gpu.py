"""Every stage, briefly, on one CUDA GPU: prints its figures, exits 0 (1 if a stage failed).

    python -m bench.gpu [--preset mini]

  1. train   a few steps of nanoglm5.training's Trainer on random tokens, bf16 autocast: tokens/s, loss;
  2. decode  the engine in bf16 without CUDA graphs, with them (one per batch bucket), and with MTP speculative
             decoding on top: tokens/s at batch 1 and 8, greedy agreement with the plain eager run, acceptance;
  3. RL      one learner update (nanoglm5.rl.learner) on fabricated groups: seconds, loss, grad norm;
  4. int4    PTQ to packed int4 (nanoglm5.quant.ptq) and the packed forward: logit gap to bf16, weight bytes.

The weights are random (a speed and plumbing check, not a quality one). Without CUDA it says so and exits 0
having done nothing; `--device cpu` runs the same stages on the CPU (graphs in their eager form), to check the
script itself.
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


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def stage_train(args, dev) -> dict:
    from nanoglm5.config import ModelConfig
    from nanoglm5.training.loop import Trainer
    from nanoglm5.training.train_config import TrainConfig

    with tempfile.TemporaryDirectory() as d:
        vocab = ModelConfig.preset(args.preset).vocab_size
        (Path(d) / "tokens").mkdir()
        toks = np.random.default_rng(0).integers(0, vocab, 200_000).astype(np.uint16)
        toks.tofile(Path(d) / "tokens" / "train.bin")
        toks[:20_000].tofile(Path(d) / "tokens" / "val.bin")
        (Path(d) / "tokens" / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": vocab}))
        cfg = TrainConfig(preset=args.preset, data_dir=d, out_dir=str(Path(d) / "out"), seq_len=256, batch_size=8,
                          micro_batch_size=8, max_steps=10**6, dense_steps=0, dsa_warmup_steps=0, sample_tokens=0,
                          device=str(dev), dtype="bf16" if dev.type == "cuda" else "fp32")
        tr = Trainer(cfg, quiet=True)
        tr.train_step(0)
        _sync(dev)
        t = time.perf_counter()
        for s in range(1, 1 + args.steps):
            rec = tr.train_step(s)
        _sync(dev)
        dt = time.perf_counter() - t
    return {"tokens_per_s": round(args.steps * 8 * 256 / dt, 1),
            **{k: round(rec[k], 4) for k in ("loss", "lm_loss", "mtp_loss", "grad_norm") if k in rec}}


def _model(args, dev, dtype):
    from nanoglm5.config import ModelConfig
    from nanoglm5.model import GLM5
    from nanoglm5.precision import cast_model

    torch.manual_seed(0)
    return cast_model(GLM5(ModelConfig.preset(args.preset)), dev, dtype).eval()  # routers stay fp32


def stage_decode(args, dev) -> dict:
    from nanoglm5.engine import Engine, SamplingParams

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = _model(args, dev, dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (64,), generator=g).tolist() for _ in range(8)]
    p = SamplingParams(max_tokens=args.new_tokens, temperature=0)
    graphs = "cuda" if dev.type == "cuda" else "eager"
    out, ref = {}, {}
    for name, kw in [("eager", dict(graphs="off")), ("cuda graphs", dict(graphs=graphs)),
                     ("cuda graphs + MTP", dict(graphs=graphs, speculative="mtp"))]:
        for batch in (1, 8):
            eng = Engine(model, max_batch=8, max_seq_len=64 + args.new_tokens + 8, **kw)
            eng.generate(prompts[:batch], p)  # warm-up: captures the graphs of the buckets used
            _sync(dev)
            t = time.perf_counter()
            toks = [c.token_ids for c in eng.generate(prompts[:batch], p)]
            _sync(dev)
            dt = time.perf_counter() - t
            key = f"{name}, batch {batch}"
            ref.setdefault(batch, toks)
            same = sum(a == b for x, y in zip(toks, ref[batch]) for a, b in zip(x, y)) / sum(map(len, toks))
            out[key] = {"tokens_per_s": round(batch * args.new_tokens / dt, 1), "greedy_agreement": round(same, 3)}
            if kw.get("speculative"):
                out[key]["acceptance_rate"] = round(eng.acceptance_rate, 3)
            print(f"  decode {key}: {out[key]}", flush=True)
    return out


def stage_rl(args, dev) -> dict:
    from nanoglm5.rl.buffer import Group, Trajectory
    from nanoglm5.rl.learner import Learner, attach_advantages, sequence_logprobs
    from nanoglm5.rl.rl_config import RLConfig

    model = _model(args, dev, torch.float32)
    learner = Learner(model, RLConfig(micro_batch_size=8))
    rng = np.random.default_rng(0)
    groups = []
    for gid in range(4):  # 4 groups × 4 samples: 32 prompt + 64 sampled tokens, μ = the model's own log-probs
        ids = torch.tensor(rng.integers(0, model.config.vocab_size, (4, 96)))
        with torch.no_grad():
            mu = sequence_logprobs(model, ids).cpu()
        trajs = [Trajectory(tokens=ids[i].tolist(), logprobs=[0.0] * 32 + mu[i, 31:].tolist(),
                            loss_mask=[0] * 32 + [1] * 64, reward=float(rng.random()), versions=[(0, 0)])
                 for i in range(4)]
        groups.append(Group(gid, 0, trajs))
        attach_advantages(groups[-1])
    _sync(dev)
    t = time.perf_counter()
    stats = learner.update(groups)
    _sync(dev)
    return {"seconds": round(time.perf_counter() - t, 3), **{k: round(v, 4) for k, v in stats.items()}}


def stage_int4(args, dev) -> dict:
    from nanoglm5.quant import ptq, weight_bytes

    model = _model(args, dev, torch.float32)
    packed = ptq(copy.deepcopy(model))
    x = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        ref, got = model(x).logits.float(), packed(x).logits.float()
    _sync(dev)
    return {"max_logit_gap": round(float((ref - got).abs().max()), 4), "weight_bytes": weight_bytes(packed),
            "fp32_weight_bytes": weight_bytes(model)}


STAGES = {"train": stage_train, "decode": stage_decode, "rl": stage_rl, "int4": stage_int4}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per sequence")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to check the script on a machine without a GPU")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device on this machine (torch.cuda.is_available() is False); nothing was run. "
              "Run it on a GPU machine, or pass --device cpu to check the script.")
        return 0
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"bench.gpu on {name}, torch {torch.__version__}, preset {args.preset}", flush=True)
    failed = []
    for stage in args.stages.split(","):
        t = time.perf_counter()
        try:
            res = STAGES[stage](args, dev)
            print(f"[{stage}] {time.perf_counter() - t:.1f}s {json.dumps(res, default=str)}", flush=True)
        except Exception:  # report every stage, then fail the run
            failed.append(stage)
            print(f"[{stage}] FAILED\n{traceback.format_exc()}", flush=True)
    if failed:
        print(f"bench.gpu: failed stages: {', '.join(failed)}")
        return 1
    print("bench.gpu: all stages ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
