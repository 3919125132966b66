"""Tasks that SFT and RL share: prompts with checkable answers, generated offline and split once.

GLM-5 (arXiv 2602.15763) post-trains on verifiable data: SFT demonstrations, then RL whose reward a
program checks (math answers, code run on tests, agent tool use). Here each kind has a seeded toy
generator, and the SFT stage (data/sft.py) and the RL environments (rl/envs.py) draw from the same ones:

  math   `math_problems(n, seed)`: arithmetic chains, linear equations, fractions and GSM-style word
         problems with exact answers and worked solutions; `check_math_answer` is the verifier
         (exact rational equality of the final answer), used by SFT data, RL rewards and the INT4 bench.
  code   `code_tasks`: a one-line Python function from a templated spec with a constant to copy, a
         reference one-liner and hidden tests (argument tuples with the expected `repr`);
         `feedback_tasks`: the same shapes with the constant left out of the prompt ("plus the hidden
         number"): only a failed attempt's feedback shows it (multi-turn RL, rl/envs.py `code_mt`).
  agent  `agent_tasks`: a chain of arithmetic steps to go through a calculator tool (`CALL add 3 4`),
         then `ANSWER n`; the number of steps is heavy-tailed (lognormal, p99/p50 ≈ 10), the long tail
         asynchronous RL hides (GLM-5 §4.1).

`task_split(key)` puts every task in one of three disjoint splits by a hash of its content, never of
the seed: "sft" (SFT demonstrations), "train" (RL) and "eval" (held out). Neither SFT nor RL ever sees
an eval task, and RL's tasks are as new to the SFT model as the eval ones, so what RL gains on them can
transfer (docs/LOG.md). `lognormal_lengths` is the benchmarks' workload knob: heavy-tailed target lengths
with a chosen median and p99/p50.

Read top to bottom: hashing and splits → lengths → math → Task → math, code and agent tasks.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from statistics import NormalDist

SPLITS = ("train", "eval", "sft")
SPLIT_FRACS = {"eval": 0.2, "sft": 0.4}  # shares of the task space; "train" (RL) gets the rest


def stable_hash(s: str) -> int:
    """64-bit hash that, unlike hash(), is the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def task_split(key: str) -> str:
    """Which split ("sft", "train" or "eval") a task's content belongs to; independent of the seed so
    that splits never overlap."""
    u, lo = stable_hash(f"rl-split:{key}") % 10_000 / 10_000, 0.0
    for split, frac in SPLIT_FRACS.items():
        if lo <= u < lo + frac:
            return split
        lo += frac
    return "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def lognormal_sigma(p99_over_p50: float) -> float:
    """σ of a lognormal whose p99/p50 is the given ratio: ratio = exp(z_0.99 · σ), z_0.99 ≈ 2.326."""
    if p99_over_p50 <= 1:
        raise ValueError(f"p99_over_p50 must be > 1, got {p99_over_p50}")
    return math.log(p99_over_p50) / NormalDist().inv_cdf(0.99)


def lognormal_lengths(
    n: int, seed: int, median: float, p99_over_p50: float = 10.0, lo: int = 1, hi: int | None = None
) -> list[int]:
    """n heavy-tailed integer lengths (e.g. max_new_tokens per prompt), clipped to [lo, hi]."""
    r, sigma = random.Random(f"lengths:{seed}"), lognormal_sigma(p99_over_p50)
    out = [max(lo, round(median * r.lognormvariate(0.0, sigma))) for _ in range(n)]
    return [min(x, hi) for x in out] if hi is not None else out


# ---------------------------------------------------------------------------------------------------
# Math: seeded problems with exact answers and worked solutions.

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jun", "Kemi", "Lena"]
ITEMS = ["apples", "books", "marbles", "stamps", "pencils", "cookies", "shells", "cards"]


def fraction_str(x: Fraction | int) -> str:
    """"42" for integers, "-3/4" otherwise: how answers are written everywhere."""
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _arith(r: random.Random) -> tuple[str, list[str], Fraction]:
    """A left-to-right chain ((a op b) op c) op d with every step shown."""
    val = r.randint(2, 60)
    expr, steps = str(val), []
    for _ in range(r.randint(2, 4)):
        op, b = r.choice("+-*"), r.randint(2, 25)
        new = val + b if op == "+" else val - b if op == "-" else val * b
        steps.append(f"{fraction_str(val)} {op} {b} = {fraction_str(new)}")
        expr, val = f"({expr} {op} {b})", new
    return f"Compute {expr[1:-1]}.", steps, Fraction(val)


def _linear(r: random.Random) -> tuple[str, list[str], Fraction]:
    """a*x + b = c, answers may be fractions."""
    a = r.choice([i for i in range(-9, 10) if i not in (0, 1)])
    b, c = r.randint(-30, 30), r.randint(-30, 30)
    x = Fraction(c - b, a)
    sign = "+" if b >= 0 else "-"
    steps = [f"{a}x = {c} - ({b}) = {c - b}", f"x = {c - b} / {a} = {fraction_str(x)}"]
    return f"Solve for x: {a}x {sign} {abs(b)} = {c}.", steps, x


def _fraction(r: random.Random) -> tuple[str, list[str], Fraction]:
    p, q = Fraction(r.randint(1, 9), r.randint(2, 9)), Fraction(r.randint(1, 9), r.randint(2, 9))
    op = r.choice("+-*")
    v = p + q if op == "+" else p - q if op == "-" else p * q
    return (f"Compute {fraction_str(p)} {op} {fraction_str(q)}.",
            [f"{fraction_str(p)} {op} {fraction_str(q)} = {fraction_str(v)}"], v)


def _word(r: random.Random) -> tuple[str, list[str], Fraction]:
    """Templated GSM-style problems; every intermediate number is an integer."""
    name, item, kind = r.choice(NAMES), r.choice(ITEMS), r.randrange(4)
    if kind == 0:
        a, k, m, g = r.randint(3, 40), r.randint(2, 9), r.randint(2, 12), r.randint(1, 20)
        q = (f"{name} has {a} {item}. {name} buys {k} bags with {m} {item} each and then gives away {g}. "
             f"How many {item} does {name} have now?")
        return q, [f"{k} * {m} = {k * m}", f"{a} + {k * m} = {a + k * m}", f"{a + k * m} - {g} = {a + k * m - g}"], \
            Fraction(a + k * m - g)
    if kind == 1:
        n, p = r.randint(2, 12), r.randint(2, 15)
        paid = n * p + r.randint(0, 50)
        q = f"{name} buys {n} notebooks at {p} dollars each and pays with {paid} dollars. How much change is given?"
        return q, [f"{n} * {p} = {n * p}", f"{paid} - {n * p} = {paid - n * p}"], Fraction(paid - n * p)
    if kind == 2:
        s, t = r.randint(20, 90), r.randint(2, 9)
        q = f"A train travels at {s} km per hour for {t} hours. How many km does it travel?"
        return q, [f"{s} * {t} = {s * t}"], Fraction(s * t)
    per, k = r.randint(2, 12), r.randint(2, 9)
    q = f"{name} shares {per * k} {item} equally among {k} friends. How many {item} does each friend get?"
    return q, [f"{per * k} / {k} = {per}"], Fraction(per)


MATH_KINDS = {"arithmetic": _arith, "linear": _linear, "fraction": _fraction, "word": _word}


def math_problems(n: int, seed: int) -> list[dict]:
    """n problems: {"question", "answer" (exact, e.g. "42" or "-3/4"), "solution" (steps, then
    "Answer: <answer>"), "kind"}. Same (n, seed) → same list."""
    r = random.Random(f"math:{seed}")
    out = []
    for _ in range(n):
        kind = r.choice(sorted(MATH_KINDS))
        q, steps, ans = MATH_KINDS[kind](r)
        solution = "\n".join(f"Step {i + 1}: {s}" for i, s in enumerate(steps)) + f"\nAnswer: {fraction_str(ans)}"
        out.append({"question": q, "answer": fraction_str(ans), "solution": solution, "kind": kind})
    return out


_NUM = r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*-?\d+(?:\.\d+)?)?"


def _to_fraction(s: str) -> Fraction | None:
    try:
        if "/" in s:
            p, q = s.split("/")
            return Fraction(p.replace(",", "").strip()) / Fraction(q.strip())
        return Fraction(s.replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(completion: str) -> str | None:
    """The final answer in model text: after the last "answer:" / "####" / inside \\boxed{}, else the last number."""
    tail = completion
    for marker in (r"\\boxed\{", r"####", r"answer\s*(?:is)?\s*[:=]?"):
        hits = list(re.finditer(marker, completion, flags=re.I))
        if hits:
            tail = completion[hits[-1].end():]
            m = re.search(_NUM, tail)
            if m:
                return m.group(0)
    nums = re.findall(_NUM, completion)
    return nums[-1] if nums else None


def check_math_answer(completion: str, answer: str) -> bool:
    """True if the final answer in `completion` equals `answer` exactly as a rational number
    ("3/4" == "0.75" == "6/8"; "42" == "42.0")."""
    got, want = extract_answer(completion), _to_fraction(str(answer))
    return got is not None and want is not None and _to_fraction(got) == want


# ---------------------------------------------------------------------------------------------------
# Tasks: a prompt as chat messages, a reference answer and what its checker needs.

MATH_SYSTEM = "Solve the problem. End with 'Answer: <number>'."
CODE_SYSTEM = "Write the Python function. Reply with one line: def f(...): return ..."
AGENT_SYSTEM = "Use the calculator. One call per turn: CALL add|sub|mul <a> <b>. When finished reply: ANSWER <n>."


@dataclass
class Task:
    """One prompt and what its checker needs.

    task_id:  "<env>/<split>/<seed>/<index>", unique and stable.
    env:      "math" | "code" | "agent".
    messages: the prompt as chat messages [{"role": "system"|"user", "content": str}].
    answer:   a reference solution (math: the exact answer; code: a correct one-liner; agent: "ANSWER n").
    meta:     checker data (code: "tests" [[args, expected_repr]]; agent: "ops", "start", "target",
              "max_turns", "latency_median_s"). JSON-serializable, so tasks can cross processes.
    """

    task_id: str
    env: str
    messages: list[dict]
    answer: str
    meta: dict = field(default_factory=dict)


def _prompt(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def math_tasks(n: int, seed: int, split: str = "train") -> list[Task]:
    """n math tasks of `split`, deterministic in (n, seed, split)."""
    _check_split(split)
    tasks, chunk = [], 0
    while len(tasks) < n:
        for p in math_problems(64, seed=stable_hash(f"rl-math:{seed}:{chunk}") % 2**31):
            if task_split(p["question"]) == split and len(tasks) < n:
                tasks.append(Task(f"math/{split}/{seed}/{len(tasks)}", "math", _prompt(MATH_SYSTEM, p["question"]),
                                  p["answer"], {"kind": p["kind"], "solution": p["solution"]}))
        chunk += 1
    return tasks


def _test_args(r: random.Random, k: int, ints_from) -> tuple[list, list, list, list]:
    """k random test-argument tuples of each kind a template takes: ints, lists, words, pairs."""
    ints = [(x,) for x in r.sample(ints_from, k)]
    lists = [(r.sample(range(-9, 30), r.randint(1, 6)),) for _ in range(k)]
    words = [(r.choice(["ab", "cat", "xyz", "hello", "q", "tree"]),) for _ in range(k)]
    pairs = [(r.randint(-20, 20), r.randint(-20, 20)) for _ in range(k)]
    return ints, lists, words, pairs


def _code_template(r: random.Random, two_constant_weight: float = 1.0) -> tuple[str, str, str, list[tuple]]:
    """(spec, signature, reference body, test argument tuples) for one random template.

    Every template carries a constant drawn from a wide range, and the split is a hash of the whole
    spec: held-out tasks are seen templates with unseen constants, so solving them takes reading the
    number from the prompt and copying it, not recalling a memorised answer. The first template is the
    only one with two constants; `two_constant_weight` draws it that many times as often as each other."""
    a, b, k = r.randint(2, 19), r.randint(1, 29), r.randint(2, 19)
    ints, lists, words, pairs = _test_args(r, 5, range(-20, 21))
    choices = [
        (f"returns {a} times x plus {b}", "f(x)", f"{a} * x + {b}", ints),
        (f"returns x times x minus {b}", "f(x)", f"x * x - {b}", ints),
        (f"returns x modulo {a}", "f(x)", f"x % {a}", ints),
        (f"returns the absolute value of x plus {b}", "f(x)", f"abs(x) + {b}", ints),
        (f"returns the larger of a and b plus {b}", "f(a, b)", f"max(a, b) + {b}", pairs),
        (f"returns a plus {a} times b", "f(a, b)", f"a + {a} * b", pairs),
        (f"returns the sum of the list xs plus {b}", "f(xs)", f"sum(xs) + {b}", lists),
        (f"returns the largest element of the list xs minus {b}", "f(xs)", f"max(xs) - {b}", lists),
        (f"returns the length of the list xs times {a}", "f(xs)", f"len(xs) * {a}", lists),
        (f"returns the string s repeated {k} times", "f(s)", f"s * {k}", words),
        (f"returns the length of the string s plus {b}", "f(s)", f"len(s) + {b}", words),
    ]
    if two_constant_weight == 1.0:  # r.choice: the draws RL and the held-out evaluation have always had
        return r.choice(choices)
    return r.choices(choices, weights=[two_constant_weight] + [1.0] * (len(choices) - 1))[0]


def code_tasks(n: int, seed: int, split: str = "train", two_constant_weight: float = 1.0) -> list[Task]:
    """n code tasks of `split`; meta holds the signature and the hidden tests [[args, expected repr]].
    RL and the evaluation draw the templates uniformly; SFT weights the two-constant one (data/sft.py)."""
    _check_split(split)
    r, tasks = random.Random(f"rl-code:{seed}"), []
    while len(tasks) < n:
        spec, sig, body, args = _code_template(r, two_constant_weight)
        if task_split(f"{spec}|{sig}") != split:
            continue
        tasks.append(_code_task(f"code/{split}/{seed}/{len(tasks)}", spec, sig, body, args))
    return tasks


def _code_task(task_id: str, spec: str, sig: str, body: str, args: list[tuple], **meta) -> Task:
    """A "code" Task: the prompt, the reference answer, and the hidden tests [[args, expected repr]], whose expected
    outputs come from our own reference body (trusted code, evaluated here)."""
    tests = [[list(a), repr(eval(f"lambda {sig[2:-1]}: {body}")(*a))] for a in args]
    return Task(task_id, "code", _prompt(CODE_SYSTEM, f"Write {sig} that {spec}."), f"def {sig}: return {body}",
                {"signature": sig, "tests": tests, **meta})


# Feedback tasks: the constant is in no prompt, only in the tests' feedback (code_mt, docs/rl_tasks.md).
# The prompt says "plus the hidden number"; the first hidden test is an edge case whose expected value IS the
# number (f(0) of abs(x) + N is N), so a first attempt cannot know it and the observation of a failed attempt
# ("f(0) returned 3, expected 17") shows it. Reading the number out of the feedback and writing it where it
# belongs is the one skill a revision needs: narrow enough for a 2M-parameter model, and never demonstrated
# (SFT shows single attempts of the templates above, whose constants are in the prompt).
HIDDEN = "the hidden number"
# the template held out by template: no RL-train task is "the length of the string s plus the hidden number"
HIDDEN_EVAL_ONLY = ("returns the length of the string s plus the hidden number",)


def _hidden_template(r: random.Random) -> tuple[str, str, str, list[tuple], int]:
    """(spec, signature, reference body, test argument tuples, hidden constant); the first test reveals it."""
    n = r.randint(2, 29)
    ints, lists, words, pairs = _test_args(r, 4, [i for i in range(-20, 21) if i])
    # first the edge case whose expected value is n itself: f(0), sum([]), len([v]), len(""), max(0, 0), 0 + n * 1
    ones, units = [([r.randint(-9, 9)],)] + lists, [(0, 1)] + pairs
    ints, lists, words, pairs = [(0,)] + ints, [([],)] + lists, [("",)] + words, [(0, 0)] + pairs
    choices = [
        (f"returns the absolute value of x plus {HIDDEN}", "f(x)", f"abs(x) + {n}", ints),
        (f"returns the larger of a and b plus {HIDDEN}", "f(a, b)", f"max(a, b) + {n}", pairs),
        (f"returns a plus {HIDDEN} times b", "f(a, b)", f"a + {n} * b", units),
        (f"returns the sum of the list xs plus {HIDDEN}", "f(xs)", f"sum(xs) + {n}", lists),
        (f"returns the length of the list xs times {HIDDEN}", "f(xs)", f"len(xs) * {n}", ones),
        (f"returns the length of the string s plus {HIDDEN}", "f(s)", f"len(s) + {n}", words),
    ]
    return (*r.choice(choices), n)


def hidden_split(spec: str, n: int) -> str:
    """A feedback task's split: "eval" for the held-out template, else by a hash of (template, constant) into
    "train" or "eval" (the "sft" share is unused: SFT never shows a feedback task)."""
    if spec in HIDDEN_EVAL_ONLY:
        return "eval"
    split = task_split(f"hidden|{spec}|{n}")
    return "train" if split == "sft" else split


def feedback_tasks(n: int, seed: int, split: str = "train") -> list[Task]:
    """n feedback tasks of `split` ("train" or "eval"); meta as code_tasks', plus "hidden" (the constant)."""
    if split not in ("train", "eval"):
        raise ValueError(f"feedback tasks have splits 'train' and 'eval' (SFT shows none), got {split!r}")
    r, tasks = random.Random(f"rl-feedback:{seed}"), []
    while len(tasks) < n:
        spec, sig, body, args, k = _hidden_template(r)
        if hidden_split(spec, k) != split:
            continue
        tasks.append(_code_task(f"code_fb/{split}/{seed}/{len(tasks)}", spec, sig, body, args, hidden=k))
    return tasks


# The calculator the agent tasks are posed in: op name → function, and how the prompt words it.
OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}
OP_WORDS = {"add": "add", "sub": "subtract", "mul": "multiply by"}


def agent_tasks(n: int, seed: int, split: str = "train", median_steps: float = 2.0, p99_over_p50: float = 10.0,
                max_steps: int = 24, latency_median_s: float = 0.0) -> list[Task]:
    """n tool-use tasks of `split`: len(ops) ~ lognormal(median_steps, p99/p50), clipped to [1, max_steps].
    A task allows 2·steps + 2 turns; latency_median_s is recorded for the environment that serves it."""
    _check_split(split)
    sigma = lognormal_sigma(p99_over_p50)
    r, tasks = random.Random(f"rl-agent:{seed}"), []
    while len(tasks) < n:
        steps = min(max_steps, max(1, round(median_steps * r.lognormvariate(0.0, sigma))))
        start = r.randint(2, 30)
        ops = [(r.choice(sorted(OPS)), r.randint(2, 12)) for _ in range(steps)]
        if task_split(f"{start}|{ops}") != split:
            continue
        value = start
        for op, x in ops:
            value = OPS[op](value, x)
        chain = "; then ".join(f"{OP_WORDS[op]} {x}" for op, x in ops)
        meta = {"start": start, "ops": ops, "target": value, "max_turns": 2 * steps + 2,
                "latency_median_s": latency_median_s}
        tasks.append(Task(f"agent/{split}/{seed}/{len(tasks)}", "agent",
                          _prompt(AGENT_SYSTEM, f"Start with {start}; {chain}. What is the result?"),
                          f"ANSWER {value}", meta))
    return tasks


def agent_solution(task: Task) -> list[tuple[str, str | None]]:
    """The reference episode: (assistant turn, the calculator's reply) per step, then ("ANSWER n", None)."""
    turns, value = [], task.meta["start"]
    for op, x in task.meta["ops"]:
        result = OPS[op](value, x)
        turns.append((f"CALL {op} {value} {x}", str(result)))
        value = result
    return turns + [(f"ANSWER {value}", None)]
