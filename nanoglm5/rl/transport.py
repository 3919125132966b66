"""How the controller reaches its rollout workers: the transport interface, and its process implementation.

The controller (controller.py) holds all of RL's logic: the replay buffer, admission control, leases, weight
versions, respawns, task failures, checkpoints. A transport only moves things: it starts a worker, carries the
messages of messages.py both ways, says whether a worker still lives, kills one (fault injection), hands each
new weight version to the workers, and stops them. Two transports implement one interface:

  ProcessTransport (--backend mp, this file)     workers are torch.multiprocessing processes on this machine;
      messages travel over one pair of simplex pipes per worker; weights go through the WeightRelay (shared
      memory, seqlock); the learner runs in the controller's process (its trainer thread).
  RayTransport (--backend ray, ray_transport.py)  workers and the learner are Ray actors, anywhere in a Ray
      cluster; messages are actor calls; weights go through Ray's object store, one immutable object per version.

Both run the same worker body (rollout.worker_main), which needs only duck types: an inbox with poll(timeout) and
recv(), an outbox with send(msg), and a weight source with latest_version() and pull(model, min_version=...).

The interface (`Transport`):
  open(learner, version) -> trainer   set the weight channel up with the learner's weights as `version`; returns
                                      the trainer handle the controller's trainer thread calls (below)
  spawn(wid, t0)                      start rollout worker `wid` (its busy intervals: seconds since t0)
  send(wid, msg) -> bool              Assign / Stop; False when the worker is gone (its leases come back anyway)
  poll(timeout) -> [(wid, msg)]       messages from live workers, waiting at most `timeout` s for the first one
  exit_reason(wid) -> str | None      None while worker `wid` lives, else why it ended (exit code, actor error)
  kill(wid, sig)                      end a worker abruptly (SIGKILL / ray.kill): the fault tests
  publish(weights, version)           make `version` (trainer.weights()) the newest; never waits for a worker
  stop()                              Stop every live worker, wait briefly, kill the stragglers
  close()                             release what the transport started (a local Ray cluster, the learner actor)

The trainer handle (`InProcessLearner` here, `RemoteLearner` in ray_transport.py):
  update(batch) -> stats              push_every optimizer steps on one rollout batch (learner.Learner.update)
  reset_optimizer()
  weights()                           what publish() takes: the model itself here, an object-store reference there
  sync(learner)                       copy the trained weights and optimizer state into the controller's own
                                      learner, which checkpoints and evaluation read (a no-op here: it is that one)
"""

from __future__ import annotations

import os
import signal
from dataclasses import asdict, dataclass
from multiprocessing import connection
from typing import Protocol

import torch.multiprocessing as mp

from nanoglm5.rl.learner import Learner
from nanoglm5.rl.messages import Stop
from nanoglm5.rl.relay import WeightRelay
from nanoglm5.rl.rl_config import RLConfig
from nanoglm5.rl.rollout import worker_main


class Trainer(Protocol):
    def update(self, batch: list) -> dict: ...
    def reset_optimizer(self) -> None: ...
    def weights(self): ...
    def sync(self, learner: Learner) -> None: ...


class Transport(Protocol):
    name: str

    def open(self, learner: Learner, version: int) -> Trainer: ...
    def spawn(self, wid: int, t0: float) -> None: ...
    def send(self, wid: int, msg) -> bool: ...
    def poll(self, timeout: float) -> list[tuple[int, object]]: ...
    def exit_reason(self, wid: int) -> str | None: ...
    def kill(self, wid: int, sig: int = signal.SIGKILL) -> None: ...
    def publish(self, weights, version: int) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


class InProcessLearner:
    """--backend mp: the learner runs in the controller's process; the relay reads the model directly."""

    def __init__(self, learner: Learner):
        self.learner = learner

    def update(self, batch: list) -> dict:
        return self.learner.update(batch)

    def reset_optimizer(self) -> None:
        self.learner.reset_optimizer()

    def weights(self):
        return self.learner.model

    def sync(self, learner: Learner) -> None:
        pass  # the controller's learner is this one


@dataclass
class _Proc:
    proc: object
    send: object  # controller → worker (leases)
    recv: object  # worker → controller (groups, heartbeats)
    eof: bool = False
    reason: str | None = None


class ProcessTransport:
    """Workers as spawned processes on this machine, weights through the shared-memory relay.

    Messages travel over one pair of simplex pipes per worker (not a shared mp.Queue): a worker killed with
    SIGKILL in the middle of a write can then corrupt only its own pipe, never another worker's. A dead worker
    is noticed by its exit code (polled every control-loop turn, ~10 ms), not by a lease timeout."""

    name = "mp"

    def __init__(self, cfg: RLConfig, policy: dict, tokenizer_file: str):
        self.cfg, self.policy, self.tokenizer_file = cfg, policy, tokenizer_file
        self.ctx = mp.get_context("spawn")
        self.procs: dict[int, _Proc] = {}
        self.relay: WeightRelay | None = None

    def open(self, learner: Learner, version: int) -> InProcessLearner:
        self.relay = WeightRelay(learner.model.state_dict(), version=version, ctx=self.ctx)
        return InProcessLearner(learner)

    def spawn(self, wid: int, t0: float) -> None:
        lease_r, lease_w = self.ctx.Pipe(duplex=False)
        out_r, out_w = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=worker_main, name=f"rollout-{wid}", daemon=True,
                                args=(wid, asdict(self.cfg), self.policy, self.tokenizer_file, self.relay, lease_r,
                                      out_w, t0))
        proc.start()
        lease_r.close()
        out_w.close()  # our copy closed: a dead worker's pipe reads EOF instead of hanging
        self.procs[wid] = _Proc(proc, lease_w, out_r)

    def send(self, wid: int, msg) -> bool:
        p = self.procs[wid]
        if p.reason is not None:
            return False
        try:
            p.send.send(msg)
            return True
        except (BrokenPipeError, OSError):
            return False

    def poll(self, timeout: float) -> list[tuple[int, object]]:
        by_conn = {p.recv: wid for wid, p in self.procs.items() if p.reason is None and not p.eof}
        out = []
        for conn in connection.wait(list(by_conn), timeout=timeout):
            wid = by_conn[conn]
            try:
                out.append((wid, conn.recv()))
            except (EOFError, OSError):
                self.procs[wid].eof = True  # the process is exiting: exit_reason reports it once it is reaped
        return out

    def exit_reason(self, wid: int) -> str | None:
        p = self.procs[wid]
        if p.reason is None and p.proc.exitcode is not None:
            code = p.proc.exitcode
            p.reason = f"exit code {code}" + (f" ({signal.Signals(-code).name})" if code < 0 else "")
            for c in (p.send, p.recv):
                c.close()
        return p.reason

    def kill(self, wid: int, sig: int = signal.SIGKILL) -> None:
        os.kill(self.procs[wid].proc.pid, sig)

    def publish(self, weights, version: int) -> None:
        self.relay.publish(weights, version)  # never waits for a reader (seqlock)

    def stop(self) -> None:
        for wid in self.procs:
            self.send(wid, Stop())
        for p in self.procs.values():
            p.proc.join(timeout=10)
            if p.proc.exitcode is None:
                p.proc.kill()
                p.proc.join(timeout=5)

    def close(self) -> None:
        pass
