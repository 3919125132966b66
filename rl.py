"""Reinforcement learning for nanoGLM5: asynchronous rollout workers ⇄ weight relay ⇄ trainer (DESIGN.md §5).

    python rl.py --init-from out/sft/ckpt                       # async, 2 workers, mixed math/code/agent tasks
    python rl.py --init-from out/sft/ckpt --mode sync           # the same code with η = 0: the synchronous baseline
    python rl.py --init-from out/sft/ckpt --env code --loss icepop --max-staleness 4 --partial-rollout
    python rl.py --init-from out/sft/ckpt --time-budget-s 180   # stop, save and evaluate after 3 minutes
    python rl.py --resume                                       # continue out/rl/ckpt: model, optimizer, buffer, leases

Every flag is a field of `nanoglm5.rl.trainer.RLConfig` (kebab-case). Prints the held-out greedy accuracy
before and after, writes out_dir/ckpt (the one checkpoint format + rl_state), metrics.jsonl, timeline.json,
summary.json and reward_vs_time.png.
"""

import argparse
import sys
import types
from dataclasses import MISSING, fields


def _base_type(t):
    if isinstance(t, types.UnionType):
        return next(a for a in t.__args__ if a is not type(None))
    return {"int": int, "float": float, "str": str, "bool": bool}.get(t, t) if isinstance(t, str) else t


def build_parser() -> argparse.ArgumentParser:
    from nanoglm5.rl.trainer import RLConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(RLConfig):
        flag, t = "--" + f.name.replace("_", "-"), _base_type(f.type)
        default = f.default if f.default is not MISSING else None
        help_ = f.metadata.get("help", "") + f" (default: {default!r})"
        if f.name == "resume":
            p.add_argument(flag, nargs="?", const="auto", default="", help=help_)
        elif t is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            p.add_argument(flag, type=t, default=default, help=help_)
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
