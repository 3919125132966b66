"""The embedded pre-training corpus: documents that ship with Python and the pip requirements, plus
generated math and junk, so that `python data/prepare.py` needs no network.

GLM-5 (arXiv 2602.15763) pre-trains on three pipelines, web knowledge, code, and math & science (the
report's pre-training data section, after GLM-4.5 arXiv 2508.06471 §2.2). Here each has a toy stand-in
that any fresh install holds:
  - knowledge prose: CPython's `pydoc_data.topics` and stdlib docstrings;
  - code: stdlib `.py` (Python), numpy/CPython headers (C), torch/pyarrow headers (C++),
    numpy/pyarrow `.pyx/.pxd` (Cython), numpy's f2py test sources (Fortran);
  - math: worked solutions of `tasks.math_problems` (the generator SFT and RL share);
  - junk: generated low-quality text (the quality classifier's negatives), corrupted math (the judge's
    negatives), and planted exact / near duplicates with known ground truth.
Real corpora stay one flag away: `read_hf(NAME)` goes through `datasets.load_dataset` (prepare.py's
`--source hf:NAME`), `read_jsonl(PATH)` reads local .jsonl / .txt files (`--source jsonl:PATH`). Bad input
is counted in a `Rejects`, never dropped silently.

Every document is a dict with the same keys (DOC_KEYS); labels (`quality`, `lang`, `dup_of`) are the
ground truth the filters are measured against, -1 / "" where unknown (external sources). `split` is
"train" or "val", by `doc_split` of the document's group (a file or topic).
Read top to bottom: documents → sources → math → junk → duplicates → external sources.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import random
import re
import socket
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from pydoc_data.topics import topics

from nanoglm5.data.tasks import fraction_str, math_problems, stable_hash

DOC_KEYS = ("id", "text", "source", "domain", "lang", "quality", "group", "split", "dup_of", "dup_kind")
CHUNK_CHARS = 4000  # documents are cut at blank lines to at most this many characters
MAX_DOC_CHARS = 100_000  # longer documents from external sources are skipped as "too_long"


def make_doc(id: str, text: str, source: str, domain: str, lang: str = "", quality: int = -1,
             group: str = "", dup_of: str = "", dup_kind: str = "") -> dict:
    return {"id": id, "text": text, "source": source, "domain": domain, "lang": lang, "quality": quality,
            "group": group or id, "split": "", "dup_of": dup_of, "dup_kind": dup_kind}


def doc_split(group: str, seed: int, val_frac: float = 0.1) -> str:
    """Deterministic train/val split of documents by group (a file or topic), so chunks of one file never
    straddle it."""
    return "val" if stable_hash(f"{seed}:{group}") % 10_000 < val_frac * 10_000 else "train"


def chunk_text(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut at blank lines into pieces of at most max_chars (a longer paragraph is cut at line ends)."""
    pieces, cur = [], ""
    for para in re.split(r"(?<=\n)\s*\n", text):
        while len(para) > max_chars:  # an over-long paragraph: cut at the last newline that fits
            cut = para.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(para[:cut])
            para = para[cut:].lstrip("\n")
        if cur and len(cur) + len(para) + 1 > max_chars:
            pieces.append(cur)
            cur = ""
        cur = f"{cur}\n{para}" if cur else para
    if cur:
        pieces.append(cur)
    return [p.strip("\n") for p in pieces if p.strip()]


class Rejects:
    """Counts what was skipped and why (malformed, empty, undecodable, too_long, missing_source)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(where)

    def check(self, doc: dict, max_chars: int = MAX_DOC_CHARS) -> bool:
        """True if the document is usable; otherwise count why and return False."""
        text = doc.get("text")
        if not isinstance(text, str):
            self.add("malformed", doc.get("id", "?"))
        elif not text.strip():
            self.add("empty", doc["id"])
        elif len(text) > max_chars:
            self.add("too_long", f"{doc['id']} ({len(text)} chars > {max_chars})")
        else:
            try:
                text.encode("utf-8")  # lone surrogates from JSON escapes cannot be stored in arrow
                return True
            except UnicodeEncodeError:
                self.add("undecodable", doc["id"])
        return False

    def summary(self) -> dict:
        return {"total": sum(self.counts.values()), "counts": dict(sorted(self.counts.items())),
                "examples": self.examples}


# ---------------------------------------------------------------------------------------------------
# Embedded sources. Each takes (max_chars, seed, rejects) and yields documents; order is deterministic.

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def _site_packages(pkg: str) -> Path | None:
    """Directory of an installed package, without importing it (importing torch costs seconds)."""
    spec = importlib.util.find_spec(pkg)
    return Path(spec.origin).parent if spec and spec.origin else None


def _read_file(path: Path, rejects: Rejects) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        rejects.add("undecodable", str(path))
    except OSError as e:
        rejects.add("unreadable", f"{path} ({e.__class__.__name__})")
    return None


def _files(root: Path | None, patterns: Iterable[str], skip: set[str] = SKIP_DIRS) -> list[Path]:
    if root is None or not root.exists():
        return []
    out = set()
    for pat in patterns:
        out.update(p for p in root.glob(pat) if p.is_file() and not skip & set(p.relative_to(root).parts[:-1]))
    return sorted(out)


def pydoc_topics(max_chars: int, seed: int, rejects: Rejects) -> Iterator[dict]:
    """The Python language reference as plain prose, one document per chunk of a topic."""
    n = 0
    for name in sorted(topics):
        for i, piece in enumerate(chunk_text(topics[name])):
            if n >= max_chars:
                return
            n += len(piece)
            yield make_doc(f"pydoc_topics/{name}/{i}", piece, "pydoc_topics", "text", quality=1,
                           group=f"pydoc_topics/{name}")


def stdlib_docstrings(max_chars: int, seed: int, rejects: Rejects) -> Iterator[dict]:
    """Module, class and function docstrings (> 200 chars) of the stdlib, modules in a seeded order."""
    files = _files(STDLIB, ["*.py", "*/*.py", "*/*/*.py"])
    random.Random(seed).shuffle(files)
    n = 0
    for path in files:
        src = _read_file(path, rejects)
        if src is None:
            continue
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            rejects.add("malformed", str(path))
            continue
        mod = str(path.relative_to(STDLIB))
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)]
        for node in nodes:
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 200:
                continue
            if n >= max_chars:
                return
            n += len(doc)
            name = getattr(node, "name", "<module>")
            yield make_doc(f"docstrings/{mod}:{name}:{getattr(node, 'lineno', 0)}", doc[:CHUNK_CHARS],
                           "docstrings", "text", quality=1, group=f"docstrings/{mod}")


def _code_source(name: str, lang: str, roots_patterns) -> callable:
    """A source of code files: chunks of files under (package, glob patterns), files in a seeded order."""

    def source(max_chars: int, seed: int, rejects: Rejects) -> Iterator[dict]:
        files = []
        for root, patterns, skip in roots_patterns():
            files += [(root, f) for f in _files(root, patterns, skip)]
        if not files:
            raise FileNotFoundError(f"no {lang} files found for source {name!r}")
        random.Random(f"{seed}:{name}").shuffle(files)
        n = 0
        for root, path in files:
            text = _read_file(path, rejects)
            if text is None:
                continue
            rel = f"{root.name}/{path.relative_to(root)}"
            for i, piece in enumerate(chunk_text(text)):
                if n >= max_chars:
                    return
                n += len(piece)
                yield make_doc(f"{name}/{rel}/{i}", piece, name, "code", lang=lang, group=f"{name}/{rel}")

    source.__name__ = name
    source.__doc__ = f"{lang} code: chunks of the files that {name} finds on this machine."
    return source


def _py_roots():
    return [(STDLIB, ["*.py", "*/*.py"], SKIP_DIRS)]


def _c_roots():
    np_dir = _site_packages("numpy")
    inc = Path(sysconfig.get_paths()["include"])  # CPython headers: pyenv/python.org builds, Debian python3-dev
    return [(np_dir, ["**/include/numpy/**/*.h", "f2py/src/*.c", "f2py/src/*.h"], set()),
            (inc, ["*.h", "cpython/*.h"], set())]


def _cpp_roots():
    torch_inc = (_site_packages("torch") or Path("/nonexistent")) / "include"
    arrow_inc = (_site_packages("pyarrow") or Path("/nonexistent")) / "include"
    # ATen/c10/torch are C++; torch/include also holds C libraries (cpuinfo, xnnpack), left out.
    return [(torch_inc, ["c10/**/*.h", "ATen/core/*.h", "torch/csrc/api/include/torch/nn/modules/*.h"], set()),
            (arrow_inc, ["arrow/*.h", "arrow/compute/*.h", "arrow/util/*.h"], set())]


def _cython_roots():
    return [(_site_packages("numpy"), ["**/*.pyx", "**/*.pxd"], set()),
            (_site_packages("pyarrow"), ["*.pyx", "*.pxd", "*.pxi"], set())]


def _fortran_roots():
    return [(_site_packages("numpy"), ["f2py/tests/src/**/*.f", "f2py/tests/src/**/*.f90"], set())]


stdlib_python = _code_source("stdlib_python", "python", _py_roots)
c_headers = _code_source("c_headers", "c", _c_roots)
cpp_headers = _code_source("cpp_headers", "cpp", _cpp_roots)
cython_sources = _code_source("cython_sources", "cython", _cython_roots)
fortran_sources = _code_source("fortran_sources", "fortran", _fortran_roots)
CODE_LANGS = ("python", "c", "cpp", "cython", "fortran")


# ---------------------------------------------------------------------------------------------------
# Math documents: worked solutions from the task generator (data/tasks.py), good and corrupted.

def math_docs(max_chars: int, seed: int, rejects: Rejects) -> Iterator[dict]:
    """Problems with worked solutions, as pre-training documents (quality 1)."""
    n, i = 0, 0
    while n < max_chars:
        for p in math_problems(200, seed * 1000 + i):
            text = f"Problem: {p['question']}\nSolution:\n{p['solution']}"
            n += len(text)
            yield make_doc(f"math/{i}/{n}", text, "math", "math", quality=1, group=f"math/{i}/{n}")
        i += 1


def corrupt_solution(p: dict, r: random.Random) -> str:
    """A bad worked solution: wrong arithmetic, answer only, truncated, shuffled steps or rambling."""
    steps = p["solution"].split("\n")[:-1]
    kind = r.randrange(5)
    if kind == 0:  # one step's result is wrong, and the error carries to the answer
        i = r.randrange(len(steps))
        head, _, res = steps[i].rpartition("= ")
        wrong = fraction_str(Fraction(res) + r.choice([-3, -2, -1, 1, 2, 10]))
        steps[i] = f"{head}= {wrong}"
        return "\n".join(steps[: i + 1]) + f"\nAnswer: {wrong}"
    if kind == 1:
        return f"Answer: {fraction_str(Fraction(p['answer']) + r.randint(1, 9))}"
    if kind == 2:
        return steps[0].rsplit("=", 1)[0] + "= ..."
    if kind == 3:
        r.shuffle(steps)
        return "\n".join(s.split(": ", 1)[-1] for s in steps) + f"\nAnswer: {r.randint(-20, 99)}"
    return (f"I think this one is easy. Probably the answer is around {r.randint(1, 99)}, "
            "hard to say, numbers are tricky. Answer: maybe")


def noisy_math_docs(max_chars: int, seed: int, rejects: Rejects) -> Iterator[dict]:
    """Corrupted worked solutions (quality 0): the math judge's negatives."""
    n, i, r = 0, 0, random.Random(f"noisy:{seed}")
    while n < max_chars:
        for p in math_problems(200, seed * 1000 + 500 + i):
            text = f"Problem: {p['question']}\nSolution:\n{corrupt_solution(p, r)}"
            n += len(text)
            yield make_doc(f"math_noisy/{i}/{n}", text, "math_noisy", "math", quality=0, group=f"math_noisy/{i}/{n}")
        i += 1


# ---------------------------------------------------------------------------------------------------
# Junk: generated low-quality text, the knowledge classifier's negatives.

BOILER = ["Home | About Us | Contact | Privacy Policy | Terms of Service", "Share Tweet Email", "We use cookies to improve your experience. "
          "By continuing to browse you agree to our use of cookies.", "Copyright (c) 2024 All rights reserved.",
          "Click here to subscribe to our newsletter!", "Share on Facebook Share on Twitter Share via Email",
          "Log in | Register | Forgot password?", "Skip to main content", "Related posts:", "Advertisement",
          "Sign up now and get 20% off your first order!", "Loading comments...", "Page 1 of 12 Next >>"]
STUFF = ["best", "cheap", "free", "download", "online", "2024", "top", "buy", "deal", "review", "now", "fast"]


def _junk_shuffled(r, words, n):
    return " ".join(r.choice(words) for _ in range(n)).capitalize() + "."


def _junk_salad(r, paras, n):
    """A real paragraph's words in random order: stopwords and all, only the order is wrong."""
    words = r.choice(paras).split()
    r.shuffle(words)
    return " ".join(words[:n])


def _junk_boilerplate(r, words, n):
    return r.choice(["\n", " ", " | "]).join(r.choice(BOILER) for _ in range(max(3, n // 12)))


def _junk_shout(r, words, n):
    """All-caps clickbait: the same few phrases, exclamation marks."""
    hooks = ["CLICK HERE", "BUY NOW", "FREE", "LIMITED OFFER", "ACT NOW", "WIN", "DON'T MISS OUT", "100% GUARANTEED"]
    return " ".join(f"{r.choice(hooks + [w.upper() for w in r.sample(words, 3)])}{'!' * r.randint(1, 4)}"
                    for _ in range(max(6, n // 4)))


def _junk_repeated(r, words, n):
    line = " ".join(r.choice(words) for _ in range(r.randint(3, 9)))
    return "\n".join([line] * max(5, n // 8))


def _junk_stuffing(r, words, n):
    kw = [r.choice(words) for _ in range(2)]
    sep = r.choice([" ", ", ", " | "])
    return sep.join(f"{r.choice(STUFF)} {' '.join(kw)}" for _ in range(max(8, n // 3)))


def _junk_ids(r, words, n):
    ids = [f"{r.getrandbits(128):032x}", f"id={r.randint(10**5, 10**9)}&ref={r.getrandbits(32):08x}",
           f"https://example.com/p/{r.getrandbits(40):x}?utm_source={r.choice(STUFF)}",
           f"SKU-{r.randint(1000, 9999)}-{r.getrandbits(16):04X}", f"{r.randint(0, 255)}.{r.randint(0, 255)}.0.{r.randint(1, 254)}"]
    return " ".join(r.choice(ids) if r.random() < 0.7 else ids[0][: r.randint(4, 16)] for _ in range(max(10, n // 4)))


def _junk_listing(r, words, n):
    """Product-listing and pagination debris: prices, stock, page numbers, tags."""
    parts = []
    for _ in range(max(4, n // 6)):
        k = r.randrange(4)
        if k == 0:
            parts.append(f"${r.randint(1, 999)}.{r.randint(0, 99):02d}")
        elif k == 1:
            parts.append(r.choice(["in stock", "ships in 24h", "sold out", "add to cart", "4.5 stars", "(123 reviews)"]))
        elif k == 2:
            parts.append(" ".join(str(i) for i in range(1, r.randint(3, 12))) + r.choice([" Next >>", " Last >>", ""]))
        else:
            parts.append("tags: " + ", ".join(r.choice(words).lower() for _ in range(r.randint(3, 8))))
    return r.choice([" ", "\n", " | "]).join(parts)


def _junk_lorem(r, words, n):
    lorem = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".split()
    return " ".join(lorem[i % len(lorem)] if r.random() < 0.8 else r.choice(words) for i in range(n))


JUNK_KINDS = {"shuffled": _junk_shuffled, "salad": _junk_salad, "boilerplate": _junk_boilerplate,
              "repeated": _junk_repeated, "stuffing": _junk_stuffing, "ids": _junk_ids, "listing": _junk_listing,
              "lorem": _junk_lorem, "shout": _junk_shout}


def junk_docs(max_chars: int, seed: int, rejects: Rejects) -> Iterator[dict]:
    """Low-quality documents of nine kinds, words drawn from the reference prose so that the classifier
    must learn order and structure, not vocabulary (quality 0)."""
    words = sorted({w for t in topics.values() for w in re.findall(r"[A-Za-z]{2,}", t)})
    paras = [p for t in sorted(topics) for p in topics[t].split("\n\n") if len(p.split()) > 30]
    r, n, i = random.Random(f"junk:{seed}"), 0, 0
    kinds = sorted(JUNK_KINDS)
    while n < max_chars:
        kind = kinds[i % len(kinds)]
        text = JUNK_KINDS[kind](r, paras if kind == "salad" else words, r.randint(30, 300))
        n += len(text)
        yield make_doc(f"junk/{kind}/{i}", text, f"junk_{kind}", "text", quality=0)
        i += 1


# name → (source, share of the character budget). The shares are the mixture's raw proportions.
SOURCES = {
    "pydoc_topics": (pydoc_topics, 0.05),
    "docstrings": (stdlib_docstrings, 0.16),
    "stdlib_python": (stdlib_python, 0.25),
    "c_headers": (c_headers, 0.07),
    "cpp_headers": (cpp_headers, 0.12),
    "cython_sources": (cython_sources, 0.08),
    "fortran_sources": (fortran_sources, 0.03),
    "math": (math_docs, 0.12),
    "math_noisy": (noisy_math_docs, 0.04),
    "junk": (junk_docs, 0.08),
}


# ---------------------------------------------------------------------------------------------------
# Planted duplicates: known ground truth for the dedup filters.

def near_copy(text: str, r: random.Random, edit_frac: float = 0.01) -> str:
    """Replace, drop or insert ~edit_frac of the words (at least one); keeps ~90% of 5-word shingles."""
    words = text.split(" ")
    for _ in range(max(1, int(len(words) * edit_frac))):
        i = r.randrange(len(words))
        op = r.randrange(3)
        if op == 0:
            words[i] = r.choice(["data", "value", "the", "result", "item"])
        elif op == 1 and len(words) > 1:
            del words[i]
        else:
            words.insert(i, r.choice(["also", "then", "new", "small"]))
    return " ".join(words)


def exact_copy(text: str, r: random.Random) -> str:
    """Equal after normalisation (case, whitespace): what a re-crawl of the same page looks like."""
    t = re.sub(r"[ \t]+", lambda m: " " * r.randint(1, 3), text)
    return t.upper() if r.random() < 0.3 else t + "\n\n"


def plant_duplicates(docs: list[dict], frac: float, seed: int, min_words: int = 60) -> list[dict]:
    """For `frac` of the text/code docs with ≥ min_words words, add an exact or a near copy (half each)."""
    r = random.Random(f"dups:{seed}")
    eligible = [d for d in docs if d["domain"] in ("text", "code") and d["quality"] != 0
                and len(d["text"].split()) >= min_words]
    picks = r.sample(eligible, int(len(eligible) * frac)) if eligible else []
    out = []
    for j, d in enumerate(sorted(picks, key=lambda d: d["id"])):
        kind = "exact" if j % 2 == 0 else "near"
        text = exact_copy(d["text"], r) if kind == "exact" else near_copy(d["text"], r)
        out.append({**d, "id": f"{d['id']}#dup-{kind}", "text": text, "dup_of": d["id"], "dup_kind": kind})
    return out


def embedded_corpus(budget_chars: int, seed: int, rejects: Rejects, sources: Iterable[str] | None = None,
                    max_docs: int | None = None, dup_frac: float = 0.04, val_frac: float = 0.1,
                    log=print) -> list[dict]:
    """All embedded sources within the character budget, plus planted duplicates, shuffled with the seed.
    A source that this machine lacks is reported and skipped."""
    docs = []
    for name in sources or SOURCES:
        fn, share = SOURCES[name]
        try:
            got = [d for d in take(fn(int(budget_chars * share), seed, rejects), max_docs) if rejects.check(d)]
        except (FileNotFoundError, ImportError) as e:
            rejects.add("missing_source", f"{name}: {e}")
            log(f"source {name}: missing ({e}); continuing with the rest")
            continue
        docs += got
    docs += plant_duplicates(docs, dup_frac, seed)
    for d in docs:
        d["split"] = doc_split(d["group"], seed, val_frac)
    random.Random(f"order:{seed}").shuffle(docs)
    return docs


def take(it: Iterator[dict], n: int | None) -> Iterator[dict]:
    """The first n items of `it` (all of them when n is None)."""
    for i, d in enumerate(it):
        if n is not None and i >= n:
            return
        yield d


# ---------------------------------------------------------------------------------------------------
# External sources: local files and the Hugging Face hub.

def read_jsonl(path: str | Path, rejects: Rejects, text_key: str = "text", max_chars: int = MAX_DOC_CHARS,
               seed: int = 0, val_frac: float = 0.1) -> Iterator[dict]:
    """Documents from a .jsonl file ({"text": ..., optional "source"/"domain"/"lang"}) or a .txt file
    (documents separated by blank lines). Bad lines are counted in `rejects`, never fatal."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raw = path.read_bytes()
    if path.suffix == ".txt":
        try:
            records = list(enumerate(({"text": t} for t in re.split(r"\n\s*\n", raw.decode("utf-8"))), 1))
        except UnicodeDecodeError:
            rejects.add("undecodable", str(path))
            return
    else:
        records = _jsonl_records(raw, path, rejects)
    for i, rec in records:
        doc = make_doc(f"{path.name}:{i}", rec.get(text_key), str(rec.get("source", path.stem)),
                       str(rec.get("domain", "text")), lang=str(rec.get("lang", "")))
        if rejects.check(doc, max_chars):
            doc["split"] = doc_split(doc["group"], seed, val_frac)
            yield doc


def _jsonl_records(raw: bytes, path: Path, rejects: Rejects) -> Iterator[tuple[int, dict]]:
    for ln, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            rejects.add("undecodable", f"{path}:{ln}")
            continue
        except json.JSONDecodeError:
            rejects.add("malformed", f"{path}:{ln}")
            continue
        if not isinstance(rec, dict):
            rejects.add("malformed", f"{path}:{ln} (not an object)")
            continue
        yield ln, rec


OFFLINE_HELP = ("Run offline with the embedded default corpus: `python data/prepare.py` "
                "(or `--source embedded`), or pass local files with `--source jsonl:PATH`.")


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None if huggingface.co answers, else why not. Checked first so that no network fails in seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return None
    except OSError as e:
        return f"huggingface.co:443 is unreachable ({e.__class__.__name__}: {e})"


def read_hf(name: str, rejects: Rejects, text_key: str = "text", max_docs: int | None = None,
            cache_dir: str | None = None, seed: int = 0, val_frac: float = 0.1) -> Iterator[dict]:
    """Documents of a Hugging Face dataset (`NAME` or `NAME:CONFIG`, split "train"); a local dataset
    directory also works offline. Without a network this fails fast with what to do instead."""
    from datasets import load_dataset
    path, _, config = name.partition(":")
    if not Path(path).exists():
        why = _hub_reachable()
        if why:
            raise ConnectionError(f"--source hf:{name} needs the Hugging Face hub, but {why}. {OFFLINE_HELP}")
    ds = load_dataset(path, config or None, split="train", streaming=not Path(path).exists(), cache_dir=cache_dir)
    for i, rec in enumerate(take(iter(ds), max_docs)):
        doc = make_doc(f"hf:{name}/{i}", rec.get(text_key), f"hf:{name}", "text")
        if rejects.check(doc):
            doc["split"] = doc_split(doc["group"], seed, val_frac)
            yield doc
