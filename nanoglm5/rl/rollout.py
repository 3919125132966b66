"""Rollout: whole GRPO groups, token-in-token-out, and the worker process that generates them.

Holds, top to bottom (a worker reads its settings from the run's `RLConfig`: group size G, lengths,
weight-pickup policy, threads):
  - seeds: every sample's sampling seed is a pure function of (seed, group_id, sample, turn), so a group
    comes out the same whichever worker generates it, and again when a killed worker's group is re-issued;
  - `Rollout`: the generation loop of one worker, usable in-process too (evaluation, the synchronous
    reference of the tests). It decodes up to `worker_groups` groups together in one `Engine`
    (continuous batching), records per token the sampled id, its log-prob under the distribution
    actually sampled (softmax(logits / T), no top-k/top-p: the behaviour policy μ of the IS ratios is
    exact, and the learner's π_θ is the same tempered distribution),
    the loss-mask bit and the weight version of each segment, and runs the judge (`env.reward`, which
    for code runs the program in the sandbox) and multi-turn `AgentEnv.step`s in a thread pool, so a
    slow environment (its latency) never stalls the decoding of the other sequences;
  - `worker_main`: the process body: pull weights from the relay, take leases, generate, send groups,
    renew leases (heartbeats), and pull newer weights between groups or mid-trajectory; it talks to the
    controller in the dataclasses of messages.py.

TITO (GLM-5 §4.1.2): the trajectory is the list of ids the engine sampled, prompt first; observations
are appended as tokens of the chat template's `<|observation|>` turn (loss mask 0) followed by the
`<|assistant|>` generation prompt (mask 0). Text is decoded only to show the environment what the model
wrote; it is never re-encoded into the trajectory. Template pieces appended mid-trajectory are rendered
without the conversation prefix (`Tokenizer.prefix_ids`, `[gMASK]<sop>`). A turn's stop token
(`<|observation|>`, `<|user|>` or `<|endoftext|>`) was sampled, so it is trained (mask 1), as in SFT's
render_chat.

Prefill (issue 20 item 6): each turn's request is the whole conversation so far, but the engine's prefix cache
(block_manager.py) holds the keys of every full block the previous turn computed, so a turn prefills only its
new tokens (the observation, the generation prompt, and the tail of the last partial block); the G samples of
a group share their prompt's blocks, so the prompt is prefilled once per group. `Rollout.engine.stats()` counts
prefill tokens computed and the hit rate (bench/prefix.py measures them against `prefix_caching=False`). New
weights drop the cache: a turn after a weight pickup reads no key the older policy wrote.

Weight pickup: `partial_rollout=False` (slime, GLM's RL framework): the engine's weights change only when
it is empty; a lease whose min_version is newer than the loaded weights waits until the running groups drain.
`partial_rollout=True` (AReaL/Laminar): every `pull_every` decode steps the worker polls the relay and
swaps weights under running sequences, whose KV cache stays as the old weights wrote it; each sequence
then records a new segment (start index, version), GLM-5's w₀…w_k (arXiv 2602.15763 §4.1).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
import traceback
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from nanoglm5.data.tasks import Task
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.engine import Engine, SamplingParams
from nanoglm5.precision import cast_model
from nanoglm5.rl.buffer import Group, Lease, Trajectory
from nanoglm5.rl.envs import EnvCrash, make_env
from nanoglm5.rl.learner import build_policy
from nanoglm5.rl.messages import Assign, GroupDone, Heartbeat, Hello, Stop, WorkerFailed, WorkerStats
from nanoglm5.rl.rl_config import RLConfig


def sample_seed(seed: int, group_id: int, index: int, turn: int = 0) -> int:
    """Sampling seed of sample `index`, turn `turn` of group `group_id`: independent of worker and attempt."""
    h = hashlib.blake2b(f"{seed}:{group_id}:{index}:{turn}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


def make_envs(cfg: RLConfig) -> dict:
    """One instance per environment name; the agent env gets the latency knob, code_mt its turns."""
    return {
        "math": make_env("math"),
        "code": make_env("code", allow_unsandboxed=cfg.allow_unsandboxed),
        "code_mt": make_env("code_mt", max_turns=cfg.max_turns, turn_discount=cfg.turn_discount,
                            allow_unsandboxed=cfg.allow_unsandboxed),
        "agent": make_env("agent", latency_median_s=cfg.env_latency_s),
    }


# ---------------------------------------------------------------------------------------------- the loop
@dataclass(eq=False)
class _Sample:
    """One trajectory being built. `turn_start` = index of the current assistant turn's first token."""

    group: _GroupRun
    index: int
    tokens: list[int]
    logprobs: list[float]
    mask: list[int]
    versions: list[tuple[int, int]]
    turn: int = 0
    turn_start: int = 0
    state: dict | None = None
    reward: float | None = None
    finish: str = ""
    env_s: float = 0.0
    judging: bool = False  # fully generated; only the final judge call is outstanding
    sandboxed: bool | None = None  # the code judge ran the program inside bubblewrap (None: no program ran)
    env_error: str = ""  # the environment failed on this sample (envs.EnvCrash): no reward signal, filtered out


@dataclass(eq=False)
class _GroupRun:
    lease: Lease
    task: Task
    samples: list[_Sample] = field(default_factory=list)
    t_start: float = 0.0


class Rollout:
    """Generate GRPO groups with one engine. `start(lease, task)`, then `step()` until `busy()` is False;
    each `step()` returns the `Group`s that finished. `set_version(v)` after loading new weights.
    Reads from `cfg`: group_size, max_new_tokens, max_len, temperature, worker_groups, seed, env_threads,
    env_latency_s (the worker loop also reads partial_rollout, pull_every, worker_threads, renew_every_s)."""

    def __init__(self, model, tokenizer, cfg: RLConfig, version: int = 0, envs: dict | None = None,
                 greedy: bool = False, prefix_caching: bool = True, block_size: int = 16):
        c = self.cfg = cfg
        self.tok, self.version, self.greedy = tokenizer, version, greedy
        max_batch = max(1, c.worker_groups) * c.group_size
        self.engine = Engine(model, max_batch=max_batch, max_tokens_in_flight=max_batch * c.max_len,
                             max_seq_len=c.max_len, prefix_caching=prefix_caching, block_size=block_size)
        self.envs = envs or make_envs(c)
        self.pool = ThreadPoolExecutor(max(1, c.env_threads), thread_name_prefix="env")
        self.groups: dict[int, _GroupRun] = {}
        self.requests: dict[str, _Sample] = {}
        self.pending: list[tuple] = []  # (future, sample, kind)
        self.stop_ids = list(tokenizer.stop_ids)
        obs = tokenizer.special["<|observation|>"]
        self.obs_id = obs
        self.n_prefix = len(tokenizer.prefix_ids)  # [gMASK]<sop>: opens a conversation, not a turn
        self.gen_prompt = tokenizer.render_chat([], add_generation_prompt=True)[0][self.n_prefix:]  # <|assistant|> \n
        self.tokens_generated = 0

    # -- bookkeeping -------------------------------------------------------------------------------
    def busy(self) -> bool:
        return bool(self.groups)

    def decoding(self) -> int:
        """Groups that may still need the engine. A group whose samples only wait for their final judge
        call (a slow test suite, a remote grader) frees its decode slot and keeps no weights pinned:
        the engine starts the next group meanwhile, instead of idling for the judge."""
        return sum(not all(s.reward is not None or s.judging for s in g.samples) for g in self.groups.values())

    def has_room(self) -> bool:
        """Room in the decode batch (worker_groups·G sequences) for one more group, counted in sequences: a group
        whose episodes mostly ended (passed at the first attempt) leaves their slots to the next group instead of
        holding them until its last revision ends (continuous batching across groups). A sequence between turns
        (its observation being computed) keeps its slot. With worker_groups = 1 this is `not decoding()`."""
        live = sum(s.reward is None and not s.judging for g in self.groups.values() for s in g.samples)
        return live + self.cfg.group_size <= max(1, self.cfg.worker_groups) * self.cfg.group_size

    def held(self) -> list[tuple[int, int]]:
        return [(g.lease.group_id, g.lease.attempt) for g in self.groups.values()]

    def set_version(self, version: int) -> None:
        """New weights are in the model: every unfinished sample starts a new segment here."""
        if version == self.version:
            return
        self.version = version
        for g in self.groups.values():
            for smp in g.samples:
                if smp.reward is None and not smp.judging:
                    if smp.versions[-1][0] == len(smp.tokens):
                        smp.versions[-1] = (len(smp.tokens), version)
                    else:
                        smp.versions.append((len(smp.tokens), version))

    # -- starting and continuing turns -------------------------------------------------------------
    def start(self, lease: Lease, task: Task) -> None:
        prompt = self.tok.render_prompt(task.messages)
        if len(prompt) >= self.cfg.max_len:
            raise ValueError(f"task {task.task_id}: prompt of {len(prompt)} tokens does not fit max_len="
                             f"{self.cfg.max_len}; raise --max-len")
        g = _GroupRun(lease, task, t_start=time.time())
        env = self.envs[task.env]
        for i in range(self.cfg.group_size):
            smp = _Sample(g, i, list(prompt), [0.0] * len(prompt), [0] * len(prompt), [(0, self.version)],
                          turn_start=len(prompt))
            if hasattr(env, "reset"):
                smp.state = env.reset(task)
            g.samples.append(smp)
        self.groups[lease.group_id] = g
        for smp in g.samples:
            self._add_turn(smp)

    def _add_turn(self, smp: _Sample) -> None:
        g, c = smp.group, self.cfg
        forced = g.task.meta.get("forced_len")  # benchmark workload: decode exactly this many tokens
        room = c.max_len - len(smp.tokens)
        n = min(forced if forced else c.max_new_tokens, room)
        if n < 1:
            self._finish(smp, 0.0, "max_len")
            return
        smp.turn_start = len(smp.tokens)
        params = SamplingParams(
            max_tokens=n, temperature=0.0 if self.greedy else c.temperature, top_p=1.0, top_k=0,
            seed=sample_seed(c.seed, g.lease.group_id, smp.index, smp.turn),
            stop_token_ids=() if forced else self.stop_ids,
        )
        rid = f"{g.lease.group_id}:{g.lease.attempt}:{smp.index}:{smp.turn}"
        self.engine.add_request(smp.tokens, params, request_id=rid)
        self.requests[rid] = smp

    def _end_turn(self, smp: _Sample) -> None:
        """The engine finished a turn: ask the judge / environment, off the decoding thread."""
        new = smp.tokens[smp.turn_start:]
        if new and new[-1] in self.stop_ids:
            new = new[:-1]
        text = self.tok.decode(new)  # shown to the environment only; never re-encoded
        task, env = smp.group.task, self.envs[smp.group.task.env]
        if hasattr(env, "step"):  # multi-turn (agent, code_mt): the environment answers or ends the episode
            fut = self.pool.submit(_timed, env.step, task, smp.state, text)
            self.pending.append((fut, smp, "step"))
        else:
            fut = self.pool.submit(_timed, _judge, env, task, text, task.meta.get("judge_latency_s", 0.0))
            self.pending.append((fut, smp, "reward"))
            smp.judging = True

    def _observe(self, smp: _Sample, obs: str) -> None:
        """Append the observation turn and the next generation prompt (mask 0), then continue."""
        ids = self.tok.render_chat([{"role": "observation", "content": obs}])[0][self.n_prefix:]  # <|observation|> \n obs
        if smp.tokens[-1] == self.obs_id:  # the model already closed its turn with <|observation|>
            ids = ids[1:]
        ids = ids + self.gen_prompt
        if len(smp.tokens) + len(ids) >= self.cfg.max_len:  # no room for another turn
            self._finish(smp, 0.0, "max_len")
            return
        smp.tokens += ids
        smp.logprobs += [0.0] * len(ids)
        smp.mask += [0] * len(ids)
        smp.turn += 1
        self._add_turn(smp)

    def _finish(self, smp: _Sample, reward: float, why: str) -> None:
        smp.reward, smp.finish = float(reward), why

    # -- one step ----------------------------------------------------------------------------------
    def step(self, wait_s: float = 0.005) -> list[Group]:
        """One engine step (or, with nothing to decode, a short wait for the environment); returns the
        groups that completed."""
        if self.engine.has_unfinished():
            for ev in self.engine.step():
                smp = self.requests[ev.request_id]
                smp.tokens.append(ev.token_id)
                smp.logprobs.append(ev.logprob)
                smp.mask.append(1)
                self.tokens_generated += 1
                if ev.completion is not None:
                    del self.requests[ev.request_id]
                    self._end_turn(smp)
        elif self.pending:
            _wait_any([f for f, _, _ in self.pending], wait_s)
        still = []
        for fut, smp, kind in self.pending:
            if not fut.done():
                still.append((fut, smp, kind))
                continue
            try:
                result, dt = fut.result()  # any other exception in a judge is a bug: let it surface
            except EnvCrash as e:  # the environment failed, not the policy: marked, filtered by the controller
                smp.env_error, smp.judging = str(e), False
                self._finish(smp, 0.0, "env_error")
                continue
            smp.env_s += dt
            if kind == "reward":
                reward, smp.sandboxed = result
                self._finish(smp, reward, "done")
            else:
                obs, done, reward = result
                if smp.state is not None and smp.state.get("sandboxed") is not None:
                    smp.sandboxed = smp.state["sandboxed"]
                if done:
                    self._finish(smp, reward, "done")
                elif len(smp.tokens) + 1 >= self.cfg.max_len:
                    self._finish(smp, 0.0, "max_len")
                else:
                    self._observe(smp, obs)
        self.pending = still
        return self._collect()

    def _collect(self) -> list[Group]:
        out = []
        for gid in [gid for gid, g in self.groups.items() if all(s.reward is not None for s in g.samples)]:
            g = self.groups.pop(gid)
            trajs = [Trajectory(s.tokens, s.logprobs, s.mask, s.reward, s.versions,
                                meta={"turns": s.turn + 1, "env_s": round(s.env_s, 4), "finish": s.finish,
                                      "sandboxed": s.sandboxed,
                                      "gen_s": round(time.time() - g.t_start, 4),
                                      **({"env_error": s.env_error} if s.env_error else {})},
                                env_error=bool(s.env_error))
                     for s in g.samples]
            out.append(Group(gid, g.lease.attempt, trajs, g.task.task_id))
        return out

    def run(self, leases_tasks: list[tuple[Lease, Task]]) -> list[Group]:
        """Generate the given groups to completion (in-process use); groups in the given order."""
        todo, done = deque(leases_tasks), {}
        while todo or self.busy():
            while todo and self.decoding() < max(1, self.cfg.worker_groups):
                self.start(*todo.popleft())
            for g in self.step():
                done[g.group_id] = g
        return [done[lease.group_id] for lease, _ in leases_tasks]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _judge(env, task: Task, text: str, latency_s: float) -> tuple[float, bool | None]:
    """(reward, sandboxed): whether the program the reward came from ran inside bubblewrap (None when the
    environment runs no program)."""
    if latency_s > 0:  # benchmark workload: a judge that takes this long (a test suite, a remote grader)
        time.sleep(latency_s)
    if hasattr(env, "judge"):
        reward, details = env.judge(task, text)
        return reward, details.get("sandboxed")
    return env.reward(task, text), None


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def _wait_any(futures, timeout: float) -> None:
    wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)


# ---------------------------------------------------------------------------------------------- process
class _Sender:
    """Sends messages from a background thread, so a full pipe never stalls decoding."""

    def __init__(self, conn):
        self.conn, self.q = conn, queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            msg = self.q.get()
            if msg is None:
                return
            try:
                self.conn.send(msg)
            except (BrokenPipeError, OSError):
                return

    def send(self, msg) -> None:
        self.q.put(msg)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=5)


def worker_main(wid: int, cfg: dict, model_config: dict, tokenizer_file: str, relay, lease_conn, out_conn,
                t0: float) -> None:
    """Body of a rollout worker (a process of the mp transport, a thread in a Ray actor) with the run's RLConfig
    as a dict.

    Inbox (lease_conn: poll(timeout), recv()): Assign or Stop. Outbox (out_conn: send(msg)): Hello, then
    Heartbeat and GroupDone (each with the WorkerStats since the previous report), or WorkerFailed
    (messages.py). Weights (relay: latest_version(), pull(model, min_version=...)): the WeightRelay, or
    ray_transport.ObjectStoreWeights.
    """
    sender = _Sender(out_conn)
    try:
        _worker_loop(wid, RLConfig(**cfg), model_config, tokenizer_file, relay, lease_conn, sender, t0)
    except (EOFError, BrokenPipeError):  # the controller is gone
        pass
    except Exception:
        sender.send(WorkerFailed(wid, traceback.format_exc()))
    finally:
        sender.close()


def _worker_loop(wid, cfg: RLConfig, model_config, tokenizer_file, relay, lease_conn, sender, t0):
    torch.set_num_threads(cfg.worker_threads)
    torch.manual_seed(0)
    model = build_policy(model_config)  # the learner's modules (QAT ones for a QAT policy)
    if cfg.device == "cuda":  # a bf16 copy on the GPU (shared with the learner); pulls copy into it in place
        model = cast_model(model, "cuda", torch.bfloat16)  # routers and QAT masters stay fp32, as the learner's
    version = relay.pull(model)
    ro = Rollout(model, Tokenizer.load(tokenizer_file), cfg, version)
    sender.send(Hello(wid, version, os.getpid()))
    queued: deque = deque()
    busy: list[list[float]] = []  # [start, end] seconds since t0 with work in the engine or the env
    pulls, steps_since_poll, last_renew = 0, 0, time.time()

    def stats() -> WorkerStats:
        """Busy intervals since the last report (an open one is cut at now and reopened)."""
        nonlocal busy
        now, was_open = time.time() - t0, bool(busy) and busy[-1][1] is None
        if was_open:
            busy[-1][1] = now
        out = WorkerStats(busy, ro.tokens_generated, pulls, ro.version)
        busy = [[now, None]] if was_open else []
        return out

    def pull(min_version=None):
        nonlocal pulls
        v = relay.pull(model, min_version=min_version)
        pulls += 1
        ro.set_version(v)

    while True:
        while lease_conn.poll():
            match lease_conn.recv():
                case Stop():
                    return
                case Assign(lease, task):
                    queued.append((lease, task))
        # weights: freshest version allowed by the pickup policy (the relay never makes the trainer wait)
        if relay.latest_version() > ro.version:
            if not ro.decoding() or (cfg.partial_rollout and steps_since_poll >= cfg.pull_every):
                pull()
                steps_since_poll = 0
        # start queued leases while there is room and our weights are fresh enough for them
        while queued and ro.has_room():
            lease, task = queued[0]
            if ro.version < lease.min_version:
                if ro.decoding() and not cfg.partial_rollout:
                    break  # drain the running groups first, then swap (between-groups pickup)
                pull(min_version=lease.min_version)
            queued.popleft()
            ro.start(lease, task)
        now = time.time() - t0
        if ro.busy():
            if not busy or busy[-1][1] is not None:
                busy.append([now, None])
            for g in ro.step():
                sender.send(GroupDone(wid, g, stats()))
            steps_since_poll += 1
        else:
            if busy and busy[-1][1] is None:
                busy[-1][1] = now
            lease_conn.poll(0.005)
        if time.time() - last_renew > cfg.renew_every_s:
            last_renew = time.time()
            held = ro.held() + [(lease.group_id, lease.attempt) for lease, _ in queued]
            sender.send(Heartbeat(wid, held, stats()))
