"""Is DSA lossless at toy scale? Dense-only training against dense → indexer warm-up → sparse training.

    python -m bench.dsa_quality                   # needs `python data/prepare.py` first; writes "dsa_quality"
    python -m bench.dsa_quality --max-steps 200 --dense-steps 120 --data-dir /tmp/d

Both runs take the same --max-steps LM-training steps on exactly the same batch sequence, at the same
learning rate per LM step: LM step i of either run trains on batch i (data order is a pure function of
(seed, batch number)). The DSA run trains dense for its first --dense-steps LM steps (identical to the dense
run so far), then inserts --dsa-warmup-steps steps in which only the indexer trains (its KL to the dense
attention, DeepSeek-V3.2 arXiv 2512.02556 §2.1) on batches max_steps, max_steps+1, ... that no LM step of
either run sees, then trains sparse on the remaining LM batches. The trainer numbers batches by its own step
counter, which counts the warm-up; this bench re-indexes the DSA run's batches by LM step (and checks both
runs' LM batch sequences are equal). Compared: validation LM loss of the dense model (dense attention) and
of the DSA model (top-k attention, index_topk of seq_len keys). GLM-5 (arXiv 2602.15763) reports DSA as
lossless; the goal here is within 2%.
"""

import argparse
import tempfile

from bench.report import machine, write_section  # noqa: E402
from nanoglm5.training.loop import Trainer  # noqa: E402
from nanoglm5.training.train_config import STAGE_DEFAULTS, TrainConfig  # noqa: E402


class LMStepBatches:
    """The trainer's batches, numbered by LM step instead of trainer step: trainer step s of a run with D dense
    steps, W warm-up steps and M LM steps reads batch s (s < D), max_steps + s - D (the warm-up: batches no LM
    step reads) or s - W (the sparse stage). Records (trainer step, stage, batch) for the check and the report."""

    def __init__(self, data, dense_steps: int, warmup: int, lm_steps: int):
        self.data, self.dense_steps, self.warmup, self.lm_steps = data, dense_steps, warmup, lm_steps
        self.log: list[tuple[int, str, int]] = []

    def batch_of(self, step: int) -> tuple[str, int]:
        d, w = self.dense_steps, self.warmup
        if step < d:
            return "lm", step
        if step < d + w:
            return "warmup", self.lm_steps + step - d
        return "lm", step - w

    def n_targets(self, step: int, batch_size: int) -> int:  # called once per trainer step, before its batches
        kind, b = self.batch_of(step)
        self.log.append((step, kind, b))
        return self.data.n_targets(b, batch_size)

    def batch(self, step: int, batch_size: int, lo: int, hi: int):
        return self.data.batch(self.batch_of(step)[1], batch_size, lo, hi)

    def lm_batches(self) -> list[int]:
        return [b for _, kind, b in self.log if kind == "lm"]

    def __getattr__(self, name):  # everything else (eval batches, sizes) is the trainer's own data
        return getattr(self.data, name)


def run(args, dense_steps: int, warmup: int) -> tuple[Trainer, LMStepBatches]:
    cfg = TrainConfig(data_dir=args.data_dir, out_dir=tempfile.mkdtemp(), preset=args.preset, seed=args.seed,
                      max_steps=args.max_steps + warmup, dense_steps=dense_steps, dsa_warmup_steps=warmup,
                      eval_every=0, save_every=0, sample_tokens=0, eval_seqs=args.eval_seqs, log_every=1,
                      model={"index_topk": args.index_topk} if args.index_topk else {})
    tr = Trainer(cfg)
    tr.data = LMStepBatches(tr.data, dense_steps, warmup, args.max_steps)
    tr.run()
    return tr, tr.data


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
    if not 0 <= args.dense_steps <= args.max_steps:
        p.error(f"--dense-steps {args.dense_steps} must be between 0 and --max-steps {args.max_steps}")

    dense, dense_data = run(args, dense_steps=args.max_steps, warmup=0)
    dsa, dsa_data = run(args, dense_steps=args.dense_steps, warmup=args.dsa_warmup_steps)
    lm = list(range(args.max_steps))
    if not dense_data.lm_batches() == dsa_data.lm_batches() == lm:  # the claim of the docstring, checked
        raise AssertionError(f"the runs' LM batch sequences differ: dense {dense_data.lm_batches()[:5]}..., "
                             f"DSA {dsa_data.lm_batches()[:5]}...")
    warm = [b for _, kind, b in dsa_data.log if kind == "warmup"]
    assert not set(warm) & set(lm)
    lr = [[h["lr"] for h in t.history if h["stage"] != "warmup"] for t in (dense, dsa)]  # log_every=1: every step
    if not (len(lr[0]) == len(lr[1]) == args.max_steps and all(abs(x - y) <= 1e-12 for x, y in zip(*lr))):
        raise AssertionError("the runs' learning rates per LM step differ")
    a, b = dense.evaluate("dense")["val_loss"], dsa.evaluate("sparse")["val_loss"]
    b_dense = dsa.evaluate("dense")["val_loss"]
    kl = [h["indexer_kl"] for h in dsa.history if h["stage"] == "warmup"]
    gap = b / a - 1
    mc = dsa.model_config
    n_sparse = args.max_steps - args.dense_steps
    warm_txt = f"batches {warm[0]}–{warm[-1]}, read by no LM step" if warm else "none"
    md = [f"`python -m bench.dsa_quality` — {machine()}; preset {args.preset}, seq_len {dsa.cfg.seq_len}, "
          f"index_topk {mc.index_topk}, {args.max_steps} LM steps × {dsa.cfg.batch_size} sequences. Both runs train "
          f"the LM on batches 0–{args.max_steps - 1} in the same order at the same learning rate per LM step; "
          f"the DSA run trains LM steps 0–{args.dense_steps - 1} dense (as the dense run), then "
          f"{args.dsa_warmup_steps} indexer-only warm-up steps ({warm_txt}), then LM steps "
          f"{args.dense_steps}–{args.max_steps - 1} sparse ({n_sparse} steps).", "",
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
