"""WeightRelay: versioned, double-buffered shared-memory weights guarded by a seqlock (GLM-5 arXiv 2602.15763 §4.1).

The trainer publishes new weights without waiting for anyone; rollout workers pull the latest
version whenever they choose (between groups, or every N decode steps mid-trajectory). This is the
pull-based "relay" of Laminar (arXiv 2510.12633: "rollouts pull the latest weight anytime without
stalling the actor's training loop"), in one machine's shared memory rather than slime's
push-and-pause NCCL broadcast.

Layout: a state_dict is flattened into one fp32 tensor per slot (two slots, `share_memory_()`),
with a table of (name, shape, offset). Beside them, in shared memory: `seq[slot]`, `version[slot]`
and `latest` (the slot readers should take).

The seqlock rule (one writer, any number of readers):
  writer  s = 1 − latest;  seq[s] += 1 (now odd: "being written");  copy the weights into slot s;
          version[s] = v;  seq[s] += 1 (even again: "stable");  latest = s.
  reader  s = latest;  q1 = seq[s];  if q1 is odd, retry;  copy slot s out;  q2 = seq[s];
          if q1 != q2 the writer touched slot s during the copy (it published twice meanwhile):
          the copy may be torn, retry; else the copy is exactly version[s].
The writer never waits for readers (it only ever writes the slot readers were told not to take);
a reader retries at most while the writer republishes faster than one copy takes, which a trainer
publishing once per step never does.

No lock at all, on purpose: the counters are lock-free shared integers (`RawArray`). A worker can be
SIGKILLed at any instruction (the fault tests do it; so does the OOM killer), and a process-shared
lock it held then stays held for ever: the trainer's next publish would block, and the run with it.
Aligned 8-byte loads and stores are atomic on x86-64 and arm64; their order around the copy rests on
x86-64's ordered loads and ordered stores, and elsewhere on the mutex operations of the GIL hand-off
that every torch copy makes.

Pass a relay to spawned children as a `Process` argument (tensors travel as shared-memory handles
via torch.multiprocessing, the counters by inheritance); do not send it through a Queue.
Simplified: everything is stored as fp32 (integer buffers are exact below 2^24); one writer only.
A pull copies into the target's own device and dtype (a bf16 model on the GPU with --device cuda): a copy from
these pageable CPU slots to the GPU returns only when done, so the seqlock's second read still follows the copy;
a publish from a GPU model copies back the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives in the flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


def _tensors(obj) -> dict[str, torch.Tensor]:
    return obj.state_dict() if isinstance(obj, torch.nn.Module) else obj


class WeightRelay:
    """Double-buffered weights in shared memory. The trainer calls `publish`, workers call `pull`.

    relay = WeightRelay(model.state_dict())            # version 0 = these weights
    relay.publish(model, version=1)                    # trainer, after a step; never blocks
    v = relay.pull(worker_model)                       # worker: copies the newest version, returns it
    relay.latest_version()                             # cheap poll (no copy)
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], version: int = 0, ctx=None):
        ctx = ctx or mp.get_context("spawn")
        self.layout: list[Entry] = []
        offset = 0
        for name, t in state_dict.items():
            self.layout.append(Entry(name, tuple(t.shape), offset, t.numel()))
            offset += t.numel()
        self.numel = offset
        self.slots = [torch.zeros(offset, dtype=torch.float32).share_memory_() for _ in range(2)]
        self._seq = ctx.RawArray("q", [0, 0])  # per-slot sequence counters (odd = being written)
        self._version = ctx.RawArray("q", [-1, -1])  # version held by each slot
        self._latest = ctx.RawValue("q", 1)  # the slot readers take; first publish goes to slot 0
        self.publish(state_dict, version)

    def latest_version(self) -> int:
        return self._version[self._latest.value]

    def publish(self, weights: torch.nn.Module | dict[str, torch.Tensor], version: int) -> None:
        """Write `weights` as `version` into the inactive slot, then make it the latest. One writer only."""
        tensors = _tensors(weights)
        current = self.latest_version()
        if version <= current:
            raise ValueError(f"publish: versions must increase; got version={version} after {current}")
        s = 1 - self._latest.value
        self._seq[s] += 1  # odd: readers that started on slot s will retry (one writer: no lost update)
        flat = self.slots[s]
        with torch.no_grad():
            for e in self.layout:
                t = tensors.get(e.name)
                if t is None or tuple(t.shape) != e.shape:
                    got = None if t is None else tuple(t.shape)
                    raise ValueError(
                        f"publish: tensor {e.name!r} has shape {got}, relay layout expects {e.shape}"
                    )
                flat[e.offset : e.offset + e.numel].copy_(t.detach().reshape(-1))
        self._version[s] = version
        self._seq[s] += 1  # even: stable
        self._latest.value = s

    def _try_pull(self, tensors: dict[str, torch.Tensor]) -> int | None:
        """One seqlock read attempt: the version copied, or None if it may be torn."""
        s = self._latest.value
        q1 = self._seq[s]
        if q1 % 2:
            return None
        flat = self.slots[s]
        with torch.no_grad():
            for e in self.layout:
                tensors[e.name].copy_(flat[e.offset : e.offset + e.numel].view(e.shape))
        v = self._version[s]
        q2 = self._seq[s]
        return v if q1 == q2 else None

    def pull(
        self,
        target: torch.nn.Module | dict[str, torch.Tensor],
        min_version: int | None = None,
        timeout_s: float = 60.0,
        stats: dict | None = None,
    ) -> int:
        """Copy the newest weights into `target` in place; returns the version copied.

        min_version: wait (polling) until at least this version is published; TimeoutError after
        timeout_s. stats: if given, stats["retries"] counts torn reads that were retried.
        """
        tensors = _tensors(target)
        missing = [e.name for e in self.layout if e.name not in tensors]
        if missing:
            raise ValueError(f"pull: target lacks tensors {missing[:5]} of the relay layout")
        deadline = time.monotonic() + timeout_s
        retries = 0
        while True:
            if min_version is not None and self.latest_version() < min_version:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"pull: version {min_version} not published within {timeout_s}s "
                        f"(latest is {self.latest_version()})"
                    )
                time.sleep(0.001)
                continue
            v = self._try_pull(tensors)
            if v is not None:
                if stats is not None:
                    stats["retries"] = stats.get("retries", 0) + retries
                return v
            retries += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"pull: no consistent read within {timeout_s}s ({retries} torn reads)")
