"""Pieces every training loop needs (pretraining and SFT in trainer.py, RL in rl.py).

Holds, top to bottom:
  - `TrainError`: a user-facing failure whose message says what went wrong and what to try;
  - distributed setup under torchrun (`Dist`, `setup_distributed`): DDP with gloo on CPU / nccl on GPU;
  - data as a pure function of (seed, step): `TokenBatches` (random windows of the token shards) and
    `ChatBatches` (SFT conversations, epoch-wise permutations), so a resumed run sees exactly the
    batches the uninterrupted run would have seen, on any number of ranks;
  - training state: RNG states, `save_checkpoint` (the one HF-format directory of DESIGN.md §1 plus
    trainer_state.pt, written atomically) and `load_trainer_state` (errors name the file);
  - `config_diff` for resume checks, `unigram_entropy`, `bytes_per_token`, `greedy_generate`.
"""

import argparse
import dataclasses
import json
import os
import random
import shutil
import types
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nanoglm5.checkpoint import CheckpointError, resolve_dir, save_hf


class TrainError(RuntimeError):
    """Bad input or a failed run; the message is one line naming the bad value and the fix."""


# ---------------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (no-op on one process)."""
        if self.enabled:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"--device {device}: no CUDA GPU is visible to torch {torch.__version__}; use --device cpu")
    return torch.device(device)


def setup_distributed(device: str = "auto") -> Dist:
    """One process: Dist(). Under `torchrun --nproc_per_node N`: init the process group
    (nccl on GPU, gloo on CPU), one GPU per local rank, CPU threads split between local ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        return Dist(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


# ---------------------------------------------------------------------------------------------- data
def load_shards(data_dir: str | Path, split: str) -> np.ndarray:
    from nanoglm5.corpus import load_tokens

    try:
        return load_tokens(data_dir, split)
    except FileNotFoundError as e:
        raise TrainError(f"{e} (--data-dir {data_dir})") from None


class TokenBatches:
    """Pretraining batches: random windows of seq_len+1 tokens. The window starts of step s are drawn
    from np.random.default_rng([seed, s]): a pure function of (seed, step), the same on every rank,
    each rank taking its own slice of the global batch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        if len(tokens) < seq_len + 2:
            raise TrainError(f"the token shard holds {len(tokens)} tokens, fewer than --seq-len {seq_len} + 2; "
                             "lower --seq-len or build more data with `python data/prepare.py`")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def starts(self, step: int, batch_size: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len - 1, size=batch_size)

    def _windows(self, starts) -> tuple[torch.Tensor, torch.Tensor]:
        w = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        w = torch.from_numpy(w)
        return w[:, :-1], w[:, 1:]  # inputs (B, T), targets (B, T)

    def batch(self, step: int, batch_size: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences [lo, hi) of the global batch of `step`."""
        return self._windows(self.starts(step, batch_size)[lo:hi])

    def n_targets(self, step: int, batch_size: int) -> int:
        return batch_size * self.seq_len

    def eval_batches(self, n_seqs: int, batch_size: int):
        """Fixed, evenly spaced windows over the whole shard (the same every evaluation)."""
        starts = np.linspace(0, len(self.tokens) - self.seq_len - 1, num=n_seqs).astype(np.int64)
        for i in range(0, n_seqs, batch_size):
            yield self._windows(starts[i : i + batch_size])


def chat_example(ids: list[int], mask: list[int], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Rendered chat → (inputs, targets) of at most seq_len tokens: targets are the ids shifted by one,
    kept only where the assistant mask of the predicted token is 1, else -1 (ignored by the loss)."""
    ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
    x = np.asarray(ids[:-1], dtype=np.int64)
    y = np.where(np.asarray(mask[1:], dtype=bool), np.asarray(ids[1:], dtype=np.int64), -1)
    return x, y


class ChatBatches:
    """SFT batches of rendered conversations, padded to the longest in the micro-batch (pad targets -1).
    Order: epoch e is np.random.default_rng([seed, e]).permutation(N); step s takes the next
    batch_size examples of that endless stream, so the order is a pure function of (seed, step).
    Within a step the examples are sorted by length before the micro-batches are cut: the step's
    gradient is the same sum, but short conversations (a code one-liner) no longer pad up to a long
    one (a worked solution), which halves the padded tokens at micro_batch_size < batch_size."""

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], seed: int, pad_id: int):
        examples = [(x, y) for x, y in examples if (y >= 0).any()]
        if not examples:
            raise TrainError("no SFT example has an assistant token within --seq-len; raise --seq-len")
        self.examples, self.seed, self.pad_id = examples, seed, pad_id
        self.n_valid = np.array([int((y >= 0).sum()) for _, y in examples])
        self._epoch = (-1, None)

    def _perm(self, epoch: int) -> np.ndarray:
        if self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)))
        return self._epoch[1]

    def indices(self, step: int, batch_size: int) -> np.ndarray:
        n, first = len(self.examples), step * batch_size
        return np.array([self._perm(k // n)[k % n] for k in range(first, first + batch_size)])

    def _collate(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(len(self.examples[i][0]) for i in idx)
        x = np.full((len(idx), T), self.pad_id, dtype=np.int64)
        y = np.full((len(idx), T), -1, dtype=np.int64)
        for r, i in enumerate(idx):
            xi, yi = self.examples[i]
            x[r, : len(xi)], y[r, : len(yi)] = xi, yi
        return torch.from_numpy(x), torch.from_numpy(y)

    def batch(self, step: int, batch_size: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(step, batch_size)
        idx = idx[np.argsort([len(self.examples[i][0]) for i in idx], kind="stable")]
        return self._collate(idx[lo:hi])

    def n_targets(self, step: int, batch_size: int) -> int:
        return int(self.n_valid[self.indices(step, batch_size)].sum())

    def eval_batches(self, n_seqs: int, batch_size: int):
        n = min(n_seqs, len(self.examples))
        for i in range(0, n, batch_size):
            yield self._collate(list(range(i, min(n, i + batch_size))))


# ---------------------------------------------------------------------------------------------- RNG + state
def rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA generator states, as plain tensors/lists (torch.load weights_only)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _python_state(x):
    """Tuples → lists recursively, so random.getstate() survives the weights_only unpickler as a list."""
    return [_python_state(v) for v in x] if isinstance(x, tuple | list) else x


def save_checkpoint(path: str | Path, model, trainer_state: dict, tokenizer_file: str | Path | None = None,
                    config: dict | None = None) -> Path:
    """Write the one checkpoint format atomically: config.json + model.safetensors (checkpoint.save_hf),
    tokenizer.json (copied), trainer_state.pt (optimizer, step, RNG, data position) and train_config.json.
    A crash mid-write leaves the previous checkpoint under `path` intact (checkpoint.atomic_dir)."""
    extra = {"trainer_state.pt": lambda p: torch.save(trainer_state, p)}
    if tokenizer_file is not None and Path(tokenizer_file).exists():
        extra["tokenizer.json"] = lambda p: shutil.copyfile(tokenizer_file, p)
    if config is not None:
        extra["train_config.json"] = lambda p: Path(p).write_text(json.dumps(config, indent=2, default=str))
    return save_hf(model, path, extra_files=extra)


def trainer_state(step: int, optimizers: dict, data: dict, config: dict, **extra) -> dict:
    """The trainer_state.pt payload: everything beyond the weights that an exact resume needs."""
    rng = rng_state()
    rng["python"] = _python_state(rng["python"])
    return {"step": step, "optimizers": {k: o.state_dict() for k, o in optimizers.items()}, "rng": rng,
            "data": data, "train_config": config, **extra}


def load_trainer_state(path: str | Path) -> dict:
    """trainer_state.pt of a checkpoint directory; a missing or corrupt file is a CheckpointError naming it."""
    f = resolve_dir(path) / "trainer_state.pt"
    if not f.exists():
        raise CheckpointError(f"{f} not found: {path} holds weights only, so it cannot be resumed; "
                              "start a new run from it with --init-from")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated zips and bad pickles
        raise CheckpointError(f"{f} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                              "resume from an earlier checkpoint or restart without --resume") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{f} is not a nanoGLM5 trainer state (no 'step'); restart without --resume")
    p = state["rng"]["python"]
    state["rng"]["python"] = (p[0], tuple(p[1]), p[2])
    return state


def config_diff(saved: dict, now: dict, ignore: set[str] = frozenset()) -> list[str]:
    """['name: saved → now', …] for the keys whose values differ."""
    out = []
    for k in sorted(set(saved) | set(now)):
        if k in ignore:
            continue
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: {a!r} (checkpoint) vs {b!r} (now)")
    return out


def asdict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# ---------------------------------------------------------------------------------------------- measurements
def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """H = -Σ p(v) ln p(v) in nats over the shard's token frequencies: the loss of the best model that
    ignores context, the baseline a language model must beat."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def bytes_per_token(tokens: np.ndarray, tokenizer, n: int = 100_000) -> float:
    """UTF-8 bytes per token on (a prefix of) a shard: converts nats/token to bits per byte."""
    ids = np.asarray(tokens[:n])
    return len(tokenizer.decode(ids.tolist()).encode("utf-8")) / max(1, len(ids))


@torch.no_grad()
def greedy_generate(model, prompt: list[int], max_new_tokens: int, stop_ids=(), sparse: bool = True) -> list[int]:
    """Greedy decoding by recomputing the full forward each step (simple, O(T²) per token; engine.py
    has the KV-cached version). Returns the new tokens only."""
    was_training = model.training
    model.eval()
    ids, new = list(prompt), []
    device = next(model.parameters()).device
    max_len = model.config.max_position_embeddings
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-max_len:]], device=device)
        nxt = int(model(x, sparse=sparse, last_logits_only=True).logits[0, -1].argmax())
        ids.append(nxt)
        new.append(nxt)
        if nxt in stop_ids:
            break
    model.train(was_training)
    return new


# ---------------------------------------------------------------------------------------------- CLI flags
def base_type(t):
    """int for `int | None`, and the type behind a string annotation."""
    if isinstance(t, types.UnionType):
        t = next(a for a in t.__args__ if a is not type(None))
    return {"int": int, "float": float, "str": str, "bool": bool}.get(t, t) if isinstance(t, str) else t


def config_field(default, help: str):
    """A config dataclass field with its --help text, which add_config_flags reads (dict defaults get a factory)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def add_config_flags(p: argparse.ArgumentParser, cls, skip=(), stage_defaults: dict | None = None) -> None:
    """One --kebab-case flag per field of the config dataclass `cls` (CLI flag = field name), its help from
    the field's metadata; bools get --x / --no-x; `resume` takes an optional path (bare --resume = 'auto')."""
    for f in fields(cls):
        if f.name in skip:
            continue
        flag, t = "--" + f.name.replace("_", "-"), base_type(f.type)
        default = f.default if f.default is not MISSING else None
        per_stage = {s: d[f.name] for s, d in (stage_defaults or {}).items() if f.name in d}
        help_ = f.metadata.get("help", "") + (f" (default: {per_stage})" if per_stage else f" (default: {default!r})")
        if f.name == "resume":
            p.add_argument(flag, nargs="?", const="auto", default="", help=help_)
        elif t is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            p.add_argument(flag, type=t, default=default, help=help_)
