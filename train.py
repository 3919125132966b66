"""Train nanoGLM5: pretraining with DSA's two stages, then SFT (DESIGN.md §1, §3, §8).

    python data/prepare.py                                   # token shards + tokenizer into data/
    python train.py                                          # pretrain the tiny preset (~5 min, 2 cores)
    python train.py --stage sft --init-from out/pretrain/ckpt  # chat SFT, loss on assistant tokens
    python train.py --resume                                 # continue out/pretrain/ckpt exactly
    python train.py --preset mini --index-topk 64 --optimizer muon
    torchrun --nproc_per_node 2 train.py --device cpu        # DDP (gloo on CPU, nccl on GPU); --fsdp for FSDP2

Every flag is a field of `nanoglm5.trainer.TrainConfig` (kebab-case), plus one flag per ModelConfig
field to override the preset. The loop itself lives in nanoglm5/trainer.py.
"""

import argparse
import sys
from dataclasses import fields

from nanoglm5.checkpoint import CheckpointError
from nanoglm5.config import ModelConfig
from nanoglm5.train_utils import TrainError, add_config_flags, base_type


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    from nanoglm5.trainer import STAGE_DEFAULTS, TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, TrainConfig, skip=("model",), stage_defaults=STAGE_DEFAULTS)
    g = p.add_argument_group("model overrides (ModelConfig fields; default: the preset's value)")
    for f in fields(ModelConfig):
        t = base_type(f.type)
        if t not in (int, float, bool, str):
            continue
        g.add_argument("--" + f.name.replace("_", "-"), dest="model." + f.name, default=None,
                       type=_parse_bool if t is bool else t, metavar=t.__name__.upper())
    return p


def parse_config(argv=None):
    from nanoglm5.trainer import TrainConfig

    args = vars(build_parser().parse_args(argv))
    model = {k[len("model."):]: v for k, v in args.items() if k.startswith("model.") and v is not None}
    return TrainConfig(**{k: v for k, v in args.items() if not k.startswith("model.")}, model=model)


def main(argv=None) -> int:
    cfg = parse_config(argv)
    try:
        from nanoglm5.trainer import Trainer

        Trainer(cfg).run()
    except (TrainError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; the latest checkpoint (if any) is in {cfg.out_dir or 'out/' + cfg.stage}/ckpt "
              "— continue with --resume", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
