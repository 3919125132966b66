"""Is DSA lossless at toy scale? Dense-only training against dense → indexer warm-up → sparse training.

    python -m bench.dsa_quality                   # needs `python data/prepare.py` first; writes "dsa_quality"
    python -m bench.dsa_quality --max-steps 200 --dense-steps 120 --data-dir /tmp/d

Both runs see the same batches (data order is a pure function of (seed, step)) and take the same number
of LM-training steps; the DSA run adds --dsa-warmup-steps steps in which only the indexer trains (its KL to
the dense attention, DeepSeek-V3.2 §2.1). Compared: validation LM loss of the dense model (dense attention)
and of the DSA model (top-k attention, index_topk of seq_len keys). GLM-5 reports DSA as lossless;
the goal here is within 2%.
"""

import argparse
import tempfile

from bench.report import machine, write_section  # noqa: E402
from nanoglm5.trainer import STAGE_DEFAULTS, TrainConfig, Trainer  # noqa: E402


def run(args, dense_steps: int, warmup: int, max_steps: int) -> Trainer:
    cfg = TrainConfig(data_dir=args.data_dir, out_dir=tempfile.mkdtemp(), preset=args.preset, seed=args.seed,
                      max_steps=max_steps, dense_steps=dense_steps, dsa_warmup_steps=warmup, eval_every=0,
                      save_every=0, sample_tokens=0, eval_seqs=args.eval_seqs, log_every=1,
                      model={"index_topk": args.index_topk} if args.index_topk else {})
    tr = Trainer(cfg)
    tr.run()
    return tr


def main(argv=None):
    d = STAGE_DEFAULTS["pretrain"]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--max-steps", type=int, default=d["max_steps"] - d["dsa_warmup_steps"], help="LM-training steps")
    p.add_argument("--dense-steps", type=int, default=d["dense_steps"], help="DSA run: dense steps before the warm-up")
    p.add_argument("--dsa-warmup-steps", type=int, default=d["dsa_warmup_steps"])
    p.add_argument("--index-topk", type=int, default=0, help="override the preset's index_topk (0 = keep)")
    p.add_argument("--eval-seqs", type=int, default=64)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    dense = run(args, dense_steps=args.max_steps, warmup=0, max_steps=args.max_steps)
    dsa = run(args, dense_steps=args.dense_steps, warmup=args.dsa_warmup_steps,
              max_steps=args.max_steps + args.dsa_warmup_steps)
    a, b = dense.evaluate("dense")["val_loss"], dsa.evaluate("sparse")["val_loss"]
    b_dense = dsa.evaluate("dense")["val_loss"]
    kl = [h["indexer_kl"] for h in dsa.history if h["stage"] == "warmup"]
    gap = b / a - 1
    mc = dsa.model_config
    md = [f"`python -m bench.dsa_quality` — {machine()}; preset {args.preset}, seq_len {dsa.cfg.seq_len}, "
          f"index_topk {mc.index_topk}, {args.max_steps} LM steps × {dsa.cfg.batch_size} sequences, "
          f"DSA run: {args.dense_steps} dense + {args.dsa_warmup_steps} indexer warm-up + "
          f"{args.max_steps - args.dense_steps} sparse steps.", "",
          "| run | attention at eval | val loss (nats/token) |", "|---|---|---|",
          f"| dense only | dense | {a:.4f} |",
          f"| dense → warm-up → sparse | sparse (top-{mc.index_topk} of ≤{dsa.cfg.seq_len}) | {b:.4f} |",
          f"| same DSA model | dense | {b_dense:.4f} |", "",
          f"Sparse vs dense: {100 * gap:+.2f}% ({'within' if abs(gap) <= 0.02 else 'outside'} the 2% goal)."
          + (f" Indexer KL during the warm-up: {kl[0]:.4f} → {kl[-1]:.4f}." if kl else "")]
    print("\n".join(md))
    if not args.no_write:
        write_section("dsa_quality", "\n".join(md))


if __name__ == "__main__":
    main()
