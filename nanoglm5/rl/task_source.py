"""TaskSource: the controller's task stream, group_id → task.

The task of a group is a pure function of (seed, group_id): epoch e over the task list is the permutation
np.random.default_rng([seed, e]), so a re-issued group (a dead worker's lease) and a resumed run get the same
prompt. `--env mix` interleaves math, code and agent tasks.

The benchmark's heavy-tailed workload lives here too: with `length_median > 0` each group is forced to decode
a lognormal number of tokens (p99/p50 = `length_p99_over_p50`, 10 being the skew Laminar, arXiv 2510.12633,
reports for real RL rollouts), and `judge_latency_s` makes every judge call sleep (a slow grader).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from nanoglm5.data.tasks import lognormal_lengths
from nanoglm5.rl.envs import make_env
from nanoglm5.rl.rl_config import RLConfig


class TaskSource:
    """group_id → Task. Epoch e over the task list is np.random.default_rng([seed, e]).permutation."""

    def __init__(self, cfg: RLConfig):
        names = ["math", "code", "agent"] if cfg.env == "mix" else [cfg.env]
        lists = [make_env(n).make_tasks(cfg.n_train_tasks, cfg.seed, "train") for n in names]
        self.tasks = [t for row in zip(*lists) for t in row]  # interleaved: math, code, agent, math, ...
        self.cfg, self.names = cfg, names
        self._perm = (-1, None)

    def __call__(self, group_id: int):
        n = len(self.tasks)
        epoch = group_id // n
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.cfg.seed, epoch]).permutation(n))
        task = self.tasks[int(self._perm[1][group_id % n])]
        c = self.cfg
        meta = dict(task.meta)
        if c.length_median > 0:
            meta["forced_len"] = lognormal_lengths(1, f"{c.seed}:{group_id}", c.length_median,
                                                   c.length_p99_over_p50, lo=1, hi=c.max_len // 2)[0]
        if c.judge_latency_s > 0:
            meta["judge_latency_s"] = c.judge_latency_s
        return replace(task, meta=meta)

    def length_hint(self, task) -> int:
        """Expected decode tokens of a group (dynamic repackaging routes on it)."""
        if "forced_len" in task.meta:
            return task.meta["forced_len"]
        if task.env == "agent":
            return (len(task.meta["ops"]) + 1) * 12
        return self.cfg.max_new_tokens // 2

    def eval_tasks(self) -> list:
        return [t for n in self.names for t in make_env(n).make_tasks(self.cfg.n_eval_tasks, self.cfg.seed, "eval")]
