"""Serving benchmark (section "serve" of docs/benchmarks.md). Same weights, one run, three decoders:

  1. decode tokens/s of one greedy sequence: our engine (compressed cache, absorbed MLA, DSA top-k) vs
     recomputing the full forward without a cache each step vs transformers' `GlmMoeDsaForCausalLM.generate`
     loaded from the same save_hf directory; and whether the three produce the same tokens;
  2. cache bytes per token: ours vs transformers' cache (measured from its past_key_values) vs the expanded
     per-head K/V that plain multi-head attention would cache;
  3. aggregate tokens/s of 1, 4, 8, 16 concurrent streaming clients against the real server (serve.py in a
     subprocess) over loopback: each client sends a fixed number of requests, so the run ends by itself.

Targets (issue 5): ≥3× transformers' decode speed; ≥4× aggregate throughput at 8 clients vs 1.

    python -m bench.serve [--preset tiny --new-tokens 128 --threads 1]
"""

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from bench.report import machine, write_section
from nanoglm5.checkpoint import save_hf
from nanoglm5.config import ModelConfig
from nanoglm5.engine import Engine, SamplingParams, cache_bytes_per_token, expanded_kv_bytes_per_token
from nanoglm5.model import GLM5
from nanoglm5.tokenizer import Tokenizer


@dataclass
class BenchConfig:
    preset: str = "tiny"
    prompt_tokens: int = 32
    new_tokens: int = 128  # prompt + new > index_topk (tiny: 32), so decode runs DSA's top-k
    long_prompt_tokens: int = 448  # a second, long-context row (no recompute: too slow); 0 = skip
    long_new_tokens: int = 64
    threads: int = 1  # torch threads for every decoder and the server (same for all; see the note in the report)
    clients: str = "1,4,8,16"
    requests_per_client: int = 2
    max_tokens: int = 64  # per streamed request
    write: bool = True


def _tokenizer() -> Tokenizer:
    """A small BPE trained on this package's own source: the model is random, only the vocabulary matters."""
    texts = [f.read_text() for f in sorted((Path(__file__).resolve().parent.parent / "nanoglm5").glob("*.py"))]
    return Tokenizer.train(texts, vocab_size=1024)


def _agree(a, b) -> int:
    """How many leading tokens two greedy decodes share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def decode_speed(model, tok_dir, prompt_tokens: int, n: int, recompute: bool = True):
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (prompt_tokens,), generator=g).tolist()
    res = {"recompute": float("nan"), "agree_recompute": None}

    eng = Engine(model, max_batch=1, max_seq_len=prompt_tokens + n)
    eng.generate([prompt[:4]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    t = time.perf_counter()
    ours = eng.generate([prompt], SamplingParams(max_tokens=n, temperature=0))[0].token_ids
    res["ours"] = n / (time.perf_counter() - t)

    if recompute:
        ids = list(prompt)
        t = time.perf_counter()
        with torch.inference_mode():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids]), last_logits_only=True).logits[0, -1].argmax()))
        res["recompute"] = n / (time.perf_counter() - t)
        res["agree_recompute"] = _agree(ours, ids[len(prompt):])

    hf = AutoModelForCausalLM.from_pretrained(tok_dir).eval()
    x = torch.tensor([prompt])
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(x[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        t = time.perf_counter()
        out = hf.generate(x, return_dict_in_generate=True, **kw)
        res["transformers"] = n / (time.perf_counter() - t)
    hf_tokens = out.sequences[0, len(prompt):].tolist()
    # transformers' cache bytes per token: every tensor its cache layers hold, over the cached length
    total = 0
    for layer in out.past_key_values.layers:
        for v in vars(layer).values():
            if isinstance(v, torch.Tensor) and v.dim() >= 3:
                total += v.numel() * v.element_size()
    res["hf_cache_bytes"] = total // (len(prompt) + n - 1)
    res["agree_hf"] = _agree(ours, hf_tokens)
    res["n"], res["prompt"] = n, prompt_tokens
    return res


async def _client(url, n_req, max_tokens, prompt, tokens):
    import httpx

    async with httpx.AsyncClient(timeout=300) as c:
        for _ in range(n_req):
            body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 1.0,
                    "stream_options": {"include_usage": True}}
            async with c.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"server answered {r.status_code}: {await r.aread()}")
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"usage":{' in line:
                        tokens.append(json.loads(line[6:])["usage"]["completion_tokens"])


def load_test(ckpt: Path, cfg: BenchConfig):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    max_c = max(int(c) for c in cfg.clients.split(","))
    proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", str(ckpt), "--port", str(port),
                             "--max-batch", str(max_c), "--threads", str(cfg.threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = []
    try:
        import httpx

        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"serve.py did not start: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")
            time.sleep(0.3)
        asyncio.run(_client(url, 1, 8, "warm up", []))
        for c in [int(x) for x in cfg.clients.split(",")]:
            tokens = []

            async def run(c=c, tokens=tokens):
                await asyncio.gather(*[_client(url, cfg.requests_per_client, cfg.max_tokens, f"client {i} says",
                                               tokens) for i in range(c)])

            t = time.perf_counter()
            asyncio.run(run())
            dt = time.perf_counter() - t
            rows.append((c, sum(tokens), dt, sum(tokens) / dt))
            print(f"  {c:2d} clients: {sum(tokens)} tokens in {dt:.1f}s = {sum(tokens) / dt:.1f} tok/s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(BenchConfig):
        if f.type is bool or isinstance(f.default, bool):
            ap.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false")
        else:
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    cfg = BenchConfig(**vars(ap.parse_args(argv)))
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    tok = _tokenizer()
    torch.manual_seed(0)
    mcfg = ModelConfig.preset(cfg.preset, vocab_size=tok.vocab_size)
    model = GLM5(mcfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / cfg.preset
        save_hf(model, ckpt, tokenizer=tok)
        print(f"[bench serve] {cfg.preset}: decode speed, {cfg.prompt_tokens} prompt + {cfg.new_tokens} new tokens")
        decs = [decode_speed(model, ckpt, cfg.prompt_tokens, cfg.new_tokens)]
        if cfg.long_prompt_tokens:
            decs.append(decode_speed(model, ckpt, cfg.long_prompt_tokens, cfg.long_new_tokens, recompute=False))
        for d in decs:
            print(f"  {d['prompt']}+{d['n']}: ours {d['ours']:.1f} tok/s, recompute {d['recompute']:.1f}, "
                  f"transformers {d['transformers']:.1f}")
        d = decs[0]
        print("[bench serve] load test over loopback")
        rows = load_test(ckpt, cfg)

    ours_b, exp_b = cache_bytes_per_token(mcfg), expanded_kv_bytes_per_token(mcfg)
    glm = ModelConfig.preset("glm5_744b")
    glm_ours, glm_exp = cache_bytes_per_token(glm, torch.bfloat16), expanded_kv_bytes_per_token(glm, torch.bfloat16)
    x_hf = d["ours"] / d["transformers"]
    x_long = decs[-1]["ours"] / decs[-1]["transformers"]
    base = rows[0][3]
    at8 = next((r[3] for r in rows if r[0] == 8), None)
    met1 = "met" if x_hf >= 3 else "NOT met"
    met2 = "n/a" if at8 is None else ("met" if at8 / base >= 4 else "NOT met")
    lines = [
        f"`python -m bench.serve --preset {cfg.preset}` · {machine()} · torch threads {cfg.threads} · "
        f"{time.time() - t0:.0f} s",
        "",
        f"**Decode, one greedy sequence** ({cfg.preset}: {mcfg.num_hidden_layers} layers, hidden {mcfg.hidden_size}, "
        f"index_topk {mcfg.index_topk}; {cfg.prompt_tokens} prompt + {cfg.new_tokens} new tokens, same weights)",
        "",
        "| context (prompt + new) | decoder | tokens/s | × transformers | leading greedy tokens equal to ours |",
        "|---|---|---:|---:|---:|",
        *[row for e in decs for row in (
            f"| {e['prompt']} + {e['n']} | ours: compressed cache, absorbed MLA, DSA top-k | {e['ours']:.1f} | "
            f"{e['ours'] / e['transformers']:.2f} | — |",
            f"| {e['prompt']} + {e['n']} | ours without a cache (full forward each step) | "
            + (f"{e['recompute']:.1f} | {e['recompute'] / e['transformers']:.2f} | {e['agree_recompute']}/{e['n']} |"
               if e["agree_recompute"] is not None else "not run (slow) | | |"),
            f"| {e['prompt']} + {e['n']} | transformers `generate` (GlmMoeDsaForCausalLM) | {e['transformers']:.1f} | "
            f"1.00 | {e['agree_hf']}/{e['n']} |")],
        "",
        f"Target ≥3× transformers: **{met1}** ({x_hf:.2f}× at {d['prompt']} + {d['n']}"
        + (f", {x_long:.2f}× at {decs[-1]['prompt']} + {decs[-1]['n']}" if len(decs) > 1 else "") + ").",
        "Greedy agreement: the engine breaks exact ties of DSA index scores by position (`tie_break=\"stable\"`, "
        "which the recompute shares because it is the same model object), so ours and the recompute agree; "
        "transformers' `topk` breaks those ties by an order that depends on the row length, so its greedy tokens "
        "part ways from ours once a tie falls on the top-k boundary (docs/LOG.md).",
        "",
        "**Cache bytes per token** (all layers)",
        "",
        "| | ours (c_kv + k_rot + indexer key) | transformers' cache (measured) | expanded per-head K/V (plain MHA) | expanded / ours |",
        "|---|---:|---:|---:|---:|",
        f"| {cfg.preset}, fp32 | {ours_b:,} | {d['hf_cache_bytes']:,} | {exp_b:,} | {exp_b / ours_b:.1f}× |",
        f"| glm5_744b, bf16 | {glm_ours:,} | — | {glm_exp:,} | {glm_exp / glm_ours:.1f}× |",
        "",
        f"**Aggregate throughput, streaming clients over loopback** (serve.py subprocess, max_batch "
        f"{max(r[0] for r in rows)}; each client sends {cfg.requests_per_client} requests of ≤{cfg.max_tokens} tokens)",
        "",
        "| clients | tokens | seconds | tokens/s | × 1 client |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {c} | {n} | {dt:.1f} | {tps:.1f} | {tps / base:.2f} |" for c, n, dt, tps in rows],
        "",
        f"Target ≥4× at 8 clients vs 1: **{met2}**" + (f" ({at8 / base:.2f}×)." if at8 else "."),
        "",
        "Why: transformers 5.x also caches the compressed latent (so its bytes/token equal ours), but every step it "
        "re-expands per-head K/V for the whole context with kv_b_proj and attends densely under a mask; ours folds "
        "W_UK into the query and W_UV after the weighted sum (absorbed MLA) and attends only to the DSA top-k. That "
        "saving grows with the context (compare the two context rows); at tiny scale both decoders are bound by "
        "per-op dispatch (hundreds of small torch ops per token), which fewer ops per step, torch.compile or CUDA "
        "graphs would address. Tokens/s include the prefill for all three decoders. Batched decode amortises the "
        "per-step overhead over the batch, which is where the concurrency gain comes from. One torch thread per "
        "process (no oversubscription).",
    ]
    md = "\n".join(lines)
    print(md)
    if cfg.write:
        write_section("serve", "## Serving (`bench/serve.py`)\n\n" + md)


if __name__ == "__main__":
    main()
