"""Training data as a pure function of (seed, step), so a resumed run sees exactly the batches the
uninterrupted run would have seen, on any number of ranks.

  `TokenBatches`  pretraining: random windows of the token shards;
  `ChatBatches`   SFT: rendered conversations (`chat_example`), epoch-wise permutations, loss on
                  assistant tokens only;
  `MixedBatches`  SFT with pretraining text mixed in: a fixed share of each step's sequences are windows
                  of the token shards (loss on every token), the rest conversations;
  `PasskeyMix`    long-context mid-training: windows of the token shards with a share of synthetic passkey
                  documents (data/passkey.py), loss on every token of both.
"""

from pathlib import Path

import numpy as np
import torch

from nanoglm5.data.passkey import draw_key, draw_train_depth, passkey_document
from nanoglm5.data.shards import load_tokens
from nanoglm5.training.train_config import TrainError


def load_shards(data_dir: str | Path, split: str) -> np.ndarray:
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


def pad_rows(rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) rows of any lengths → (B, T) tensors, right-padded (inputs pad_id, targets -1)."""
    T = max(len(x) for x, _ in rows)
    x = np.full((len(rows), T), pad_id, dtype=np.int64)
    y = np.full((len(rows), T), -1, dtype=np.int64)
    for r, (xi, yi) in enumerate(rows):
        x[r, : len(xi)], y[r, : len(yi)] = xi, yi
    return torch.from_numpy(x), torch.from_numpy(y)


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
        return pad_rows([self.examples[i] for i in idx], self.pad_id)

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


class MixedBatches:
    """SFT batches with pretraining text mixed in, as production SFT recipes replay pretraining data so that
    post-training keeps what pretraining learned. Of a step's batch_size sequences, n_text =
    round(frac · batch_size) are windows of the token shards (`TokenBatches.starts(step, n_text)`, loss on
    all their tokens) and the rest conversations (`ChatBatches` positions step·n_chat …): both parts are pure
    functions of (seed, step), so the mix resumes exactly. The step's rows are sorted by length before the
    micro-batches are cut (the windows, the longest rows, share the last ones). Validation: the chat part."""

    def __init__(self, chat: ChatBatches, text: TokenBatches, frac: float):
        if not 0.0 <= frac < 1.0:
            raise TrainError(f"--sft-pretrain-mix {frac}: must be in [0, 1)")
        self.chat, self.text, self.frac = chat, text, frac
        self.examples = chat.examples

    def split(self, batch_size: int) -> tuple[int, int]:
        """(conversations, text windows) in a batch of batch_size."""
        n_text = min(batch_size - 1, int(round(self.frac * batch_size)))
        return batch_size - n_text, n_text

    def rows(self, step: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
        n_chat, n_text = self.split(batch_size)
        rows = [self.chat.examples[i] for i in self.chat.indices(step, n_chat)]
        if n_text:
            L = self.text.seq_len
            for s in self.text.starts(step, n_text):
                w = np.asarray(self.text.tokens[s : s + L + 1], dtype=np.int64)
                rows.append((w[:-1], w[1:]))
        return sorted(rows, key=lambda r: len(r[0]))  # stable: equal lengths keep their order

    def batch(self, step: int, batch_size: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_rows(self.rows(step, batch_size)[lo:hi], self.chat.pad_id)

    def n_targets(self, step: int, batch_size: int) -> int:
        n_chat, n_text = self.split(batch_size)
        return self.chat.n_targets(step, n_chat) + n_text * self.text.seq_len

    def eval_batches(self, n_seqs: int, batch_size: int):
        return self.chat.eval_batches(n_seqs, batch_size)


class PasskeyMix:
    """Long-context batches: of a step's batch_size sequences, n_key = round(frac · batch_size) are synthetic
    passkey documents of exactly seq_len + 1 tokens (train-shard filler, a "train" key at a training depth:
    data/passkey.py keeps keys, filler and depths apart from the evaluation's), the rest windows of the token
    shards (`TokenBatches.starts(step, n_text)`), all packed as they come, without document masks, loss on every
    token. Long-context mid-training mixes long documents with synthetic long-range tasks so that the model
    learns to use the far context at all (a corpus window rarely needs more than a few hundred tokens back).
    Documents of step s come from np.random.default_rng([seed, s, 1]): a pure function of (seed, step).
    The passkey documents are the batch's last rows. Validation: the text windows."""

    def __init__(self, text: TokenBatches, tok, frac: float):
        if not 0.0 <= frac <= 1.0:
            raise TrainError(f"--passkey-mix {frac}: must be in [0, 1]")
        if tok is None:
            raise TrainError(f"--passkey-mix {frac} writes passkey documents, which needs a tokenizer.json in "
                             "--checkpoint or --data-dir; add one or pass --passkey-mix 0")
        self.text, self.tok, self.frac = text, tok, frac
        self.seq_len, self.seed = text.seq_len, text.seed

    def split(self, batch_size: int) -> tuple[int, int]:
        """(text windows, passkey documents) in a batch of batch_size."""
        n_key = int(round(self.frac * batch_size))
        return batch_size - n_key, n_key

    def documents(self, step: int, n: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, step, 1])
        docs = []
        for _ in range(n):
            key = draw_key(rng, "train")
            d = passkey_document(self.tok, self.text.tokens, self.seq_len + 1, draw_train_depth(rng), key, rng)
            docs.append(np.asarray(d.ids, dtype=np.int64))
        return docs

    def batch(self, step: int, batch_size: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_text, n_key = self.split(batch_size)
        rows = [np.asarray(self.text.tokens[s : s + self.seq_len + 1], dtype=np.int64)
                for s in self.text.starts(step, n_text)[lo:hi]]
        if hi > n_text:
            rows += self.documents(step, n_key)[max(lo - n_text, 0) : hi - n_text]
        w = torch.from_numpy(np.stack(rows))
        return w[:, :-1], w[:, 1:]

    def n_targets(self, step: int, batch_size: int) -> int:
        return batch_size * self.seq_len

    def eval_batches(self, n_seqs: int, batch_size: int):
        return self.text.eval_batches(n_seqs, batch_size)
