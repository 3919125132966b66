"""GLM-5's sample filters for asynchronous RL, as small pure functions (arXiv 2602.15763 §4.1).

  τ-drop           a trajectory whose OLDEST segment was generated more than τ weight versions before the
                   version that trains it is dropped (`is_stale`, `tau_drop`). The oldest segment, not the
                   newest: with partial rollout one trajectory spans several versions, and its first tokens
                   condition all the later ones.
  crash filter     samples on which the environment itself failed (a sandbox that did not start, a judge
                   that timed out before the program ran: `Trajectory.env_error`) carry no reward signal,
                   so they are removed rather than trained as reward 0. GLM-5 keeps the group if more than
                   half of it is valid and pads it back to its size by repeating valid samples; otherwise
                   the whole group is dropped (`filter_crashed`). A wrong or hostile program is NOT an
                   environment failure: it is a reward-0 answer (envs.MultiTurnCodeEnv defines the line).
  wasted tokens    every token generated and never trained, by cause (`wasted_tokens`).

Simplified: which valid samples repeat is not in the report; here they repeat in sample order
(valid[0], valid[1], ...), so the padded group is a pure function of the group.
"""

from __future__ import annotations

import copy

# Group and Trajectory (nanoglm5/rl/buffer.py) appear in annotations only, unimported: buffer.py imports this module


def is_stale(t: Trajectory, trainer_version: int, tau: int | None) -> bool:
    """GLM-5's τ-drop test: v_train − (oldest segment version) > τ. τ = None: never stale."""
    return tau is not None and trainer_version - t.oldest_version > tau


def tau_drop(trajs: list[Trajectory], trainer_version: int, tau: int | None) -> tuple[list, list]:
    """(kept, dropped) in order."""
    kept = [t for t in trajs if not is_stale(t, trainer_version, tau)]
    dropped = [t for t in trajs if is_stale(t, trainer_version, tau)]
    return kept, dropped


def filter_crashed(group: Group) -> Group | None:
    """Remove env-crashed samples. All valid: the group itself. More than half valid: the valid samples, then
    copies of them in order until the group has its size again (copies marked meta["padded"] = True, so
    wasted-token counts do not count them twice). Half or fewer valid: None (drop the group)."""
    G = len(group.trajectories)
    valid = [t for t in group.trajectories if not t.env_error]
    if len(valid) == G:
        return group
    if 2 * len(valid) <= G:
        return None
    pad = []
    for i in range(G - len(valid)):
        t = copy.deepcopy(valid[i % len(valid)])
        t.meta = {**t.meta, "padded": True}
        pad.append(t)
    return type(group)(group.group_id, group.attempt, valid + pad, group.task_id)


def generated_tokens(trajs: list[Trajectory]) -> int:
    """Loss tokens the policy actually generated for these samples (padding copies excluded)."""
    return sum(t.n_loss_tokens for t in trajs if not t.meta.get("padded"))


def wasted_tokens(generated: int, late_discarded: int = 0, tau_dropped: int = 0, crash_removed: int = 0,
                  crash_dropped_groups: int = 0, untrained_at_end: int = 0,
                  in_flight_at_end: int = 0) -> dict:
    """Generated-but-never-trained tokens by cause, their total and its fraction of `generated`.

    late_discarded: groups whose lease had expired or been re-issued (a duplicate); tau_dropped: τ-dropped
    samples; crash_removed: env-crashed samples of kept groups; crash_dropped_groups: every sample of a group
    with half or fewer valid; untrained_at_end: committed groups still in the buffer when the run ended;
    in_flight_at_end: tokens workers had generated for groups that never came back (still decoding at the
    end, or on a worker that died, including groups given up after --max-task-failures)."""
    parts = {"late_discarded": late_discarded, "tau_dropped": tau_dropped, "crash_removed": crash_removed,
             "crash_dropped_groups": crash_dropped_groups, "untrained_at_end": untrained_at_end, "in_flight_at_end": in_flight_at_end}
    bad = {k: v for k, v in {**parts, "generated": generated}.items() if v < 0}
    if bad:
        raise ValueError(f"wasted_tokens: token counts must be >= 0, got {bad}")
    total = sum(parts.values())
    return {**parts, "total": total, "generated": generated, "frac": total / max(1, generated)}
