"""Asynchronous RL, GLM-5 style (GLM-5 §3.2–3.6, §4.1; research/rl.md §5; DESIGN.md §5).

Read in this order:
  envs.py, sandbox.py  tasks whose reward is checked, not guessed: math answers, code run in a sandbox,
                       a multi-turn calculator agent with heavy-tailed turns and latency (the judge)
  loss.py              GRPO advantages; DDIS (GLM-5), PPO clip, TIS, IcePop; token/sample mean
  buffer.py            Trajectory / Group (token-in-token-out), admission control (η), leases, τ-drop
  relay.py             versioned double-buffered shared-memory weights with a seqlock
  rollout.py           a worker: whole GRPO groups with the engine, per-token behaviour log-probs, loss
                       masks, per-segment weight versions; between-group or mid-trajectory weight pickup
  trainer.py           RLConfig, the task stream, log-probs on the sampled ids, the policy update, eval
  controller.py        the processes and the loop: admission, leases, respawns, checkpoints (rl.py)

The roles, on one machine (torch.multiprocessing, spawn):

    controller (main process) ── leases ──► rollout worker 0..W-1 (model copy, own threads, Engine)
        │  ReplayBuffer, TaskSource         ◄── groups, heartbeats ──┘        ▲
        │  trainer thread: update ──► WeightRelay.publish(v) ─ shared memory ─┘ pull(v) (never blocks the trainer)

Sync vs async is one number: `--mode sync` is η = 0 (the buffer admits only the current version's batch,
so workers wait while the trainer trains); `--mode async` lets them run η versions ahead. With one group
per worker engine (`--worker-groups 1`) η = 0 reproduces the synchronous loop bit for bit.

Scale-out: the same roles map onto Ray actors (what slime uses, rl.md §1.1) when one machine is outgrown:
  - each rollout worker → a Ray actor wrapping an inference server (SGLang/vLLM), one per GPU group; the
    lease/heartbeat protocol becomes actor method calls (`generate_group.remote(lease, task)`) and a
    dead actor's ObjectRef raises instead of a pipe reading EOF — the buffer logic is unchanged;
  - the trainer → a group of Ray actors running Megatron/FSDP over torch.distributed (train.py's DDP/FSDP2
    path), rank 0 publishing;
  - the relay → the weight transport: NCCL broadcast to the engines in buckets (slime's
    UpdateWeightFromDistributed), or Laminar-style relay actors holding the latest version in host memory
    that engines pull from; the seqlock's role is played by versioned buckets;
  - the controller (ReplayBuffer, TaskSource, admission) → the driver or a single Ray actor; its
    state_dict is what a restarted driver reloads (slime: trainer failure = resume from checkpoint).
Nothing here imports Ray: the scale-out path is documented, not implemented.
"""
