"""The RL system end to end: TITO log-probs (GLM-5 arXiv 2602.15763 §4.1.2), η=0 ≡ the synchronous reference,
a SIGKILLed worker loses and duplicates nothing, --resume restores model, optimizer, buffer and leases.

A tiny random model and a small BPE stand in for the SFT checkpoint (bench.toy.toy_checkpoint). Its rewards are
all 0, so every advantage is 0 and an update moves nothing: the tests that claim bit-equal training use the coin
checkpoint instead (that model taught to answer 0 or 1 at random, on math tasks whose answer is 0 or 1), whose groups
mix rewards 0 and 1, and first assert that the update moved the weights.
"""

import math
import os
import random
import time
from dataclasses import replace

import pytest
import torch
from test_rl_buffer import _group

from bench.toy import toy_checkpoint
from nanoglm5.checkpoint import load_hf, save_hf
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.rl.buffer import Lease, ReplayBuffer
from nanoglm5.rl.controller import Controller
from nanoglm5.rl.envs import make_env
from nanoglm5.rl.learner import Learner, attach_advantages, pad_trajectories, sequence_logprobs
from nanoglm5.rl.rl_config import RLConfig
from nanoglm5.rl.rollout import Rollout, sample_seed
from nanoglm5.rl.task_source import TaskSource
from nanoglm5.training.state import load_trainer_state


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(toy_checkpoint(tmp_path_factory.mktemp("rl") / "init"))


@pytest.fixture(scope="module")
def coin(tmp_path_factory):
    return str(coin_checkpoint(tmp_path_factory.mktemp("coin")))


def coin_checkpoint(path, steps: int = 20):
    """The toy checkpoint after a few SFT steps on math prompts answered "0" or "1" at random (seeded): a policy that
    guesses, so a group on a task whose answer is 0 or 1 (CoinTasks) gets rewards 0 and 1, non-zero advantages."""
    init = toy_checkpoint(path / "random")
    model, tok = load_hf(init).train(), Tokenizer.load(init)
    tasks, rng = make_env("math").make_tasks(64, 1, "train"), random.Random(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        rows = [tok.render_chat(t.messages + [{"role": "assistant", "content": str(rng.randint(0, 1))}])
                for t in rng.sample(tasks, 16)]
        T = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([i + [tok.eos_id] * (T - len(i)) for i, _ in rows])  # (16, T)
        targets = torch.tensor([[x if keep else -1 for x, keep in zip(i[1:], m[1:])] + [-1] * (T - len(i) + 1)
                                for i, m in rows])  # loss on the answer and its end token only
        opt.zero_grad()
        model(ids, targets).lm_loss.backward()
        opt.step()
    return save_hf(model.eval(), path / "coin", tokenizer=tok)


class CoinTasks:
    """The run's TaskSource with every math task swapped for one whose answer is 0 or 1 (code and agent tasks kept)."""

    def __init__(self, inner):
        self.inner = inner
        self.pool = [t for t in make_env("math").make_tasks(1000, 0, "train") if t.answer in ("0", "1")]

    def __call__(self, gid):
        task = self.inner(gid)
        return self.pool[gid % len(self.pool)] if task.env == "math" else task

    def __getattr__(self, name):  # length_hint, eval_tasks: the run's own
        return getattr(self.inner, name)


def coin_controller(cfg) -> Controller:
    ctl = Controller(cfg, quiet=True)
    ctl.tasks = CoinTasks(ctl.tasks)
    return ctl


def assert_training_moved(ctl, what: str) -> None:
    """What makes "bit-equal training" a check: some step had a non-zero gradient (it is exactly 0 when every
    advantage is 0) and the weights left the checkpoint's."""
    assert any(h["grad_norm"] > 0 for h in ctl.history), f"{what}: every gradient was 0 (all advantages 0)"
    init = load_hf(ctl.cfg.checkpoint).state_dict()
    moved = [k for k, v in ctl.model.state_dict().items() if not torch.equal(v, init[k])]
    assert {"embed_tokens.weight", "lm_head.weight"} <= set(moved), f"{what}: only {moved} moved from the checkpoint"


def _cfg(ckpt, out, **kw):
    base = dict(checkpoint=ckpt, out_dir=str(out), env="mix", workers=2, worker_groups=1, group_size=4,
                groups_per_step=2, max_steps=3, max_new_tokens=12, max_len=128, n_eval_tasks=0, n_train_tasks=50,
                lr=3e-3, plot=False, progress=False, lease_timeout_s=20.0, renew_every_s=0.5)
    return RLConfig(**{**base, **kw})


def test_sample_seed_is_a_function_of_group_not_worker():
    assert sample_seed(1, 5, 0) == sample_seed(1, 5, 0) != sample_seed(1, 5, 1) != sample_seed(1, 6, 0)


def test_buffer_fail_requeues_at_once_and_gives_up_after_max_failures():
    """ReplayBuffer.fail (a dead worker's lease): re-queued now, not at its deadline; the max_failures-th failure
    completes the group empty, so FIFO moves on (the batch is one group smaller) and it is never trained."""
    buf = ReplayBuffer(groups_per_step=2, max_staleness=0, lease_timeout_s=600)
    a, b = buf.admit(0), buf.admit(0)
    assert buf.fail(a.group_id, a.attempt, max_failures=2) == "requeued" and buf.requeue == [0]
    assert buf.fail(a.group_id, a.attempt, max_failures=2) is None  # that lease is gone already
    a2 = buf.admit(0)
    assert (a2.group_id, a2.attempt) == (0, 1)
    sd = buf.state_dict()
    assert sd["failures"] == {"0": 1}
    assert buf.fail(a2.group_id, a2.attempt, max_failures=2, task_id="t0") == "dropped"
    assert buf.complete(_group(b))
    batch = buf.take_batch(None, 0)
    assert [g.group_id for g in batch] == [1] and buf.trained == {0, 1}
    assert buf.counters["failed_groups"] == 1 and buf.counters["requeued_dead"] == 1 and not buf.failures
    buf2 = ReplayBuffer(groups_per_step=2, max_staleness=0)
    buf2.load_state_dict(sd)
    assert buf2.failures == {0: 1} and buf2.requeue == [0, 1]


def test_time_budget_stops_the_trainer_even_with_a_batch_ready(ckpt, tmp_path):
    """Async keeps the buffer full, so the deadline must be checked before taking a ready batch (it once
    was checked only while waiting, and the speedrun's async stage overran its --time-budget-s)."""
    ctl = Controller(_cfg(ckpt, tmp_path / "run", groups_per_step=2), quiet=True)  # workers never started
    for _ in range(2):
        ctl.buffer.complete(_group(ctl.buffer.admit(0)))
    assert ctl._wait_batch(deadline=time.time() - 1) is None
    assert len(ctl._wait_batch(deadline=time.time() + 5)) == 2


def test_group_waiting_on_its_judge_frees_its_decode_slot(ckpt):
    """A group whose samples only wait for a slow judge no longer counts against worker_groups: the next
    group decodes meanwhile (the async stall that bench/rl_throughput.py measured), and weights swapped
    then open no segment in the judged samples."""
    model, tok = load_hf(ckpt).eval(), Tokenizer.load(ckpt)
    s = RLConfig(group_size=2, max_new_tokens=4, max_len=128, worker_groups=1)
    src = TaskSource(_cfg(ckpt, "unused", env="math", judge_latency_s=2.0))
    ro = Rollout(model, tok, s)
    try:
        ro.start(Lease(0, 0, math.inf, 0), src(0))
        while ro.decoding():
            assert not ro.step()  # the judge sleeps 2 s: nothing finishes while A decodes its 4 tokens
        assert ro.busy() and ro.decoding() == 0  # A is being judged
        ro.set_version(1)
        assert all(smp.versions == [(0, 0)] for smp in ro.groups[0].samples)
        ro.start(Lease(1, 0, math.inf, 1), src(1))
        n = ro.tokens_generated
        for _ in range(3):
            ro.step()
        assert ro.tokens_generated > n and ro.decoding() == 1
        assert all(smp.reward is None for smp in ro.groups[0].samples)  # B decoded while A's judge ran
    finally:
        ro.close()


# Trainer vs worker log-probs for the same weights: the KV-cache decode and the full forward are the same float32
# math in another order, so they agree to rounding (measured: every token within 5e-7). 1e-5 is that with room; a
# learner that ignores the temperature is off by ~0.2 at T = 0.7, a different DSA key choice by far more than 1e-5.
LOGPROB_TOL = 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("topk,temperature", [(512, 1.0), (16, 1.0), (16, 0.7)])
def test_tito_trainer_logprobs_equal_worker_logprobs(tmp_path, topk, temperature):
    """Same weights: the trainer's log π on the sampled ids equals the worker's log μ on EVERY loss token (IS ratio
    1), multi-turn observations are masked, and nothing is re-tokenized (re-encoding decoded text would change the
    ids). topk=512: DSA selects everything at these lengths; topk=16: real sparse selection, ties broken by position
    on both sides. temperature 0.7: the worker samples from softmax(logits / T) and records its log-probs; the
    learner takes log-probs of the same tempered distribution (sequence_logprobs(..., temperature))."""
    ckpt = str(toy_checkpoint(tmp_path / "ck", index_topk=topk))
    torch.manual_seed(0)
    model, tok = load_hf(ckpt).eval(), Tokenizer.load(ckpt)
    s = RLConfig(group_size=4, max_new_tokens=10, max_len=160, worker_groups=2, temperature=temperature)
    cfg = _cfg(ckpt, "unused", env="agent")
    agent = TaskSource(cfg)(0)
    math_task = TaskSource(replace(cfg, env="math"))(0)
    ro = Rollout(model, tok, s)
    groups = ro.run([(Lease(0, 0, math.inf, 0), math_task), (Lease(1, 0, math.inf, 0), agent)])
    ro.close()
    trajs = [t for g in groups for t in g.trajectories]
    prompt = tok.render_prompt(math_task.messages)
    assert all(t.tokens[: len(prompt)] == prompt and not any(t.loss_mask[: len(prompt)]) for t in groups[0].trajectories)
    obs_id = tok.special["<|observation|>"]
    multi = [t for t in groups[1].trajectories if t.meta["turns"] > 1]
    for t in multi:  # observation turns: the role token (unless sampled), content and generation prompt are mask 0
        assert 0 in t.loss_mask[len(tok.render_prompt(agent.messages)):] and obs_id in t.tokens
    ids, lp_mu, mask = pad_trajectories(trajs)
    with torch.no_grad():
        lp = sequence_logprobs(model, ids, temperature)
    m = mask[:, 1:].bool()
    assert m.sum() > 20
    diff = (lp - lp_mu[:, 1:])[m].abs()
    bad = int((diff > LOGPROB_TOL).sum())
    assert bad == 0, f"{bad} of {int(m.sum())} tokens differ by more than {LOGPROB_TOL:g} (max {diff.max().item():.2e})"
    assert any(tok.encode(tok.decode(t.tokens)) != t.tokens for t in trajs), "re-tokenization should not round-trip"


def _reference_sync(cfg: RLConfig, steps: int):
    """The synchronous loop in one process: generate B groups with version v, train, repeat."""
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    model, tok = load_hf(cfg.checkpoint).eval(), Tokenizer.load(cfg.checkpoint)
    learner, tasks = Learner(model, cfg), CoinTasks(TaskSource(cfg))
    B, losses, advantages = cfg.groups_per_step, [], []
    for v in range(steps):
        ro = Rollout(model, tok, cfg, version=v)
        groups = ro.run([(Lease(g, 0, math.inf, v), tasks(g)) for g in range(v * B, (v + 1) * B)])
        ro.close()
        for g in groups:
            attach_advantages(g, cfg.std_normalize)
            advantages += [t.advantage for t in g.trajectories]
        losses.append(learner.update(groups)["loss"])
        if cfg.reset_optimizer:  # GLM-5 §4.1, on by default: the controller clears it after each push
            learner.reset_optimizer()
    return model, losses, advantages


@pytest.mark.slow
def test_eta0_async_code_path_reproduces_synchronous_run(coin, tmp_path):
    cfg = _cfg(coin, tmp_path / "run", mode="async", max_staleness=0, max_steps=3)
    ctl = coin_controller(cfg)
    out = ctl.run()
    ref_model, ref_losses, ref_adv = _reference_sync(ctl.cfg, 3)
    assert sum(a != 0 for a in ref_adv) >= 4, f"the reference's advantages {ref_adv} should not all be 0"
    assert_training_moved(ctl, "η = 0 async")
    assert [h["group_ids"] for h in out["history"]] == [[0, 1], [2, 3], [4, 5]]
    assert all(list(h["staleness"]) == [0] for h in out["history"])  # η = 0: every token from the trained version
    assert [h["loss"] for h in out["history"]] == ref_losses
    for (k, a), b in zip(ctl.model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs from the synchronous reference"


def held_leases(ctl, timeout_s: float = 60.0) -> tuple[int, dict]:
    """(wid, {group_id: attempt}) of the live worker holding the most leases, once one holds any."""
    t = time.time()
    while time.time() - t < timeout_s:
        with ctl.lock:
            live = [w for w in ctl.workers.values() if not w.dead and w.pid and w.assigned]
            if live:
                w = max(live, key=lambda w: len(w.assigned))
                return w.wid, dict(w.assigned)
        time.sleep(0.01)
    raise AssertionError("no worker took a lease")


def requeued(ctl, held: dict) -> bool:
    """Every one of these leases is gone: re-queued, re-issued (a newer attempt), or its group finished."""
    with ctl.lock:
        b = ctl.buffer
        return all(g not in b.leases or b.leases[g].attempt != a for g, a in held.items())


def kill_busiest_then_finish(ctl, step_timeout_s: float) -> tuple[int, float]:
    """Start the run, kill the worker holding the most leases once one does, wait until its leases are re-queued
    (at most 10 s), train to max_steps, stop. Returns (killed wid, seconds until its leases were re-queued)."""
    ctl.start()
    try:
        ctl.train_one()  # workers are up and generating
        wid, held = held_leases(ctl)
        t = time.time()
        killed = ctl.kill_worker(wid)
        while not requeued(ctl, held):
            assert time.time() - t < 10, "the dead worker's leases were not re-queued"
            time.sleep(0.005)
        dt = time.time() - t
        while ctl.step < ctl.cfg.max_steps:
            assert ctl.train_one(deadline=time.time() + step_timeout_s) is not None, "stalled after the kill"
    finally:
        ctl.stop()
    print(f"leases {sorted(held)} of the killed worker re-queued after {dt:.3f}s (lease timeout 30s)")
    return killed, dt


@pytest.mark.slow
def test_sigkill_worker_mid_group_requeued_at_once_every_group_trained_once(ckpt, tmp_path):
    """A dead worker's leases come back as soon as its exit is seen (a control-loop turn), not after
    --lease-timeout-s (30 s here: FIFO mode would stall that long), and nothing is lost or trained twice."""
    cfg = _cfg(ckpt, tmp_path / "run", mode="async", max_staleness=2, max_steps=5, max_new_tokens=24,
               lease_timeout_s=30.0, worker_groups=1)
    ctl = Controller(cfg, quiet=True)
    killed, dt = kill_busiest_then_finish(ctl, step_timeout_s=40)
    assert dt < 2.0, f"re-queued after {dt:.1f}s: the death should be seen at once, not at the lease timeout"
    trained = [g for h in ctl.history for g in h["group_ids"]]
    assert sorted(trained) == list(range(cfg.max_steps * cfg.groups_per_step)), trained
    assert ctl.counters["worker_deaths"] == 1 and ctl.counters["respawned"] == 1
    assert ctl.buffer.counters["requeued_dead"] >= 1 and ctl.buffer.counters["reissued"] >= 1
    assert ctl.buffer.counters["expired"] == 0  # nothing waited for the lease timeout
    new = [w for w in ctl.workers.values() if w.wid != killed and not w.dead]
    assert len(new) == cfg.workers


class CrashingLatency(float):
    """A judge latency that ends the worker process when the judge reads it (`if latency_s > 0` in rollout._judge):
    a task that kills whichever worker runs it, as a judge that segfaults or exhausts memory would. It crosses to
    the spawned worker inside the task (pickled by reference to this module, which the worker imports)."""

    def __gt__(self, other):
        os._exit(13)


class PoisonedSource:
    """The run's TaskSource with one group's task replaced by a worker-killing one."""

    def __init__(self, inner, bad_gid: int):
        self.inner, self.bad_gid = inner, bad_gid

    def __call__(self, gid):
        task = self.inner(gid)
        if gid == self.bad_gid:
            task = replace(task, task_id="poison/" + task.task_id, meta={**task.meta, "judge_latency_s": CrashingLatency(0)})
        return task

    def length_hint(self, task):
        return self.inner.length_hint(task)


@pytest.mark.slow
def test_task_that_kills_its_worker_is_dropped_after_max_task_failures(ckpt, tmp_path, capsys):
    """Group 2's task kills every worker that judges it. After its first death it runs alone on a worker (so
    the next deaths are its own); at the third it is given up with a log line, never trained, and the run
    finishes with every other group trained once (today's alternative: respawning workers forever)."""
    cfg = _cfg(ckpt, tmp_path / "run", mode="async", max_staleness=1, max_steps=3, max_task_failures=3, env="math")
    ctl = Controller(cfg, quiet=False)
    ctl.tasks = PoisonedSource(ctl.tasks, bad_gid=2)
    ctl.start()
    try:
        while ctl.step < cfg.max_steps:
            assert ctl.train_one(deadline=time.time() + 120) is not None, "stalled"
    finally:
        ctl.stop()
    trained = [g for h in ctl.history for g in h["group_ids"]]
    assert sorted(trained) == [g for g in range(cfg.max_steps * cfg.groups_per_step) if g != 2], trained
    assert ctl.buffer.counters["failed_groups"] == 1
    assert ctl.counters["worker_deaths"] == 3 and ctl.counters["respawned"] == 3
    out = capsys.readouterr().out
    assert "group 2 (task poison/" in out and "given up" in out, out[-2000:]


@pytest.mark.slow
def test_resume_restores_model_and_optimizer_exactly(coin, tmp_path):
    """Sync: 2 steps + resume to 4 == 4 uninterrupted steps, bit for bit. (Next test, async: the checkpoint
    holds buffered groups / in-flight leases, and after resuming every group id is trained exactly once.)"""
    out = tmp_path / "a"
    coin_controller(_cfg(coin, out, mode="sync", max_steps=2)).run()
    ctl = coin_controller(_cfg(coin, out, mode="sync", max_steps=4, resume="auto"))
    saved_opt = load_trainer_state(out / "ckpt")["optimizers"]["main"]["optimizers"][0]["state"]
    live = ctl.learner.opt.optimizers[0].state_dict()["state"]
    assert all(torch.equal(saved_opt[k]["exp_avg"], live[k]["exp_avg"]) for k in saved_opt)
    ctl.run()
    full = coin_controller(_cfg(coin, tmp_path / "b", mode="sync", max_steps=4))
    full.run()
    assert_training_moved(full, "the uninterrupted run")
    for (k, a), b in zip(ctl.model.state_dict().items(), full.model.state_dict().values()):
        assert torch.equal(a, b), f"{k}: resumed run differs from the uninterrupted one"


@pytest.mark.slow
def test_resume_async_reissues_buffered_groups_and_leases(ckpt, tmp_path):
    out = tmp_path / "c"
    # stopped after 2 of 5 steps (as a killed run is), so the workers have run ahead: a run that reaches its
    # max_steps admits no group beyond them (ReplayBuffer.max_groups) and leaves nothing to resume
    first = Controller(_cfg(ckpt, out, mode="async", max_staleness=3, max_steps=5, worker_groups=2), quiet=True)
    first.start()
    try:
        while first.step < 2:
            assert first.train_one(deadline=time.time() + 120) is not None, "stalled"
        first.save()
    finally:
        first.stop()
    rl = load_trainer_state(out / "ckpt")["rl_state"]["buffer"]
    pending = len(rl["done"]) + len(rl["requeue"])
    assert pending > 0, "the async checkpoint should hold buffered groups or in-flight leases"
    second = Controller(_cfg(ckpt, out, mode="async", max_staleness=3, max_steps=5, worker_groups=2, resume="auto"),
                        quiet=True)
    assert len(second.buffer.done) + len(second.buffer.requeue) == pending
    second.run()
    trained = [g for h in second.history for g in h["group_ids"]]
    assert sorted(trained) == list(range(5 * 2))
