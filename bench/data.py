"""Data filters: documents/s of each filter, and our MinHash-LSH against the `datasketch` library on the
same documents (recall and precision against planted duplicates, speed ratio). Writes the "data" section
of docs/benchmarks.md.

    python -m bench.data [--budget-mb 2]

Both dedups use word 5-gram shingles, 128 permutations, threshold 0.7 and the same greedy rule (drop a
document if a *kept* earlier one is a candidate with estimated Jaccard ≥ threshold), so the difference
is the hashing (numpy multiply-shift vs datasketch's per-shingle SHA-1 + universal hashing) and the band
choice (we weigh misses 4x; datasketch 1:1). One process, no datasets workers.
"""

import argparse
import re
import time

import numpy as np

from bench.report import machine, write_section
from nanoglm5.data import corpus, filters


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def ours(texts, threshold, num_perm):
    lsh = filters.MinHashLSH(threshold, num_perm)
    sigs = np.stack([lsh.signature(t) for t in texts])
    return lsh.dedup(sigs), f"{lsh.bands}x{lsh.rows}"


def datasketch_dedup(texts, threshold, num_perm):
    from datasketch import MinHash, MinHashLSH
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    out, kept = [], {}
    for i, t in enumerate(texts):
        w = re.findall(r"\w+", t.casefold())
        sh = {" ".join(w[k:k + 5]).encode() for k in range(max(len(w) - 4, 1))}
        m = MinHash(num_perm=num_perm)
        m.update_batch(list(sh))
        best = max(((kept[j].jaccard(m), -j) for j in lsh.query(m)), default=(0.0, 0))
        if best[0] >= threshold:
            out.append((-best[1], best[0]))
        else:
            out.append(None)
            kept[i] = m
            lsh.insert(i, m)
    return out, f"{lsh.b}x{lsh.r}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-mb", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    docs = corpus.embedded_corpus(int(args.budget_mb * 1e6), args.seed, corpus.Rejects(), dup_frac=0.1)
    texts = [d["text"] for d in docs]
    print(f"{len(docs)} documents, {sum(map(len, texts)) / 1e6:.2f} M chars")

    # --- documents/s of each filter's per-document work (train split fits the classifiers) ---
    train = [d for d in docs if d["split"] == "train"]
    qclf = filters.QualityClassifier().fit(*zip(*[(d["text"], d["quality"]) for d in train
                                                  if d["domain"] == "text" and d["quality"] >= 0]))
    lclf = filters.LanguageClassifier(corpus.CODE_LANGS).fit(*zip(*[(d["text"], d["lang"]) for d in train
                                                                    if d["domain"] == "code"]))
    judge = filters.MathJudge().fit(*zip(*[(d["text"], d["quality"]) for d in train if d["domain"] == "math"]))
    lsh = filters.MinHashLSH()
    by = {dom: [d["text"] for d in docs if d["domain"] == dom] for dom in ("text", "code", "math")}
    rows = []
    for name, fn, xs in [("exact dedup (normalise + hash)", lambda xs: [filters.exact_key(x) for x in xs], texts),
                         ("MinHash signature (128 perms)", lambda xs: [lsh.signature(x) for x in xs], texts),
                         ("knowledge quality score", qclf.score, texts),
                         ("code language ID", lambda xs: lclf.predict(xs), by["code"]),
                         ("math judge score", judge.score, by["math"])]:
        _, s = timed(lambda fn=fn, xs=xs: fn(xs))
        rows.append(f"| {name} | {len(xs)} | {sum(map(len, xs)) / len(xs):.0f} | {len(xs) / s:,.0f} |")

    # --- MinHash-LSH: ours vs datasketch on the prose + code documents ---
    sub = [d for d in docs if d["domain"] in ("text", "code")]
    sub_texts = [d["text"] for d in sub]
    ds_in = {"id": [d["id"] for d in sub], "text": sub_texts, "dup_of": [d["dup_of"] for d in sub]}
    res = {}
    for name, fn in [("ours (numpy)", ours), ("datasketch", datasketch_dedup)]:
        (matches, bands), s = timed(lambda fn=fn: fn(sub_texts, 0.7, 128))
        pairs = {sub[i]["id"]: sub[m[0]]["id"] for i, m in enumerate(matches) if m}
        res[name] = (filters.dedup_metrics(ds_in, pairs, 0.7), s, bands)
        print(name, res[name][0], f"{s:.1f}s")
    (mo, so, _), (md, sd, _) = res["ours (numpy)"], res["datasketch"]

    table = "\n".join([
        "## Data filters (`python -m bench.data`)", "", f"Machine: {machine()}.", "",
        f"Embedded corpus, budget {args.budget_mb} M chars, seed {args.seed}: {len(docs)} documents. "
        "Documents/s of each filter's per-document work in one process (prepare.py adds datasets workers):", "",
        "| filter | documents | mean chars | documents/s |", "|---|---|---|---|", *rows, "",
        f"Near-dup dedup on the {len(sub)} prose + code documents ({mo['planted']} planted copies), "
        "threshold 0.7, 128 permutations, word 5-gram shingles:", "",
        "| implementation | bands x rows | recall (planted) | precision | dropped (planted + natural + false) | seconds | documents/s |",
        "|---|---|---|---|---|---|---|",
        *[f"| {n} | {b} | {m['recall']:.3f} | {m['precision']:.3f} | {m['dropped']} ({m['true_planted']} + "
          f"{m['true_natural']} + {m['false']}) | {s:.2f} | {len(sub) / s:,.0f} |" for n, (m, s, b) in res.items()],
        "", f"Speed: ours is **{sd / so:.1f}x** datasketch's throughput on the same documents "
        f"(recall {mo['recall']:.3f} vs {md['recall']:.3f}, precision {mo['precision']:.3f} vs {md['precision']:.3f}).",
    ])
    print(table)
    write_section("data", table)


if __name__ == "__main__":
    main()
