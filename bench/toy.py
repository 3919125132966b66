"""A stand-in checkpoint for measuring the RL system when no SFT checkpoint is at hand.

Used by tests/test_rl_system.py, bench/rl_throughput.py and notebooks/04_async_rl.ipynb. Its rewards are
~0: good for systems measurements (throughput, staleness, bitwise reproducibility), not for "it learns".
"""

import torch

from nanoglm5.checkpoint import save_hf
from nanoglm5.config import ModelConfig
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.model import GLM5
from nanoglm5.rl.envs import make_env


def toy_checkpoint(path, seed: int = 0, vocab_size: int = 400, **model_overrides):
    """A random 2-layer GLM5 + a small BPE trained on the RL prompts, saved as a checkpoint directory."""
    texts = []
    for name in ("math", "code", "agent"):
        for t in make_env(name).make_tasks(40, 0, "train"):
            texts += [m["content"] for m in t.messages] + [t.answer]
    tok = Tokenizer.train(texts * 3, vocab_size=vocab_size)
    torch.manual_seed(seed)
    kw = dict(vocab_size=tok.vocab_size, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
              n_routed_experts=4, q_lora_rank=32, index_topk=16, max_position_embeddings=512)
    save_hf(GLM5(ModelConfig.preset("tiny", **{**kw, **model_overrides})), path, tokenizer=tok)
    return path
