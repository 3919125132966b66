"""Replay buffer, admission control and leases for asynchronous RL (GLM-5 arXiv 2602.15763 §4.1).

A plain, single-process class owned by the controller. Rollout workers never touch it: they get
`Lease`s (through a queue) and send back `Group`s; the controller calls `admit`, `complete`,
`expire` and `take_batch`.

  Trajectory / Group   what workers produce, token-in-token-out (TITO, GLM-5 §4.1.2): token ids,
                       behaviour log-probs, loss mask, reward, per-segment weight versions, and
                       the GRPO advantage the controller sets when the whole group has arrived.
  admission control    AReaL's staleness manager (arXiv 2505.24298): a new group is admitted only while
                       submitted ≤ (η + v + 1)·B, B = groups per train step, v = trainer version.
                       With batches taken in group_id order ("fifo"), group k is trained at step
                       ⌊k/B⌋ and was admitted at v ≥ ⌊k/B⌋ − η, so no trained token is more than η
                       versions stale (workers must pull at least `lease.min_version`); η = 0 is the
                       synchronous schedule.
  leases               each admitted group goes out as (group_id, attempt) with a deadline; an
                       expired lease (a killed or stuck worker) is re-queued ahead of new groups,
                       and a late result for an expired or re-issued lease is discarded. Commits are
                       idempotent by group_id: each group is trained exactly once. A lease whose
                       worker died (`fail`) is re-queued at once, without waiting for its deadline;
                       a group whose worker died max_failures times is given up: it completes empty
                       (its batch is one group smaller) and is never trained.
  τ-drop               GLM-5 §4.1: drop a sample if v_train − (its oldest segment version) > τ;
                       drops and the lengths of dropped samples are counted (dropping starves
                       slow rollouts — a bias toward short answers — so look at those lengths).
  state_dict           buffered-but-untrained groups, counters and in-flight leases (re-queued on
                       load), so a resumed run trains the same multiset of groups
                       (tests/test_rl_system.py checks it).

Orders for `take_batch`: "fifo" (default) waits for the B lowest untrained group ids — the
staleness bound above holds and η = 0 reproduces the synchronous run; "ready" takes the B
lowest-id groups that are complete — no head-of-line blocking, staleness then bounded only by τ.
Simplified: the task behind a group_id is the controller's business (e.g. tasks[group_id % n]).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from nanoglm5.rl.async_rules import generated_tokens, is_stale


@dataclass
class Trajectory:
    """One sampled response (or multi-turn episode), token-in-token-out.

    tokens:    all token ids, prompt first, then model and environment tokens in order.
    logprobs:  log μ(token) under the distribution actually sampled (temperature/top-k applied);
               0.0 where loss_mask is 0. Same length as tokens.
    loss_mask: 1 = sampled by the policy, trained; 0 = prompt, observation/tool output, padding.
    reward:    scalar from the environment's checker.
    versions:  [(start_idx, version)], increasing start_idx, first start_idx 0: tokens from
               start_idx up to the next segment were generated with weights `version` (one entry
               unless the worker swapped weights mid-trajectory — partial rollout).
    advantage: the GRPO advantage, normalised over the whole group; 0.0 until the controller sets
               it on arrival (learner.attach_advantages), before any τ-drop removes samples.
    meta:      free-form (turn count, env latency, finish reason...).
    env_error: the environment itself failed on this sample (sandbox did not start, judge timeout before
               the program ran), so its reward says nothing about the policy; async_rules.filter_crashed
               removes it (GLM-5 §4.1). A wrong or hostile program is reward 0, not an env error.
    """

    tokens: list[int]
    logprobs: list[float]
    loss_mask: list[int]
    reward: float
    versions: list[tuple[int, int]]
    advantage: float = 0.0
    meta: dict = field(default_factory=dict)
    env_error: bool = False

    def __post_init__(self):
        n = len(self.tokens)
        if len(self.logprobs) != n or len(self.loss_mask) != n:
            raise ValueError(
                f"Trajectory: tokens ({n}), logprobs ({len(self.logprobs)}) and loss_mask "
                f"({len(self.loss_mask)}) must have the same length"
            )
        if not self.versions or self.versions[0][0] != 0:
            raise ValueError(
                f"Trajectory: versions must start with a segment at index 0, got {self.versions}"
            )
        self.versions = [tuple(s) for s in self.versions]  # JSON round trips turn tuples into lists

    @property
    def oldest_version(self) -> int:
        return min(v for _, v in self.versions)

    @property
    def n_loss_tokens(self) -> int:
        return sum(self.loss_mask)

    def loss_tokens_by_version(self) -> Counter:
        """{version: number of loss tokens generated with it}."""
        out, bounds = Counter(), [s for s, _ in self.versions[1:]] + [len(self.tokens)]
        for (start, v), end in zip(self.versions, bounds):
            out[v] += sum(self.loss_mask[start:end])
        return out


@dataclass
class Group:
    """A GRPO group: the G trajectories sampled for one prompt under one lease."""

    group_id: int
    attempt: int
    trajectories: list[Trajectory]
    task_id: str = ""

    @staticmethod
    def from_dict(d: dict) -> Group:
        return Group(
            d["group_id"], d["attempt"], [Trajectory(**t) for t in d["trajectories"]], d.get("task_id", "")
        )


@dataclass(frozen=True)
class Lease:
    """Permission for one worker to generate group `group_id` (attempt `attempt`) until `deadline`.
    The worker must generate with weights of version >= min_version (the trainer version at admission)."""

    group_id: int
    attempt: int
    deadline: float
    min_version: int


class ReplayBuffer:
    """Admission control + leases + completed groups, in group_id order.

    groups_per_step: B, groups per train step.  max_staleness: η (0 = synchronous-equivalent).
    lease_timeout_s: a lease not completed (or renewed) within this is re-queued.
    drop_tau: τ for the GLM-5 stale-sample drop (None = off).  order: "fifo" or "ready".
    clock: time source (monotonic seconds); tests inject a fake one.
    """

    def __init__(
        self,
        groups_per_step: int,
        max_staleness: int = 0,
        lease_timeout_s: float = 600.0,
        drop_tau: int | None = None,
        order: str = "fifo",
        clock=time.monotonic,
    ):
        if groups_per_step < 1 or max_staleness < 0 or lease_timeout_s <= 0:
            raise ValueError(
                f"need groups_per_step >= 1, max_staleness >= 0, lease_timeout_s > 0; got "
                f"{groups_per_step}, {max_staleness}, {lease_timeout_s}"
            )
        if order not in ("fifo", "ready"):
            raise ValueError(f"order must be 'fifo' or 'ready', got {order!r}")
        if drop_tau is not None and drop_tau < 0:
            raise ValueError(f"drop_tau must be >= 0 or None, got {drop_tau}")
        self.B, self.eta, self.lease_timeout_s = groups_per_step, max_staleness, lease_timeout_s
        self.drop_tau, self.order, self.clock = drop_tau, order, clock
        self.submitted = 0  # distinct group ids ever admitted (ids 0..submitted-1)
        self.max_groups: int | None = None  # the run trains no more than this many groups: admit none beyond
        self.leases: dict[int, Lease] = {}  # in flight, by group_id
        self.requeue: list[int] = []  # expired, waiting to be re-issued (sorted)
        self.attempts: dict[int, int] = {}  # last attempt issued per untrained group
        self.done: dict[int, Group] = {}  # completed, not yet trained
        self.trained: set[int] = set()
        self.failures: dict[int, int] = {}  # untrained group → how many times its worker died holding it
        self.counters = Counter()  # expired, reissued, late_discarded, dropped_samples, ...
        self.dropped_lengths: list[int] = []
        self.staleness_hist = Counter()  # {v_train − v_gen: loss tokens}

    # ---- admission and leases ----------------------------------------------------------------

    def can_admit(self, trainer_version: int) -> bool:
        """Is there work to hand out: a re-queued group, or room under (η + v + 1)·B (and under max_groups: a group
        the run will never train is pure waste, which async admission running η versions ahead would otherwise
        generate at the end of every run)?"""
        if self.max_groups is not None and self.submitted >= self.max_groups:
            return bool(self.requeue)
        return bool(self.requeue) or self.submitted + 1 <= (self.eta + trainer_version + 1) * self.B

    def admit(self, trainer_version: int) -> Lease | None:
        """Issue the next lease (re-queued groups first, lowest id first), or None if staleness forbids."""
        self.expire()
        if self.requeue:
            gid = self.requeue.pop(0)
            self.counters["reissued"] += 1
        elif self.can_admit(trainer_version):
            gid, self.submitted = self.submitted, self.submitted + 1
        else:
            return None
        attempt = self.attempts.get(gid, -1) + 1
        self.attempts[gid] = attempt
        lease = Lease(gid, attempt, self.clock() + self.lease_timeout_s, trainer_version)
        self.leases[gid] = lease
        return lease

    def renew(self, group_id: int, attempt: int) -> bool:
        """Heartbeat from a worker on a long (tail) group: push its deadline out. False if stale."""
        lease = self.leases.get(group_id)
        if lease is None or lease.attempt != attempt:
            return False
        self.leases[group_id] = Lease(
            group_id, attempt, self.clock() + self.lease_timeout_s, lease.min_version
        )
        return True

    def expire(self) -> list[int]:
        """Re-queue every lease past its deadline; returns their group ids."""
        now = self.clock()
        gone = sorted(g for g, lease in self.leases.items() if lease.deadline < now)
        for g in gone:
            del self.leases[g]
        self.requeue = sorted(self.requeue + gone)
        self.counters["expired"] += len(gone)
        return gone

    def fail(self, group_id: int, attempt: int, max_failures: int = 0, task_id: str = "") -> str | None:
        """The worker holding this lease died. Returns "requeued" (it goes out again now, ahead of new groups),
        "dropped" (its worker died max_failures times, 0 = never give up: the group completes empty and is never
        trained) or None (the lease was already gone: completed, expired or re-issued)."""
        lease = self.leases.get(group_id)
        if lease is None or lease.attempt != attempt:
            return None
        del self.leases[group_id]
        n = self.failures[group_id] = self.failures.get(group_id, 0) + 1
        if max_failures and n >= max_failures:
            self.done[group_id] = Group(group_id, attempt, [], task_id)
            self.counters["failed_groups"] += 1
            return "dropped"
        self.requeue = sorted(self.requeue + [group_id])
        self.counters["requeued_dead"] += 1
        return "requeued"

    def complete(self, group: Group) -> bool:
        """Commit a finished group if it answers the live lease; otherwise discard it (late/duplicate)."""
        lease = self.leases.get(group.group_id)
        if lease is None or lease.attempt != group.attempt:
            self.counters["late_discarded"] += 1
            return False
        del self.leases[group.group_id]
        self.done[group.group_id] = group
        self.counters["completed"] += 1
        return True

    # ---- consumption -------------------------------------------------------------------------

    def _head(self) -> int:
        """Lowest group id not yet trained (ids are trained densely in fifo order)."""
        return len(self.trained) if self.order == "fifo" else min(self.done, default=self.submitted)

    def ready(self, n: int | None = None) -> bool:
        n = n or self.B
        if self.order == "fifo":
            head = self._head()
            return all(g in self.done for g in range(head, head + n))
        return len(self.done) >= n

    def take_batch(self, n: int | None = None, trainer_version: int = 0) -> list[Group] | None:
        """The next n (default B) groups in group_id order, or None if not ready yet.

        Applies the τ-drop to each trajectory (a group emptied by it is left out of the batch but
        still counts as trained) and records the staleness of every trained loss token.
        """
        n = n or self.B
        if not self.ready(n):
            return None
        ids = list(range(self._head(), self._head() + n)) if self.order == "fifo" else sorted(self.done)[:n]
        batch = []
        for gid in ids:
            group = self.done.pop(gid)
            self.trained.add(gid)
            self.attempts.pop(gid, None)
            self.failures.pop(gid, None)
            kept = [t for t in group.trajectories if not self._drop(t, trainer_version)]
            for t in kept:
                for v, k in t.loss_tokens_by_version().items():
                    self.staleness_hist[trainer_version - v] += k
            if kept:
                batch.append(Group(group.group_id, group.attempt, kept, group.task_id))
            elif group.trajectories:  # (a group given up by `fail` has none: counted there)
                self.counters["dropped_groups"] += 1
        self.counters["trained_groups"] += n
        return batch

    def _drop(self, t: Trajectory, trainer_version: int) -> bool:
        if not is_stale(t, trainer_version, self.drop_tau):
            return False
        self.counters["dropped_samples"] += 1
        self.counters["tau_dropped_tokens"] += generated_tokens([t])  # a padding copy was never generated
        self.dropped_lengths.append(len(t.tokens))
        return True

    def stats(self) -> dict:
        """A snapshot for logging (counts, staleness histogram, dropped-sample lengths)."""
        return {
            "submitted": self.submitted,
            "in_flight": len(self.leases),
            "requeued": len(self.requeue),
            "buffered": len(self.done),
            "trained": len(self.trained),
            **self.counters,
            "staleness_hist": dict(sorted(self.staleness_hist.items())),
            "dropped_lengths": list(self.dropped_lengths),
        }

    # ---- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to resume (JSON-serializable). In-flight leases are saved as re-queued:
        their workers die with the run, so on load they go out again (attempt + 1)."""
        return {
            "config": {
                "groups_per_step": self.B,
                "max_staleness": self.eta,
                "drop_tau": self.drop_tau,
                "order": self.order,
            },
            "submitted": self.submitted,
            "requeue": sorted(self.requeue + list(self.leases)),
            "attempts": {str(k): v for k, v in self.attempts.items()},
            "failures": {str(k): v for k, v in self.failures.items()},
            "done": [asdict(g) for _, g in sorted(self.done.items())],
            "trained": sorted(self.trained),
            "counters": dict(self.counters),
            "dropped_lengths": list(self.dropped_lengths),
            "staleness_hist": {str(k): v for k, v in self.staleness_hist.items()},
        }

    def load_state_dict(self, sd: dict) -> None:
        cfg = sd["config"]
        if cfg["groups_per_step"] != self.B or cfg["order"] != self.order:
            raise ValueError(
                f"load_state_dict: checkpoint has groups_per_step={cfg['groups_per_step']}, "
                f"order={cfg['order']!r}; this buffer has {self.B}, {self.order!r}"
            )
        self.submitted = sd["submitted"]
        self.leases = {}
        self.requeue = sorted(sd["requeue"])
        self.attempts = {int(k): v for k, v in sd["attempts"].items()}
        self.failures = {int(k): v for k, v in sd.get("failures", {}).items()}
        self.done = {d["group_id"]: Group.from_dict(d) for d in sd["done"]}
        self.trained = set(sd["trained"])
        self.counters = Counter(sd["counters"])
        self.dropped_lengths = list(sd["dropped_lengths"])
        self.staleness_hist = Counter({int(k): v for k, v in sd["staleness_hist"].items()})
