"""The multi-turn code environment (envs.MultiTurnCodeEnv) and GLM-5's async filters (rl/async_rules.py, arXiv
2602.15763 §4.1): a scripted policy feeds the environment its turns; hostile programs are wrong answers, not
environment crashes; observation tokens carry loss mask 0; τ-drop, the crash filter with its padding, and the
wasted-token accounting on constructed groups. Programs run in the real bubblewrap sandbox."""

import math
import re
import time

import pytest
import torch

from bench.toy import toy_checkpoint
from nanoglm5.checkpoint import load_hf
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.rl import envs as envs_mod
from nanoglm5.rl import forkserver
from nanoglm5.rl.async_rules import filter_crashed, generated_tokens, is_stale, tau_drop, wasted_tokens
from nanoglm5.rl.buffer import Group, Lease, ReplayBuffer, Trajectory
from nanoglm5.rl.envs import EnvCrash, MultiTurnCodeEnv, make_env
from nanoglm5.rl.rl_config import RLConfig
from nanoglm5.rl.rollout import Rollout, make_envs
from nanoglm5.rl.sandbox import bwrap_available

needs_bwrap = pytest.mark.skipif(not bwrap_available(), reason="bubblewrap cannot run here")


def _task(env, signature="f(x)"):
    """A train task with the given signature (the feedback tests name its calls)."""
    return next(t for t in env.make_tasks(40, seed=1) if t.meta["signature"] == signature)


def _episode(env, task, attempts):
    """Feed the env the scripted attempts until it ends the episode: [(observation, done, reward)]."""
    state, out = env.reset(task), []
    for a in attempts:
        out.append(env.step(task, state, a))
        if out[-1][1]:
            break
    return out, state


# ---------------------------------------------------------------------------------------------- the env
@needs_bwrap
def test_correct_program_scores_1_at_turn_1():
    env = MultiTurnCodeEnv(max_turns=3)
    t = _task(env)
    steps, state = _episode(env, t, [t.answer, "never asked"])
    assert steps == [(None, True, 1.0)] and state["solved_at"] == 1 and state["sandboxed"] is True


@needs_bwrap
def test_wrong_then_fixed_scores_1_at_turn_2_and_feedback_names_the_failing_call():
    env = MultiTurnCodeEnv(max_turns=3)
    t = _task(env)
    body = t.answer.split("return ", 1)[1]
    wrong = f"def f(x): return {body} + 1"
    steps, state = _episode(env, t, [wrong, t.answer])
    (obs, done, reward), last = steps
    args, want = t.meta["tests"][0]
    got = repr(eval(f"lambda x: {body} + 1")(*args))  # what the wrong program returns on the first test
    assert not done and reward == 0.0
    assert f"f({args[0]!r})" in obs and f"expected {want}" in obs and f"returned {got}" in obs, obs
    assert "0/5 tests passed" in obs
    assert last == (None, True, 1.0) and state["solved_at"] == 2


@needs_bwrap
def test_turn_discount_and_max_turns():
    t = _task(MultiTurnCodeEnv())
    steps, _ = _episode(MultiTurnCodeEnv(max_turns=3, turn_discount=0.5), t, ["0", "0", t.answer])
    assert [s[2] for s in steps] == [0.0, 0.0, 0.25] and steps[-1][1]
    steps, _ = _episode(MultiTurnCodeEnv(max_turns=3), t, ["0", "0", "0", t.answer])
    assert len(steps) == 3 and steps[-1] == (None, True, 0.0)  # the fourth attempt is never judged
    with pytest.raises(ValueError, match="turn_discount"):
        MultiTurnCodeEnv(turn_discount=0.0)
    with pytest.raises(ValueError, match="--max-turns"):
        RLConfig(max_turns=0).validate()


@needs_bwrap
def test_partial_pass_is_not_a_pass():
    env = MultiTurnCodeEnv(max_turns=2)
    t = _task(env)
    a0, want0 = t.meta["tests"][0]
    cheat = f"def f(x):\n    return {want0} if x == {a0[0]} else None"  # right on the first test only
    (obs, done, reward), = _episode(env, t, [cheat])[0][:1]
    assert reward == 0.0 and not done and "1/5 tests passed" in obs


@needs_bwrap
@pytest.mark.parametrize("program, says", [
    ("def f(x):\n    while True: pass", "Timed out"),  # an infinite loop: the program's timeout
    ("def f(x):\n    import os\n    while True:\n        os.fork()", "limit|Timed out|raised"),  # a fork bomb
    ("def f(x):\n    print('x' * 10**7)\n    return 0", "hit the output limit"),  # a flood of output
    ("def f(x):\n    x = bytearray(1 << 34)", "memory|MemoryError"),  # a memory bomb
    ("def f(x): return open('/etc/shadow').read()", "raised (PermissionError|FileNotFoundError)"),  # reading files
    ("def f(x): return 1 // 0", "raised ZeroDivisionError: integer division or modulo by zero"),  # a crash
    ("def f(x) return", "The program failed: SyntaxError"),
    ("def f(x):\n    import sys; sys.exit(0)", "exited before returning"),
])
def test_hostile_and_crashing_programs_are_wrong_answers_not_env_crashes(program, says):
    """Whatever a program does once it runs is the program's: reward 0 with feedback, never EnvCrash."""
    env = MultiTurnCodeEnv(max_turns=2, timeout_s=1.5)
    t = _task(env)
    (obs, done, reward), = _episode(env, t, [program])[0]
    assert reward == 0.0 and not done and re.search(says, obs), obs
    assert len(obs) <= env.feedback_chars


def test_env_crash_is_not_a_wrong_answer(monkeypatch):
    env = MultiTurnCodeEnv()
    t = _task(env)

    def broken(*a, **k):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(envs_mod, "run_calls", broken)
    with pytest.raises(EnvCrash, match="could not be launched"):
        env.step(t, env.reset(t), t.answer)
    with pytest.raises(EnvCrash):
        make_env("code").judge(t, t.answer)  # the single-turn judge draws the same line


@needs_bwrap
def test_judge_timeout_before_the_program_starts_is_an_env_crash(monkeypatch):
    """A timeout shorter than the sandbox's start-up (what a machine at load 16 does to a 2 s timeout on a
    cold start: no warm server, so a fresh bubblewrap + interpreter): the candidate never ran, so this is the
    environment's failure, even for a correct program."""
    monkeypatch.setattr(forkserver, "run", lambda *a: None)  # what a warm server that could not start gives
    env = MultiTurnCodeEnv(timeout_s=0.002)
    t = _task(env)
    with pytest.raises(EnvCrash, match="never ran the program"):
        env.step(t, env.reset(t), t.answer)


# ---------------------------------------------------------------------------------------------- rollout
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(toy_checkpoint(tmp_path_factory.mktemp("mt") / "init"))


def _rollout(ckpt, **kw):
    torch.manual_seed(0)
    cfg = RLConfig(env="code_mt", group_size=2, max_new_tokens=6, max_len=400, worker_groups=1, max_turns=3, **kw)
    model, tok = load_hf(ckpt).eval(), Tokenizer.load(ckpt)
    return Rollout(model, tok, cfg), tok, cfg


@needs_bwrap
def test_rollout_observation_tokens_have_loss_mask_0(ckpt):
    ro, tok, cfg = _rollout(ckpt)
    task = make_envs(cfg)["code_mt"].make_tasks(1, seed=0)[0]
    (g,) = ro.run([(Lease(0, 0, math.inf, 0), task)])
    ro.close()
    obs_id, prompt_len = tok.special["<|observation|>"], len(tok.render_prompt(task.messages))
    for t in g.trajectories:
        assert t.meta["turns"] == 3 and t.reward == 0.0 and not t.env_error  # a random model fails 3 times
        m = t.loss_mask
        # mask-0 runs after the prompt are the observation turns: the environment's feedback, never trained
        runs, i = [], prompt_len
        while i < len(m):
            if m[i] == 0:
                j = i
                while j < len(m) and m[j] == 0:
                    j += 1
                runs.append((i, j))
                i = j
            else:
                i += 1
        assert len(runs) == 2, runs  # two observations between three attempts
        for a, b in runs:
            assert all(lp == 0.0 for lp in t.logprobs[a:b])
            text = tok.decode([x for x in t.tokens[a:b] if x != obs_id])
            assert "passed" in text or "program" in text or "Timed out" in text, text
        assert sum(m) == sum(1 for x in m[prompt_len:] if x) > 0  # only sampled tokens are trained


def test_rollout_marks_env_crash_samples(ckpt, monkeypatch):
    def broken(*a, **k):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(envs_mod, "run_calls", broken)
    ro, _, cfg = _rollout(ckpt)
    task = make_envs(cfg)["code_mt"].make_tasks(1, seed=0)[0]
    (g,) = ro.run([(Lease(0, 0, math.inf, 0), task)])
    ro.close()
    assert all(t.env_error and t.meta["finish"] == "env_error" for t in g.trajectories)
    assert "Cannot allocate memory" in g.trajectories[0].meta["env_error"]
    assert filter_crashed(g) is None  # no valid sample: the group is dropped


# ---------------------------------------------------------------------------------------------- filters
def _traj(reward=1.0, versions=((0, 0),), n_loss=4, env_error=False, tag=0):
    mask = [0, 0] + [1] * n_loss
    return Trajectory([tag] * len(mask), [0.0, 0.0] + [-0.5] * n_loss, mask, reward, list(versions),
                      env_error=env_error)


def test_tau_drop_uses_the_oldest_segment():
    old_first = _traj(versions=((0, 1), (3, 4)))  # started at v1, finished at v4 (partial rollout)
    fresh = _traj(versions=((0, 3),))
    assert is_stale(old_first, trainer_version=4, tau=2) and not is_stale(fresh, 4, 2)
    assert not is_stale(old_first, 4, None) and not is_stale(old_first, 3, 2)
    kept, dropped = tau_drop([old_first, fresh], 4, 2)
    assert kept == [fresh] and dropped == [old_first]
    buf = ReplayBuffer(groups_per_step=1, max_staleness=5, drop_tau=2, order="ready")
    lease = buf.admit(0)
    buf.complete(Group(lease.group_id, lease.attempt, [old_first, fresh]))
    (g,) = buf.take_batch(1, trainer_version=4)
    assert g.trajectories == [fresh] and buf.counters["tau_dropped_tokens"] == old_first.n_loss_tokens


@pytest.mark.parametrize("G, crashed, kept", [(4, [1], True), (8, [0, 5, 6], True), (4, [0, 3], False),
                                              (8, [1, 2, 3, 4], False), (2, [1], False), (3, [], True)])
def test_crash_filter_pads_with_valid_repeats_or_drops(G, crashed, kept):
    g = Group(7, 0, [_traj(reward=float(i % 2), env_error=i in crashed, tag=i) for i in range(G)], "t7")
    out = filter_crashed(g)
    if not kept:
        assert out is None
        return
    assert len(out.trajectories) == G and not any(t.env_error for t in out.trajectories)
    valid = [i for i in range(G) if i not in crashed]
    tags = [t.tokens[0] for t in out.trajectories]
    assert tags == (valid + [valid[i % len(valid)] for i in range(len(crashed))])  # valid, then repeats in order
    assert sum(t.meta.get("padded", False) for t in out.trajectories) == len(crashed)
    assert generated_tokens(out.trajectories) == 4 * len(valid)  # the copies were never generated


def test_wasted_tokens_sum_every_cause():
    w = wasted_tokens(1000, late_discarded=10, tau_dropped=20, crash_removed=30, crash_dropped_groups=40,
                      untrained_at_end=50, in_flight_at_end=60)
    assert w["total"] == 210 and w["frac"] == pytest.approx(0.21)
    assert wasted_tokens(0)["frac"] == 0.0
    with pytest.raises(ValueError, match="tau_dropped"):
        wasted_tokens(10, tau_dropped=-1)


def test_controller_accounts_crashes_and_untrained_groups(ckpt, tmp_path):
    """_commit on constructed groups: a group with one crash is padded, one with most crashed is dropped, a third
    stays untrained; the controller's wasted-token count names each."""
    from nanoglm5.rl.controller import Controller, _Worker
    from nanoglm5.rl.messages import WorkerStats

    cfg = RLConfig(checkpoint=ckpt, out_dir=str(tmp_path), env="code", group_size=4, groups_per_step=1,
                   max_staleness=3, n_eval_tasks=0, n_train_tasks=10, plot=False, progress=False)
    ctl = Controller(cfg, quiet=True)
    ctl.t0 = time.time()  # (start() sets it; no workers are started here)
    w = ctl.workers[0] = _Worker(0, "short", pid=1)
    leases = [ctl.buffer.admit(0) for _ in range(3)]
    groups = [Group(lz.group_id, lz.attempt, [_traj(reward=float(i % 2), env_error=(i in crash), tag=i)
                                              for i in range(4)])
              for lz, crash in zip(leases, ([3], [0, 1, 2], []))]
    with ctl.lock:  # as the control thread holds it
        for g in groups:
            ctl._commit(w, g, WorkerStats([], 0, 0, 0))
    w.tokens = 3 * 16 + 8  # the worker also generated 8 tokens of a group that never came back
    assert [len(g.trajectories) for g in ctl._wait_batch(math.inf)] == [4]  # group 0, padded back to 4
    assert ctl._wait_batch(math.inf) == []  # group 1: dropped (1 of 4 valid), trained as nothing
    waste = ctl.wasted_tokens()
    assert waste == {"late_discarded": 0, "tau_dropped": 0, "crash_removed": 4, "crash_dropped_groups": 16,
                     "untrained_at_end": 16, "in_flight_at_end": 8, "total": 44, "generated": 56,
                     "frac": 44 / 56}
    assert ctl.counters["env_error_samples"] == 4 and ctl.counters["crash_dropped_groups"] == 1
    ctl.transport.close()


def test_glm5_async_rules_are_on_by_default():
    """τ-drop (τ = η unless set) and the optimizer reset after each push are the defaults (GLM-5 §4.1)."""
    c = RLConfig()
    assert c.reset_optimizer and c.resolved().drop_tau == c.max_staleness == 2
    assert RLConfig(mode="sync").resolved().drop_tau == 0
    assert RLConfig(max_staleness=4, order="ready").resolved().drop_tau == 4
    assert RLConfig(drop_tau=-1).resolved().drop_tau == -1 and RLConfig(drop_tau=1).resolved().drop_tau == 1
    with pytest.raises(ValueError, match="--drop-tau"):
        RLConfig(drop_tau=-3).resolved().validate()


@needs_bwrap
def test_a_feedback_task_is_solved_by_the_number_its_feedback_shows():
    env = MultiTurnCodeEnv(max_turns=3, feedback_frac=1.0)
    t = next(t for t in env.make_tasks(20, seed=3) if t.meta["signature"] == "f(x)")
    k, body = t.meta["hidden"], t.answer.split("return ", 1)[1]
    guess = body.replace(str(k), str(k + 5))  # the prompt alone: any constant but the hidden one
    steps, state = _episode(env, t, [f"def f(x): return {guess}", "then the number the observation ends with"])
    obs = steps[0][0]
    assert steps[0][1:] == (False, 0.0) and obs.endswith(f"expected {k}"), obs
    steps, state = _episode(env, t, [f"def f(x): return {guess}", body.replace(str(k), obs.rsplit(" ", 1)[1])])
    assert steps[-1] == (None, True, 1.0) and state["solved_at"] == 2
