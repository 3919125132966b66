"""RL environments whose reward is checked, not guessed (GLM-5 arXiv 2602.15763 §3.2, §4.1).

The tasks come from nanoglm5/data/tasks.py (the generators SFT shares, split into disjoint "sft", "train"
and "eval" parts); an environment adds what RL needs on top: the reward, and for multi-turn tasks the
episode. Four environments share one small interface:
  - `env.make_tasks(n, seed, split)` → list of `Task` (deterministic in (n, seed, split));
  - `env.reward(task, completion_text) -> float` in [0, 1];
  - multi-turn envs add `env.reset(task) -> state` and
    `env.step(task, state, assistant_text) -> (observation_text | None, done, reward)`;
  - `EnvCrash` from `reward`/`judge`/`step`: the environment failed, not the policy (below).

  math   reward 1 if `check_math_answer` finds the exact final answer (rational equality). GLM-5 §3.2's
         reasoning RL in miniature.
  code   the judge RUNS the model's one-line function on the task's hidden tests in the sandbox
         (`sandbox.run_code`); reward = fraction of tests passed; crashing, hostile or time-wasting code
         scores 0: a grounded judge rather than a learned one.
  code_mt  multi-turn code, judged by execution: the model writes the function, the judge runs the hidden
         tests in the sandbox, and on a failure the observation tells the model what failed (the failing
         call, what was expected and what came back, or the error) so it may revise, up to `max_turns`
         attempts. Reward 1 only if every test passes (times `turn_discount` per extra attempt), else 0.
  agent  multi-turn tool use: each `CALL add 3 4` is answered by the calculator (observation `7`) until
         `ANSWER n`. Turns are heavy-tailed (data/tasks.py) and each tool call has a seeded lognormal
         latency: the long tail and environment latency that asynchronous RL hides (GLM-5 §4.1).

Simplified: observations are returned as plain text; the rollout worker renders them in the chat
template's observation role (`<|observation|>`) with loss mask 0. The code judge cannot be forged by the
program it judges: `sandbox.run_calls` brings back only what the candidate's function returned, and the
expected values are compared here, outside the sandbox, never passed in.

Crash ≠ wrong answer (GLM-5 §4.1 removes environment-crash samples instead of training them as reward 0).
The line, for the code envs: once the sandbox has started running the candidate (the harness printed its
start mark, `CallsResult.started`), everything that happens is the PROGRAM's doing and scores 0: a syntax
error, an exception, an infinite loop or sleep past the timeout, a fork bomb, a memory bomb, a flood of
output, reading or writing files it may not, an early exit. The ENVIRONMENT failed (`EnvCrash`, the sample is
marked `env_error`) when the candidate never ran: the sandbox could not be launched (OSError), bubblewrap
exited before the harness started, or the start-up itself outlasted the timeout (a loaded machine).
"""

from __future__ import annotations

import random
import re
import time

from nanoglm5.data.tasks import (
    AGENT_SYSTEM,
    CODE_SYSTEM,
    MATH_SYSTEM,
    OPS,
    Task,
    agent_solution,
    agent_tasks,
    check_math_answer,
    code_tasks,
    feedback_tasks,
    lognormal_sigma,
    math_tasks,
)
from nanoglm5.rl.judge import CallsResult, run_calls


class EnvCrash(RuntimeError):
    """The environment failed, not the policy: the sample carries no reward signal (rollout marks it
    `env_error` and async_rules.filter_crashed removes it). Never raised for anything a program does."""


def _judge_calls(code: str, task: Task, timeout_s: float, memory_mb: int, allow_unsandboxed: bool) -> CallsResult:
    """run_calls on the task's tests; EnvCrash when the sandbox never got to run the candidate."""
    try:
        out = run_calls(code, [t[0] for t in task.meta["tests"]], timeout_s=timeout_s, memory_mb=memory_mb,
                        allow_unsandboxed=allow_unsandboxed)
    except OSError as e:  # Popen itself failed (no fork, no fds): the machine's fault
        raise EnvCrash(f"{task.task_id}: the sandbox could not be launched ({e})") from e
    if not out.started:
        why = (f"its start-up took longer than the {timeout_s:g} s timeout (a loaded machine?)"
               if out.run.timed_out else f"it exited with status {out.run.returncode}: {out.run.stderr[-200:].strip()}")
        raise EnvCrash(f"{task.task_id}: the sandbox never ran the program: {why}")
    return out

# ----------------------------------------------------------------------------------------------
# math


class MathEnv:
    """Single-turn math with exact answers; reward 1 if the final answer is right, else 0."""

    name = "math"
    system = MATH_SYSTEM

    def make_tasks(self, n: int, seed: int, split: str = "train") -> list[Task]:
        return math_tasks(n, seed, split)

    def reward(self, task: Task, completion: str) -> float:
        return 1.0 if check_math_answer(completion, task.answer) else 0.0


# ----------------------------------------------------------------------------------------------
# code: templated one-line functions, judged by running them


# The judge program: defines the candidate in its own namespace, calls it on each test, prints
# one line `<nonce>[repr(result) | null, ...]`. The parent compares against the expected reprs.
def extract_code(completion: str, signature: str) -> str:
    """The candidate as a module defining f: a ```python block or `def f...` line as written,
    else the first non-empty line taken as the body expression of `def <signature>: return ...`."""
    fenced = re.search(r"```(?:python)?\n(.*?)(?:```|$)", completion, flags=re.S)
    text = fenced.group(1) if fenced else completion
    m = re.search(r"^def f\(.*", text, flags=re.S | re.M)
    if m:
        return m.group(0).strip() + "\n"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "None")
    line = re.sub(r"^return\s+", "", line)
    return f"def {signature}:\n    return {line}\n"


class CodeEnv:
    """One-line Python functions from templates; reward = fraction of hidden tests passed."""

    name = "code"
    system = CODE_SYSTEM

    def __init__(self, timeout_s: float = 2.0, memory_mb: int = 256, all_or_nothing: bool = False,
                 allow_unsandboxed: bool = False):
        self.timeout_s, self.memory_mb, self.all_or_nothing = timeout_s, memory_mb, all_or_nothing
        self.allow_unsandboxed = allow_unsandboxed  # without bubblewrap run_code refuses unless allowed

    def make_tasks(self, n: int, seed: int, split: str = "train") -> list[Task]:
        return code_tasks(n, seed, split)

    def judge(self, task: Task, completion: str) -> tuple[float, dict]:
        """(reward, details): calls the candidate on the tests inside the sandbox; `details["sandboxed"]`
        says whether bubblewrap isolated the run. Raises EnvCrash when the sandbox never ran the program."""
        code = extract_code(completion, task.meta["signature"])
        out = _judge_calls(code, task, self.timeout_s, self.memory_mb, self.allow_unsandboxed)
        res = out.run
        details = {
            "code": code,
            "returncode": res.returncode,
            "limit_hit": res.limit_hit,
            "timed_out": res.timed_out,
            "stderr": res.stderr[-500:],
            "sandboxed": res.sandboxed,
        }
        if out.reprs is None:  # hostile, crashing or silent → 0
            return 0.0, details
        want = [t[1] for t in task.meta["tests"]]
        passed = out.passed(want)
        details["passed"] = passed
        frac = passed / len(want)
        return (float(frac == 1.0) if self.all_or_nothing else frac), details

    def reward(self, task: Task, completion: str) -> float:
        return self.judge(task, completion)[0]


# ----------------------------------------------------------------------------------------------
# agent: multi-turn calculator tool with heavy-tailed turns and environment latency

_CALL = re.compile(r"CALL\s+(add|sub|mul)\s+(-?\d+)\s+(-?\d+)")
_ANSWER = re.compile(r"ANSWER\s*:?\s*(-?\d+)")


class AgentEnv:
    """Multi-turn: apply a chain of operations with the calculator tool, then answer.

    A task needs `len(ops)` tool calls plus one answer turn; len(ops) ~ lognormal with median
    `median_steps` and p99/p50 = `p99_over_p50` (heavy tail), clipped to `max_steps`.
    Each tool call waits a seeded lognormal latency (median `latency_median_s`, same skew) when
    `sleep=True`, standing in for a slow environment (a sandbox, a browser, a test suite).
    Reward 1 for the right final answer within `max_turns`, else 0.
    """

    name = "agent"
    system = AGENT_SYSTEM

    def __init__(
        self,
        median_steps: float = 2.0,
        p99_over_p50: float = 10.0,
        max_steps: int = 24,
        latency_median_s: float = 0.0,
        sleep: bool = True,
    ):
        self.median_steps, self.p99_over_p50, self.max_steps = median_steps, p99_over_p50, max_steps
        self.sigma = lognormal_sigma(p99_over_p50)
        self.latency_median_s, self.sleep = latency_median_s, sleep

    def make_tasks(self, n: int, seed: int, split: str = "train") -> list[Task]:
        return agent_tasks(n, seed, split, self.median_steps, self.p99_over_p50, self.max_steps,
                           self.latency_median_s)

    def latency(self, task: Task, turn: int) -> float:
        """Seeded environment latency of tool call `turn` (seconds)."""
        if self.latency_median_s <= 0:
            return 0.0
        r = random.Random(f"latency:{task.task_id}:{turn}")
        return self.latency_median_s * r.lognormvariate(0.0, self.sigma)

    def reset(self, task: Task) -> dict:
        return {"turn": 0, "calls": 0, "done": False}

    def step(self, task: Task, state: dict, assistant_text: str) -> tuple[str | None, bool, float]:
        """One assistant turn → (observation or None, done, reward). Mutates `state`."""
        if state["done"]:
            raise ValueError(f"step() on a finished episode of {task.task_id}; call reset() first")
        state["turn"] += 1
        ans = _ANSWER.search(assistant_text)
        call = _CALL.search(assistant_text)
        if ans and (not call or ans.start() < call.start()):
            state["done"] = True
            return None, True, float(int(ans.group(1)) == task.meta["target"])
        if state["turn"] >= task.meta["max_turns"]:
            state["done"] = True
            return None, True, 0.0
        if not call:
            return "error: expected 'CALL add|sub|mul <a> <b>' or 'ANSWER <n>'", False, 0.0
        wait = self.latency(task, state["turn"])
        if self.sleep and wait > 0:
            time.sleep(wait)
        state["calls"] += 1
        op, a, b = call.group(1), int(call.group(2)), int(call.group(3))
        return str(OPS[op](a, b)), False, 0.0

    def reward(self, task: Task, completion: str) -> float:
        """Single-shot check of a whole transcript: its last ANSWER must be the target."""
        answers = _ANSWER.findall(completion)
        return float(bool(answers) and int(answers[-1]) == task.meta["target"])

    def solve(self, task: Task) -> list[str]:
        """The reference assistant turns (for tests)."""
        return [turn for turn, _ in agent_solution(task)]


# ----------------------------------------------------------------------------------------------
# code_mt: the same tasks over several attempts, each failure answered with what failed


def _call_text(task: Task, args: list) -> str:
    name = task.meta["signature"].split("(", 1)[0]
    return f"{name}({', '.join(map(repr, args))})"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: max(0, n - 3)] + "..."


def _last_error_line(stderr: str) -> str:
    """The exception line of a traceback (its last non-empty line), else a generic note."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else "the program exited before returning a result"


class MultiTurnCodeEnv:
    """Write the function; on failure, read what failed and revise, up to `max_turns` attempts.

    Each attempt is judged by execution: the candidate runs on the task's hidden tests in the sandbox.
    All pass → done, reward `turn_discount ** (attempt − 1)` (1.0 = no discount). Otherwise the observation
    names the first failing test: "f(3) returned 9, expected 10", or "f(3) raised ZeroDivisionError: ...",
    or why the program never answered (a syntax error's line, a timeout, a limit it hit), clipped to
    `feedback_chars`; after the last attempt the episode ends with reward 0. Binary, all-or-nothing: a
    program that passes 4 of 5 tests has not solved the task. The expected value the observation shows was
    computed here from the reference solution, outside the sandbox, never passed in; what came back is
    the repr the candidate's function returned inside it.
    """

    name = "code_mt"
    system = CODE_SYSTEM

    def __init__(self, max_turns: int = 3, turn_discount: float = 1.0, timeout_s: float = 2.0, memory_mb: int = 256,
                 feedback_chars: int = 160, feedback_frac: float = 0.5, allow_unsandboxed: bool = False):
        if max_turns < 1:
            raise ValueError(f"max_turns={max_turns}: an episode needs at least 1 attempt (use >= 3 for revisions)")
        if not 0.0 < turn_discount <= 1.0:
            raise ValueError(f"turn_discount={turn_discount}: use a factor in (0, 1] (1.0 = no discount)")
        if not 0.0 <= feedback_frac <= 1.0:
            raise ValueError(f"feedback_frac={feedback_frac}: use a share in [0, 1] (0 = only prompts with constants)")
        self.feedback_frac = feedback_frac
        self.max_turns, self.turn_discount, self.feedback_chars = max_turns, turn_discount, feedback_chars
        self.timeout_s, self.memory_mb, self.allow_unsandboxed = timeout_s, memory_mb, allow_unsandboxed

    def make_tasks(self, n: int, seed: int, split: str = "train") -> list[Task]:
        """The code tasks (same prompts, tests and splits as `code`) and, a `feedback_frac` share of them,
        feedback tasks whose constant only a failed attempt's feedback shows (data/tasks.py), shuffled."""
        n_fb = round(self.feedback_frac * n) if split != "sft" else 0
        tasks = code_tasks(n - n_fb, seed, split) + (feedback_tasks(n_fb, seed, split) if n_fb else [])
        random.Random(f"code_mt:{seed}:{split}").shuffle(tasks)
        return [Task(t.task_id, self.name, t.messages, t.answer, t.meta) for t in tasks]

    def check(self, task: Task, completion: str) -> tuple[bool, str, dict]:
        """(all tests passed, feedback for the model, details). Raises EnvCrash if the sandbox never ran it."""
        code = extract_code(completion, task.meta["signature"])
        out = _judge_calls(code, task, self.timeout_s, self.memory_mb, self.allow_unsandboxed)
        res, tests = out.run, task.meta["tests"]
        details = {"code": code, "sandboxed": res.sandboxed, "limit_hit": res.limit_hit, "timed_out": res.timed_out}
        if res.timed_out or res.limit_hit in ("wall", "cpu"):
            return False, f"Timed out: the program did not finish within {self.timeout_s:g} s.", details
        if res.limit_hit:
            return False, f"The program was stopped: it hit the {res.limit_hit} limit.", details
        call, want = _call_text(task, tests[0][0]), tests[0][1]
        if out.reprs is None:  # what the first test expects too: a revision has something to go on
            why = _clip(_last_error_line(res.stderr), 60)
            return False, _clip(f"The program failed: {why}. {call} expected {want}", self.feedback_chars), details
        passed = out.passed([want for _, want in tests])
        details["passed"] = passed
        if passed == len(tests):
            return True, "", details
        i = next(i for i, ((_, want), got) in enumerate(zip(tests, out.reprs)) if got != want)
        args, want = tests[i]
        call = _call_text(task, args)
        err = out.errors[i] if out.errors else None
        # the expected value last, never clipped away: it is what a revision needs (the feedback tasks' constant)
        what = f"{call} raised {_clip(err, 60)}, expected {want}" if err else f"{call} returned {_clip(out.reprs[i], 30)}, expected {want}"
        return False, _clip(f"{passed}/{len(tests)} tests passed. {what}", self.feedback_chars), details

    def reset(self, task: Task) -> dict:
        return {"turn": 0, "done": False, "sandboxed": None, "solved_at": None}

    def step(self, task: Task, state: dict, assistant_text: str) -> tuple[str | None, bool, float]:
        """One attempt → (observation or None, done, reward). Mutates `state`; raises EnvCrash."""
        if state["done"]:
            raise ValueError(f"step() on a finished episode of {task.task_id}; call reset() first")
        state["turn"] += 1
        ok, feedback, details = self.check(task, assistant_text)
        state["sandboxed"] = details["sandboxed"]
        if ok:
            state["done"], state["solved_at"] = True, state["turn"]
            return None, True, self.turn_discount ** (state["turn"] - 1)
        if state["turn"] >= self.max_turns:
            state["done"] = True
            return None, True, 0.0
        return feedback, False, 0.0

    def reward(self, task: Task, completion: str) -> float:
        """Single-shot: 1.0 if one attempt passes every test."""
        return float(self.check(task, completion)[0])


ENVS = {"math": MathEnv, "code": CodeEnv, "code_mt": MultiTurnCodeEnv, "agent": AgentEnv}


def make_env(name: str, **kwargs):
    """An environment by name ("math", "code", "code_mt", "agent"), with its constructor's keyword knobs."""
    if name not in ENVS:
        raise ValueError(f"unknown env {name!r}; choose one of {sorted(ENVS)}")
    return ENVS[name](**kwargs)
