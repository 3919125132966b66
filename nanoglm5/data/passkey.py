"""Passkey documents (Mohtashami & Jaggi, arXiv 2305.16300): corpus filler with a random 5-digit key hidden at a
chosen depth and asked for at the end. Built here once for both uses: the long-context stage's synthetic share of
training documents (training/batches.py) and the retrieval evaluation (nanoglm5/retrieval.py).

What training sees and what the evaluation asks are kept apart on every axis but the template:
  keys    the 90,000 five-digit keys split in two halves by a multiplicative hash (`key_split`): training draws
          only "train" keys, the evaluation only "eval" keys, so no evaluated key was ever a training answer,
          while both halves use every digit and so every digit token;
  filler  training takes it from the train shard, the evaluation from the val shard;
  depths  the evaluation puts the needle at EVAL_DEPTHS; training draws depths uniformly from [0, 1] outside
          ±DEPTH_MARGIN of each of them.
Nothing but the needle tells the key: keys are uniform within their half (no frequent answer), the filler comes
from a random offset and holds no copy of the key (`passkey_document` redraws the offset if it does), and the
needle's position moves with the depth, so neither position nor frequency solves the task.
"""

from dataclasses import dataclass

import numpy as np

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"
EVAL_DEPTHS = (0.1, 0.25, 0.5, 0.75, 0.9)
DEPTH_MARGIN = 0.025
KEY_RANGE = (10_000, 100_000)


def key_split(key: int) -> str:
    """'train' or 'eval': Knuth's multiplicative hash of the key, top bit (a fixed, even split of the keys)."""
    return "eval" if ((key * 2654435761) & 0xFFFFFFFF) >> 31 else "train"


def draw_key(rng: np.random.Generator, split: str) -> str:
    """A key drawn uniformly from its half of KEY_RANGE."""
    if split not in ("train", "eval"):
        raise ValueError(f"split {split!r}: use 'train' or 'eval'")
    while True:
        key = int(rng.integers(*KEY_RANGE))
        if key_split(key) == split:
            return str(key)


def draw_train_depth(rng: np.random.Generator) -> float:
    """A needle depth in [0, 1], uniformly, never within DEPTH_MARGIN of an evaluation depth."""
    while True:
        d = float(rng.random())
        if all(abs(d - e) >= DEPTH_MARGIN for e in EVAL_DEPTHS):
            return d


@dataclass
class PasskeyDoc:
    ids: list[int]  # filler + needle + filler + question + answer, `length` tokens
    answer_at: int  # position of the answer's first token
    n_answer: int
    key_pos: list[int]  # positions of the key's first occurrence inside the needle


def passkey_document(tok, filler: np.ndarray, length: int, depth: float, key: str,
                     rng: np.random.Generator) -> PasskeyDoc:
    """A `length`-token document: the needle at `depth` of filler taken from a random offset of `filler` (a token
    stream with no copy of the key in the chosen span), then the question and the key as the answer."""
    pre_needle = tok.encode(NEEDLE.split("{key}")[0])
    needle = tok.encode(NEEDLE.format(key=key))
    tail, answer = tok.encode(QUESTION), tok.encode(" " + key)
    room = length - len(needle) - len(tail) - len(answer)
    if room < 8 or len(filler) < room + 1:
        raise ValueError(f"length {length}: too short for the needle and question, or the filler has only "
                         f"{len(filler)} tokens; use a longer length or more data")
    for _ in range(100):
        start = int(rng.integers(0, len(filler) - room))
        hay = [int(t) for t in filler[start : start + room]]
        if key not in tok.decode(hay):
            break
    else:
        raise ValueError(f"the filler holds the key {key} everywhere: use other filler text")
    cut = int(round(depth * room))
    ids = hay[:cut] + needle + hay[cut:] + tail + answer
    # the key's tokens inside the needle (BPE may merge them with the space before): the first occurrence of
    # either encoding; if neither is found intact, the whole needle counts
    key_pos = list(range(cut, cut + len(needle)))
    for key_ids in (tok.encode(" " + key), tok.encode(key)):
        at = _find(needle, key_ids, len(pre_needle) - 1)
        if at >= 0:
            key_pos = [cut + at + i for i in range(len(key_ids))]
            break
    return PasskeyDoc(ids, len(ids) - len(answer), len(answer), key_pos)


def _find(seq: list[int], sub: list[int], start: int) -> int:
    for i in range(max(start, 0), len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1
