"""Prefill work of RL rollouts with and without the engine's prefix cache (section "prefix" of docs/benchmarks.md;
issue 20 item 6, issue 21 item 2).

The same rollouts, side by side in one run: `Rollout(..., prefix_caching=False)` (every turn's request prefills
the whole conversation, each of the G samples its own copy of the prompt: what the engine did before paging)
and `prefix_caching=True` (block_manager.py: the G samples share their prompt's blocks, each turn prefills only
what the previous turn did not leave in full cached blocks). The workload is the multi-turn code environment
(`code_mt`: attempt, the sandbox's feedback, revision, up to --max-turns), G samples per group, groups decoded
`--worker-groups` at a time, sampled at temperature 1 with the rollout's per-sample seeds. Reported per mode:
prefill tokens computed per trained token (loss-mask-1 tokens of the trajectories), the prefix-cache hit rate
(cached / looked-up prompt tokens), wall time, and whether both modes produced the same trajectories.

    python -m bench.prefix                                # a random toy checkpoint (~1 min on 2 cores)
    python -m bench.prefix --checkpoint out/sft/ckpt       # the main job's SFT model
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from bench.report import machine, write_section
from bench.toy import toy_checkpoint
from nanoglm5.checkpoint import load_hf
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.rl.buffer import Lease
from nanoglm5.rl.rl_config import RLConfig
from nanoglm5.rl.rollout import Rollout, make_envs


def measure(ckpt: str, cfg: RLConfig, tasks: list, prefix_caching: bool, block_size: int) -> dict:
    torch.manual_seed(0)
    model, tok = load_hf(ckpt).eval(), Tokenizer.load(ckpt)
    ro = Rollout(model, tok, cfg, prefix_caching=prefix_caching, block_size=block_size)
    t = time.perf_counter()
    groups = ro.run([(Lease(i, 0, math.inf, 0), task) for i, task in enumerate(tasks)])
    wall = time.perf_counter() - t
    ro.close()
    trajs = [tr for g in groups for tr in g.trajectories]
    trained = sum(sum(tr.loss_mask) for tr in trajs)
    # the floor: each group's prompt once, then per sample only what the model did not sample (observations,
    # generation prompts) and each earlier turn's last sampled token (the engine never feeds a reply's last token)
    prompt = [len(tok.render_prompt(task.messages)) for task in tasks]
    floor = sum(prompt) + sum(len(tr.tokens) - p - sum(tr.loss_mask) + tr.meta["turns"] - 1
                              for g, p in zip(groups, prompt) for tr in g.trajectories)
    st = ro.engine.stats()
    return {"prefix_caching": prefix_caching, "wall_s": wall, "trained": trained, "turns": sum(tr.meta["turns"] for tr in trajs),
            "prefill": st["prefill_computed"], "requested": st["prompt_tokens"], "hit_rate": st["hit_rate"],
            "per_trained": st["prefill_computed"] / trained, "floor": floor, "tokens": [tr.tokens for tr in trajs]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", "--init-from", default="", help="a checkpoint directory (default: a random toy checkpoint)")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--worker-groups", type=int, default=2)
    ap.add_argument("--max-turns", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.checkpoint or str(toy_checkpoint(Path(tmp) / "toy"))
        cfg = RLConfig(env="code_mt", group_size=a.group_size, worker_groups=a.worker_groups, max_turns=a.max_turns,
                       max_new_tokens=a.max_new_tokens, max_len=512, temperature=1.0, seed=0)
        tasks = make_envs(cfg)["code_mt"].make_tasks(a.groups, seed=0)
        rows = [measure(ckpt, cfg, tasks, pc, a.block_size) for pc in (False, True)]
    same = sum(x == y for x, y in zip(rows[0]["tokens"], rows[1]["tokens"]))
    n = len(rows[0]["tokens"])
    lines = ["| prefix cache | turns | trained tokens | prompt tokens requested | prefill tokens computed | "
             "prefill / trained token | floor / trained token | hit rate | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hit = "—" if not r["prefix_caching"] else f"{r['hit_rate']:.1%}"
        lines.append(f"| {'on' if r['prefix_caching'] else 'off'} | {r['turns']} | {r['trained']} | {r['requested']} | "
                     f"{r['prefill']} | {r['per_trained']:.2f} | {r['floor'] / r['trained']:.2f} | {hit} | {r['wall_s']:.1f} |")
    md = (f"Workload: `code_mt` (multi-turn code, up to {a.max_turns} attempts with the sandbox's feedback), "
          f"{a.groups} groups × G = {a.group_size}, {a.worker_groups} groups decoded together, "
          f"≤ {a.max_new_tokens} tokens per turn, temperature 1, block size "
          f"{a.block_size}; model: {'`' + a.checkpoint + '`' if a.checkpoint else 'a random toy checkpoint (bench/toy.py)'}. "
          f"Off: every turn prefills the whole conversation and every sample its own prompt (the engine before "
          f"paging); on: the engine's prefix cache. Prefill work {rows[0]['prefill'] / max(rows[1]['prefill'], 1):.1f}× "
          f"lower; the same trajectories in {same} of {n} samples. The floor: each group's prompt once, and per sample "
          f"only the tokens it did not sample (observations, generation prompts, each reply's never-fed last "
          f"token); what is above it is the tail of each conversation's last partial block, recomputed per turn.\n\n" + "\n".join(lines) +
          f"\n\n`python -m bench.prefix` on {machine()}.")
    print(md)
    if not a.no_doc:
        write_section("prefix", "## Prefix cache in RL rollouts (`python -m bench.prefix`)\n\n" + md)


if __name__ == "__main__":
    main()
