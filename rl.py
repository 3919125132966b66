"""Reinforcement learning for nanoGLM5: asynchronous rollout workers ⇄ weight relay ⇄ trainer (GLM-5, arXiv 2602.15763).

    python rl.py --checkpoint out/sft/ckpt                       # async, 2 workers, code tasks judged in the sandbox
    python rl.py --checkpoint out/sft/ckpt --mode sync           # the same code with η = 0: the synchronous baseline
    python rl.py --checkpoint out/sft/ckpt --env mix --loss icepop --max-staleness 4 --partial-rollout
    python rl.py --checkpoint out/sft/ckpt --time-budget-s 180   # stop, save and evaluate after 3 minutes
    python rl.py --resume                                       # continue out/rl/ckpt: model, optimizer, buffer, leases
    python rl.py --checkpoint out/sft/ckpt --device cuda         # learner and workers share one GPU (bf16 rollouts)
    python rl.py --checkpoint out/sft/ckpt --backend ray         # workers and learner as Ray actors (a local cluster)
    python rl.py --checkpoint out/sft/ckpt --backend ray --ray-address auto   # on a running Ray cluster (docs/scaling.md)

The code judge runs model-written programs inside bubblewrap (`apt-get install bubblewrap`); without it rl.py
refuses unless --allow-unsandboxed (resource limits only, never as root) is given. `--backend ray` needs Ray
(`pip install ray`); both backends run the same controller, and a run may resume on either.

Every flag is a field of `nanoglm5.rl.rl_config.RLConfig` (kebab-case). Prints the held-out pass@1 (greedy,
and the mean of 8 seeded samples) before and after, writes out_dir/ckpt (the one checkpoint format + rl_state), metrics.jsonl, timeline.json,
summary.json and reward_vs_time.png.
"""

import argparse
import sys

from nanoglm5.checkpoint import CheckpointError
from nanoglm5.cli import PathError, check_checkpoint, parser_for, run_main
from nanoglm5.rl.controller import Controller
from nanoglm5.rl.rl_config import RLConfig
from nanoglm5.rl.sandbox import SandboxUnavailable, check_sandbox
from nanoglm5.training.train_config import TrainError


def build_parser() -> argparse.ArgumentParser:
    return parser_for(RLConfig, __doc__)


def parse_config(argv=None) -> RLConfig:
    return RLConfig(**vars(build_parser().parse_args(argv)))


def run(cfg: RLConfig) -> None:
    if cfg.checkpoint and not cfg.resume:  # "does not exist" / "is not a checkpoint", before anything starts
        check_checkpoint(cfg.checkpoint)
    if cfg.env in ("code", "mix"):  # fail now, not inside a worker minutes later
        check_sandbox(cfg.allow_unsandboxed)
    Controller(cfg).run()


def main(argv=None) -> int:
    cfg = parse_config(argv)
    return run_main(lambda: run(cfg), (TrainError, CheckpointError, SandboxUnavailable, PathError), f"{cfg.out_dir}/ckpt")


if __name__ == "__main__":
    sys.exit(main())
