"""Train nanoGLM5: pretraining with DSA's two stages, then SFT (GLM-5, arXiv 2602.15763; docs/design.md).

    python data/prepare.py                                   # token shards + tokenizer into data/
    python train.py                                          # pretrain the tiny preset (~5 min, 2 cores)
    python train.py --stage sft --checkpoint out/pretrain/ckpt  # chat SFT, loss on assistant tokens
    python train.py --stage long_context --checkpoint out/pretrain/ckpt   # context extension: 2048 tokens,
                                                             # RoPE base raised 100x (GLM-4.5 §2.4), DSA on
    python train.py --resume                                 # continue out/pretrain/ckpt exactly
    python train.py --preset mini --index-topk 64 --optimizer muon
    torchrun --nproc_per_node 2 train.py --device cpu        # DDP (gloo on CPU, nccl on GPU); --fsdp for FSDP2
    torchrun --nproc_per_node 2 train.py --device cpu --fsdp --resume auto   # FSDP2; resumes from its shards

Every flag is a field of `nanoglm5.training.train_config.TrainConfig` (kebab-case), plus one flag per ModelConfig
field to override the preset. The loop itself lives in nanoglm5/training/loop.py; several nodes, FSDP
checkpoints and the road to 744B: docs/scaling.md.
"""

import argparse
import sys
from dataclasses import fields

from nanoglm5.checkpoint import CheckpointError
from nanoglm5.cli import PathError, base_type, check_checkpoint, parse_bool, parser_for, run_main
from nanoglm5.config import ModelConfig
from nanoglm5.training.dist import teardown_distributed
from nanoglm5.training.loop import Trainer
from nanoglm5.training.train_config import STAGE_DEFAULTS, TrainConfig, TrainError


def build_parser() -> argparse.ArgumentParser:
    p = parser_for(TrainConfig, __doc__, skip=("model",), stage_defaults=STAGE_DEFAULTS)
    g = p.add_argument_group("model overrides (ModelConfig fields; default: the preset's value)")
    for f in fields(ModelConfig):
        t = base_type(f.type)
        if t not in (int, float, bool, str):
            continue
        g.add_argument("--" + f.name.replace("_", "-"), dest="model." + f.name, default=None,
                       type=parse_bool if t is bool else t, metavar=t.__name__.upper())
    return p


def parse_config(argv=None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    model = {k[len("model."):]: v for k, v in args.items() if k.startswith("model.") and v is not None}
    return TrainConfig(**{k: v for k, v in args.items() if not k.startswith("model.")}, model=model)


def run(cfg: TrainConfig) -> None:
    if cfg.checkpoint:  # before any data is read
        check_checkpoint(cfg.checkpoint)
    Trainer(cfg).run()


def main(argv=None) -> int:
    cfg = parse_config(argv)
    try:
        return run_main(lambda: run(cfg), (TrainError, CheckpointError, PathError),
                        f"{cfg.out_dir or 'out/' + cfg.stage}/ckpt")
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
