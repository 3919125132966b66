"""INT4 benchmark (section "int4" of docs/benchmarks.md): full precision vs PTQ int4 vs QAT int4 at two group
sizes, on the same held-out eval, plus weight bytes and decode speed. GLM-5 (arXiv 2602.15763) §2.4.3.

One run, side by side: a tiny model (the `tiny` preset with byte-level tokens, vocab 256) is pre-trained
on generated math (data.tasks.math_problems), then given the same SFT budget three times from the same start:
plain (→ full precision, and PTQ of it) and with QAT at g=32 and g=128 (→ converted, packed). Eval: loss on
the answers of held-out problems, and greedy-decoding accuracy checked by data.tasks.check_math_answer (the RL
math task's verifier). Layers: all_but_head; scales stored in bf16.
Noise: every loss gap to full precision is reported with its standard error over the held-out problems (the
gap is paired: the same problems for both models), and with --seeds N > 1 also with its spread over N whole
runs (training seeds). "QAT recovers X% of the PTQ gap" is stated only where the PTQ gap exceeds 3 times its
noise: a ratio whose denominator is noise means nothing (a PTQ gap within noise once printed "QAT recovers
1024% of the PTQ gap").
Simplified: a minimal SFT loop lives here (model.forward + AdamW, loss on the solution bytes), not
`train.py --stage sft --qat int4`, so the bench runs on its own; decoding recomputes the whole prefix each
token (no KV cache), the same for both models, so the speed ratio isolates the cost of dequantizing.

    python -m bench.int4 [--base-steps 300 --sft-steps 150 --seeds 1 --quick]
"""

import argparse
import copy
import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from bench.report import machine, write_section
from nanoglm5 import int4, quant
from nanoglm5.config import ModelConfig
from nanoglm5.data.tasks import check_math_answer, math_problems
from nanoglm5.model import GLM5

PAD = 0  # byte 0 never appears in the text: padding and end of answer


@dataclass
class BenchConfig:
    base_steps: int = 300  # pre-training on problems + solutions
    sft_steps: int = 150  # the SFT budget each variant gets (plain, QAT g=32, QAT g=128)
    batch_size: int = 16
    lr_base: float = 3e-3
    lr_sft: float = 1e-3
    layers: str = "all_but_head"
    group_sizes: tuple = (32, 128)
    scale_dtype: str = "bfloat16"
    n_val: int = 128  # held-out problems for the loss
    n_acc: int = 32  # held-out problems for greedy-decoding accuracy
    max_new: int = 72
    seed: int = 0
    seeds: int = 1  # whole runs with seeds seed, seed+1, ...: the spread of the gaps over training seeds
    quick: bool = False


# ---------------------------------------------------------------------------------------------- data
def encode(p: dict) -> tuple[list[int], int]:
    """Bytes of "Question: …\\nSolution:\\n…\\n"; returns (ids, where the solution starts)."""
    prompt = f"Question: {p['question']}\nSolution:\n".encode()
    return list(prompt + (p["solution"] + "\n").encode()), len(prompt)


def batch(problems: list[dict], answers_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) inputs and next-byte targets (-1 = ignored: padding, and the question if answers_only)."""
    rows = [encode(p) for p in problems]
    T = max(len(ids) for ids, _ in rows)
    x = torch.full((len(rows), T), PAD)
    y = torch.full((len(rows), T), -1)
    for i, (ids, start) in enumerate(rows):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(ids) - 1] = torch.tensor(ids[1:])
        if answers_only:
            y[i, : start - 1] = -1
    return x, y


def train(model: GLM5, problems: list[dict], steps: int, lr: float, batch_size: int, answers_only: bool,
          seed: int, desc: str) -> list[float]:
    """Minimal SFT/pre-training loop: AdamW, cosine decay, router-bias balancing. Returns the loss curve."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    curve = []
    for step in tqdm(range(steps), desc=desc, leave=False):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        idx = torch.randint(len(problems), (batch_size,), generator=g)
        x, y = batch([problems[i] for i in idx], answers_only)
        out = model(x, y, mtp_weight=0.0)
        out.lm_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_bias(out.expert_load, 1e-3)
        curve.append(out.lm_loss.item())
    return curve


@torch.no_grad()
def val_losses(model: GLM5, problems: list[dict], bs: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per held-out problem: the summed loss over its answer bytes, and the number of answer bytes."""
    model.eval()
    sums, counts = [], []
    for i in range(0, len(problems), bs):
        x, y = batch(problems[i : i + bs], answers_only=True)
        logits = model(x).logits.double()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, ignore_index=-1, reduction="none")
        sums.append(ce.sum(1))
        counts.append((y >= 0).sum(1).double())
    return torch.cat(sums), torch.cat(counts)


def val_loss(model: GLM5, problems: list[dict], bs: int = 32) -> float:
    """Mean loss per answer byte on held-out problems."""
    s, n = val_losses(model, problems, bs)
    return (s.sum() / n.sum()).item()


def paired_gap(sums_a: torch.Tensor, sums_b: torch.Tensor, counts: torch.Tensor) -> tuple[float, float]:
    """Loss per answer byte of a minus b on the same problems, and its standard error over the problems
    (the gap is sum_i d_i / sum_i n_i with d_i the per-problem difference: se = std(d) * sqrt(P) / sum n)."""
    d = sums_a - sums_b
    return (d.sum() / counts.sum()).item(), (d.std() * len(d) ** 0.5 / counts.sum()).item()


@torch.no_grad()
def generate(model: GLM5, prompts: list[list[int]], max_new: int) -> tuple[list[str], int]:
    """Greedy decoding of a batch of byte prompts, left-padded; pads get a position beyond every real token,
    so the causal mask (key_pos <= query_pos) hides them. Stops when every row ended a line after "Answer:".
    Returns the texts and the number of decoded steps."""
    model.eval()
    B, L = len(prompts), max(len(p) for p in prompts)
    far = model.config.max_position_embeddings - 1
    x = torch.full((B, L), PAD)
    pos = torch.full((B, L), far)
    for i, p in enumerate(prompts):
        x[i, L - len(p):] = torch.tensor(p)
        pos[i, L - len(p):] = torch.arange(len(p))
    outs = [bytearray() for _ in range(B)]
    steps = 0
    for _ in range(max_new):
        nxt = model(x, positions=pos, logits_at=torch.full((B,), x.shape[1] - 1)).logits.argmax(-1)
        x, pos = torch.cat([x, nxt[:, None]], 1), torch.cat([pos, pos[:, -1:] + 1], 1)
        steps += 1
        for i, t in enumerate(nxt.tolist()):
            outs[i].append(t)
        if all(b"Answer:" in o and o.rstrip(b"\x00").endswith(b"\n") or PAD in o for o in outs):
            break
    return [o.split(b"\x00")[0].decode(errors="replace") for o in outs], steps


def accuracy(model: GLM5, problems: list[dict], max_new: int) -> float:
    prompts = [encode(p)[0][: encode(p)[1]] for p in problems]
    texts, _ = generate(model, prompts, max_new)
    return sum(check_math_answer(t, p["answer"]) for t, p in zip(texts, problems)) / len(problems)


def decode_speed(model: GLM5, prompt: list[int], n: int = 16, repeats: int = 2) -> float:
    """Tokens per second of greedy decoding, batch 1 (best of `repeats`)."""
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            x = torch.tensor([prompt])
            for _ in range(n):
                nxt = model(x, logits_at=torch.tensor([x.shape[1] - 1])).logits.argmax(-1)
                x = torch.cat([x, nxt[:, None]], 1)
        best = max(best, n / (time.perf_counter() - t))
    return best


# ---------------------------------------------------------------------------------------------- the run
def run(bc: BenchConfig) -> dict:
    torch.manual_seed(bc.seed)
    cfg = ModelConfig.preset("tiny", vocab_size=256)
    train_set = math_problems(4000, seed=bc.seed)
    held = math_problems(bc.n_val + bc.n_acc, seed=bc.seed + 1000)
    val, acc_set = held[: bc.n_val], held[bc.n_val :]
    t0 = time.time()

    base = GLM5(cfg)
    train(base, train_set, bc.base_steps, bc.lr_base, bc.batch_size, answers_only=False, seed=bc.seed, desc="base")
    res = {"curves": {}, "rows": {}}

    def evaluate(name, model):
        sums, counts = val_losses(model, val)
        res["rows"][name] = {"loss": (sums.sum() / counts.sum()).item(), "sums": sums, "counts": counts,
                             "acc": accuracy(model, acc_set, bc.max_new), **quant.weight_bytes(model)}
        print(f"  {name:>14}: val loss {res['rows'][name]['loss']:.4f}, accuracy {res['rows'][name]['acc']:.1%}")

    fp = copy.deepcopy(base)
    res["curves"]["full precision"] = train(fp, train_set, bc.sft_steps, bc.lr_sft, bc.batch_size, True, bc.seed + 1, "sft")
    evaluate("full precision", fp)
    for g in bc.group_sizes:
        evaluate(f"PTQ g={g}", quant.ptq(copy.deepcopy(fp), bc.layers, g, bc.scale_dtype))
        qat = int4.prepare_qat(copy.deepcopy(base), bc.layers, g, bc.scale_dtype)
        res["curves"][f"QAT g={g}"] = train(qat, train_set, bc.sft_steps, bc.lr_sft, bc.batch_size, True, bc.seed + 1,
                                            f"sft qat g={g}")
        evaluate(f"QAT g={g}", quant.convert_qat(qat))
        res[f"packed{g}"] = qat
    # bytes of the same layers with fp32 scales, for reference
    res["fp32_scales"] = quant.weight_bytes(quant.ptq(copy.deepcopy(fp), bc.layers, bc.group_sizes[-1], "float32"))
    prompt = encode(acc_set[0])[0][: encode(acc_set[0])[1]]
    g = bc.group_sizes[-1]
    res["speed"] = {"full precision": decode_speed(fp, prompt), f"int4 g={g}": decode_speed(res[f"packed{g}"], prompt)}
    res["seconds"] = time.time() - t0
    return res


def gap_stats(bc: BenchConfig, results: list[dict]) -> dict:
    """Per group size: the PTQ and QAT loss gaps to full precision and QAT - PTQ, each as (mean over seeds,
    noise), noise = the paired standard error over held-out problems (one seed) or the standard error of the
    mean over seeds (several: it holds the training noise and the eval sampling noise); and the recovery
    (PTQ gap - QAT gap) / PTQ gap with its propagated error, or None where the PTQ gap is not > 3 noise."""
    out = {}
    for g in bc.group_sizes:
        per_seed = {"ptq": [], "qat": [], "qat_minus_ptq": []}
        for res in results:
            rows = res["rows"]
            fp, ptq, qat = rows["full precision"], rows[f"PTQ g={g}"], rows[f"QAT g={g}"]
            per_seed["ptq"].append(paired_gap(ptq["sums"], fp["sums"], fp["counts"]))
            per_seed["qat"].append(paired_gap(qat["sums"], fp["sums"], fp["counts"]))
            per_seed["qat_minus_ptq"].append(paired_gap(qat["sums"], ptq["sums"], fp["counts"]))
        st = {}
        for k, v in per_seed.items():
            gaps = torch.tensor([gp for gp, _ in v], dtype=torch.float64)
            eval_se = (torch.tensor([se for _, se in v], dtype=torch.float64).pow(2).mean() / len(v)).sqrt().item()
            seed_se = (gaps.std() / len(v) ** 0.5).item() if len(v) > 1 else None
            st[k] = {"gap": gaps.mean().item(), "eval_se": eval_se, "seed_se": seed_se,
                     "noise": seed_se if seed_se is not None else eval_se, "per_seed": gaps.tolist()}
        ptq, diff = st["ptq"], st["qat_minus_ptq"]
        st["significant"] = ptq["gap"] > 3 * ptq["noise"]
        if st["significant"]:
            r = -diff["gap"] / ptq["gap"]
            r_se = ((diff["noise"] / ptq["gap"]) ** 2 + (diff["gap"] * ptq["noise"] / ptq["gap"] ** 2) ** 2) ** 0.5
            st["recovery"] = (r, r_se)
        else:
            st["recovery"] = None
        out[g] = st
    return out


def _pm(st: dict) -> str:
    return f"{st['gap']:+.4f} ± {st['noise']:.4f}"


def report(bc: BenchConfig, results: list[dict]) -> tuple[str, str]:
    res = results[0]
    rows, fp = res["rows"], res["rows"]["full precision"]
    n_all = fp["n_weights"]
    secs = sum(r["seconds"] for r in results)
    seeds = f"seeds {bc.seed}–{bc.seed + len(results) - 1}" if len(results) > 1 else f"seed {bc.seed}"
    lines = ["`python -m bench.int4" + (f" --seeds {len(results)}" if len(results) > 1 else "") + f"` — {machine()}, "
             f"{secs:.0f} s.",
             "",
             f"Tiny preset, byte tokens (vocab 256), {n_all:,} weights; {bc.base_steps} pre-training steps, then "
             f"{bc.sft_steps} SFT steps (batch {bc.batch_size}) per variant from the same start. Quantized: "
             f"`{bc.layers}` ({int4.LAYERS[bc.layers]}), symmetric int4, scales {bc.scale_dtype}. Eval: loss per answer "
             f"byte on {bc.n_val} held-out problems; greedy accuracy on {bc.n_acc} more (check_math_answer). "
             f"The table is {'the first of ' + str(len(results)) + ' runs (' + seeds + ')' if len(results) > 1 else seeds}; "
             "± is the standard error of the gap over the held-out problems (paired: the same problems for both).",
             "",
             "| variant | val loss | gap to fp (± SE) | accuracy | int4-layer bytes / bf16 | model bytes / bf16 (rest in bf16) | model bytes / fp32 |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        q_ratio = r["int4_bytes"] / (2 * r["int4_weights"]) if r["int4_weights"] else 1.0
        model_bf16 = (r["int4_bytes"] + 2 * r["other_params"]) / (2 * n_all)
        model_fp32 = (r["int4_bytes"] + 4 * r["other_params"]) / (4 * n_all)
        if r is fp:
            gap = "—"
        else:
            gp, se = paired_gap(r["sums"], fp["sums"], fp["counts"])
            gap = f"{gp:+.4f} ± {se:.4f}"
        lines.append(f"| {name} | {r['loss']:.4f} | {gap} | {r['acc']:.1%} | {q_ratio:.3f} | "
                     f"{model_bf16:.3f} | {model_fp32:.3f} |")
    f32 = res["fp32_scales"]
    g_hi = bc.group_sizes[-1]
    lines += ["", f"With fp32 scales instead, g={g_hi}: int4-layer bytes / bf16 = {f32['int4_bytes'] / (2 * f32['int4_weights']):.3f} "
              "(the tiny model's 64- and 32-wide inputs get one scale per row at g=128, which is why the ratio sits above "
              "the 4.25/16 = 0.266 of a model whose input dims are multiples of 128)."]
    stats = gap_stats(bc, results)
    noise_kind = (f"standard error of the mean over {len(results)} seeds" if len(results) > 1 else
                  f"standard error over the {bc.n_val} held-out problems; training-seed noise not included (--seeds N)")

    def recovery_text(st):
        r, r_se = st["recovery"]
        if r > 1:  # QAT ended below full precision: it recovers the whole gap, and the excess is not quantization
            return f"all (≥ 100%: QAT ends {-st['qat']['gap']:.4f} below full precision)"
        return f"{r:.0%} ± {r_se:.0%}"

    def recovery_cell(st):
        if st["recovery"] is None:
            return f"not stated: PTQ gap {_pm(st['ptq'])} is within 3 SE of zero"
        return recovery_text(st)

    def qat_note(st):
        q = st["qat"]
        return " (QAT ends below full precision)" if q["gap"] < -2 * q["noise"] else ""

    lines += ["", f"Loss gaps to full precision, nats per answer byte; ± = {noise_kind}.", "",
              "| | " + " | ".join(f"g={g}" for g in bc.group_sizes) + " |", "|---|" + "---|" * len(bc.group_sizes),
              "| PTQ gap to full precision | " + " | ".join(_pm(stats[g]["ptq"]) for g in bc.group_sizes) + " |",
              "| QAT gap to full precision | " + " | ".join(_pm(stats[g]["qat"]) + qat_note(stats[g])
                                                            for g in bc.group_sizes) + " |",
              "| QAT − PTQ (paired) | " + " | ".join(_pm(stats[g]["qat_minus_ptq"]) for g in bc.group_sizes) + " |",
              "| QAT recovers of the PTQ loss gap (target ≥ 70%; stated only where the PTQ gap > 3 SE) | "
              + " | ".join(recovery_cell(stats[g]) for g in bc.group_sizes) + " |"]
    sp = res["speed"]
    (a, va), (b, vb) = sp.items()
    lines += ["", f"Decode (batch 1, no KV cache, 16 tokens): {a} {va:.1f} tok/s, packed {b} {vb:.1f} tok/s "
              f"({vb / va:.2f}×): the packed model unpacks and dequantizes every weight at every step; it saves memory, "
              "not time, without a fused int4 kernel."]
    ratio_hi = rows[f"QAT g={g_hi}"]["int4_bytes"] / (2 * rows[f"QAT g={g_hi}"]["int4_weights"])
    parts = []
    for g in bc.group_sizes:
        st = stats[g]
        if st["recovery"] is None:
            parts.append(f"at g={g} the PTQ gap ({_pm(st['ptq'])}) is within noise, so no recovery ratio is measurable")
        else:
            parts.append(f"QAT recovers {recovery_text(st)} of the PTQ loss gap ({_pm(st['ptq'])}) at g={g}")
    judged = [stats[g]["recovery"][0] >= 0.7 for g in bc.group_sizes if stats[g]["recovery"] is not None]
    verdict = ("cannot be judged: no PTQ gap above noise" if not judged else
               "met" if all(judged) and len(judged) == len(bc.group_sizes) else
               "not met" if not all(judged) else "met where measurable")
    summary = (f"int4 summary: g={g_hi} weights {ratio_hi:.3f}× bf16 (target ≤ 0.27: {'met' if ratio_hi <= 0.27 else 'not met'}); "
               + "; ".join(parts) + f" (target ≥ 70%: {verdict}); packed decode {vb / va:.2f}× full precision")
    lines += ["", summary]
    return "\n".join(lines), summary


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = BenchConfig()
    for f in ("base_steps", "sft_steps", "batch_size", "n_val", "n_acc", "seed", "seeds"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(d, f))
    p.add_argument("--layers", default=d.layers, choices=sorted(int4.LAYERS))
    p.add_argument("--quick", action="store_true", help="a smoke run (few steps); does not write the section")
    a = p.parse_args()
    bc = BenchConfig(**{k: v for k, v in vars(a).items()})
    if bc.quick:
        bc.base_steps, bc.sft_steps, bc.n_val, bc.n_acc, bc.max_new = 4, 3, 8, 4, 8
    results = [run(dataclasses.replace(bc, seed=bc.seed + i)) for i in range(max(bc.seeds, 1))]
    md, summary = report(bc, results)
    print(md)
    if not bc.quick:
        write_section("int4", "## INT4: full precision vs PTQ vs QAT\n\n" + md)


if __name__ == "__main__":
    main()
