"""Build the pre-training data in one command, offline: corpus → filters → mixture → tokenizer →
token shards → stats.json + report.md (GLM-5 arXiv 2602.15763: the knowledge / code / math pre-training
data pipelines, at toy scale; the pieces live in nanoglm5/data/).

    python data/prepare.py                          # embedded default corpus into data/
    python data/prepare.py --out-dir /tmp/d --budget-mb 1 --max-docs 300   # a small, fast build
    python data/prepare.py --source embedded --source jsonl:my_docs.jsonl   # add local documents
    python data/prepare.py --source hf:HuggingFaceFW/fineweb-edu:sample-10BT --max-docs 20000  # needs network

Writes under --out-dir: mixture.parquet (kept documents with scores), knowledge.jsonl (clean prose
paragraphs for the SFT stage's Q&A), tokenizer.json, tokens/{train,val}.bin (+ meta.json; documents
each followed by <|endoftext|>), stats.json, report.md and its PNGs, timings.json (wall times: the only
output that differs between two runs with the same seed). Classifiers are trained on the labelled
embedded sources (train split) and measured on the held-out split; with only external sources, a small
embedded reference set is built for training and not mixed in.
"""

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from nanoglm5.data import corpus, filters, shards
from nanoglm5.data.tasks import math_problems
from nanoglm5.data.tokenizer import Tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="data", help="where every output goes (default: data/)")
    p.add_argument("--seed", type=int, default=0, help="one seed for sampling, generation, splits and planting")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary incl. special tokens (tiny preset: 4096)")
    p.add_argument("--budget-mb", type=float, default=10.0, help="characters (millions) drawn from the embedded sources")
    p.add_argument("--max-docs", type=int, default=None, help="cap on documents per source (for quick runs)")
    p.add_argument("--num-proc", type=int, default=min(2, os.cpu_count() or 1), help="datasets map/filter workers")
    p.add_argument("--source", action="append", default=None,
                   help="embedded | embedded:NAME[,NAME] | jsonl:PATH | text:PATH | hf:NAME[:CONFIG]; repeatable")
    p.add_argument("--val-frac", type=float, default=0.1, help="held-out share (by file/topic group)")
    p.add_argument("--dup-frac", type=float, default=0.05, help="share of documents given a planted duplicate")
    p.add_argument("--max-doc-chars", type=int, default=100_000, help="longer external documents are skipped")
    p.add_argument("--quality-threshold", type=float, default=0.5, help="keep prose with P(reference) ≥ this")
    p.add_argument("--near-dup-threshold", type=float, default=0.7, help="Jaccard of 5-gram shingles")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--lang-min-conf", type=float, default=0.5, help="drop code no language claims this surely")
    p.add_argument("--math-keep", type=float, default=0.75, help="share of math documents the judge keeps")
    return p.parse_args(argv)


class Timer:
    def __init__(self):
        self.t0, self.times = time.perf_counter(), {}

    def __call__(self, name):
        now = time.perf_counter()
        self.times[name] = round(now - self.t0 - sum(self.times.values()), 2)
        print(f"[prepare] {name}: {self.times[name]:.1f}s")


# ---------------------------------------------------------------------------------------------------

def load_sources(args, rejects, cache_dir):
    """Documents of every --source, and whether the embedded corpus is part of them."""
    docs, have_embedded = [], False
    budget = int(args.budget_mb * 1e6)
    for src in args.source or ["embedded"]:
        kind, _, arg = src.partition(":")
        if kind == "embedded":
            names = arg.split(",") if arg else list(corpus.SOURCES)
            unknown = [n for n in names if n not in corpus.SOURCES]
            if unknown:
                sys.exit(f"unknown embedded source(s) {unknown}; choose from {list(corpus.SOURCES)}")
            print(f"[prepare] embedded corpus: {len(names)} sources, budget {args.budget_mb} M chars")
            docs += corpus.embedded_corpus(budget, args.seed, rejects, names, args.max_docs, args.dup_frac,
                                           args.val_frac)
            have_embedded = True
        elif kind in ("jsonl", "text") or (not arg and Path(src).suffix in (".jsonl", ".txt")):
            path = arg if kind in ("jsonl", "text") else src
            try:
                got = list(tqdm(corpus.take(corpus.read_jsonl(path, rejects, max_chars=args.max_doc_chars,
                                seed=args.seed, val_frac=args.val_frac), args.max_docs), desc=f"reading {path}"))
            except FileNotFoundError as e:
                rejects.add("missing_source", f"{src}: {e}")
                print(f"[prepare] source {src}: missing ({e}); continuing with the rest")
                continue
            docs += got
        elif kind == "hf":
            try:
                docs += list(tqdm(corpus.read_hf(arg, rejects, max_docs=args.max_docs, cache_dir=cache_dir,
                                                 seed=args.seed, val_frac=args.val_frac), desc=f"reading {src}"))
            except ConnectionError as e:
                sys.exit(f"error: {e}")
        else:
            sys.exit(f"unknown --source {src!r}; use embedded, embedded:NAME, jsonl:PATH, text:PATH or hf:NAME")
    return docs, have_embedded


def labelled(ds, domain, label_col, split):
    sub = ds.filter(lambda d: d["domain"] == domain and d["split"] == split and d[label_col] not in (-1, ""),
                    desc=f"{label_col}: {domain}/{split} examples")
    return sub["text"], sub[label_col]


def train_filters(ds_ref, args):
    """Fit the three classifiers on the train split of labelled documents, measure on the val split."""
    metrics = {}
    x, y = labelled(ds_ref, "text", "quality", "train")
    qclf = filters.QualityClassifier().fit(x, y)
    x, y = labelled(ds_ref, "text", "quality", "val")
    metrics["quality"] = filters.binary_metrics(y, qclf.score(x), args.quality_threshold) if x else {}
    x, y = labelled(ds_ref, "code", "lang", "train")
    lclf = filters.LanguageClassifier(sorted(set(y))).fit(x, y)
    x, y = labelled(ds_ref, "code", "lang", "val")
    metrics["language"] = filters.language_metrics(y, lclf.predict(x)[0]) if x else {}
    snippets = ["\n".join(t.strip("\n").splitlines()[:5]) for t in x]  # robustness: 5-line snippets
    metrics["language"]["snippet_accuracy"] = filters.language_metrics(y, lclf.predict(snippets)[0])["accuracy"] if x else None
    x, y = labelled(ds_ref, "math", "quality", "train")
    judge = filters.MathJudge().fit(x, y)
    x, y = labelled(ds_ref, "math", "quality", "val")
    metrics["math_judge"] = filters.binary_metrics(y, judge.score(x)) if x else {}
    return qclf, lclf, judge, metrics


def unseen_metrics(qclf, lclf, judge, args):
    """Scores on hand-written documents in data/fixtures that no source generates (topics, styles, snippets)."""
    out = {}
    q, c = FIXTURES / "unseen_quality.jsonl", FIXTURES / "unseen_code.jsonl"
    if q.exists():
        rows = [json.loads(ln) for ln in q.read_text().splitlines() if ln.strip()]
        out["quality"] = filters.binary_metrics([r["quality"] for r in rows], qclf.score([r["text"] for r in rows]),
                                                args.quality_threshold)
    if c.exists():
        rows = [json.loads(ln) for ln in c.read_text().splitlines() if ln.strip()]
        out["language"] = filters.language_metrics([r["lang"] for r in rows], lclf.predict([r["text"] for r in rows])[0])
    probs = math_problems(200, args.seed + 12345)
    r = random.Random(args.seed)
    texts = [f"Problem: {p['question']}\nSolution:\n{p['solution']}" for p in probs[:100]] + \
            [f"Problem: {p['question']}\nSolution:\n{corpus.corrupt_solution(p, r)}" for p in probs[100:]]
    out["math_judge_fresh_problems"] = filters.binary_metrics([1] * 100 + [0] * 100, judge.score(texts))
    return out


# ---------------------------------------------------------------------------------------------------
# Report

def plots(out, reports, scored, mixture_stats):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    meta = {"Software": None}
    figs = {}

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [r["filter"] for r in reports]
    ax.bar(names, [r["kept"] for r in reports], label="kept")
    ax.bar(names, [r["dropped"] for r in reports], bottom=[r["kept"] for r in reports], label="dropped")
    ax.set_ylabel("documents")
    ax.set_title("each filter: documents kept and dropped")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "filters.png", dpi=90, metadata=meta)
    figs["filters"] = "filters.png"

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    bins = np.linspace(0, 1, 26)
    for (col, dom, title), ax in zip([("quality_score", "text", "knowledge quality (prose)"),
                                      ("judge_score", "math", "math judge")], axes):
        for label, name in [(1, "reference / good"), (0, "junk / corrupted"), (-1, "unlabelled")]:
            rows = scored["math" if dom == "math" else "quality"]
            s = [r[col] for r in rows if r["domain"] == dom and r["quality"] == label]
            if s:
                ax.hist(s, bins=bins, alpha=0.6, label=f"{name} ({len(s)})")
        ax.set_title(title)
        ax.set_xlabel("score")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=90, metadata=meta)
    figs["scores"] = "scores.png"

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    mix = mixture_stats["code_languages"]
    axes[0].bar(list(mix), list(mix.values()))
    axes[0].set_title("code by predicted language (documents)")
    dom = mixture_stats["tokens_by_domain"]
    axes[1].bar(list(dom), list(dom.values()))
    axes[1].set_title("training tokens by domain")
    fig.tight_layout()
    fig.savefig(out / "mixture.png", dpi=90, metadata=meta)
    figs["mixture"] = "mixture.png"
    plt.close("all")
    return figs


def report_md(stats) -> str:
    m, lines = stats["metrics"], ["# Data report", "", f"Seed {stats['seed']}; {stats['n_docs_in']} documents in, "
                                  f"{stats['mixture']['docs']} in the mixture; {stats['tokens']['n_train_tokens']:,} "
                                  f"training and {stats['tokens']['n_val_tokens']:,} validation tokens "
                                  f"(vocab {stats['tokens']['vocab_size']}).", ""]
    rej = stats["rejected"]
    lines += [f"Skipped at input: {rej['total']} " + (f"({', '.join(f'{k}: {v}' for k, v in rej['counts'].items())})"
                                                       if rej["total"] else "(none)"), "",
              "## Filters", "", "| filter | in | kept | dropped | why |", "|---|---|---|---|---|"]
    for r in stats["filters"]:
        why = ", ".join(f"{k}: {v}" for k, v in r["reasons"].items()) or "—"
        lines.append(f"| {r['filter']} | {r['in']} | {r['kept']} | {r['dropped']} | {why} |")
    d, q, lang, j = m["dedup"], m["quality"], m["language"], m["math_judge"]
    lines += ["", "![filters](filters.png)", "", "## Held-out quality of each filter", "",
              "| filter | measured on | result |", "|---|---|---|",
              f"| dedup (exact + MinHash-LSH) | {d['planted']} planted copies | recall {d['recall']:.3f}, precision "
              f"{d['precision']:.3f} ({d['true_planted']} planted + {d['true_natural']} natural duplicates, {d['false']} false) |",
              f"| knowledge quality | {q.get('n', 0)} held-out prose docs | accuracy {q.get('accuracy', 0):.3f}, precision "
              f"{q.get('precision', 0):.3f}, recall {q.get('recall', 0):.3f}, AUC {q.get('auc', 0):.3f} |",
              f"| code language ID | {lang.get('n', 0)} held-out files' chunks | accuracy {lang.get('accuracy', 0):.3f}; "
              f"5-line snippets {lang.get('snippet_accuracy') or 0:.3f} |",
              f"| math judge | {j.get('n', 0)} held-out solutions | accuracy {j.get('accuracy', 0):.3f}, AUC {j.get('auc', 0):.3f} |"]
    for name, u in stats.get("unseen", {}).items():
        lines.append(f"| {name} (unseen fixtures) | {u['n']} docs | accuracy {u['accuracy']:.3f} |")
    lines += ["", "![scores](scores.png)", "", "## Mixture", "", "| domain | documents | chars | train tokens |",
              "|---|---|---|---|"]
    mix = stats["mixture"]
    for dom in sorted(mix["by_domain"]):
        b = mix["by_domain"][dom]
        lines.append(f"| {dom} | {b['docs']} | {b['chars']:,} | {mix['tokens_by_domain'].get(dom, 0):,} |")
    lines += ["", "Code by predicted language: " + ", ".join(f"{k} {v}" for k, v in mix["code_languages"].items()),
              "", "![mixture](mixture.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / ".hf_cache"  # datasets writes here, never to ~/.cache
    os.environ.setdefault("HF_DATASETS_CACHE", str(cache))
    timer = Timer()
    import datasets

    datasets.disable_caching()  # every run recomputes: outputs depend on the seed only, not on stale caches

    rejects = corpus.Rejects()
    docs, have_embedded = load_sources(args, rejects, str(cache))
    if not docs:
        sys.exit("error: no documents from any --source (see the messages above); "
                 "the offline default is `python data/prepare.py`")
    if rejects.counts:
        print(f"[prepare] skipped at input: {rejects.summary()['counts']}")
    ds = datasets.Dataset.from_list(docs)
    src_stats = {s: {"docs": 0, "chars": 0} for s in sorted(set(ds["source"]))}
    for s, t in zip(ds["source"], ds["text"]):
        src_stats[s]["docs"] += 1
        src_stats[s]["chars"] += len(t)
    timer("corpus")

    ds1, r_exact, pairs = filters.exact_dedup(ds, args.num_proc)
    lsh = filters.MinHashLSH(args.near_dup_threshold, args.num_perm, seed=args.seed)
    ds2, r_near, near_pairs = filters.near_dedup(ds1, lsh, args.num_proc)
    dedup = filters.dedup_metrics(ds, {**pairs, **near_pairs}, args.near_dup_threshold)
    timer("dedup")

    ref = ds2 if have_embedded else datasets.Dataset.from_list(
        corpus.embedded_corpus(3_000_000, args.seed, corpus.Rejects(), dup_frac=0.0, val_frac=args.val_frac))
    qclf, lclf, judge, metrics = train_filters(ref, args)
    metrics["dedup"] = dedup
    timer("train filters")

    ds3, r_quality, q_scored = filters.quality_filter(ds2, qclf, args.quality_threshold, args.num_proc)
    ds4, r_lang, _ = filters.language_filter(ds3, lclf, args.lang_min_conf, args.num_proc)
    mixture, r_math, m_scored = filters.math_filter(ds4, judge, args.math_keep, args.num_proc)
    reports = [r_exact, r_near, r_quality, r_lang, r_math]
    timer("filters")

    scored_rows = {"quality": q_scored.select_columns(["domain", "quality", "quality_score"]).to_list(),
                   "math": m_scored.select_columns(["domain", "quality", "judge_score"]).to_list()}
    keep_cols = ["id", "text", "source", "domain", "pred_lang", "split", "quality_score", "lang_conf", "judge_score"]
    mixture = mixture.select_columns(keep_cols).rename_column("pred_lang", "lang")
    mixture.to_parquet(str(out / "mixture.parquet"))
    knowledge = mixture.filter(lambda d: d["domain"] == "text" and not d["source"].startswith("junk"),
                                desc="knowledge: world-knowledge docs")
    with open(out / "knowledge.jsonl", "w") as f:
        for row in knowledge.select_columns(["id", "text", "source", "quality_score"]).to_list():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    timer("mixture")

    train_texts = mixture.filter(lambda d: d["split"] == "train", desc="tokenizer: train split")["text"]
    tok = Tokenizer.train(train_texts, args.vocab_size)
    tok.save(out / "tokenizer.json")
    timer("tokenizer")
    meta, tokens_by_split_domain = shards.write_shards(mixture, tok, out, args.seed)
    timer("shards")

    by_domain = {}
    for dom, t in zip(mixture["domain"], mixture["text"]):
        b = by_domain.setdefault(dom, {"docs": 0, "chars": 0})
        b["docs"] += 1
        b["chars"] += len(t)
    mix_stats = {"docs": len(mixture), "by_domain": by_domain,
                 "by_source": dict(sorted(Counter(mixture["source"]).items())),
                 "code_languages": dict(sorted(Counter(lang for lang, d in zip(mixture["lang"], mixture["domain"])
                                                       if d == "code").items())),
                 "tokens_by_domain": {k.split("/")[1]: v for k, v in tokens_by_split_domain.items()
                                      if k.startswith("train/")}}
    stats = {"seed": args.seed, "args": {k: v for k, v in vars(args).items() if k not in ("out_dir", "num_proc")},
             "n_docs_in": len(ds), "sources": src_stats, "rejected": rejects.summary(),
             "filters": [{k: v for k, v in r.items() if k != "docs_per_s"} for r in reports],
             "metrics": metrics, "unseen": unseen_metrics(qclf, lclf, judge, args),
             "mixture": mix_stats, "tokens": meta, "tokens_by_split_domain": tokens_by_split_domain,
             "tokenizer": {"vocab_size": tok.vocab_size, "special": tok.special,
                           "chars_per_token": round(sum(b["chars"] for b in by_domain.values())
                                                    / max(meta["n_train_tokens"] + meta["n_val_tokens"], 1), 3)}}
    plots(out, reports, scored_rows, mix_stats)
    (out / "report.md").write_text(report_md(stats))  # no wall times here: they live in timings.json
    (out / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False))
    timer("stats + report")
    timer.times["total"] = round(time.perf_counter() - timer.t0, 2)
    timer.times["docs_per_s"] = {r["filter"]: r["docs_per_s"] for r in reports}
    (out / "timings.json").write_text(json.dumps(timer.times, indent=1))
    print(f"[prepare] done in {timer.times['total']:.0f}s: {len(mixture)} documents, {meta['n_train_tokens']:,} train / "
          f"{meta['n_val_tokens']:,} val tokens, vocab {tok.vocab_size} → {out}/ (see report.md)")
    return stats


if __name__ == "__main__":
    main()
