"""Reinforcement learning for nanoGLM5: asynchronous rollout workers ⇄ weight relay ⇄ trainer (DESIGN.md §5).

    python rl.py --init-from out/sft/ckpt                       # async, 2 workers, code tasks judged in the sandbox
    python rl.py --init-from out/sft/ckpt --mode sync           # the same code with η = 0: the synchronous baseline
    python rl.py --init-from out/sft/ckpt --env mix --loss icepop --max-staleness 4 --partial-rollout
    python rl.py --init-from out/sft/ckpt --time-budget-s 180   # stop, save and evaluate after 3 minutes
    python rl.py --resume                                       # continue out/rl/ckpt: model, optimizer, buffer, leases

Every flag is a field of `nanoglm5.rl.trainer.RLConfig` (kebab-case). Prints the held-out pass@1 (greedy,
and the mean of 8 seeded samples) before and after, writes out_dir/ckpt (the one checkpoint format + rl_state), metrics.jsonl, timeline.json,
summary.json and reward_vs_time.png.
"""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from nanoglm5.rl.trainer import RLConfig
    from nanoglm5.train_utils import add_config_flags

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, RLConfig)
    return p


def parse_config(argv=None):
    from nanoglm5.rl.trainer import RLConfig

    return RLConfig(**vars(build_parser().parse_args(argv)))


def main(argv=None) -> int:
    from nanoglm5.checkpoint import CheckpointError
    from nanoglm5.train_utils import TrainError

    cfg = parse_config(argv)
    try:
        from nanoglm5.rl.controller import Controller

        Controller(cfg).run()
    except (TrainError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; the latest checkpoint (if any) is in {cfg.out_dir}/ckpt — continue with --resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
