"""GLM-5's pre-training filters at toy scale (GLM-5 arXiv 2602.15763, pre-training data pipelines):
  - exact dedup: hash of the normalised text (NFKC, casefold, collapsed whitespace), first copy kept;
  - near-dup dedup: MinHash over word 5-gram shingles + LSH banding (Broder 1997; Leskovec et al.,
    *Mining of Massive Datasets* §3.4), each candidate verified against kept documents only (no chaining);
  - knowledge quality: a linear classifier on hashed word uni/bigrams + 12 Gopher-style signals
    (Rae et al. 2021, App. A), trained in torch on reference prose vs generated junk, scoring every doc;
  - code language ID: the same model shape, softmax over languages, on code tokens and line starts;
  - math judge: the same model shape on n-grams + verifier signals (how many "a op b = c" steps check
    out, whether the final answer follows), trained on good vs corrupted worked solutions; keeps the
    best fraction of math documents. Simplified: GLM uses LLM judges here; ours is a linear scorer.
Each filter runs through `datasets` (map/filter with num_proc) and returns a report dict: in, kept,
dropped, reasons, by-source counts, examples and documents/s. Metrics on held-out labels are at the end.
Read top to bottom: features → linear model → classifiers → dedup → filters over datasets → metrics.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import unicodedata
import warnings
import zlib
from collections import Counter
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

N_BUCKETS = 1 << 18  # hashed feature space; collisions at this size cost < 1% accuracy here

# ---------------------------------------------------------------------------------------------------
# Features: hashed n-grams (crc32 is stable across processes, unlike hash()) and dense signals.

_WORD = re.compile(r"[^\W\d_]+|\d+|[^\w\s]")
_CODE = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\d+|[^\sA-Za-z_0-9]")
STOPWORDS = frozenset("the of and to a in is that for it as with be on by this are an or not from at which "
                      "can if you will have has its was but all when their than may also".split())


def _crc(tokens: list[str]) -> np.ndarray:
    return np.fromiter((zlib.crc32(t.encode("utf-8", "replace")) for t in tokens), np.uint64, len(tokens))


def hashed_ngrams(tokens: list[str], n_buckets: int = N_BUCKETS, max_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Bucket ids and L2-normalised log counts of the 1..max_n-grams of tokens."""
    h = _crc(tokens)
    grams = [h]
    for n in range(2, max_n + 1):
        if len(h) >= n:  # combine hashes of consecutive tokens: (h_i * P + h_{i+1}) ..., wraps mod 2^64
            g = h[: len(h) - n + 1].copy()
            for k in range(1, n):
                g = g * np.uint64(1_000_003) + h[k: len(h) - n + 1 + k] + np.uint64(n)
            grams.append(g)
    allg = np.concatenate(grams) % np.uint64(n_buckets) if grams else np.zeros(0, np.uint64)
    idx, cnt = np.unique(allg.astype(np.int64), return_counts=True)
    val = np.log1p(cnt).astype(np.float32)
    return idx, val / max(float(np.linalg.norm(val)), 1e-6)


QUALITY_SIGNALS = ("log_words", "mean_word_len", "frac_lines_punct", "frac_dup_lines", "type_token",
                   "frac_stopwords", "frac_alpha_words", "frac_digits", "frac_symbols", "frac_upper",
                   "top_bigram_frac", "frac_long_words")


_DIGIT, _SYMBOL, _UPPER = re.compile(r"\d"), re.compile(r"[^\w\s]"), re.compile(r"[A-Z]")


def quality_signals(text: str) -> np.ndarray:
    """Gopher-style heuristics: cheap numbers that separate prose from spam on unseen topics too."""
    words = text.split()
    nw, nc = max(len(words), 1), max(len(text), 1)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    nl = max(len(lines), 1)
    lower = [w.lower().strip(".,;:!?()\"'") for w in words]
    bigrams = Counter(zip(lower, lower[1:]))
    top_bi = bigrams.most_common(1)[0][1] * 2 / nw if bigrams else 0.0
    return np.array([
        math.log1p(len(words)),
        sum(map(len, words)) / nw,
        sum(ln[-1] in ".!?:;" for ln in lines) / nl,
        1 - len(set(lines)) / nl,
        len(set(lower)) / nw,
        sum(w in STOPWORDS for w in lower) / nw,
        sum(map(str.isalpha, lower)) / nw,
        len(_DIGIT.findall(text)) / nc,
        len(_SYMBOL.findall(text)) / nc,
        len(_UPPER.findall(text)) / nc,
        top_bi,
        sum(len(w) > 15 for w in words) / nw,
    ], dtype=np.float32)


def quality_features(text: str):
    return (*hashed_ngrams([t.lower() for t in _WORD.findall(text)]), quality_signals(text))


def code_tokens(text: str) -> list[str]:
    """Lower-cased code tokens, plus a marker for each line's first token (`#include` vs `# comment`)
    and its indentation kind (Fortran's fixed columns, Python's 4 spaces)."""
    out = []
    for line in text.splitlines()[:400]:
        toks = _CODE.findall(line.lower())
        if toks:
            indent = len(line) - len(line.lstrip(" "))
            out += [f"^{toks[0]}", f"^i{min(indent, 8)}", *toks]
    return out


def lang_features(text: str):
    return (*hashed_ngrams(code_tokens(text)), np.zeros(0, np.float32))


_EQ = re.compile(r"(-?\d+(?:/\d+)?)\s*([-+*/])\s*\(?(-?\d+(?:/\d+)?)\)?\s*=\s*(-?\d+(?:/\d+)?)")
MATH_SIGNALS = ("log_steps", "frac_steps_correct", "n_steps_wrong", "has_answer", "answer_follows", "log_chars")


def _frac(s: str) -> Fraction:
    p, _, q = s.partition("/")
    return Fraction(int(p), int(q) if q else 1)


def math_signals(text: str) -> np.ndarray:
    """Verifier signals: each `a op b = c` step is recomputed; does the final answer equal the last result?"""
    ok, bad, last = 0, 0, None
    for a, op, b, c in _EQ.findall(text):
        try:
            x, y, z = _frac(a), _frac(b), _frac(c)
            v = x + y if op == "+" else x - y if op == "-" else x * y if op == "*" else x / y
        except (ZeroDivisionError, ValueError):
            bad += 1
            continue
        ok, bad, last = ok + (v == z), bad + (v != z), z
    m = re.search(r"answer:\s*(-?\d+(?:/\d+)?)\s*$", text.strip(), re.I)
    follows = float(m is not None and last is not None and _frac(m.group(1)) == last)
    n = ok + bad
    return np.array([math.log1p(n), ok / n if n else 0.0, bad, float(m is not None), follows,
                     math.log1p(len(text))], dtype=np.float32)


def math_features(text: str):
    return (*hashed_ngrams([t.lower() for t in _WORD.findall(text)]), math_signals(text))


# ---------------------------------------------------------------------------------------------------
# One model shape for all three classifiers.

class LinearScorer:
    """Multinomial logistic regression: logits = X·W + standardise(dense)·A + b, X the sparse (N, buckets)
    n-gram weights. fit() in torch with the gradient written out (Xᵀ(p - y) through a CSR matmul: autograd
    through sparse ops is ~20x slower on CPU), full-batch Adam, class-balanced; predict_proba() in numpy
    so that datasets' worker processes never touch torch."""

    def __init__(self, featurize, classes: list, n_buckets: int = N_BUCKETS):
        self.featurize, self.classes, self.n_buckets = featurize, list(classes), n_buckets

    def fit(self, texts: list[str], labels: list, steps: int = 100, lr: float = 0.1, l2: float = 1e-5):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # ops on ~100K numbers: thread wake-ups cost more than they save
        try:
            return self._fit(texts, labels, steps, lr, l2)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, texts, labels, steps, lr, l2):
        if len(set(labels)) < 2:
            raise ValueError(f"need training examples of at least two classes, got {sorted(set(labels))}")
        feats = [self.featurize(t) for t in texts]
        rows = np.concatenate([np.full(len(f[0]), i) for i, f in enumerate(feats)])
        used, cols = np.unique(np.concatenate([f[0] for f in feats]), return_inverse=True)  # only buckets that occur
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta", "invariant checks disabled"
            X = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols.ravel()])),  # (N, n_used)
                                        torch.from_numpy(np.concatenate([f[1] for f in feats])), (len(feats), len(used)))
            X, XT = X.coalesce().to_sparse_csr(), X.t().coalesce().to_sparse_csr()
        dense = np.stack([f[2] if len(f[2]) else np.zeros(1, np.float32) for f in feats])
        self.mu, self.sd = dense.mean(0), dense.std(0) + 1e-6
        D = torch.from_numpy((dense - self.mu) / self.sd)  # (N, n_dense)
        y = torch.tensor([self.classes.index(c) for c in labels])
        Y = F.one_hot(y, len(self.classes)).float()  # (N, C)
        w = (len(y) / (len(self.classes) * torch.bincount(y, minlength=len(self.classes)).clamp(min=1)))[y]
        w = (w / w.sum())[:, None].float()  # class-balanced weights of the mean loss, (N, 1)
        W = torch.zeros(len(used), len(self.classes))  # zero init: training needs no seed
        A, b = torch.zeros(D.shape[1], len(self.classes)), torch.zeros(len(self.classes))
        params = [torch.nn.Parameter(t) for t in (W, A, b)]
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            W, A, b = (p.data for p in params)
            logp = torch.log_softmax(X @ W + D @ A + b, -1)
            G = (logp.exp() - Y) * w  # d loss / d logits, loss = Σ w_i · CE_i
            for p, g in zip(params, (XT @ G + 2 * l2 * W, D.T @ G, G.sum(0))):
                p.grad = g
            opt.step()
        self.train_loss = float(-(logp * Y * w).sum())
        self.W = np.zeros((self.n_buckets, len(self.classes)), np.float32)  # (n_buckets, C)
        self.W[used] = params[0].data.numpy()
        self.A, self.b = params[1].data.numpy().copy(), params[2].data.numpy().copy()
        return self

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(self.classes)), np.float32)
        for i, t in enumerate(texts):
            idx, val, dense = self.featurize(t)
            dense = dense if len(dense) else np.zeros(1, np.float32)
            logits = val @ self.W[idx] + ((dense - self.mu) / self.sd) @ self.A + self.b
            e = np.exp(logits - logits.max())
            out[i] = e / e.sum()
        return out


class QualityClassifier(LinearScorer):
    """P(reference-quality prose). Trained on labels 1 (reference) / 0 (low quality)."""

    def __init__(self):
        super().__init__(quality_features, [0, 1])

    def score(self, texts: list[str]) -> np.ndarray:
        return self.predict_proba(texts)[:, 1]


class LanguageClassifier(LinearScorer):
    """Which programming language a code document is in; `predict` → (language, confidence).
    Trained on whole documents and on their 12-line windows, so that snippets are recognised too."""

    def __init__(self, langs):
        super().__init__(lang_features, sorted(langs))

    def fit(self, texts, labels, **kw):
        xs, ys = list(texts), list(labels)
        for t, y in zip(texts, labels):
            lines = t.splitlines()
            for i in range(0, len(lines) - 6, 12):  # windows of 12 lines, the last one at least 6
                xs.append("\n".join(lines[i:i + 12]))
                ys.append(y)
        return super().fit(xs, ys, **kw)

    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        p = self.predict_proba(texts)
        return [self.classes[i] for i in p.argmax(1)], p.max(1)


class MathJudge(LinearScorer):
    """P(correct, complete worked solution). Trained on labels 1 (good) / 0 (corrupted)."""

    def __init__(self):
        super().__init__(math_features, [0, 1])

    def score(self, texts: list[str]) -> np.ndarray:
        return self.predict_proba(texts)[:, 1]


# ---------------------------------------------------------------------------------------------------
# Dedup: exact (normalised hash) and near (MinHash + LSH).

def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_key(text: str) -> str:
    return hashlib.blake2b(normalize(text).encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def shingles(text: str, n: int = 5) -> np.ndarray:
    """Hashes of the word n-grams of the normalised text (a shorter text is one shingle)."""
    h = _crc(re.findall(r"\w+", text.casefold()))
    if len(h) < n:
        return np.array([int(h.sum()) if len(h) else 0], np.uint64)
    g = h[: len(h) - n + 1].copy()
    for k in range(1, n):
        g = g * np.uint64(1_000_003) + h[k: len(h) - n + 1 + k]
    return np.unique(g)


class MinHashLSH:
    """Signatures by multiply-shift hashing: h_i(x) = (a_i·x + b_i mod 2^64) >> 32, min over shingles;
    the probability that two signatures agree in one slot is the Jaccard similarity of the shingle sets.
    LSH: b bands of r rows; a pair becomes a candidate with probability 1 - (1 - J^r)^b."""

    def __init__(self, threshold: float = 0.7, num_perm: int = 128, ngram: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        self.a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
        self.b_ = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.bands, self.rows = optimal_bands(threshold, num_perm)

    def signature(self, text: str) -> np.ndarray:
        x = shingles(text, self.ngram)
        with np.errstate(over="ignore"):
            h = (self.a[:, None] * x[None, :] + self.b_[:, None]) >> np.uint64(32)  # (num_perm, n_shingles)
        return h.min(1).astype(np.uint32)

    def band_keys(self, sig: np.ndarray) -> list[bytes]:
        return [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]

    def dedup(self, sigs: np.ndarray) -> list[tuple[int, float] | None]:
        """For each doc in order: None if kept, else (index of the earlier kept doc it duplicates, est. J).
        Only kept docs enter the buckets, so A≈B≈C chains cannot drop C for resembling a dropped B."""
        buckets = [dict() for _ in range(self.bands)]
        out = []
        for i, sig in enumerate(sigs):
            keys = self.band_keys(sig)
            cands = sorted({j for band, k in zip(buckets, keys) for j in band.get(k, ())})
            best = max(((float((sigs[j] == sig).mean()), -j) for j in cands), default=(0.0, 0))
            if best[0] >= self.threshold:
                out.append((-best[1], best[0]))
                continue
            out.append(None)
            for band, k in zip(buckets, keys):
                band.setdefault(k, []).append(i)
        return out


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.2, fn_weight: float = 0.8) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false-positive + false-negative areas of the S-curve (as
    datasketch does, which weighs them 0.5/0.5). We weigh misses 4x: every candidate is verified on its
    signature afterwards, so a false candidate costs a comparison while a miss costs a duplicate."""
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz
    best, xs = None, np.linspace(0, 1, 201)
    for b in range(1, num_perm + 1):
        r = num_perm // b
        p = 1 - (1 - xs**r) ** b
        fp = trapezoid(np.where(xs < threshold, p, 0), xs)
        fn = trapezoid(np.where(xs >= threshold, 1 - p, 0), xs)
        cost = fp_weight * fp + fn_weight * fn
        if best is None or cost < best[0]:
            best = (cost, b, r)
    return best[1], best[2]


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = set(shingles(a, n).tolist()), set(shingles(b, n).tolist())
    return len(sa & sb) / max(len(sa | sb), 1)


# ---------------------------------------------------------------------------------------------------
# Filters over a datasets.Dataset. Each returns (kept dataset, report, extra): extra is the scored
# input (every row, with the new column) for classifiers, {dropped id: kept id it duplicates} for dedup.
# Inside, `drop` is a list of (row index, reason, detail) that the report summarises.

def _report(name: str, ds, drop: list[tuple[int, str, str]], seconds: float, extra: dict | None = None) -> dict:
    sources = ds["source"]
    by_source: dict[str, list[int]] = {}
    for s in sources:
        by_source.setdefault(s, [0, 0])[0] += 1
    examples: dict[str, list[dict]] = {}
    for i, reason, detail in drop:
        by_source[sources[i]][0] -= 1
        by_source[sources[i]][1] += 1
        if len(examples.setdefault(reason, [])) < 5:
            examples[reason].append({"id": ds[i]["id"], "detail": detail, "text": ds[i]["text"][:240]})
    return {"filter": name, "in": len(ds), "kept": len(ds) - len(drop), "dropped": len(drop),
            "reasons": dict(Counter(r for _, r, _ in drop)), "by_source": {k: {"kept": v[0], "dropped": v[1]}
            for k, v in sorted(by_source.items())}, "examples": examples,
            "docs_per_s": round(len(ds) / max(seconds, 1e-9), 1), **(extra or {})}


def _keep(ds, drop, num_proc, what: str = "filter"):
    dropped = {i for i, _, _ in drop}
    return ds.filter(lambda _, i: i not in dropped, with_indices=True, num_proc=_np(ds, num_proc),
                     desc=f"{what}: dropping {len(dropped)} docs")


def _np(ds, num_proc: int) -> int | None:
    """Worker processes only pay off past a few thousand rows."""
    return num_proc if num_proc and num_proc > 1 and len(ds) >= 2000 else None


def exact_dedup(ds, num_proc: int = 1):
    t = time.perf_counter()
    ds = ds.map(lambda b: {"exact_key": [exact_key(x) for x in b["text"]]}, batched=True, num_proc=_np(ds, num_proc),
                desc="exact dedup: hashing")
    first, drop = {}, []
    for i, (k, id_) in enumerate(zip(ds["exact_key"], ds["id"])):
        if k in first:
            drop.append((i, "exact_duplicate", first[k]))
        else:
            first[k] = id_
    report = _report("exact_dedup", ds, drop, time.perf_counter() - t)
    pairs = {ds[i]["id"]: rep for i, _, rep in drop}
    return _keep(ds, drop, num_proc, "exact dedup"), report, pairs


def near_dedup(ds, lsh: MinHashLSH, num_proc: int = 1):
    t = time.perf_counter()
    ds = ds.map(lambda b: {"minhash": [lsh.signature(x) for x in b["text"]]}, batched=True,
                num_proc=_np(ds, num_proc), desc="near dedup: MinHash")
    sigs = np.asarray(ds.with_format("numpy")["minhash"], dtype=np.uint32).reshape(len(ds), lsh.num_perm)
    ids = ds["id"]
    matches = [(i, m) for i, m in enumerate(lsh.dedup(sigs)) if m]
    drop = [(i, "near_duplicate", f"{ids[j]} (J≈{est:.2f})") for i, (j, est) in matches]
    report = _report("near_dedup", ds, drop, time.perf_counter() - t,
                     {"bands": lsh.bands, "rows": lsh.rows, "threshold": lsh.threshold})
    pairs = {ids[i]: ids[j] for i, (j, _) in matches}
    return _keep(ds.remove_columns("minhash"), drop, num_proc, "near dedup"), report, pairs


def score_column(ds, name: str, fn, num_proc: int = 1, desc: str = ""):
    """Add column `name` = fn(list of texts) → list, through datasets.map (batched, num_proc)."""
    return ds.map(lambda b: {name: list(fn(b["text"]))}, batched=True, batch_size=256,
                  num_proc=_np(ds, num_proc), desc=desc or name)


def quality_filter(ds, clf: QualityClassifier, threshold: float = 0.5, num_proc: int = 1):
    """Scores every document; drops prose ("text" domain) below threshold. Code and math have their own filters."""
    t = time.perf_counter()
    ds = score_column(ds, "quality_score", clf.score, num_proc, "quality: scoring")
    drop = [(i, "low_quality", f"score {s:.3f}") for i, (s, d) in enumerate(zip(ds["quality_score"], ds["domain"]))
            if d == "text" and s < threshold]
    report = _report("quality", ds, drop, time.perf_counter() - t, {"threshold": threshold})
    return _keep(ds, drop, num_proc, "quality"), report, ds


def language_filter(ds, clf: LanguageClassifier, min_conf: float = 0.5, num_proc: int = 1):
    """Labels code with its language (routing and counts; "" for other domains); drops code that no
    language claims with min_conf."""
    t = time.perf_counter()

    def predict(batch):
        rows = [i for i, d in enumerate(batch["domain"]) if d == "code"]
        langs, conf = clf.predict([batch["text"][i] for i in rows])
        out = {"pred_lang": [""] * len(batch["text"]), "lang_conf": [0.0] * len(batch["text"])}
        for i, lang, c in zip(rows, langs, conf):
            out["pred_lang"][i], out["lang_conf"][i] = lang, float(c)
        return out
    ds = ds.map(predict, batched=True, batch_size=256, num_proc=_np(ds, num_proc), desc="language ID")
    drop = [(i, "unknown_language", f"conf {c:.2f}") for i, (c, d) in enumerate(zip(ds["lang_conf"], ds["domain"]))
            if d == "code" and c < min_conf]
    mix = Counter(lang for lang, d in zip(ds["pred_lang"], ds["domain"]) if d == "code")
    report = _report("language", ds, drop, time.perf_counter() - t,
                     {"min_conf": min_conf, "language_mix": dict(sorted(mix.items()))})
    return _keep(ds, drop, num_proc, "language ID"), report, ds


def math_filter(ds, judge: MathJudge, keep_frac: float = 0.75, num_proc: int = 1):
    """Scores math documents (others get 0) and keeps the best keep_frac of them (ties broken by order)."""
    t = time.perf_counter()
    def score(batch):
        rows = [i for i, d in enumerate(batch["domain"]) if d == "math"]
        out = [0.0] * len(batch["text"])
        for i, x in zip(rows, judge.score([batch["text"][i] for i in rows])):
            out[i] = float(x)
        return {"judge_score": out}
    ds = ds.map(score, batched=True, batch_size=256, num_proc=_np(ds, num_proc), desc="math judge: scoring")
    math_rows = [i for i, d in enumerate(ds["domain"]) if d == "math"]
    scores = ds["judge_score"]
    ranked = sorted(math_rows, key=lambda i: (-scores[i], i))
    cut = ranked[int(math.ceil(keep_frac * len(ranked))):]
    drop = sorted((i, "below_top_fraction", f"score {scores[i]:.3f}") for i in cut)
    report = _report("math_judge", ds, drop, time.perf_counter() - t, {"keep_frac": keep_frac})
    return _keep(ds, drop, num_proc, "math judge"), report, ds


# ---------------------------------------------------------------------------------------------------
# Held-out metrics.

def binary_metrics(y_true, score, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1 of the positive class (1) and ROC AUC."""
    y, s = np.asarray(y_true, int), np.asarray(score, float)
    pred = s >= threshold
    tp, fp, fn = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum()), int((~pred & (y == 1)).sum())
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    pos, neg = s[y == 1], s[y == 0]
    auc = float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()) \
        if len(pos) and len(neg) else float("nan")
    return {"n": len(y), "accuracy": round(float((pred == (y == 1)).mean()), 4), "precision": round(prec, 4),
            "recall": round(rec, 4), "f1": round(2 * prec * rec / max(prec + rec, 1e-9), 4), "auc": round(auc, 4)}


def language_metrics(true, pred) -> dict:
    labels = sorted(set(true) | set(pred))
    confusion = {t: {p: 0 for p in labels} for t in labels}
    for t, p in zip(true, pred):
        confusion[t][p] += 1
    acc = sum(t == p for t, p in zip(true, pred)) / max(len(true), 1)
    return {"n": len(true), "accuracy": round(acc, 4), "confusion": confusion}


def dedup_metrics(ds_in, drops: dict[str, str], threshold: float) -> dict:
    """Against planted duplicates. drops: id of each dropped doc → id of the kept doc it duplicates.
    recall: planted copies whose pair (copy, original) was merged. precision: dropped docs that are a
    planted copy/original of their match, or a natural duplicate (exact Jaccard ≥ threshold, checked here)."""
    text = dict(zip(ds_in["id"], ds_in["text"]))
    dup_of = {i: o for i, o in zip(ds_in["id"], ds_in["dup_of"]) if o}
    root = lambda x: dup_of.get(x, x)
    planted = [i for i in dup_of if dup_of[i] in text]
    found = sum(1 for i in planted if drops.get(i) and root(drops[i]) == root(i)
                or drops.get(dup_of[i]) and root(drops[dup_of[i]]) == root(i))
    tp_planted = tp_natural = 0
    false = []
    for d, rep in drops.items():
        if root(d) == root(rep):
            tp_planted += 1
        elif jaccard(text[d], text[rep]) >= threshold or normalize(text[d]) == normalize(text[rep]):
            tp_natural += 1
        else:
            false.append((d, rep))
    n = len(drops)
    return {"planted": len(planted), "planted_found": found, "recall": round(found / max(len(planted), 1), 4),
            "dropped": n, "true_planted": tp_planted, "true_natural": tp_natural, "false": len(false),
            "precision": round((tp_planted + tp_natural) / max(n, 1), 4), "false_examples": false[:5]}
