"""Asynchronous RL: relay, replay buffer, rollout workers, environments, sandbox, losses (rl.md §5)."""
