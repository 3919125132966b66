"""--backend ray: the rollout workers and the learner as Ray actors, behind the interface of transport.py.

The controller runs in the driver (rl.py) with exactly the logic of --backend mp: the replay buffer, admission,
leases, weight versions, respawns and checkpoints are the controller's; only the transport differs.

  RolloutActor   one per rollout worker: runs rollout.worker_main (the same loop as a worker process) in a
                 thread. The controller's Assign / Stop arrive by actor calls into an inbox; the worker's
                 messages wait in an outbox that the controller long-polls (`drain`). A dead actor (its node
                 lost, the OOM killer, ray.kill) fails that pending poll at once (ActorDiedError), so its leases
                 are re-queued immediately, not after --lease-timeout-s.
  LearnerActor   the model being trained and its optimizer (learner.Learner) on --device; the driver's trainer
                 thread calls update() once per rollout batch, then publish().

Weights: publish() is one ray.put of the state dict (CPU tensors) per version, by the learner actor; the driver
sends (version, reference) to every worker, which ray.get()s the object when its pickup policy says so (between
groups, or mid-trajectory with --partial-rollout) and copies it in place into its model (on the GPU in bf16 with
--device cuda). An object in Ray's object store is immutable once put, so a worker copies exactly the version it
was given, never a mix of two: the relay's no-torn-read guarantee holds by construction, with no seqlock. Workers
on the learner's node read the object from shared memory; another node fetches it once per version.

The cluster: --ray-address joins a running one (`ray start --head` / `ray start --address ...`; docs/scaling.md);
without it a local one sized to this machine is started and shut down at the end. Ray itself is optional and is
imported only here, when --backend ray is chosen.
"""

from __future__ import annotations

import functools
import os
import queue
import signal
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

from nanoglm5.rl.learner import Learner, build_policy
from nanoglm5.rl.messages import Stop
from nanoglm5.rl.rl_config import RLConfig
from nanoglm5.rl.rollout import worker_main
from nanoglm5.training.state import seed_everything
from nanoglm5.training.train_config import TrainError

POLL_S = 0.05  # a worker's drain() returns after this long without a message


def import_ray():
    """Ray, or a TrainError that says what to install."""
    try:
        import ray
    except ImportError as e:
        raise TrainError(f"--backend ray needs Ray, which cannot be imported here ({e}): pip install ray "
                         "(requirements-dev.txt pins the version the tests use), or use --backend mp") from None
    return ray


def _cpu(obj, clone: bool = False):
    """A (nested) state dict with every tensor on the CPU, for the object store; clone=True: tensors of our
    own (what comes out of the object store may be a read-only view when zero-copy tensors are enabled)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        return t.clone() if clone else t
    if isinstance(obj, dict):
        return {k: _cpu(v, clone) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v, clone) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------- inside actors
class _Inbox:
    """The worker's lease pipe, as a queue: poll(timeout) and recv(), one consumer (the worker thread)."""

    def __init__(self):
        self.q, self.head = queue.Queue(), []

    def poll(self, timeout: float = 0.0) -> bool:
        if not self.head:
            try:
                self.head.append(self.q.get(timeout=timeout) if timeout > 0 else self.q.get_nowait())
            except queue.Empty:
                return False
        return True

    def recv(self):
        return self.head.pop() if self.head else self.q.get()


class _Outbox:
    def __init__(self):
        self.q = queue.Queue()

    def send(self, msg) -> None:
        self.q.put(msg)


class ObjectStoreWeights:
    """The worker's weight source: the newest (version, object reference) the controller offered.

    Same calls as the relay (latest_version, pull). The referenced object never changes after ray.put, so a
    pull copies exactly one version; the version number travels with the reference in one call."""

    def __init__(self, version: int, refs: list):
        self.cond = threading.Condition()
        self.version, self.refs = version, refs

    def offer(self, version: int, refs: list) -> None:
        with self.cond:
            if version > self.version:  # calls may arrive out of order on a threaded actor: keep the newest
                self.version, self.refs = version, refs
                self.cond.notify_all()

    def latest_version(self) -> int:
        return self.version

    def pull(self, target, min_version: int | None = None, timeout_s: float = 60.0, stats: dict | None = None) -> int:
        import ray

        with self.cond:
            if not self.cond.wait_for(lambda: min_version is None or self.version >= min_version, timeout_s):
                raise TimeoutError(f"pull: version {min_version} not offered within {timeout_s}s "
                                   f"(latest is {self.version})")
            version, refs = self.version, self.refs
        weights = ray.get(refs[0])
        tensors = target.state_dict() if isinstance(target, torch.nn.Module) else target
        missing = [k for k in weights if k not in tensors]
        if missing:
            raise ValueError(f"pull: target lacks tensors {missing[:5]} of the published weights")
        with torch.no_grad():
            for k, t in weights.items():
                tensors[k].copy_(t)  # to the target's device and dtype (bf16 on the GPU), in place
        return version


class RolloutActor:
    """One rollout worker: rollout.worker_main in a thread; Assign/Stop in through deliver(), messages out
    through drain(). Nothing in __init__ can fail: an error in the worker arrives as a WorkerFailed message."""

    def __init__(self, wid: int, cfg: dict, policy: dict, tokenizer_json: str, t0: float, version: int, refs: list):
        tok = Path(tempfile.mkdtemp(prefix="nanoglm5-rollout-")) / "tokenizer.json"  # nodes share no disk
        tok.write_text(tokenizer_json)
        self.inbox, self.outbox = _Inbox(), _Outbox()
        self.weights = ObjectStoreWeights(version, refs)
        self.thread = threading.Thread(target=worker_main, name=f"rollout-{wid}", daemon=True,
                                       args=(wid, cfg, policy, str(tok), self.weights, self.inbox, self.outbox, t0))
        self.thread.start()

    def deliver(self, msg) -> None:
        self.inbox.q.put(msg)

    def set_weights(self, version: int, refs: list) -> None:
        self.weights.offer(version, refs)

    def drain(self, timeout: float) -> list:
        """The worker's messages since the last call; waits up to `timeout` for the first one."""
        try:
            out = [self.outbox.q.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                out.append(self.outbox.q.get_nowait())
            except queue.Empty:
                return out


class LearnerActor:
    """The model being trained, its optimizer and the update, on --device (fp32 weights, bf16 autocast on CUDA)."""

    def __init__(self, cfg: dict, policy: dict, state_dict: dict, opt_state: dict):
        c = RLConfig(**cfg)
        if c.trainer_threads > 0:
            torch.set_num_threads(c.trainer_threads)
        seed_everything(c.seed)
        model = build_policy(policy)
        model.load_state_dict(state_dict)
        self.learner = Learner(model.to(c.device), c)
        self.learner.opt.load_state_dict(_cpu(opt_state, clone=True))  # the optimizer writes into its state

    def update(self, batch: list) -> dict:
        return self.learner.update(batch)

    def reset_optimizer(self) -> None:
        self.learner.reset_optimizer()

    def publish(self) -> list:
        """The current weights as one immutable object in the store; a list, so Ray passes the reference on."""
        import ray

        return [ray.put(_cpu(self.learner.model.state_dict()))]

    def state(self) -> tuple[dict, dict]:
        return _cpu(self.learner.model.state_dict()), _cpu(self.learner.opt.state_dict())


@functools.cache
def _remote_classes():
    ray = import_ray()
    return ray.remote(RolloutActor), ray.remote(LearnerActor)


# ---------------------------------------------------------------------------------------------- the driver side
class RemoteLearner:
    """The trainer handle for a LearnerActor (same calls as transport.InProcessLearner)."""

    def __init__(self, ray, actor):
        self.ray, self.actor = ray, actor

    def _get(self, ref):
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayActorError as e:
            raise TrainError(f"the learner actor died ({str(e).splitlines()[0][:200]}); continue from the last "
                             "checkpoint with --resume") from None

    def update(self, batch: list) -> dict:
        return self._get(self.actor.update.remote(batch))

    def reset_optimizer(self) -> None:
        self._get(self.actor.reset_optimizer.remote())

    def weights(self) -> list:
        return self._get(self.actor.publish.remote())

    def sync(self, learner: Learner) -> None:
        model_sd, opt_sd = self._get(self.actor.state.remote())
        learner.model.load_state_dict(model_sd)
        learner.opt.load_state_dict(_cpu(opt_sd, clone=True))


class RayTransport:
    """Workers and the learner as Ray actors (module docstring). `log`: where to say what was started."""

    name = "ray"

    def __init__(self, cfg: RLConfig, policy: dict, tokenizer_file: str, log=print):
        self.ray = import_ray()  # fails here, before any work, when Ray is missing
        self.cfg, self.policy, self.log = cfg, policy, log
        self.tokenizer_json = Path(tokenizer_file).read_text()
        self.actors: dict = {}
        self.inflight: dict = {}  # wid → the pending drain() reference
        self.dead: dict[int, str] = {}
        self.owns_cluster, self.learner_actor, self.latest = False, None, None
        self.lock = threading.Lock()  # spawn (control thread) vs publish (trainer thread): no actor misses a version

    # -- setup ---------------------------------------------------------------------------------------
    def _connect(self) -> None:
        ray, c = self.ray, self.cfg
        if not ray.is_initialized():  # (the tests share one cluster across runs: then it is theirs to stop)
            if c.ray_address:
                ray.init(address=c.ray_address, log_to_driver=True)
            else:
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True)
                self.owns_cluster = True
            res = ray.cluster_resources()
            self.log(f"[rl] ray: {'started a local cluster' if self.owns_cluster else 'joined ' + c.ray_address}: "
                     f"{len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs")
        res = ray.cluster_resources()
        if c.device == "cuda" and res.get("GPU", 0) <= 0:
            raise TrainError("--device cuda: the Ray cluster has no GPU (start its nodes on GPU machines, or use "
                             "--device cpu)")
        need = c.workers * max(1, c.worker_threads) + max(1, c.trainer_threads)
        have = res.get("CPU", 0)
        self.cpu_scale = min(1.0, have / need) if have > 0 else 1.0
        if self.cpu_scale < 1:  # like --backend mp on a small machine: the actors share the cores
            self.log(f"[rl] ray: the actors ask for {need} CPUs, the cluster has {have:g}: each asks for "
                     f"{self.cpu_scale:.2f} of its threads, so all of them fit (oversubscribed, as with --backend mp)")
        gpu = c.gpus_per_actor or 1.0 / (c.workers + 1)  # 0: the learner and every worker share one GPU
        self.gpus = gpu if c.device == "cuda" else 0

    def _options(self, threads: int) -> dict:
        return {"num_cpus": max(1, threads) * self.cpu_scale, "num_gpus": self.gpus}

    def open(self, learner: Learner, version: int) -> RemoteLearner:
        self._connect()
        ray, c = self.ray, self.cfg
        _, learner_cls = _remote_classes()
        sd = _cpu(learner.model.state_dict())
        self.learner_actor = learner_cls.options(**self._options(c.trainer_threads)).remote(
            asdict(c), self.policy, sd, _cpu(learner.opt.state_dict()))
        self.latest = (version, [ray.put(sd)])
        return RemoteLearner(ray, self.learner_actor)

    # -- workers ---------------------------------------------------------------------------------------
    def spawn(self, wid: int, t0: float) -> None:
        rollout_cls, _ = _remote_classes()
        with self.lock:
            a = rollout_cls.options(max_concurrency=4, **self._options(self.cfg.worker_threads)).remote(
                wid, asdict(self.cfg), self.policy, self.tokenizer_json, t0, *self.latest)
            self.actors[wid] = a
        self.inflight[wid] = a.drain.remote(POLL_S)

    def send(self, wid: int, msg) -> bool:
        if wid in self.dead:
            return False
        self.actors[wid].deliver.remote(msg)  # fire and forget: a dead actor shows up in poll()
        return True

    def poll(self, timeout: float) -> list[tuple[int, object]]:
        ray = self.ray
        refs = {ref: wid for wid, ref in self.inflight.items()}
        if not refs:
            time.sleep(timeout)
            return []
        ready, rest = ray.wait(list(refs), num_returns=1, timeout=timeout)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        out = []
        for ref in ready:
            wid = refs[ref]
            try:
                msgs = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                self.dead[wid] = "actor died: " + (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                del self.inflight[wid]
                continue
            out += [(wid, m) for m in msgs]
            self.inflight[wid] = self.actors[wid].drain.remote(POLL_S)
        return out

    def exit_reason(self, wid: int) -> str | None:
        return self.dead.get(wid)

    def kill(self, wid: int, sig: int = signal.SIGKILL) -> None:
        self.ray.kill(self.actors[wid], no_restart=True)

    def publish(self, weights, version: int) -> None:
        """weights: the learner actor's [reference] (RemoteLearner.weights); never waits for a worker."""
        with self.lock:
            self.latest = (version, weights)
            for wid, a in list(self.actors.items()):
                if wid not in self.dead:
                    a.set_weights.remote(version, weights)

    def stop(self) -> None:
        live = [wid for wid in self.actors if wid not in self.dead]
        for wid in live:
            self.send(wid, Stop())  # no new work; the kill below then ends the actor's process
        for wid in live:
            self.ray.kill(self.actors[wid], no_restart=True)
        self.inflight.clear()

    def close(self) -> None:
        if self.learner_actor is not None:
            self.ray.kill(self.learner_actor, no_restart=True)
            self.learner_actor = None
        if self.owns_cluster:
            self.ray.shutdown()
            self.owns_cluster = False
