"""What the controller and its rollout workers say to each other: one small dataclass per message kind.

The transport carries them (transport.py: a pair of simplex pipes per worker process; ray_transport.py:
actor calls). Messages are pickled either way and the receiver dispatches on the type
(`match msg: case Assign(): ...`), so every field has a name.

controller → worker (the lease pipe / RolloutActor.deliver)
  Assign(lease, task)              generate group `lease.group_id` of `task` with weights ≥ lease.min_version
  Stop()                           return now
worker → controller (the out pipe / RolloutActor.drain)
  Hello(wid, version, pid)         the worker is up with weights `version`
  Heartbeat(wid, held, stats)      renew these leases, [(group_id, attempt)], queued ones included
  GroupDone(wid, group, stats)     a finished GRPO group (advantages not yet set: the controller does it)
  WorkerFailed(wid, traceback)     an exception ended the worker
`WorkerStats` rides on Heartbeat and GroupDone: what the worker did since its previous report.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanoglm5.data.tasks import Task
from nanoglm5.rl.buffer import Group, Lease


# ---------------------------------------------------------------------------------------------- to a worker
@dataclass(frozen=True)
class Assign:
    lease: Lease
    task: Task


@dataclass(frozen=True)
class Stop:
    pass


# ---------------------------------------------------------------------------------------------- from a worker
@dataclass(frozen=True)
class WorkerStats:
    """busy: [start, end] intervals with work in the engine or the environment since the previous report,
    in seconds since the controller's t0; tokens: generated so far; pulls: weight pulls so far;
    version: the weights the worker holds."""

    busy: list[list[float]]
    tokens: int
    pulls: int
    version: int


@dataclass(frozen=True)
class Hello:
    wid: int
    version: int
    pid: int


@dataclass(frozen=True)
class Heartbeat:
    wid: int
    held: list[tuple[int, int]]
    stats: WorkerStats


@dataclass(frozen=True)
class GroupDone:
    wid: int
    group: Group
    stats: WorkerStats


@dataclass(frozen=True)
class WorkerFailed:
    wid: int
    traceback: str
