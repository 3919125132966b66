"""Token shards: the flat token arrays that data/prepare.py writes and pre-training reads.

Layout under DATA_DIR/tokens: train.bin and val.bin hold the token ids of every document of the split,
each document followed by <|endoftext|>, as one flat array (uint16 while the vocabulary fits, else
uint32); meta.json records the dtype, vocabulary, token counts, seed and eos id.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

ENCODE_BATCH = 512  # documents per tokenizer call (the Rust encoder runs a batch on all cores)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def write_shards(ds, tok, out: Path, seed: int) -> tuple[dict, dict]:
    """Encode each split of `ds` (a datasets.Dataset with text, domain and split columns) into
    out/tokens/{train,val}.bin + meta.json. Returns (meta, tokens per "split/domain")."""
    dtype = token_dtype(tok.vocab_size)
    (out / "tokens").mkdir(parents=True, exist_ok=True)
    counts, per_domain = {}, Counter()
    for split in ("train", "val"):
        sub = ds.filter(lambda d, split=split: d["split"] == split, desc=f"shards: selecting {split}")
        arr, texts, domains = [], sub["text"], sub["domain"]
        for i in tqdm(range(0, len(texts), ENCODE_BATCH), desc=f"encoding {split}"):
            batch = slice(i, i + ENCODE_BATCH)
            for ids, dom in zip(tok.encode_batch(texts[batch]), domains[batch]):
                arr.append(np.asarray(ids + [tok.eos_id], dtype=dtype))
                per_domain[(split, dom)] += len(ids) + 1
        flat = np.concatenate(arr) if arr else np.zeros(0, dtype)
        flat.tofile(out / "tokens" / f"{split}.bin")
        counts[split] = int(flat.size)
    meta = {"dtype": dtype.name, "vocab_size": tok.vocab_size, "n_train_tokens": counts["train"],
            "n_val_tokens": counts["val"], "seed": seed, "eos_id": tok.eos_id, "tokenizer": "tokenizer.json",
            "layout": "flat token ids; each document followed by <|endoftext|>"}
    (out / "tokens" / "meta.json").write_text(json.dumps(meta, indent=1))
    tokens_by_domain = {f"{s}/{d}": n for (s, d), n in sorted(per_domain.items())}
    return meta, tokens_by_domain


def load_tokens(data_dir: str | Path, split: str) -> np.memmap:
    """The flat token array of `split` ("train" or "val") written by data/prepare.py under data_dir/tokens."""
    data_dir = Path(data_dir)
    meta_path, bin_path = data_dir / "tokens" / "meta.json", data_dir / "tokens" / f"{split}.bin"
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not meta_path.exists() or not bin_path.exists():
        raise FileNotFoundError(f"no token shards at {bin_path}; build them with "
                                f"`python data/prepare.py --out-dir {data_dir}`")
    meta = json.loads(meta_path.read_text())
    return np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r")
