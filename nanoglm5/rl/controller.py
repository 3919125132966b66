"""The RL controller: processes, leases, the replay buffer, the trainer loop, checkpoints (rl.md §5, DESIGN.md §5).

One `Controller` runs a whole `rl.py` job, sync or async on the same code (--mode sync = η 0):

  main process, trainer thread   waits for a batch (`ReplayBuffer.take_batch`, group-id order), takes
                                 push_every optimizer steps on it (`Learner`), publishes the new weights
                                 to the relay (never waits for a reader), bumps the version.
  main process, control thread   GLM-5's orchestrator / slime's Data Buffer in miniature: reads worker
                                 messages, commits groups (idempotent by group_id), renews leases on
                                 heartbeats, expires dead ones (re-queued first), respawns dead workers,
                                 admits new groups while submitted ≤ (η + v + 1)·B, and hands leases out.
  W rollout worker processes     `rollout.worker_main`: a model copy each, own thread budget, generating
                                 whole GRPO groups with the engine.

Why the trainer lives in the controller process: the controller's work is a few dictionary updates per
message; in a thread beside the trainer it keeps leases flowing while the trainer computes (torch releases
the GIL inside its kernels), and the trainer then reads the buffer without a copy between processes.
Messages travel over one pair of simplex pipes per worker (not a shared mp.Queue): a worker killed with
SIGKILL in the middle of a write can then corrupt only its own pipe, never another worker's.

Checkpoints (DESIGN.md §1): out_dir/ckpt in the one format (train_utils.save_checkpoint), with
trainer_state.pt holding the optimizer, RNG, step, weight version, history and `rl_state` = the replay
buffer's state_dict: completed-but-untrained groups and in-flight leases (re-issued on --resume).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing import connection
from pathlib import Path

import torch
import torch.multiprocessing as mp
from tqdm.auto import tqdm

from nanoglm5.checkpoint import load_hf
from nanoglm5.rl.buffer import Group, ReplayBuffer
from nanoglm5.rl.relay import WeightRelay
from nanoglm5.rl.rollout import RolloutSettings, worker_main
from nanoglm5.rl.trainer import Learner, RLConfig, TaskSource, attach_advantages, evaluate
from nanoglm5.train_utils import (
    TrainError,
    config_diff,
    load_trainer_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    trainer_state,
)

# Flags that may change between a run and its --resume.
RESUME_NEUTRAL = {"max_steps", "time_budget_s", "resume", "init_from", "out_dir", "save_every", "log_every", "wandb",
                  "wandb_project", "plot", "progress", "workers", "worker_threads", "trainer_threads",
                  "lease_timeout_s", "renew_every_s", "n_eval_tasks", "repack", "long_workers", "long_threshold"}


@dataclass
class _Worker:
    wid: int
    kind: str  # "short" or "long" (dynamic repackaging)
    proc: object
    send: object  # controller → worker (leases)
    recv: object  # worker → controller (groups, heartbeats)
    assigned: dict = field(default_factory=dict)  # group_id → attempt
    busy: list = field(default_factory=list)  # [start, end] seconds since t0
    tokens: int = 0
    pid: int | None = None
    dead: bool = False


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
        src = resume or cfg.init_from
        if not src:
            raise TrainError("rl.py starts from a checkpoint: pass --init-from out/sft/ckpt (or --resume)")
        if not (Path(src) / "tokenizer.json").exists():
            raise TrainError(f"{src} has no tokenizer.json; RL needs the tokenizer the model was trained with "
                             "(train.py writes it into every checkpoint)")
        self.tokenizer_file = str(Path(src) / "tokenizer.json")
        from nanoglm5.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.load(self.tokenizer_file)
        self.model = load_hf(src).eval()  # CheckpointError names the bad file
        # the rollout engines break DSA top-k ties by position; the trainer must select the same keys (TITO)
        self.model.set_tie_break("stable")
        self.tasks = TaskSource(cfg)
        self.settings = RolloutSettings.from_config(cfg)
        self.buffer = ReplayBuffer(cfg.push_every * cfg.groups_per_step, cfg.max_staleness, cfg.lease_timeout_s,
                                   None if cfg.drop_tau < 0 else cfg.drop_tau, cfg.order)
        self.learner = Learner(self.model, cfg)
        if resume:
            self._load(resume)
        self.relay = WeightRelay(self.model.state_dict(), version=self.version)
        self.lock = threading.Condition()
        self.workers: dict[int, _Worker] = {}
        self.parked: list = []
        self.counters = Counter()
        self.group_log: list[dict] = []
        self.group_tokens: dict[int, int] = {}  # committed, untrained group → loss tokens (wasted-token count)
        self.trainer_busy: list = []
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
        saved = state.get("train_config", {})
        diff = config_diff(saved, asdict(self.cfg), RESUME_NEUTRAL)
        if diff:
            raise TrainError(f"--resume {path}: the run used different settings: " + "; ".join(diff)
                             + ". Pass the same flags, or start a new run from its weights with --init-from")
        self.learner.opt.load_state_dict(state["optimizers"]["main"])
        set_rng_state(state["rng"])
        rl = state["rl_state"]
        self.buffer.load_state_dict(rl["buffer"])
        self.step, self.version, self.elapsed0 = state["step"], rl["version"], rl.get("elapsed_s", 0.0)
        self.history = state.get("history", [])
        self.log(f"[rl] resumed from {path}: step {self.step}, version {self.version}, "
                 f"{len(self.buffer.done)} buffered groups, {len(self.buffer.requeue)} leases to re-issue")

    # ------------------------------------------------------------------------------------ workers
    def _spawn(self, kind: str) -> _Worker:
        ctx = mp.get_context("spawn")
        wid = len(self.workers)
        lease_r, lease_w = ctx.Pipe(duplex=False)
        out_r, out_w = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=worker_main, name=f"rollout-{wid}", daemon=True,
                           args=(wid, asdict(self.settings), self.model.config.to_hf_dict(), self.tokenizer_file,
                                 self.relay, lease_r, out_w, self.t0))
        proc.start()
        lease_r.close()
        out_w.close()  # our copy closed: a dead worker's pipe reads EOF instead of hanging
        w = _Worker(wid, kind, proc, lease_w, out_r)
        self.workers[wid] = w
        return w

    def _check_workers(self) -> None:
        for w in list(self.workers.values()):
            if w.dead or w.proc.exitcode is None:
                continue
            w.dead = True
            self.counters["worker_deaths"] += 1
            self.log(f"[rl] worker {w.wid} (pid {w.pid}) died with exit code {w.proc.exitcode}; its leases "
                     f"{sorted(w.assigned)} expire in ≤ {self.cfg.lease_timeout_s:g}s and are re-queued; starting "
                     f"a new worker from version {self.version}")
            for c in (w.send, w.recv):
                c.close()
            if not self._stop.is_set():
                self._spawn(w.kind)
                self.counters["respawned"] += 1

    def _handle(self, w: _Worker, msg) -> None:
        kind = msg[0]
        if kind == "hello":
            w.pid = msg[3]
        elif kind == "error":
            self._error = f"rollout worker {w.wid} failed:\n{msg[2]}"
        elif kind == "renew":
            for gid, attempt in msg[2]:
                self.buffer.renew(gid, attempt)
            self._worker_stats(w, msg[3])
        elif kind == "group":
            g = Group.from_dict(msg[2])
            attach_advantages(g, self.cfg.std_normalize)
            tokens = sum(t.n_loss_tokens for t in g.trajectories)
            ok = self.buffer.complete(g)
            self.counters["received_tokens"] += tokens
            if ok:
                self.group_tokens[g.group_id] = tokens
            else:
                self.counters["discarded_tokens"] += tokens
            w.assigned.pop(g.group_id, None)
            self._worker_stats(w, msg[3])
            vs = [v for t in g.trajectories for _, v in t.versions]
            self.group_log.append({"group_id": g.group_id, "worker": w.wid, "t": time.time() - self.t0,
                                   "committed": ok, "reward": sum(t.reward for t in g.trajectories) / len(g.trajectories),
                                   "tokens": tokens, "v_min": min(vs), "v_max": max(vs),
                                   "segments": max(len(t.versions) for t in g.trajectories)})
            self.lock.notify_all()

    def _worker_stats(self, w: _Worker, st: dict) -> None:
        w.busy += st["busy"]
        w.tokens = st["tokens"]

    def _dispatch(self) -> None:
        """Hand out leases: parked ones first, then newly admitted ones, to workers with room."""
        # a worker holds up to worker_groups groups decoding, the groups its judge threads can wait on (they
        # free their decode slot: rollout.Rollout.decoding; Little's law: a slow judge needs many in flight),
        # and one prefetched lease
        c = self.cfg
        cap = max(1, c.worker_groups) + math.ceil(c.env_threads / c.group_size) + 1
        for w in self.workers.values():  # forget assignments whose lease expired or was re-issued
            w.assigned = {g: a for g, a in w.assigned.items()
                          if g in self.buffer.leases and self.buffer.leases[g].attempt == a}
        for lease, _ in self.parked:
            self.buffer.renew(lease.group_id, lease.attempt)

        def free(kind):
            ws = [w for w in self.workers.values() if not w.dead and len(w.assigned) < cap
                  and (not self.cfg.repack or w.kind == kind)]
            return min(ws, key=lambda w: len(w.assigned)) if ws else None

        for item in list(self.parked):
            w = free(item[2])
            if w is not None:
                self.parked.remove(item)
                self._send(w, item[0], item[1])
        while len(self.parked) < 4 * len(self.workers) and (free("short") or free("long")):
            lease = self.buffer.admit(self.version)
            if lease is None:
                return
            task = self.tasks(lease.group_id)
            kind = "long" if self.cfg.repack and self.tasks.length_hint(task) > self.cfg.long_threshold else "short"
            w = free(kind)
            if w is None:
                self.parked.append((lease, task, kind))
            else:
                self._send(w, lease, task)

    def _send(self, w: _Worker, lease, task) -> None:
        try:
            w.send.send(("lease", lease, asdict(task)))
            w.assigned[lease.group_id] = lease.attempt
        except (BrokenPipeError, OSError):
            pass  # the worker died: the lease expires and is re-queued

    def _control_loop(self) -> None:
        try:
            while not self._stop.is_set():
                by_conn = {w.recv: w for w in self.workers.values() if not w.dead}
                for conn in connection.wait(list(by_conn), timeout=0.01):
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        continue  # dead: _check_workers notices the exit code
                    with self.lock:
                        self._handle(by_conn[conn], msg)
                with self.lock:
                    self.buffer.expire()
                    self._check_workers()
                    self._dispatch()
        except Exception as e:  # surface in the trainer thread
            import traceback

            self._error = f"controller thread failed: {e}\n{traceback.format_exc()}"

    def kill_worker(self, wid: int | None = None, sig: int = 9) -> int:
        """Send `sig` (SIGKILL) to a worker holding a lease (for the fault-tolerance test); returns its id."""
        import os

        with self.lock:
            live = [w for w in self.workers.values() if not w.dead and w.pid]
            w = self.workers[wid] if wid is not None else max(live, key=lambda w: len(w.assigned))
        os.kill(w.proc.pid, sig)
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
                batch = self.buffer.take_batch(None, self.version)
                if batch is not None:
                    taken = self.buffer.trained - before  # includes groups the τ-drop emptied
                    kept = sum(t.n_loss_tokens for g in batch for t in g.trajectories)
                    self.counters["dropped_tokens"] += max(0, sum(self.group_tokens.pop(g, 0) for g in taken) - kept)
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
        info = self.learner.update(batch) if batch else {}
        self.step += max(1, min(self.cfg.push_every, len(batch))) if batch else self.cfg.push_every
        self.relay.publish(self.model, v_train + 1)  # the relay never waits for workers
        if self.cfg.reset_optimizer:
            self.learner.reset_optimizer()
        with self.lock:
            self.version = v_train + 1
            stats = self.buffer.stats()
        t_end = time.time()
        self.trainer_busy.append([t_train - self.t0, t_end - self.t0])
        trajs = [t for g in batch for t in g.trajectories]
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
               **{k: v for k, v in info.items()},
               **{k: stats.get(k, 0) for k in ("dropped_samples", "dropped_groups", "expired", "late_discarded",
                                               "reissued", "buffered", "in_flight")}}
        self.history.append(rec)
        if on_step:
            on_step(rec)
        return rec

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        with self.lock:
            rl_state = {"buffer": self.buffer.state_dict(), "version": self.version,
                        "elapsed_s": self.elapsed0 + time.time() - self.t0}
        state = trainer_state(self.step, {"main": self.learner.opt},
                              {"kind": "rl", "seed": self.cfg.seed, "version": self.version}, asdict(self.cfg),
                              rl_state=rl_state, history=self.history)
        return save_checkpoint(self.ckpt_dir, self.model, state, self.tokenizer_file, asdict(self.cfg))

    # ------------------------------------------------------------------------------------ the run
    def start(self) -> None:
        """Spawn the workers and the control thread."""
        self.t0 = time.time()
        n_long = self.cfg.long_workers if self.cfg.repack else 0
        for i in range(self.cfg.workers):
            self._spawn("long" if i < n_long else "short")
        self.thread = threading.Thread(target=self._control_loop, name="controller", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if hasattr(self, "thread"):
            self.thread.join(timeout=10)
        for w in self.workers.values():
            if not w.dead:
                try:
                    w.send.send(("stop",))
                except (BrokenPipeError, OSError):
                    pass
        for w in self.workers.values():
            w.proc.join(timeout=10)
            if w.proc.exitcode is None:
                w.proc.kill()
                w.proc.join(timeout=5)

    def summary(self) -> dict:
        """Throughput and idle figures of this run (rl.md §5 "Measuring async vs sync honestly")."""
        wall = max(1e-9, time.time() - self.t0)
        hist = self.history[-len(self.trainer_busy):] if self.trainer_busy else []
        trained = sum(h.get("trained_tokens", 0) for h in hist)
        groups = sum(len(h["group_ids"]) for h in hist)
        busy_w = sum(e - s for w in self.workers.values() for s, e in w.busy if e is not None)
        stale = Counter()
        for h in hist:
            for k, v in h["staleness"].items():
                stale[int(k)] += v
        st = self.buffer.stats()
        recv = max(1, self.counters["received_tokens"])
        return {"wall_s": wall, "trained_tokens_per_s": trained / wall, "groups_per_s": groups / wall,
                "trainer_idle_frac": 1 - sum(e - s for s, e in self.trainer_busy) / wall,
                "rollout_idle_frac": max(0.0, 1 - busy_w / (wall * max(1, len(self.workers)))),
                "staleness_hist": dict(sorted(stale.items())),
                # generated but never trained: late/duplicate groups (expired leases) and τ-dropped samples
                "wasted_token_frac": (self.counters["discarded_tokens"] + self.counters["dropped_tokens"]) / recv,
                "dropped_samples": st.get("dropped_samples", 0), "dropped_lengths": st["dropped_lengths"],
                "expired": st.get("expired", 0), "worker_deaths": self.counters["worker_deaths"],
                "respawned": self.counters["respawned"], "steps": len(hist)}

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
        wb = self._wandb()
        self.start()
        deadline = time.time() + c.time_budget_s if c.time_budget_s > 0 else float("inf")
        bar = tqdm(total=c.max_steps, initial=self.step, desc=f"rl {c.mode}", disable=self.quiet or not c.progress,
                   dynamic_ncols=True)
        try:
            while self.step < c.max_steps:
                rec = self.train_one(deadline)
                if rec is None:
                    self.log(f"[rl] time budget of {c.time_budget_s:g}s reached at step {self.step}")
                    break
                bar.update(rec["step"] - bar.n)
                bar.set_postfix(reward=f"{rec['reward']:.3f}", v=rec["version"], stale=max(rec["staleness"], default=0),
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
        (self.out_dir / "metrics.jsonl").write_text("\n".join(json.dumps(h) for h in self.history) + "\n")
        (self.out_dir / "timeline.json").write_text(json.dumps(self.timeline()))
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
        if wb is not None:
            wb.finish()
        return out

    def _eval(self, tasks, when: str) -> dict:
        if not tasks:
            return {}
        t = time.time()
        res = evaluate(self.model, self.tokenizer, tasks, self.settings, samples=self.cfg.eval_samples)
        sampled = f", sampled pass@1 {res['sampled']:.3f} ({self.cfg.eval_samples} draws/task)" if "sampled" in res else ""
        self.log(f"[rl] eval {when}: greedy pass@1 {res['acc']:.3f}{sampled} on {res['n']} held-out tasks "
                 f"({time.time() - t:.0f}s)")
        return res

    def _wandb(self):
        if not self.cfg.wandb:
            return None
        import os

        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        return wandb.init(project=self.cfg.wandb_project, config=asdict(self.cfg), mode=mode, dir=str(self.out_dir))


def plot_reward_vs_time(runs: dict[str, list[dict]], path) -> None:
    """Mean batch reward against wall-clock seconds (and against steps), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, hist in runs.items():
        axes[0].plot([h["time"] for h in hist], [h["reward"] for h in hist], marker=".", label=name)
        axes[1].plot([h["step"] for h in hist], [h["reward"] for h in hist], marker=".", label=name)
    axes[0].set_xlabel("wall clock (s)")
    axes[1].set_xlabel("optimizer step")
    for ax in axes:
        ax.set_ylabel("mean reward of the trained batch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
