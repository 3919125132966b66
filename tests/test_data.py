"""The data room (nanoglm5/data: corpus, tasks, filters, shards) and data/prepare.py: known answers on small fixtures, bad input, determinism, end to end."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nanoglm5.data import corpus, filters, shards, tasks
from nanoglm5.data.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "data" / "fixtures"


def _prepare():
    spec = importlib.util.spec_from_file_location("prepare", ROOT / "data" / "prepare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _jsonl(name):
    return [json.loads(ln) for ln in (FIX / name).read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def docs():
    return corpus.embedded_corpus(1_500_000, 0, corpus.Rejects(), dup_frac=0.1)


@pytest.fixture(scope="module")
def dataset(docs, tmp_path_factory):
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf")))
    from datasets import Dataset
    return Dataset.from_list(docs)


# --- math --------------------------------------------------------------------------------------

def test_math_problems_verifiable_and_deterministic():
    probs = tasks.math_problems(200, seed=3)
    assert probs == tasks.math_problems(200, seed=3) and probs != tasks.math_problems(200, seed=4)
    assert {p["kind"] for p in probs} == set(tasks.MATH_KINDS)
    for p in probs:
        assert set(p) == {"question", "answer", "solution", "kind"}
        assert p["solution"].endswith(f"Answer: {p['answer']}")
        assert tasks.check_math_answer(p["solution"], p["answer"])
        assert filters.math_signals(p["solution"])[1] == 1.0  # every worked step recomputes exactly


@pytest.mark.parametrize("text,answer,ok", [
    ("so the answer is 42.", "42", True), ("Answer: -3/4", "-3/4", True), ("x = 0.75", "3/4", True),
    ("#### 1,000", "1000", True), ("\\boxed{12} and then 13", "12", True), ("5 apples, then 7", "5", False),
    ("no number here", "1", False), ("Answer: 6/8", "3/4", True), ("answer: 2", "-2", False), ("", "0", False)])
def test_check_math_answer(text, answer, ok):
    assert tasks.check_math_answer(text, answer) is ok


def test_data_room_never_imports_rl():
    """SFT data and RL share the tasks in data/tasks.py; the data room itself stays below the RL room."""
    code = ("import sys, nanoglm5.data.sft, nanoglm5.data.shards, nanoglm5.data.filters; "
            "print(sorted(m for m in sys.modules if m.startswith('nanoglm5.rl')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# --- corpus and bad input ----------------------------------------------------------------------

def test_embedded_corpus_sources_labels_determinism(docs):
    assert all(set(d) == set(corpus.DOC_KEYS) for d in docs)
    assert len({d["id"] for d in docs}) == len(docs)
    assert {d["domain"] for d in docs} == {"text", "code", "math"}
    langs = {d["lang"] for d in docs if d["domain"] == "code"}
    assert {"python", "c", "cpp"} <= langs  # stdlib + numpy headers + torch headers: on any install
    assert {d["split"] for d in docs} == {"train", "val"}
    assert any(d["dup_kind"] == "exact" for d in docs) and any(d["dup_kind"] == "near" for d in docs)
    again = corpus.embedded_corpus(1_500_000, 0, corpus.Rejects(), dup_frac=0.1)
    assert [d["id"] for d in again] == [d["id"] for d in docs] and again[5]["text"] == docs[5]["text"]
    by_group = {}
    for d in docs:  # chunks of one file never straddle the split
        assert by_group.setdefault(d["group"], d["split"]) == d["split"]


def test_bad_input_counted_and_skipped():
    rej = corpus.Rejects()
    got = list(corpus.read_jsonl(FIX / "bad_input.jsonl", rej, max_chars=2000))
    assert [d["id"] for d in got] == ["bad_input.jsonl:1", "bad_input.jsonl:12"]
    assert rej.summary()["counts"] == {"empty": 2, "malformed": 5, "too_long": 1, "undecodable": 2}


def test_missing_source_reported(monkeypatch):
    def gone(max_chars, seed, rejects):
        raise FileNotFoundError("no such package")
        yield
    monkeypatch.setitem(corpus.SOURCES, "fortran_sources", (gone, 0.03))
    rej, msgs = corpus.Rejects(), []
    docs = corpus.embedded_corpus(200_000, 0, rej, ["pydoc_topics", "fortran_sources", "math"], log=msgs.append)
    assert rej.counts["missing_source"] == 1 and "fortran_sources" in msgs[0]
    assert {d["source"] for d in docs} == {"pydoc_topics", "math"}
    with pytest.raises(FileNotFoundError):
        list(corpus.read_jsonl(FIX / "nope.jsonl", rej))


def test_hf_without_network_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(ConnectionError, match="python data/prepare.py"):
        list(corpus.read_hf("someone/some-dataset", corpus.Rejects()))
    assert time.time() - t < 10


def test_hf_source_reads_a_local_dataset_dir(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(5))
                                   + json.dumps({"text": ""}) + "\n")
    rej = corpus.Rejects()
    got = list(corpus.read_hf(str(d), rej, cache_dir=str(tmp_path / "cache")))
    assert len(got) == 5 and rej.counts["empty"] == 1 and got[0]["source"] == f"hf:{d}"


def test_load_tokens_missing_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="python data/prepare.py"):
        shards.load_tokens(tmp_path, "train")


# --- filters -----------------------------------------------------------------------------------

def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in rng.integers(0, 5000, 400)]
    a, b = " ".join(words), " ".join(words[:300] + [f"x{i}" for i in range(100)])
    lsh = filters.MinHashLSH(num_perm=256)
    est = float((lsh.signature(a) == lsh.signature(b)).mean())
    assert abs(est - filters.jaccard(a, b)) < 0.08
    assert (lsh.signature(a) == lsh.signature(a.upper())).all()  # shingles are case-folded


def test_dedup_finds_planted_duplicates(dataset):
    kept, r_exact, pairs = filters.exact_dedup(dataset)
    kept, r_near, near = filters.near_dedup(kept, filters.MinHashLSH(0.7))
    m = filters.dedup_metrics(dataset, {**pairs, **near}, 0.7)
    assert m["planted"] >= 20 and m["recall"] >= 0.95 and m["precision"] >= 0.95, m
    exact = [(d, o) for d, o, k in zip(dataset["id"], dataset["dup_of"], dataset["dup_kind"]) if k == "exact"]
    assert all(d in pairs or o in pairs for d, o in exact)  # normalisation-level copies: caught by the exact stage
    assert r_exact["dropped"] + r_near["dropped"] == len(dataset) - len(kept)
    assert set(kept["id"]).isdisjoint(pairs) and set(kept["id"]).isdisjoint(near)


@pytest.fixture(scope="module")
def trained(dataset):
    prep = _prepare()
    args = prep.parse_args(["--out-dir", "unused"])
    return prep.train_filters(dataset, args)


def test_quality_classifier(trained, dataset):
    qclf, _, _, metrics = trained
    assert metrics["quality"]["accuracy"] >= 0.95 and metrics["quality"]["n"] >= 20
    rows = _jsonl("unseen_quality.jsonl")  # hand-written, topics no source covers
    s = qclf.score([r["text"] for r in rows])
    y = np.array([r["quality"] for r in rows])
    assert s[y == 0].max() < 0.5, "every spam/junk fixture scores low"
    assert filters.binary_metrics(y, s)["accuracy"] >= 0.8 and s[y == 1].mean() > s[y == 0].mean() + 0.3
    kept, report, scored = filters.quality_filter(dataset, qclf)
    assert report["reasons"] == {"low_quality": report["dropped"]} and report["dropped"] > 0
    assert all(not s.startswith("pydoc") or v["dropped"] <= 0.05 * (v["kept"] + v["dropped"])
               for s, v in report["by_source"].items())
    junk = [v for s, v in report["by_source"].items() if s.startswith("junk")]
    assert sum(v["dropped"] for v in junk) >= 0.95 * sum(v["kept"] + v["dropped"] for v in junk)
    assert len(scored) == len(dataset) and len(kept) == report["kept"]


def test_language_classifier(trained):
    _, lclf, _, metrics = trained
    assert metrics["language"]["accuracy"] >= 0.9
    rows = _jsonl("unseen_code.jsonl")
    pred, conf = lclf.predict([r["text"] for r in rows])
    acc = np.mean([p == r["lang"] for p, r in zip(pred, rows)])
    assert acc >= 0.8, list(zip(pred, [r["lang"] for r in rows]))


def test_math_judge(trained):
    _, _, judge, metrics = trained
    assert metrics["math_judge"]["auc"] >= 0.95
    probs = tasks.math_problems(60, seed=99)  # problems it never saw
    import random
    r = random.Random(0)
    good = judge.score([f"Problem: {p['question']}\nSolution:\n{p['solution']}" for p in probs])
    bad = judge.score([f"Problem: {p['question']}\nSolution:\n{corpus.corrupt_solution(p, r)}" for p in probs])
    assert filters.binary_metrics([1] * 60 + [0] * 60, np.concatenate([good, bad]))["auc"] >= 0.95


# --- prepare.py end to end ---------------------------------------------------------------------

SMALL = ["--budget-mb", "0.4", "--max-docs", "120", "--vocab-size", "600", "--num-proc", "1",
         "--source", "embedded", "--source", f"jsonl:{FIX / 'bad_input.jsonl'}", "--source", "jsonl:missing.jsonl",
         "--max-doc-chars", "2000"]
OUTPUTS = ["mixture.parquet", "knowledge.jsonl", "tokenizer.json", "tokens/train.bin", "tokens/val.bin",
           "tokens/meta.json", "stats.json", "report.md", "filters.png", "scores.png", "mixture.png"]


@pytest.mark.slow
def test_prepare_end_to_end_and_deterministic(tmp_path):
    prep = _prepare()
    a, b = tmp_path / "a", tmp_path / "b"
    stats = prep.main(SMALL + ["--out-dir", str(a)])
    prep.main(SMALL + ["--out-dir", str(b)])
    for f in OUTPUTS:
        assert (a / f).exists(), f
        assert (a / f).read_bytes() == (b / f).read_bytes(), f"{f} differs between two runs with one seed"
    assert stats["rejected"]["counts"] == {"empty": 2, "malformed": 5, "missing_source": 1, "too_long": 1,
                                           "undecodable": 2}
    meta = json.loads((a / "tokens/meta.json").read_text())
    tok = Tokenizer.load(a)
    assert meta["vocab_size"] == tok.vocab_size <= 600 and meta["dtype"] == "uint16"
    train = shards.load_tokens(a, "train")
    assert len(train) == meta["n_train_tokens"] > 10_000 and train.max() < tok.vocab_size
    assert len(shards.load_tokens(a, "val")) == meta["n_val_tokens"] > 0
    first = int(np.argmax(np.asarray(train) == tok.eos_id))
    import pyarrow.parquet as pq
    mix = pq.read_table(a / "mixture.parquet").to_pylist()
    assert tok.decode(train[:first]) == [d for d in mix if d["split"] == "train"][0]["text"]
    assert {d["domain"] for d in mix} == {"text", "code", "math"} and all(d["text"] for d in mix)
    assert all(tok.decode(tok.encode(d["text"])) == d["text"] for d in mix)
    assert [f["filter"] for f in stats["filters"]] == ["exact_dedup", "near_dedup", "quality", "language", "math_judge"]
    assert "## Filters" in (a / "report.md").read_text()
    know = [json.loads(ln) for ln in (a / "knowledge.jsonl").read_text().splitlines()]
    assert know and all(k["source"] in ("pydoc_topics", "docstrings", "bad_input") for k in know)


def test_prepare_hf_offline_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        _prepare().main(["--out-dir", str(tmp_path), "--source", "hf:someone/data"])
    assert "offline" in str(e.value) and "python data/prepare.py" in str(e.value)


def test_feedback_tasks_held_out_by_template_and_constant_and_their_constant_is_only_in_the_feedback():
    train, held = tasks.feedback_tasks(300, 0, "train"), tasks.feedback_tasks(300, 0, "eval")
    key = {t.messages[1]["content"] + f"|{t.meta['hidden']}" for t in train}
    assert not key & {t.messages[1]["content"] + f"|{t.meta['hidden']}" for t in held}  # disjoint by constant
    held_out = [t for t in held if t.messages[1]["content"].endswith(tasks.HIDDEN_EVAL_ONLY[0][len("returns "):] + ".")]
    assert held_out and not any(tasks.HIDDEN_EVAL_ONLY[0][8:] in t.messages[1]["content"] for t in train)  # by template
    sft_prompts = {t.messages[1]["content"] for t in tasks.code_tasks(400, 0, "sft")}
    assert not sft_prompts & {t.messages[1]["content"] for t in train + held}  # SFT shows none of them
    for t in train[:50] + held[:50]:
        assert not re.search(r"\d", t.messages[1]["content"].replace("f(x)", ""))  # no number in the prompt
        sig, k = t.meta["signature"], t.meta["hidden"]
        f = eval(f"lambda {sig[2:-1]}: {t.answer.split('return ', 1)[1]}")
        assert repr(f(*t.meta["tests"][0][0])) == t.meta["tests"][0][1] == repr(k)  # the first test shows it
        wrong = eval(f"lambda {sig[2:-1]}: {t.answer.split('return ', 1)[1].replace(str(k), str(k + 1))}")
        assert repr(wrong(*t.meta["tests"][0][0])) != t.meta["tests"][0][1]  # any other constant fails it
