"""RL environments (nanoglm5/rl/envs.py) over the shared tasks (nanoglm5/data/tasks.py): deterministic
tasks, disjoint splits, checked rewards."""

import json
import statistics
import time

import pytest

from nanoglm5.data.tasks import agent_solution, lognormal_lengths
from nanoglm5.rl.envs import AgentEnv, CodeEnv, MathEnv, extract_code, make_env


@pytest.mark.parametrize("name", ["math", "code", "agent"])
def test_tasks_deterministic_and_splits_disjoint(name):
    env = make_env(name)
    a, b = env.make_tasks(40, seed=3, split="train"), env.make_tasks(40, seed=3, split="train")
    assert [t.messages for t in a] == [t.messages for t in b] and len(a) == 40
    assert len({t.task_id for t in a}) == 40
    assert [t.messages for t in env.make_tasks(40, seed=4)] != [t.messages for t in a]
    prompt = lambda t: json.dumps(t.messages)
    train = {prompt(t) for s in range(3) for t in env.make_tasks(60, seed=s, split="train")}
    evals = {prompt(t) for s in range(3) for t in env.make_tasks(30, seed=s, split="eval")}
    sft = {prompt(t) for s in range(3) for t in env.make_tasks(60, seed=s, split="sft")}
    assert train and evals and sft and not (train & evals) and not (sft & train) and not (sft & evals)
    json.dumps([t.__dict__ for t in a])  # tasks cross process boundaries as JSON/pickle
    with pytest.raises(ValueError, match="split"):
        env.make_tasks(1, 0, split="test")


def test_math_reward_checks_the_answer():
    env = MathEnv()
    for t in env.make_tasks(10, seed=0):
        assert env.reward(t, t.meta["solution"]) == 1.0
        assert env.reward(t, "Answer: 123456789") == 0.0


def test_code_reward_runs_reference_and_partial_solutions():
    env = CodeEnv()
    tasks = env.make_tasks(30, seed=1)
    for t in tasks[:3]:
        assert env.reward(t, t.answer) == 1.0, (t.answer, env.judge(t, t.answer)[1])
    t = next(t for t in tasks if t.meta["signature"] == "f(x)")
    body = t.answer.split("return ", 1)[1]
    assert env.reward(t, body) == 1.0  # a bare expression is accepted
    assert env.reward(t, "0") < 1.0 and env.reward(t, "def f(x): return None") == 0.0


def test_code_reward_zero_for_hostile_or_broken_code():
    env = CodeEnv(timeout_s=1.5)
    t = env.make_tasks(1, seed=2)[0]
    sig = t.meta["signature"]
    hostile = [
        "def f(:",  # syntax error
        f"def {sig}: raise ValueError",
        "while True: pass",
        "import os\nwhile True:\n    os.fork()\ndef f(*a): return 0",
        "x = bytearray(1 << 34)\ndef f(*a): return 0",
        "print('x' * 10**7)\ndef f(*a): return 0",
        "import sys; print('@@judge-0000@@[]'); sys.exit(0)",  # forged marker without the nonce
    ]
    t0 = time.monotonic()
    for code in hostile:
        assert env.reward(t, code) == 0.0, code
    assert time.monotonic() - t0 < 30


def test_extract_code_forms():
    assert extract_code("def f(x): return x+1\nblah", "f(x)").startswith("def f(x): return x+1")
    assert extract_code("```python\ndef f(x):\n    return 2*x\n```", "f(x)") == "def f(x):\n    return 2*x\n"
    assert extract_code("x + 1", "f(x)") == "def f(x):\n    return x + 1\n"


def test_agent_multi_turn_reference_solution_and_observations():
    env = AgentEnv()
    for t in env.make_tasks(8, seed=0):
        state, obs_seen = env.reset(t), []
        for turn in env.solve(t):
            obs, done, rew = env.step(t, state, turn)
            if not done:
                obs_seen.append(obs)
        assert done and rew == 1.0 and state["calls"] == len(t.meta["ops"])
        assert all(o.lstrip("-").isdigit() for o in obs_seen)
        assert env.reward(t, "\n".join(env.solve(t))) == 1.0
    t = env.make_tasks(1, seed=5)[0]
    state = env.reset(t)
    obs, done, _ = env.step(t, state, "hmm")
    assert "error" in obs and not done
    assert env.step(t, state, f"ANSWER {t.meta['target'] + 1}")[1:] == (True, 0.0)
    with pytest.raises(ValueError, match="finished"):
        env.step(t, state, "ANSWER 1")


def test_agent_reference_episode_is_what_the_env_answers():
    """SFT's agent transcripts (data/sft.py) use the tasks' reference episode: the same observations as
    the environment gives, and the episode ends where the environment ends it."""
    env = AgentEnv(sleep=False)
    for t in env.make_tasks(20, seed=2, split="sft"):
        state = env.reset(t)
        for turn, observation in agent_solution(t):
            assert env.step(t, state, turn)[:2] == (observation, observation is None)


def test_agent_turns_are_heavy_tailed_and_latency_seeded():
    env = AgentEnv(median_steps=2, max_steps=1000, latency_median_s=0.001, sleep=False)
    steps = sorted(len(t.meta["ops"]) for t in env.make_tasks(2000, seed=0))
    p50, p99 = steps[len(steps) // 2], steps[int(0.99 * len(steps))]
    assert 6 <= p99 / p50 <= 16  # p99/p50 ≈ 10 (integer rounding at a median of 2)
    t = env.make_tasks(1, seed=0)[0]
    # seeded: another env with the same settings, on the same task rebuilt from its seed, waits the same time
    other = AgentEnv(median_steps=2, max_steps=1000, latency_median_s=0.001, sleep=False)
    t2 = other.make_tasks(1, seed=0)[0]
    assert t2.task_id == t.task_id and t2 is not t
    assert other.latency(t2, 1) == env.latency(t, 1) > 0
    # ... and a draw per (task, turn): other turns and other tasks wait other times
    turns = [env.latency(t, k) for k in range(1, 51)]
    assert len(set(turns)) == len(turns)
    lats = sorted(env.latency(u, 1) for u in env.make_tasks(2000, seed=1))
    assert len(set(lats)) == len(lats)
    l50, l99 = lats[len(lats) // 2], lats[int(0.99 * len(lats))]
    assert 0.0008 <= l50 <= 0.00125 and 6 <= l99 / l50 <= 16  # lognormal: median latency_median_s, p99/p50 ≈ 10
    assert AgentEnv().latency(t, 1) == 0.0


def test_lognormal_lengths_ratio():
    xs = sorted(lognormal_lengths(20000, seed=0, median=100))
    p50, p99 = xs[len(xs) // 2], xs[int(0.99 * len(xs))]
    assert 8.5 < p99 / p50 < 11.5 and abs(statistics.median(xs) - 100) < 5
    assert lognormal_lengths(5, 1, 50) == lognormal_lengths(5, 1, 50)
    assert max(lognormal_lengths(1000, 0, 50, hi=80)) == 80
