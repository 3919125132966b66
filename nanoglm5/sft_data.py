"""SFT conversations, generated offline (no network, no teacher model): GLM-5's SFT mixes general chat,
reasoning and agentic data (the report's post-training section); ours are toy stand-ins of each:

  math       problems with worked, step-by-step answers (corpus.math_problems; RL's MathEnv prompts)
  knowledge  "What does json.dumps do?" → the first sentence of its docstring; from data/knowledge.jsonl
             when `data/prepare.py` wrote it, else straight from the stdlib docstrings and pydoc topics
  code       RL-style code tasks (rl/envs.py CodeEnv, "sft" split) with their reference one-liner
  agent      RL-style tool-use tasks (AgentEnv, "sft" split) as multi-turn transcripts: CALL → observation → …
             → ANSWER, observations computed by the environment itself

Only the environments' "sft" split is used: disjoint from RL's "train" tasks and from the held-out "eval"
ones. SFT teaches the formats; RL then meets tasks that are as new to the model as the eval tasks, so
what it gains there can carry over (when SFT showed RL's own tasks with their answers, the model
memorised them and RL had nothing left to learn that transfers: docs/LOG.md). Conversations are kept short
(the tiny model's seq_len is 256). Same (n, seed) → the same list.
"""

import json
import random
import re
from pathlib import Path

from nanoglm5.corpus import Rejects, math_problems, pydoc_topics, stable_hash, stdlib_docstrings

MIX = {"math": 0.25, "knowledge": 0.25, "code": 0.30, "agent": 0.20}
MATH_SYSTEM = "Solve the problem. End with 'Answer: <number>'."


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
    from nanoglm5.rl.envs import split_of

    out, chunk = [], 0
    while len(out) < n:
        for p in math_problems(256, seed=stable_hash(f"sft-math:{seed}:{chunk}") % 2**31):
            if split_of(p["question"]) == "sft" and len(out) < n:
                out.append({"kind": "math", "messages": [
                    {"role": "system", "content": MATH_SYSTEM}, {"role": "user", "content": p["question"]},
                    {"role": "assistant", "content": p["solution"]}]})
        chunk += 1
    return out


def rl_task_chats(n_code: int, n_agent: int, seed: int, max_agent_steps: int = 4) -> list[dict]:
    """The RL environments' "sft"-split tasks with their reference answers, in chat form."""
    from nanoglm5.rl.envs import AgentEnv, CodeEnv

    out = []
    for t in CodeEnv().make_tasks(n_code, seed, "sft"):
        out.append({"kind": "code", "messages": t.messages + [{"role": "assistant", "content": t.answer}]})
    env = AgentEnv(sleep=False)
    for t in env.make_tasks(4 * n_agent, seed, "sft"):
        if len(out) >= n_code + n_agent:
            break
        if len(t.meta["ops"]) > max_agent_steps:
            continue
        msgs, state = list(t.messages), env.reset(t)
        for turn in env.solve(t):
            msgs.append({"role": "assistant", "content": turn})
            obs, done, _ = env.step(t, state, turn)
            if done:
                break
            msgs.append({"role": "observation", "content": obs})
        out.append({"kind": "agent", "messages": msgs})
    return out


def build_conversations(n: int, seed: int, data_dir: str | Path | None = None) -> list[dict]:
    """n conversations {"kind", "messages"} in the MIX proportions, shuffled (same (n, seed) → same list)."""
    k = {name: int(round(frac * n)) for name, frac in MIX.items()}
    convs = math_chats(k["math"], seed) + knowledge_qa(k["knowledge"], seed, data_dir)
    convs += rl_task_chats(k["code"], k["agent"], seed)
    if len(convs) < n:  # few knowledge docs: top up with math
        convs += math_chats(n - len(convs), seed + 1)
    random.Random(f"sft:{seed}").shuffle(convs)
    return convs[:n]
