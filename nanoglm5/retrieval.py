"""Passkey retrieval: an evaluation that needs the whole context (Mohtashami & Jaggi, arXiv 2305.16300).

A random 5-digit pass key is hidden at a chosen depth of corpus text; at the end the model is asked for it.
Nothing but the needle tells the key: the digits are drawn uniformly (no frequent answer to guess), the filler is
held-out corpus text from a random offset (nothing to memorise), and the needle's position varies with the depth,
so neither position nor frequency solves it. A task counts as retrieved when the model's greedy next token is the
key's, at every token of the answer (teacher forcing on the key's own tokens: equal to greedy decoding reproducing
the key, in one forward pass).

DSA (arXiv 2602.15763 §2.1) sees the needle only if the lightning indexer selects it: `indexer_recall` is the share
of (sparse layer, answer query) pairs whose top-k holds at least one of the needle's key tokens. The same model run
dense, every key visible, separates what the indexer loses from what the model never learned.

    python -m nanoglm5.retrieval --checkpoint out/long_context/ckpt --data-dir data --lengths 512 1024 2048
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoglm5.checkpoint import CheckpointError, load_hf
from nanoglm5.data.passkey import EVAL_DEPTHS, draw_key, passkey_document
from nanoglm5.data.shards import load_tokens
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.model import GLM5


@dataclass
class Example:
    ids: list[int]  # filler + needle + filler + question + answer
    answer_at: int  # position of the answer's first token
    n_answer: int
    key_pos: list[int]  # positions of the key's tokens inside the needle
    length: int
    depth: float
    key: str


def make_examples(tok: Tokenizer, filler: np.ndarray, lengths: list[int], depths: list[float], n: int,
                  seed: int = 0) -> list[Example]:
    """n examples per (length, depth): the needle at `depth` of `length` tokens of filler taken from a random
    offset of `filler` (a held-out token stream), the key from the evaluation's half (data/passkey.py)."""
    rng = np.random.default_rng(seed)
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(n):
                key = draw_key(rng, "eval")
                d = passkey_document(tok, filler, length, depth, key, rng)
                out.append(Example(d.ids, d.answer_at, d.n_answer, d.key_pos, length, depth, key))
    return out


class _SelectRecorder:
    """Records each DSA layer's top-k selection (Attention.select) during one forward pass; `picked` holds one
    (B, T, k) tensor per layer that selected (the chunked path selects per block of queries, in order)."""

    def __init__(self, model: GLM5):
        self.atts = [m for m in model.modules() if hasattr(m, "select") and hasattr(m, "indexer")]
        self.calls: dict[int, list[torch.Tensor]] = {}

    def __enter__(self):
        for j, att in enumerate(self.atts):
            att.select = lambda *a, _orig=att.select, _j=j, **k: self._keep(_j, _orig(*a, **k))
        return self

    def _keep(self, j: int, topk):
        self.calls.setdefault(j, []).append(topk)
        return topk

    @property
    def picked(self) -> list[torch.Tensor]:
        return [torch.cat(c, dim=1) for c in self.calls.values()]

    def __exit__(self, *exc):
        for att in self.atts:
            del att.select  # back to the class's method


@torch.no_grad()
def score(model: GLM5, ex: Example, sparse: bool) -> dict:
    """Whether the greedy answer is the key, and (sparse) the indexer's recall of the needle."""
    ids = torch.tensor([ex.ids])
    with _SelectRecorder(model) as rec:
        logits = model(ids[:, :-1], sparse=sparse).logits[0]
    q = list(range(ex.answer_at - 1, ex.answer_at - 1 + ex.n_answer))  # the queries that predict the answer
    right = logits[q].argmax(-1) == ids[0, ex.answer_at : ex.answer_at + ex.n_answer]
    hits = [bool(torch.isin(torch.tensor(ex.key_pos), t[0, i]).any()) for t in rec.picked for i in q]
    return {"retrieved": bool(right.all()), "answer_tokens": float(right.float().mean()),
            "recall": float(np.mean(hits)) if hits else float("nan")}


@torch.no_grad()
def selections(model: GLM5, ids: list[int]) -> list[torch.Tensor]:
    """The key positions each DSA layer's indexer selects for every query of one sequence (sparse forward):
    one (T, index_topk) tensor per layer that selected (none when T <= index_topk: every key is seen)."""
    model.eval()
    with _SelectRecorder(model) as rec:
        model(torch.tensor([ids]), sparse=True)
    return [t[0] for t in rec.picked]


def evaluate(model: GLM5, examples: list[Example]) -> dict:
    """Retrieval accuracy by (length, depth), DSA sparse and dense, the share of answer tokens right (a graded
    view of the same: 0.2 = one digit of five), and the indexer's recall."""
    model.eval()
    rows = {}
    for ex in examples:
        key = (ex.length, ex.depth)
        r = rows.setdefault(key, {"length": ex.length, "depth": ex.depth, "sparse": [], "dense": [], "recall": [],
                                  "sparse_tok": [], "dense_tok": []})
        s, d = score(model, ex, sparse=True), score(model, ex, sparse=False)
        r["sparse"].append(s["retrieved"]), r["dense"].append(d["retrieved"]), r["recall"].append(s["recall"])
        r["sparse_tok"].append(s["answer_tokens"]), r["dense_tok"].append(d["answer_tokens"])
    return {"cells": [{"length": r["length"], "depth": r["depth"], "n": len(r["sparse"]),
                       "sparse": float(np.mean(r["sparse"])), "dense": float(np.mean(r["dense"])),
                       "sparse_answer_tokens": float(np.mean(r["sparse_tok"])),
                       "dense_answer_tokens": float(np.mean(r["dense_tok"])),
                       "indexer_recall": float(np.nanmean(r["recall"])) if not np.isnan(r["recall"]).all() else None}
                      for r in rows.values()]}


def format_table(res: dict) -> str:
    lines = ["| length | depth | n | retrieved, DSA sparse | retrieved, dense | indexer recall of the needle |",
             "|---|---|---|---|---|---|"]
    for c in res["cells"]:
        rec = "n/a (every key selected)" if c["indexer_recall"] is None else f"{c['indexer_recall']:.2f}"
        lines.append(f"| {c['length']} | {c['depth']:.2f} | {c['n']} | {c['sparse']:.2f} | {c['dense']:.2f} | {rec} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory train.py wrote")
    p.add_argument("--data-dir", default="data", help="output of `python data/prepare.py` (its val shard is the filler)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--depths", type=float, nargs="+", default=list(EVAL_DEPTHS))
    p.add_argument("--n", type=int, default=8, help="examples per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    if not Path(a.checkpoint).exists():
        print(f"error: {a.checkpoint} does not exist: pass a checkpoint directory train.py wrote", file=sys.stderr)
        return 1
    try:
        model = load_hf(a.checkpoint)
        tok = Tokenizer.load(Path(a.checkpoint) / "tokenizer.json")
        filler = load_tokens(a.data_dir, "val")
    except (CheckpointError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    fits = [n for n in a.lengths if n <= model.config.max_position_embeddings]
    for n in sorted(set(a.lengths) - set(fits)):
        print(f"length {n}: beyond the model's max_position_embeddings={model.config.max_position_embeddings}; "
              "skipped (extend the context first: python train.py --stage long_context)")
    try:
        res = evaluate(model, make_examples(tok, filler, fits, a.depths, a.n, a.seed))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(res))
    if a.out:
        a.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
