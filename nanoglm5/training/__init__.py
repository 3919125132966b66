"""The training room: pretraining with DSA's stages and SFT, the loop behind `train.py`.

Read in this order:
  train_config.py  TrainConfig (every train.py flag), STAGE_DEFAULTS, RESUME_NEUTRAL, TrainError
  batches.py   data as a pure function of (seed, step): TokenBatches (pretraining), ChatBatches (SFT)
  optim.py     parameter groups, AdamW / Muon, the learning-rate schedule
  dist.py      one process or DDP / FSDP2 under torchrun
  state.py     RNG state, the checkpoint + trainer_state.pt, FSDP's sharded state (DCP), the one resume check
               (RL's controller uses it too)
  metrics.py   metrics.jsonl, the one W&B setup, the token-weighted validation loss, unigram entropy
  loop.py      Trainer: setup → one step → evaluation and samples → checkpoints → run()

Nothing here imports nanoglm5.rl: RL builds on this room, never the other way round.
"""
