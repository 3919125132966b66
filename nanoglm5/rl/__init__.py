"""Asynchronous RL, GLM-5 style (GLM-5 arXiv 2602.15763 §3.2–3.6, §4.1; design notes in docs/design.md).

Read in this order:
  rl_config.py         RLConfig: every rl.py flag, declared once; the workers get it too
  envs.py, judge.py,   tasks whose reward is checked, not guessed: math answers, code run in a sandbox,
  sandbox.py           a multi-turn calculator agent with heavy-tailed turns and latency (the judge)
  task_source.py       group_id → task (a pure function of the seed), the benchmark's long-tail workload
  loss.py              GRPO advantages; DDIS (GLM-5), PPO clip, TIS, IcePop; token/sample mean
  buffer.py            Trajectory (with its advantage) / Group (token-in-token-out), admission control (η),
                       leases, τ-drop
  relay.py             versioned double-buffered shared-memory weights with a seqlock
  messages.py          what the controller and the workers send each other, one dataclass per kind
  rollout.py           a worker: whole GRPO groups with the engine, per-token behaviour log-probs, loss
                       masks, per-segment weight versions; between-group or mid-trajectory weight pickup
  learner.py           log-probs on the sampled ids, GRPO advantages, the policy update
  evaluation.py        held-out pass@1 (greedy and sampled), the reward-vs-time figure
  transport.py         how the controller reaches its workers: the interface (start, send, poll, alive/kill,
                       publish weights, stop) and the process transport (--backend mp: pipes + the relay)
  ray_transport.py     the same interface over Ray actors (--backend ray: workers and the learner as actors,
                       weights through the object store)
  controller.py        the loop, one logic for both transports: admission, leases, failures, respawns,
                       checkpoints (rl.py)

The roles, on one machine (torch.multiprocessing, spawn):

    controller (main process) ── leases ──► rollout worker 0..W-1 (model copy, own threads, Engine)
        │  ReplayBuffer, TaskSource         ◄── groups, heartbeats ──┘        ▲
        │  trainer thread: update ──► WeightRelay.publish(v) ─ shared memory ─┘ pull(v) (never blocks the trainer)

Sync vs async is one number: `--mode sync` is η = 0 (the buffer admits only the current version's batch,
so workers wait while the trainer trains); `--mode async` lets them run η versions ahead. With one group
per worker engine (`--worker-groups 1`) η = 0 reproduces the synchronous loop bit for bit.

On a Ray cluster (`--backend ray`, ray_transport.py; docs/scaling.md) the same controller drives the same
roles as actors: each rollout worker is an actor running the same worker loop, Assign/Stop are actor calls
and a dead actor fails its pending call at once (where a pipe reads EOF); the learner is an actor, and each
weight version is one immutable object in Ray's object store that workers copy in place (where the relay's
seqlock guards a shared buffer). The buffer logic is unchanged. Further out, not implemented here:
  - each rollout worker → an inference server (SGLang/vLLM) per GPU group;
  - the learner → a group of actors running Megatron/FSDP over torch.distributed (train.py's DDP/FSDP2
    path), rank 0 publishing, with weights broadcast over NCCL in buckets (slime's
    UpdateWeightFromDistributed) instead of the object store;
  - the controller (ReplayBuffer, TaskSource, admission) stays in the driver; its state_dict is what a
    restarted driver reloads (slime: trainer failure = resume from checkpoint).
"""
