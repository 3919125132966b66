"""SFT conversations, generated offline (no network, no teacher model). GLM-5's SFT (arXiv 2602.15763,
post-training) mixes general chat, reasoning and agentic data; ours are toy stand-ins of each:

  math       problems with worked, step-by-step answers (tasks.math_problems, the "sft" split)
  knowledge  "What does json.dumps do?" → the first sentence of its docstring; from data/knowledge.jsonl
             when `data/prepare.py` wrote it, else straight from the stdlib docstrings and pydoc topics
  code       code tasks (tasks.code_tasks, "sft" split) with their reference one-liner
  agent      tool-use tasks (tasks.agent_tasks, "sft" split) as multi-turn transcripts:
             CALL → observation → … → ANSWER, the observations being the calculator's own results

Only the "sft" split of the task space is used: disjoint from RL's "train" tasks and from the held-out
"eval" ones. SFT teaches the formats; RL then meets tasks that are as new to the model as the eval tasks,
so what it gains there can carry over (when SFT showed RL's own tasks with their answers, the model
memorised them and RL had nothing left to learn that transfers: docs/LOG.md). Conversations are kept short
(the tiny model's seq_len is 256). Same (n, seed) → the same list.
"""

import json
import random
import re
from pathlib import Path

from nanoglm5.data.corpus import Rejects, pydoc_topics, stdlib_docstrings
from nanoglm5.data.tasks import (
    MATH_SYSTEM,
    agent_solution,
    agent_tasks,
    code_tasks,
    math_problems,
    stable_hash,
    task_split,
)

# shares of the SFT conversations. Code is the largest because RL and the held-out evaluation are code: with 30%
# the tiny model still miscopied constants of one-constant templates (held-out greedy pass@1 0.85); 45% gave 0.89,
# and 60% no more (docs/LOG.md)
MIX = {"math": 0.20, "knowledge": 0.20, "code": 0.45, "agent": 0.15}
# how much more often SFT shows the one code template with two constants ("N times x plus M") than each other one.
# Drawn uniformly (1 in 11), the tiny model learned to copy one constant but wrote the last number of the prompt
# in both places (held-out greedy 0.00-0.30 on it); at 6 (6 in 16 code examples) it copies both, on held-out
# prompts it never saw (docs/LOG.md). Hard-example upweighting of the demonstrations, not of the evaluation:
# RL and the held-out tasks still draw every template alike.
CODE_TWO_CONSTANT_WEIGHT = 6.0


def first_sentence(text: str, max_chars: int = 200) -> str | None:
    """The first sentence of a paragraph, whitespace collapsed; None if it is not a clean sentence."""
    text = " ".join(text.split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    if not m or len(m.group(1)) < 20 or len(m.group(1)) > max_chars:
        return None
    s = m.group(1)
    return s if not s.startswith((">>>", "..", "-", "*", "=")) else None


def _subject(doc_id: str) -> str | None:
    """'docstrings/json/__init__.py:dumps:120' → 'json.dumps'; 'pydoc_topics/assert/0' → 'assert'."""
    if doc_id.startswith("docstrings/"):
        mod, name, _ = doc_id[len("docstrings/"):].rsplit(":", 2)
        mod = mod.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        return mod if name == "<module>" else f"{mod}.{name}"
    m = re.match(r"pydoc_topics/([^/]+)/0$", doc_id)
    return m.group(1) if m else None


def knowledge_qa(n: int, seed: int, data_dir: str | Path | None = None) -> list[dict]:
    """Q&A pairs from the knowledge corpus: the question names the subject, the answer is its first sentence."""
    path = Path(data_dir) / "knowledge.jsonl" if data_dir else None
    if path is not None and path.exists():
        docs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        rej = Rejects()
        budget = 600 * n + 20_000  # characters: roughly 3 candidate documents per question asked
        docs = list(stdlib_docstrings(budget, seed, rej)) + list(pydoc_topics(budget // 2, seed, rej))
    out = []
    for d in docs:
        subject, answer = _subject(d.get("id", "")), first_sentence(d.get("text", ""))
        if not subject or not answer:
            continue
        if d["id"].startswith("pydoc_topics/"):
            q = f"In Python, what is '{subject}'?"
        elif ":<module>:" in d["id"]:
            q = f"What is the Python module {subject} for?"
        else:
            q = f"What does {subject} do?"
        out.append({"kind": "knowledge", "messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": answer}]})
    random.Random(f"sft-knowledge:{seed}").shuffle(out)
    return out[:n]


def math_chats(n: int, seed: int) -> list[dict]:
    """Worked math problems from the "sft" split of the RL math tasks' space (never an RL or eval question)."""
    out, chunk = [], 0
    while len(out) < n:
        for p in math_problems(256, seed=stable_hash(f"sft-math:{seed}:{chunk}") % 2**31):
            if task_split(p["question"]) == "sft" and len(out) < n:
                out.append({"kind": "math", "messages": [
                    {"role": "system", "content": MATH_SYSTEM}, {"role": "user", "content": p["question"]},
                    {"role": "assistant", "content": p["solution"]}]})
        chunk += 1
    return out


def task_chats(n_code: int, n_agent: int, seed: int, max_agent_steps: int = 4) -> list[dict]:
    """Code and agent tasks of the "sft" split with their reference answers, in chat form."""
    out = []
    for t in code_tasks(n_code, seed, "sft", two_constant_weight=CODE_TWO_CONSTANT_WEIGHT):
        out.append({"kind": "code", "messages": t.messages + [{"role": "assistant", "content": t.answer}]})
    for t in agent_tasks(4 * n_agent, seed, "sft"):
        if len(out) >= n_code + n_agent:
            break
        if len(t.meta["ops"]) > max_agent_steps:
            continue
        msgs = list(t.messages)
        for turn, observation in agent_solution(t):
            msgs.append({"role": "assistant", "content": turn})
            if observation is not None:
                msgs.append({"role": "observation", "content": observation})
        out.append({"kind": "agent", "messages": msgs})
    return out


def build_conversations(n: int, seed: int, data_dir: str | Path | None = None) -> list[dict]:
    """n conversations {"kind", "messages"} in the MIX proportions, shuffled (same (n, seed) → same list)."""
    k = {name: int(round(frac * n)) for name, frac in MIX.items()}
    convs = math_chats(k["math"], seed) + knowledge_qa(k["knowledge"], seed, data_dir)
    convs += task_chats(k["code"], k["agent"], seed)
    if len(convs) < n:  # few knowledge docs: top up with math
        convs += math_chats(n - len(convs), seed + 1)
    random.Random(f"sft:{seed}").shuffle(convs)
    return convs[:n]
