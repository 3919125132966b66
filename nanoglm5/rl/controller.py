"""The RL controller: leases, the replay buffer, the trainer loop, failures, checkpoints — on either transport.

One `Controller` runs a whole `rl.py` job, sync or async on the same code (--mode sync = η 0), with one logic
for both backends (--backend mp: worker processes on this machine; --backend ray: Ray actors):

  trainer thread    waits for a batch (`ReplayBuffer.take_batch`, group-id order), takes push_every optimizer
                    steps on it (the learner: in this process with mp, an actor with ray), publishes the new
                    weights (never waits for a worker), bumps the version.
  control thread    GLM-5's orchestrator (arXiv 2602.15763 §4.1) / the Data Buffer of slime (GLM's RL framework)
                    in miniature: reads worker messages, commits groups (idempotent by group_id), renews leases
                    on heartbeats, expires stuck ones, re-queues a dead worker's leases at once, respawns dead
                    workers, admits new groups while submitted ≤ (η + v + 1)·B, and hands leases out. Its few
                    dictionary updates per message keep leases flowing while the trainer computes.
  W rollout workers `rollout.worker_main`: a model copy each, generating whole GRPO groups with the engine; they
                    get the run's RLConfig and talk in the dataclasses of messages.py.
Everything that moves between them is the transport's (transport.py: the interface and the processes;
ray_transport.py: the actors): start a worker, messages both ways, alive or not, kill, publish weights, stop.

Faults: a dead worker is seen within a control-loop turn; its leases are re-queued at once (the lease timeout
is for workers alive but stuck), each group charged one failure and run alone from then on, so that a later
death is its own; at --max-task-failures a group is given up (logged, never trained), not retried forever.

Checkpoints: out_dir/ckpt in the one checkpoint format (the training room's save_checkpoint); trainer_state.pt
holds the optimizer, RNG, step, weight version, history and `rl_state` = the replay buffer's state_dict:
completed-but-untrained groups and in-flight leases (re-issued on --resume, on either backend).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.rl.async_rules import filter_crashed, generated_tokens, wasted_tokens
from nanoglm5.rl.buffer import Group, ReplayBuffer
from nanoglm5.rl.evaluation import evaluate, judged_line, plot_reward_vs_time
from nanoglm5.rl.learner import Learner, attach_advantages, load_policy, policy_config
from nanoglm5.rl.messages import Assign, GroupDone, Heartbeat, Hello, WorkerFailed, WorkerStats
from nanoglm5.rl.ray_transport import RayTransport
from nanoglm5.rl.rl_config import RESUME_NEUTRAL, RLConfig
from nanoglm5.rl.task_source import TaskSource
from nanoglm5.rl.transport import ProcessTransport, Transport
from nanoglm5.training.metrics import init_wandb, write_metrics
from nanoglm5.training.state import (
    check_resume,
    load_trainer_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    trainer_state,
)
from nanoglm5.training.train_config import TrainError


@dataclass
class _Worker:
    wid: int
    kind: str  # "short" or "long" (dynamic repackaging)
    assigned: dict = field(default_factory=dict)  # group_id → attempt
    busy: list = field(default_factory=list)  # [start, end] seconds since t0
    tokens: int = 0
    pid: int | None = None  # from its Hello
    dead: bool = False
    reserved_for: int | None = None  # a suspect group waits for this worker to drain, then runs alone on it


def _budget_left(t_start: float, c, first_step: int, step: int) -> str:
    """The time budget's state for the bar: seconds left, and whether it, not max_steps, will end the run."""
    used = time.time() - t_start
    pace = used / max(step - first_step, 1)
    binds = used + pace * (c.max_steps - step) > c.time_budget_s
    return f"{max(c.time_budget_s - used, 0):.0f}s left" + (" (ends the run)" if binds else "")


class Controller:
    def __init__(self, cfg: RLConfig, quiet: bool = False):
        self.cfg = cfg = cfg.resolved()
        try:
            cfg.validate()
        except ValueError as e:
            raise TrainError(str(e)) from None
        self.quiet = quiet  # --no-progress hides the bar only; the log lines (eval before/after) stay
        if cfg.trainer_threads > 0:
            torch.set_num_threads(cfg.trainer_threads)
        seed_everything(cfg.seed)
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "ckpt"
        self.step, self.version, self.history, self.elapsed0 = 0, 0, [], 0.0
        resume = self._resume_path()
        src = resume or cfg.checkpoint
        if not src:
            raise TrainError("rl.py starts from a checkpoint: pass --checkpoint out/sft/ckpt (or --resume)")
        if not (Path(src) / "tokenizer.json").exists():
            raise TrainError(f"{src} has no tokenizer.json; RL needs the tokenizer the model was trained with "
                             "(train.py writes it into every checkpoint)")
        self.tokenizer_file = str(Path(src) / "tokenizer.json")
        self.tokenizer = Tokenizer.load(self.tokenizer_file)
        if cfg.device == "cuda" and cfg.backend == "mp" and not torch.cuda.is_available():
            raise TrainError("--device cuda: torch sees no CUDA device here; use --device cpu (or a CUDA build of torch)")
        self.model = load_policy(src)  # QAT-prepared with its recipe, if any; CheckpointError names the bad file
        # --backend mp trains self.model in this process; with ray it is the copy checkpoints and evaluations read
        self.model.to(cfg.device if torch.cuda.is_available() else "cpu")
        self.tasks = TaskSource(cfg)
        self.buffer = ReplayBuffer(cfg.push_every * cfg.groups_per_step, cfg.max_staleness, cfg.lease_timeout_s,
                                   None if cfg.drop_tau < 0 else cfg.drop_tau, cfg.order)
        # a run of max_steps trains max_steps / push_every batches: async admission must not run past them
        self.buffer.max_groups = math.ceil(cfg.max_steps / cfg.push_every) * self.buffer.B
        self.learner = Learner(self.model, cfg)
        if resume:
            self._load(resume)
        policy = policy_config(self.model)
        self.transport: Transport = (RayTransport(cfg, policy, self.tokenizer_file, log=self.log)
                                     if cfg.backend == "ray" else ProcessTransport(cfg, policy, self.tokenizer_file))
        self.trainer = None  # the transport's handle on the learner, from start() on
        self.lock = threading.Condition()
        self.workers: dict[int, _Worker] = {}
        self.parked: list = []
        self.counters = Counter()
        self.group_log: list[dict] = []
        # committed, untrained group → loss tokens it generated (wasted-token count; a resumed run's buffered groups too)
        self.group_tokens: dict[int, int] = {gid: generated_tokens(g.trajectories) for gid, g in self.buffer.done.items()}
        self.trainer_busy: list = []
        self.example = None  # (rank, Trajectory): one trained episode for the report (_keep_example)
        self._error, self._stop = None, threading.Event()

    # ------------------------------------------------------------------------------------ setup
    def log(self, msg: str) -> None:
        if not self.quiet:
            tqdm.write(msg)

    def _resume_path(self) -> str:
        r = self.cfg.resume
        if not r:
            return ""
        path = self.ckpt_dir if r == "auto" else Path(r)
        if not (path / "trainer_state.pt").exists():
            if r == "auto":
                self.log(f"[rl] --resume: no checkpoint at {path} yet; starting fresh")
                return ""
            raise TrainError(f"--resume {r}: no trainer_state.pt in {path}; check the path or drop --resume")
        return str(path)

    def _load(self, path: str) -> None:
        state = load_trainer_state(path)
        check_resume(path, state.get("train_config", {}), asdict(self.cfg), RESUME_NEUTRAL,
                     "the run used different settings")
        self.learner.opt.load_state_dict(state["optimizers"]["main"])
        set_rng_state(state["rng"])
        rl = state["rl_state"]
        self.buffer.load_state_dict(rl["buffer"])
        self.step, self.version, self.elapsed0 = state["step"], rl["version"], rl.get("elapsed_s", 0.0)
        self.history = state.get("history", [])
        self.log(f"[rl] resumed from {path}: step {self.step}, version {self.version}, "
                 f"{len(self.buffer.done)} buffered groups, {len(self.buffer.requeue)} leases to re-issue")

    # ------------------------------------------------------------------------------------ workers
    def _spawn(self, kind: str) -> None:
        self.workers[wid] = _Worker(wid := len(self.workers), kind)
        self.transport.spawn(wid, self.t0)

    def _check_workers(self) -> None:
        """Dead workers: re-queue their leases now (one failure charged each), give up groups, replace the worker."""
        c = self.cfg
        for w in list(self.workers.values()):
            why = None if w.dead else self.transport.exit_reason(w.wid)
            if why is None:
                continue
            w.dead = True
            self.counters["worker_deaths"] += 1
            self.counters["deaths_before_hello"] += w.pid is None
            fate = {gid: self.buffer.fail(gid, a, c.max_task_failures, self.tasks(gid).task_id)
                    for gid, a in sorted(w.assigned.items())}
            w.assigned = {}
            back = [g for g, f in fate.items() if f == "requeued"]
            self.log(f"[rl] worker {w.wid} (pid {w.pid}) died ({why}); "
                     + (f"its leases {back} are re-queued now; " if back else "")
                     + f"starting a new worker from version {self.version}")
            for gid in (g for g, f in fate.items() if f == "dropped"):
                self.log(f"[rl] group {gid} (task {self.tasks(gid).task_id}) was on {c.max_task_failures} workers "
                         f"that died (--max-task-failures {c.max_task_failures}; after the first it ran alone): "
                         "given up, it will not be trained")
            self.lock.notify_all()  # a given-up group may complete a batch
            if self.counters["deaths_before_hello"] >= 3:
                self._error = f"rollout workers die before they start (the last with {why}); see their stderr"
            elif not self._stop.is_set():
                self._spawn(w.kind)
                self.counters["respawned"] += 1

    def _handle(self, w: _Worker, msg) -> None:
        match msg:
            case Hello(pid=pid):
                w.pid = pid
            case WorkerFailed(traceback=tb):
                self._error = f"rollout worker {w.wid} failed:\n{tb}"
            case Heartbeat(held=held, stats=st):
                for gid, attempt in held:
                    self.buffer.renew(gid, attempt)
                self._worker_stats(w, st)
            case GroupDone(group=g, stats=st):
                self._commit(w, g, st)
            case _:
                self._error = f"rollout worker {w.wid} sent an unknown message {type(msg).__name__}"

    def _commit(self, w: _Worker, g: Group, st: WorkerStats) -> None:
        """A finished group: env-crashed samples out (the group padded or dropped: async_rules.filter_crashed), advantages
        over what is left, then commit (or discard if its lease is gone)."""
        received = g
        tokens = sum(t.n_loss_tokens for t in g.trajectories)
        crashed = [t for t in g.trajectories if t.env_error]
        if crashed:
            kept = filter_crashed(g)
            g = kept if kept is not None else Group(g.group_id, g.attempt, [], g.task_id)  # completes, never trained
        if g.trajectories:
            attach_advantages(g, self.cfg.std_normalize)
        ok = self.buffer.complete(g)
        self.counters["received_tokens"] += tokens
        for t in received.trajectories:  # which rewards came from a program run inside bubblewrap
            if t.meta.get("sandboxed") is not None:
                self.counters["judged_sandboxed" if t.meta["sandboxed"] else "judged_unsandboxed"] += 1
        if not ok:
            self.counters["discarded_tokens"] += tokens
        else:
            self.counters["env_error_samples"] += len(crashed)
            if crashed and not g.trajectories:
                self.counters["crash_dropped_groups"] += 1
                self.counters["crash_dropped_group_tokens"] += tokens
            else:
                self.counters["crash_removed_tokens"] += generated_tokens(crashed)
            self.group_tokens[g.group_id] = generated_tokens(g.trajectories)
        w.assigned.pop(g.group_id, None)
        self._worker_stats(w, st)
        vs = [v for t in received.trajectories for _, v in t.versions]
        self.group_log.append({"group_id": g.group_id, "worker": w.wid, "t": time.time() - self.t0,
                               "committed": ok, "env_errors": len(crashed),
                               "reward": sum(t.reward for t in received.trajectories) / len(received.trajectories),
                               "tokens": tokens, "v_min": min(vs), "v_max": max(vs),
                               "segments": max(len(t.versions) for t in received.trajectories),
                               # the group's generation time and its slowest judge call (evaluation.plot_timeline)
                               "gen_s": max(t.meta.get("gen_s", 0.0) for t in received.trajectories),
                               "judge_s": max(t.meta.get("env_s", 0.0) for t in received.trajectories)})
        self.lock.notify_all()

    def _worker_stats(self, w: _Worker, st: WorkerStats) -> None:
        w.busy += st.busy
        w.tokens = st.tokens

    def _dispatch(self) -> None:
        """Hand out leases, parked ones first, to workers with room. A suspect (a group whose worker died) runs
        alone: on a worker reserved for it once that one has drained."""
        # a worker holds up to worker_groups groups decoding, the groups its judge threads can wait on (they free
        # their decode slot: Rollout.decoding; Little's law: a slow judge needs many in flight), one prefetched lease
        c = self.cfg
        cap = max(1, c.worker_groups) + math.ceil(c.env_threads / c.group_size) + 1
        live = [w for w in self.workers.values() if not w.dead]
        for w in live:  # forget assignments whose lease expired or was re-issued
            w.assigned = {g: a for g, a in w.assigned.items()
                          if g in self.buffer.leases and self.buffer.leases[g].attempt == a}
        for lease, _, _ in self.parked:
            self.buffer.renew(lease.group_id, lease.attempt)

        def suspect(gid):
            return self.buffer.failures.get(gid, 0) > 0

        # only workers that said Hello take leases: a lease's clock runs from its admission, and a replacement may
        # wait long for a node (or, on a busy machine, to import torch); meanwhile its leases wait here, renewed
        ready = [w for w in live if w.pid is not None]

        def open_to(kind, room=True):  # workers that may take a new group of this kind
            return [w for w in ready if w.reserved_for is None and not any(map(suspect, w.assigned))
                    and (not room or len(w.assigned) < cap) and (not c.repack or w.kind == kind)]

        def load(w):  # the least held first
            return len(w.assigned)

        def place(lease, task, kind) -> bool:
            if not suspect(lease.group_id):
                ws = open_to(kind)
                w = min(ws, key=load) if ws else None
            else:
                mine = [w for w in ready if w.reserved_for == lease.group_id] or open_to(kind, room=False)
                if not mine:
                    return False
                w = min(mine, key=load)
                w.reserved_for = lease.group_id
                if w.assigned:
                    return False  # not yet drained
                w.reserved_for = None
            return w is not None and self._send(w, lease, task)

        self.parked = [item for item in self.parked if not place(*item)]
        while len(self.parked) < 4 * len(live) and (open_to("short") or open_to("long")):
            lease = self.buffer.admit(self.version)
            if lease is None:
                return
            task = self.tasks(lease.group_id)
            kind = "long" if c.repack and self.tasks.length_hint(task) > c.long_threshold else "short"
            if not place(lease, task, kind):
                self.parked.append((lease, task, kind))

    def _send(self, w: _Worker, lease, task) -> bool:
        ok = self.transport.send(w.wid, Assign(lease, task))  # False: the worker is gone, the lease stays parked
        if ok:
            w.assigned[lease.group_id] = lease.attempt
        return ok

    def _control_loop(self) -> None:
        try:
            while not self._stop.is_set():
                msgs = self.transport.poll(0.01)
                with self.lock:
                    for wid, msg in msgs:
                        self._handle(self.workers[wid], msg)
                    self.buffer.expire()
                    self._check_workers()
                    self._dispatch()
        except Exception as e:  # surface in the trainer thread
            self._error = f"controller thread failed: {e}\n{traceback.format_exc()}"

    def kill_worker(self, wid: int | None = None, sig: int = signal.SIGKILL) -> int:
        """Kill a worker (SIGKILL / ray.kill), by default the one holding the most leases (fault tests); its id."""
        with self.lock:
            live = [w for w in self.workers.values() if not w.dead and w.pid]
            w = self.workers[wid] if wid is not None else max(live, key=lambda w: len(w.assigned))
        self.transport.kill(w.wid, sig)
        return w.wid

    # ------------------------------------------------------------------------------------ trainer
    def _wait_batch(self, deadline: float):
        """Block until the next batch is ready (or the time budget ends)."""
        with self.lock:
            while True:
                if self._error:
                    raise TrainError(self._error)
                if time.time() > deadline:  # checked first: in async mode a batch is usually ready already
                    return None
                before = set(self.buffer.trained)
                batch = self.buffer.take_batch(None, self.version)  # τ-drop inside (async_rules.is_stale)
                if batch is not None:
                    for gid in self.buffer.trained - before:  # trained (or τ-emptied): no longer waiting
                        self.group_tokens.pop(gid, None)
                    return batch
                self.lock.wait(0.05)

    def train_one(self, deadline: float = float("inf"), on_step=None) -> dict | None:
        """Wait for one rollout batch, update, publish. Returns the step record (None if out of time)."""
        t_wait = time.time()
        batch = self._wait_batch(deadline)
        if batch is None:
            return None
        t_train = time.time()
        v_train = self.version
        info = self.trainer.update(batch) if batch else {}
        self.step += max(1, min(self.cfg.push_every, len(batch))) if batch else self.cfg.push_every
        self.transport.publish(self.trainer.weights(), v_train + 1)  # never waits for workers
        if self.cfg.reset_optimizer:
            self.trainer.reset_optimizer()
        with self.lock:
            self.version = v_train + 1
            stats = self.buffer.stats()
        t_end = time.time()
        self.trainer_busy.append([t_train - self.t0, t_end - self.t0])
        trajs = [t for g in batch for t in g.trajectories]
        self._keep_example(trajs)
        stale = Counter()
        for t in trajs:
            for v, k in t.loss_tokens_by_version().items():
                stale[v_train - v] += k
        rec = {"step": self.step, "version": self.version, "time": self.elapsed0 + t_end - self.t0,
               "wait_s": t_train - t_wait, "train_s": t_end - t_train,
               "reward": sum(t.reward for t in trajs) / max(1, len(trajs)),
               "group_ids": [g.group_id for g in batch], "samples": len(trajs),
               "staleness": dict(sorted(stale.items())),
               "mean_len": sum(len(t.tokens) for t in trajs) / max(1, len(trajs)),
               "mean_turns": sum(t.meta.get("turns", 1) for t in trajs) / max(1, len(trajs)),
               **{k: v for k, v in info.items()},
               **{k: stats.get(k, 0) for k in ("dropped_samples", "dropped_groups", "failed_groups", "expired",
                                               "requeued_dead", "late_discarded", "reissued", "buffered", "in_flight")}}
        self.history.append(rec)
        if on_step:
            on_step(rec)
        return rec

    def _keep_example(self, trajs) -> None:
        """The latest trained episode that shows the most: a revision after feedback that passed, else any revision,
        else any episode (the report prints it turn by turn: attempt, observation, revision)."""
        rank = lambda t: (t.meta.get("turns", 1) > 1 and t.reward > 0, t.meta.get("turns", 1) > 1)  # noqa: E731
        best = max(trajs, key=rank, default=None)
        if best is not None and (self.example is None or rank(best) >= self.example[0]):
            self.example = (rank(best), best)

    def example_episode(self) -> dict | None:
        """The kept episode as text (the chat template's turns, TITO ids decoded once for reading) with its reward."""
        if self.example is None:
            return None
        t = self.example[1]
        return {"text": self.tokenizer.decode(t.tokens), "turns": t.meta.get("turns", 1), "reward": t.reward,
                "step": self.step}

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        if self.trainer is not None:
            self.trainer.sync(self.learner)  # --backend ray: the learner actor's weights and optimizer come here
        with self.lock:
            rl_state = {"buffer": self.buffer.state_dict(), "version": self.version,
                        "elapsed_s": self.elapsed0 + time.time() - self.t0}
        state = trainer_state(self.step, {"main": self.learner.opt},
                              {"kind": "rl", "seed": self.cfg.seed, "version": self.version}, asdict(self.cfg),
                              rl_state=rl_state, history=self.history)
        return save_checkpoint(self.ckpt_dir, self.model, state, self.tokenizer_file, asdict(self.cfg))

    # ------------------------------------------------------------------------------------ the run
    def start(self) -> None:
        """Open the transport (weights as the current version), start the workers and the control thread."""
        self.trainer = self.transport.open(self.learner, self.version)  # (a Ray cluster may start here)
        self.t0 = time.time()
        n_long = self.cfg.long_workers if self.cfg.repack else 0
        for i in range(self.cfg.workers):
            self._spawn("long" if i < n_long else "short")
        self.thread = threading.Thread(target=self._control_loop, name="controller", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop the control thread and the workers; self.model then holds the trained weights (either backend)."""
        self._stop.set()
        if hasattr(self, "thread"):
            self.thread.join(timeout=10)
        if self.trainer is None:
            return
        try:
            self.trainer.sync(self.learner)
        except TrainError as e:
            self.log(f"[rl] {e}")
        self.trainer = None
        self.transport.stop()
        self.transport.close()

    def summary(self) -> dict:
        """Throughput and idle figures of this run: trained tokens/s, trainer and rollout idle fractions,
        staleness, wasted tokens (docs/benchmarks.md, section rl_throughput, compares async and sync on them)."""
        wall = max(1e-9, time.time() - self.t0)
        hist = self.history[-len(self.trainer_busy):] if self.trainer_busy else []
        trained = sum(h.get("trained_tokens", 0) for h in hist)
        groups = sum(len(h["group_ids"]) for h in hist)
        samples = sum(h["samples"] for h in hist)
        busy_w = sum(e - s for w in self.workers.values() for s, e in w.busy if e is not None)
        stale = Counter()
        for h in hist:
            for k, v in h["staleness"].items():
                stale[int(k)] += v
        st = self.buffer.stats()
        waste = self.wasted_tokens()
        return {"wall_s": wall, "trained_tokens_per_s": trained / wall, "groups_per_s": groups / wall,
                "samples_per_s": samples / wall,  # trained samples (episodes) per second of the controller's wall
                "trainer_idle_frac": 1 - sum(e - s for s, e in self.trainer_busy) / wall,
                "rollout_idle_frac": max(0.0, 1 - busy_w / (wall * max(1, len(self.workers)))),
                "staleness_hist": dict(sorted(stale.items())),
                # generated but never trained, every cause (async_rules.wasted_tokens): late/duplicate groups, τ-dropped
                # and env-crashed samples, crash-dropped and given-up groups, groups left untrained at the end
                "wasted_token_frac": waste["frac"], "wasted_tokens": waste,
                "env_error_samples": self.counters["env_error_samples"],
                "crash_dropped_groups": self.counters["crash_dropped_groups"],
                "dropped_samples": st.get("dropped_samples", 0), "dropped_lengths": st["dropped_lengths"],
                "expired": st.get("expired", 0), "requeued_dead": st.get("requeued_dead", 0),
                "failed_groups": st.get("failed_groups", 0), "worker_deaths": self.counters["worker_deaths"],
                "respawned": self.counters["respawned"], "steps": len(hist),
                "judged_sandboxed": self.counters["judged_sandboxed"],
                "judged_unsandboxed": self.counters["judged_unsandboxed"]}

    def wasted_tokens(self) -> dict:
        """Every generated-and-never-trained token so far, by cause. Groups still in the buffer count as untrained
        (at the end of a run they are); tokens of groups still decoding, or lost with a dead worker, are the
        workers' generated count (as of their last message) minus what reached the controller."""
        c = self.counters
        generated = max(c["received_tokens"], sum(w.tokens for w in self.workers.values()))
        return wasted_tokens(generated, late_discarded=c["discarded_tokens"],
                             tau_dropped=self.buffer.counters["tau_dropped_tokens"],
                             crash_removed=c["crash_removed_tokens"], crash_dropped_groups=c["crash_dropped_group_tokens"],
                             untrained_at_end=sum(self.group_tokens.values()),
                             in_flight_at_end=generated - c["received_tokens"])

    def timeline(self) -> dict:
        return {"trainer": self.trainer_busy,
                "workers": {w.wid: [[s, e] for s, e in w.busy if e is not None] for w in self.workers.values()},
                "groups": self.group_log}

    def run(self) -> dict:
        """The whole job: eval before, train until max_steps or the time budget, save, eval after."""
        c = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "rl_config.json").write_text(json.dumps(asdict(c), indent=2))
        self.log("[rl] config " + json.dumps(asdict(c)))
        eval_tasks = self.tasks.eval_tasks() if c.n_eval_tasks > 0 else []
        before = self._eval(eval_tasks, "before")
        wb = init_wandb(c.wandb, c.wandb_project, self.out_dir, asdict(c))
        self.start()
        t_start, budget = time.time(), c.time_budget_s > 0
        deadline = t_start + c.time_budget_s if budget else float("inf")
        # the bar counts steps, the work that binds on the reference host; the time budget is a safety cap, shown in
        # the postfix, and says so when it is the one that will end the run
        bar = tqdm(total=c.max_steps, initial=self.step, unit="step", desc=f"rl {c.mode}",
                   disable=self.quiet or not c.progress, dynamic_ncols=True)
        step0 = self.step
        try:
            while self.step < c.max_steps:
                rec = self.train_one(deadline)
                if rec is None:
                    self.log(f"[rl] time budget of {c.time_budget_s:g}s reached at step {self.step}")
                    break
                bar.update(rec["step"] - bar.n)
                bar.set_postfix(**({"budget": _budget_left(t_start, c, step0, rec["step"])} if budget else {}),
                                reward=f"{rec['reward']:.3f}", v=rec["version"], stale=max(rec["staleness"], default=0),
                                wait=f"{rec['wait_s']:.1f}s")
                if self.step % c.log_every == 0:
                    self.log(f"[rl] step {self.step} v{self.version} reward {rec['reward']:.3f} "
                             f"loss {rec.get('loss', 0):+.4f} is_mask {rec.get('is_mask_frac', 0):.3f} "
                             f"staleness {rec['staleness']} wait {rec['wait_s']:.2f}s train {rec['train_s']:.2f}s")
                if wb is not None:
                    wb.log({k: v for k, v in rec.items() if isinstance(v, int | float)}, step=self.step)
                if c.save_every and self.step % c.save_every == 0:
                    self.save()
        finally:
            bar.close()
            self._stop.set()
            if hasattr(self, "thread"):
                self.thread.join(timeout=10)
            summary = self.summary()
            self.save()
            self.stop()
        after = self._eval(eval_tasks, "after")
        out = {"summary": summary, "eval_before": before, "eval_after": after, "history": self.history}
        write_metrics(self.out_dir, self.history)
        (self.out_dir / "timeline.json").write_text(json.dumps(self.timeline()))
        if self.example is not None:
            (self.out_dir / "episode.json").write_text(json.dumps(self.example_episode(), indent=1))
        (self.out_dir / "summary.json").write_text(json.dumps({k: v for k, v in out.items() if k != "history"},
                                                              indent=2))
        if c.plot and self.history:
            plot_reward_vs_time({c.mode: self.history}, self.out_dir / "reward_vs_time.png")
        if before and after:
            for key, what in (("acc", "greedy"), ("sampled", "sampled")):
                if key in before:
                    self.log(f"[rl] held-out {what} pass@1 ({before['n']} tasks): {before[key]:.3f} → {after[key]:.3f} "
                             + " ".join(f"{k[len(key) + 1:]} {before[k]:.3f}→{after[k]:.3f}"
                                        for k in before if k.startswith(key + "/")))
        s = summary
        self.log(f"[rl] {s['steps']} steps in {s['wall_s']:.0f}s: {s['trained_tokens_per_s']:.1f} trained tok/s, "
                 f"{s['groups_per_s']:.2f} groups/s, trainer idle {s['trainer_idle_frac']:.0%}, rollout idle "
                 f"{s['rollout_idle_frac']:.0%}, staleness {s['staleness_hist']}")
        self.log(f"[rl] {judged_line(s['judged_sandboxed'], s['judged_unsandboxed'])}")
        if wb is not None:
            wb.finish()
        return out

    def _eval(self, tasks, when: str) -> dict:
        if not tasks:
            return {}
        t = time.time()
        res = evaluate(self.model, self.tokenizer, tasks, self.cfg, samples=self.cfg.eval_samples)
        sampled = f", sampled pass@1 {res['sampled']:.3f} ({self.cfg.eval_samples} draws/task)" if "sampled" in res else ""
        self.log(f"[rl] eval {when}: greedy pass@1 {res['acc']:.3f}{sampled} on {res['n']} held-out tasks "
                 f"({time.time() - t:.0f}s); {judged_line(res['judged_sandboxed'], res['judged_unsandboxed'])}")
        return res
