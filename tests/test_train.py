"""train.py and nanoglm5/training/: DSA stage switch, SFT loss masks, exact resume after SIGKILL, atomic
checkpoint writes, DDP equality on 2 CPU processes, FSDP2's sharded checkpoints (exact resume after SIGKILL,
resharding to another world size), and one-line errors for bad input.
Data: a small token shard written here (no tokenizer needed for pretraining)."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoglm5.checkpoint import CheckpointError, load_state
from nanoglm5.data.tasks import math_problems
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.training.batches import ChatBatches, chat_example
from nanoglm5.training.loop import Trainer
from nanoglm5.training.optim import lr_multiplier, param_groups
from nanoglm5.training.state import load_sharded, load_trainer_state, save_checkpoint, save_sharded
from nanoglm5.training.train_config import TrainConfig, TrainError

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
             n_routed_experts=4, num_experts_per_tok=2, index_n_heads=2, index_head_dim=16, index_topk=8,
             num_hidden_layers=2, max_position_embeddings=128)
CLI_SMALL = [a for k, v in SMALL.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A learnable token stream (a noisy repeating pattern), vocab 64."""
    d = tmp_path_factory.mktemp("data")
    (d / "tokens").mkdir()
    r = np.random.default_rng(0)
    t = np.tile(np.arange(50) % 37, 400)
    noise = r.random(t.size) < 0.1
    t[noise] = r.integers(0, 64, size=noise.sum())
    t.astype(np.uint16).tofile(d / "tokens" / "train.bin")
    t[:3000].astype(np.uint16).tofile(d / "tokens" / "val.bin")
    (d / "tokens" / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 64}))
    return d


def cfg(data_dir, out, **kw) -> TrainConfig:
    base = dict(data_dir=str(data_dir), out_dir=str(out), model=dict(SMALL), seq_len=32, batch_size=4,
                micro_batch_size=2, max_steps=6, dense_steps=2, dsa_warmup_steps=2, eval_every=0,
                save_every=0, eval_seqs=4, warmup_steps=1, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def run_cli(args, timeout=120, **popen):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **popen)


# ---------------------------------------------------------------------------------------------- SFT masks
def test_sft_targets_only_on_assistant_tokens():
    ids = [10, 11, 12, 13, 14, 15, 16]
    mask = [0, 0, 0, 1, 1, 0, 1]
    x, y = chat_example(ids, mask, seq_len=16)
    assert x.tolist() == ids[:-1]
    assert y.tolist() == [-1, -1, 13, 14, -1, 16]  # target t is ids[t+1], kept where mask[t+1] = 1
    x, y = chat_example(ids, mask, seq_len=3)  # cut to seq_len
    assert len(x) == 3 and y.tolist() == [-1, -1, 13]
    batches = ChatBatches([chat_example(ids, mask, 16), chat_example(ids[:4], mask[:4], 16),
                           chat_example([1, 2], [0, 0], 16)], seed=0, pad_id=0)
    assert len(batches.examples) == 2  # the conversation without assistant tokens is dropped
    xb, yb = batches.batch(0, 2, 0, 2)
    assert xb.shape == yb.shape == (2, 6)
    short = 0 if (yb[0] == -1).sum() > 3 else 1
    assert (yb[short, 3:] == -1).all()  # padding carries no loss
    assert batches.n_targets(0, 2) == int((yb >= 0).sum())


def test_sft_micro_batches_sorted_by_length_cover_the_step():
    """Micro-batches of one step hold the step's examples sorted by length (less padding), all of them once."""
    rng = np.random.default_rng(0)
    exs = [chat_example(list(range(1, n + 2)), [1] * (n + 1), 64) for n in rng.integers(2, 40, size=24)]
    b = ChatBatches(exs, seed=3, pad_id=0)
    for step in range(3):
        parts = [b.batch(step, 8, lo, lo + 2) for lo in range(0, 8, 2)]
        lens = [int((y >= 0).sum(1).max()) for _, y in parts]
        assert lens == sorted(lens) and [x.shape[1] for x, _ in parts] == lens
        got = sorted(int((y >= 0).sum()) for _, ys in parts for y in ys)
        assert got == sorted(int(b.n_valid[i]) for i in b.indices(step, 8))
        assert sum(int((y >= 0).sum()) for _, y in parts) == b.n_targets(step, 8)


def test_sft_render_mask_with_real_tokenizer():
    tok = Tokenizer.train(["hello world, what does f do? it adds numbers."] * 20, vocab_size=300)
    msgs = [{"role": "user", "content": "what does f do?"}, {"role": "assistant", "content": "it adds"}]
    ids, mask = tok.render_chat(msgs)
    x, y = chat_example(ids, mask, 256)
    kept = [int(t) for t in y if t >= 0]
    assert tok.decode(kept[:-1]) == "it adds" and kept[-1] == tok.eos_id


def test_sft_data_mix():
    from nanoglm5.data.sft import build_conversations

    convs = build_conversations(40, seed=0)
    assert convs == build_conversations(40, seed=0)
    kinds = {c["kind"] for c in convs}
    assert {"math", "knowledge"} <= kinds
    assert all(any(m["role"] == "assistant" for m in c["messages"]) for c in convs)


def test_sft_weights_the_two_constant_code_template_and_leaves_rl_and_eval_uniform():
    """SFT shows "N times x plus M" CODE_TWO_CONSTANT_WEIGHT times as often as each other template; RL's tasks and
    the held-out ones keep the uniform share (about 1 in 11)."""
    import re

    from nanoglm5.data.sft import CODE_TWO_CONSTANT_WEIGHT, task_chats
    from nanoglm5.data.tasks import code_tasks
    from nanoglm5.rl.envs import make_env

    two = lambda text: bool(re.search(r"returns \d+ times x plus \d+", text))
    share = lambda texts: sum(map(two, texts)) / len(texts)
    sft = [c["messages"][1]["content"] for c in task_chats(3000, 0, seed=1337)]
    uniform = [t.messages[-1]["content"] for t in code_tasks(3000, 1337, "sft")]
    # the split keeps a template's share only roughly (its specs hash into "sft" at their own rate)
    assert share(uniform) < 0.15 and abs(share(sft) - CODE_TWO_CONSTANT_WEIGHT / (CODE_TWO_CONSTANT_WEIGHT + 10)) < 0.08
    for split in ("train", "eval"):
        assert share([t.messages[-1]["content"] for t in make_env("code").make_tasks(3000, seed=1337, split=split)]) < 0.15


def test_sft_tasks_disjoint_from_rl_tasks():
    """SFT shows the "sft" split only: no RL train or held-out eval prompt appears in it (docs/LOG.md)."""
    import json

    from nanoglm5.data.sft import build_conversations
    from nanoglm5.rl.envs import make_env

    convs = build_conversations(400, seed=1337)
    user = lambda msgs: next(m["content"] for m in msgs if m["role"] == "user")
    seen = {user(c["messages"]) for c in convs if c["kind"] in ("math", "code", "agent")}
    assert {"math", "code", "agent"} <= {c["kind"] for c in convs}
    for name in ("math", "code", "agent"):
        for split in ("train", "eval"):
            rl = {user(t.messages) for t in make_env(name).make_tasks(300, seed=1337, split=split)}
            assert not (seen & rl), (name, split, sorted(seen & rl)[:3])
    assert json.dumps(convs)


def test_sft_pretrain_mix_is_a_function_of_seed_and_step():
    """--sft-pretrain-mix: a fixed share of each SFT batch is pretraining windows (loss on every token), the rest
    conversations; a fresh object at step s (a resumed run) yields exactly the batch of the one that got there."""
    from nanoglm5.training.batches import MixedBatches, TokenBatches

    rng = np.random.default_rng(0)
    exs = [chat_example(list(range(1, n + 2)), [0, 0] + [1] * (n - 1), 64) for n in rng.integers(3, 20, size=40)]
    text = np.arange(5000, dtype=np.uint16) % 97
    make = lambda seed=3: MixedBatches(ChatBatches(exs, seed, 0), TokenBatches(text, 24, seed), 0.25)  # noqa: E731
    a = make()
    assert a.split(8) == (6, 2) and a.split(32) == (24, 8)
    seen = [[a.batch(s, 8, lo, lo + 4) for lo in (0, 4)] for s in range(4)]
    b = make()
    for s in (3, 1):  # any order: nothing is carried from one step to the next
        for (x, y), (x2, y2) in zip(seen[s], [b.batch(s, 8, lo, lo + 4) for lo in (0, 4)]):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    x, y = torch.cat([seen[0][1][0]]), torch.cat([seen[0][1][1]])
    windows = [r for r in range(4) if (y[r] >= 0).all() and x.shape[1] == 24]
    assert len(windows) == 2  # the two windows (longest rows) sit in the last micro-batch, all tokens trained
    assert all(torch.equal(y[r, :-1], x[r, 1:]) for r in windows)
    assert a.n_targets(0, 8) == sum(int((yy >= 0).sum()) for _, yy in seen[0])
    assert not torch.equal(seen[0][0][0], make(seed=4).batch(0, 8, 0, 4)[0])  # the seed matters


# ---------------------------------------------------------------------------------------------- DSA stages
def test_dsa_stage_switch(data_dir, tmp_path):
    tr = Trainer(cfg(data_dir, tmp_path, dense_steps=1, dsa_warmup_steps=1, max_steps=3), quiet=True)
    assert [tr.stage_at(s) for s in range(3)] == ["dense", "warmup", "sparse"]
    m = tr.model
    idx = {id(p) for p in m.indexer_parameters()}
    snap = lambda: {n: p.detach().clone() for n, p in m.named_parameters()}
    bias = lambda: torch.cat([x.gate.e_score_correction_bias.clone() for x in m.moe_layers()])

    before, b0 = snap(), bias()
    tr.train_step(0)  # dense: everything but the indexer (no KL asked) moves; router bias moves
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert not any(".indexer." in n for n in changed) and len(changed) > 10
    assert not torch.equal(bias(), b0)

    before, b0 = snap(), bias()
    rec = tr.train_step(1)  # warm-up: only the indexer, on its KL
    assert rec["stage"] == "warmup" and rec["indexer_kl"] > 0
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in m.named_parameters() if id(p) in idx}
    assert torch.equal(bias(), b0)

    before = snap()
    tr.train_step(2)  # sparse: everything
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(before)


def test_indexer_learns_only_from_kl(data_dir, tmp_path):
    tr = Trainer(cfg(data_dir, tmp_path), quiet=True)
    m = tr.model
    x, y = tr.data.batch(0, 4, 0, 2)
    out = m(x, y, sparse=True, indexer_kl=True)
    out.loss.backward(retain_graph=True)  # LM + MTP loss: no gradient may reach the indexer
    assert all(p.grad is None or not p.grad.any() for p in m.indexer_parameters())
    m.zero_grad(set_to_none=True)
    out.indexer_kl.backward()  # KL: only the indexer
    idx = {id(p) for p in m.indexer_parameters()}
    assert all(p.grad is None for p in m.parameters() if id(p) not in idx)
    assert any(p.grad is not None and p.grad.any() for p in m.indexer_parameters())


def test_optimizer_groups_and_muon(data_dir, tmp_path):
    tr = Trainer(cfg(data_dir, tmp_path, optimizer="muon", max_steps=3), quiet=True)
    g = param_groups(tr.model)
    assert all(p.ndim == 2 for _, p in g["matrix"]) and all(p.ndim == 3 for _, p in g["expert"])
    assert all("embed" in n or "lm_head" in n for n, _ in g["embed"])
    n_opt = sum(p.numel() for p in tr.opt.params())
    assert n_opt == sum(p.numel() for p in tr.model.parameters())  # everything, once; the bias is a buffer
    assert [type(o).__name__ for o in tr.opt.optimizers] == ["Muon", "AdamW"]
    hist = tr.run()
    assert all(np.isfinite(h["loss"]) for h in hist)
    assert lr_multiplier(0, 100, 10) == pytest.approx(0.1)
    assert lr_multiplier(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)


def test_loss_falls_below_unigram(data_dir, tmp_path):
    tr = Trainer(cfg(data_dir, tmp_path, max_steps=40, dense_steps=20, dsa_warmup_steps=5, lr=1e-2,
                     warmup_steps=5, batch_size=8, micro_batch_size=8), quiet=True)
    hist = tr.run()
    assert hist[-1]["val_loss"] < tr.unigram - 0.5, (hist[-1]["val_loss"], tr.unigram)
    assert (tmp_path / "ckpt" / "trainer_state.pt").exists() and (tmp_path / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(data_dir, tmp_path):
    args = ["--data-dir", str(data_dir), *CLI_SMALL, "--seq-len", "32", "--batch-size", "4",
            "--micro-batch-size", "2", "--max-steps", "24", "--dense-steps", "8", "--dsa-warmup-steps", "4",
            "--save-every", "4", "--eval-every", "0", "--sample-tokens", "0", "--threads", "1"]
    full = run_cli([*args, "--out-dir", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-2000:]

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "train.py", *args, "--out-dir", str(out)], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while not (out / "ckpt").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    killed_at = load_trainer_state(out / "ckpt")["step"]
    assert killed_at < 24
    resumed = run_cli([*args, "--out-dir", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_state(tmp_path / "full" / "ckpt"), load_state(out / "ckpt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), f"weights differ after resuming from step {killed_at}"


def test_atomic_save_survives_kill(data_dir, tmp_path):
    """A process killed in the middle of writing a checkpoint leaves the previous one intact."""
    code = f"""
import os, signal, torch
from nanoglm5.training.train_config import TrainConfig
from nanoglm5.training.loop import Trainer
tr = Trainer(TrainConfig(data_dir={str(data_dir)!r}, out_dir={str(tmp_path)!r}, model={SMALL!r}, seq_len=32,
             batch_size=2, micro_batch_size=2, max_steps=2, dense_steps=2, dsa_warmup_steps=0), quiet=True)
tr.train_step(0); tr.step = 1; tr.save()
orig = torch.save
def dying_save(obj, f, *a, **k):
    orig(obj, f, *a, **k)
    with open(f, "r+b") as fh: fh.truncate(100)   # half-written, then the machine dies
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
tr.train_step(1); tr.step = 2; tr.save()
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    state = load_trainer_state(tmp_path / "ckpt")
    assert state["step"] == 1
    load_state(tmp_path / "ckpt")
    leftovers = [x.name for x in tmp_path.iterdir() if x.name.startswith(".ckpt.tmp")]
    assert leftovers  # the dead write stays in its temp dir, never under ckpt


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_shards_message(tmp_path):
    r = run_cli(["--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "o"), "--max-steps", "1"])
    assert r.returncode == 1
    assert "python data/prepare.py" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_resume_with_different_config_lists_fields(data_dir, tmp_path):
    Trainer(cfg(data_dir, tmp_path, max_steps=2, dense_steps=2), quiet=True).run()
    with pytest.raises(TrainError) as e:
        Trainer(cfg(data_dir, tmp_path, max_steps=4, dense_steps=2, lr=1e-4, resume="auto",
                    model={**SMALL, "index_topk": 4}), quiet=True)
    msg = str(e.value)
    assert "lr: " in msg and "model.index_topk" in msg and "max_steps" not in msg
    t = Trainer(cfg(data_dir, tmp_path, max_steps=4, dense_steps=2, resume="auto"), quiet=True)  # same flags: fine
    assert t.step == 2


def test_corrupt_checkpoint_names_the_file(data_dir, tmp_path):
    Trainer(cfg(data_dir, tmp_path, max_steps=1, dense_steps=1), quiet=True).run()
    state = tmp_path / "ckpt" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="trainer_state.pt is corrupt"):
        Trainer(cfg(data_dir, tmp_path, max_steps=2, dense_steps=1, resume="auto"), quiet=True)
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    r = run_cli(["--data-dir", str(data_dir), "--out-dir", str(tmp_path / "o2"), "--checkpoint",
                 str(tmp_path / "ckpt"), "--max-steps", "1", "--seq-len", "32"])
    assert r.returncode == 1 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_nan_loss_stops_with_advice(data_dir, tmp_path):
    tr = Trainer(cfg(data_dir, tmp_path, max_steps=30, dense_steps=30, lr=1e6, warmup_steps=0, grad_clip=0.0,
                     save_every=1), quiet=True)
    with pytest.raises(TrainError, match=r"diverged at step \d+.*lower lr") as e:
        tr.run()
    assert "last good checkpoint" in str(e.value)
    state = load_trainer_state(tmp_path / "ckpt")
    sd = load_state(tmp_path / "ckpt")
    assert all(torch.isfinite(v).all() for v in sd.values()) and state["step"] < 30


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_processes_match_single(data_dir, tmp_path):
    args = ["--data-dir", str(data_dir), *CLI_SMALL, "--seq-len", "32", "--batch-size", "4",
            "--micro-batch-size", "2", "--max-steps", "6", "--dense-steps", "2", "--dsa-warmup-steps", "2",
            "--eval-every", "0", "--log-every", "1", "--sample-tokens", "0", "--device", "cpu"]
    single = run_cli([*args, "--out-dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29513", "train.py", *args, "--out-dir", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    a, b = read("one"), read("two")
    assert [r["stage"] for r in a] == [r["stage"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("loss", "lm_loss", "indexer_kl"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (ra["step"], k)
    wa, wb = load_state(tmp_path / "one" / "ckpt"), load_state(tmp_path / "two" / "ckpt")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-4), k


# ---------------------------------------------------------------------------------------------- FSDP
FSDP_ARGS = [*CLI_SMALL, "--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "8",
             "--dense-steps", "2", "--dsa-warmup-steps", "2", "--eval-every", "0", "--sample-tokens", "0",
             "--device", "cpu"]  # lr warm-up (20 steps) outlasts the run: the lr does not depend on --max-steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(free_port()),
            "train.py", *args]


def run_torchrun(args, timeout=180):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(torchrun(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it, as a machine dying would (torchrun starts each worker in a
    session of its own, so killing torchrun's process group would leave the workers running)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += [c for c, pp in parent.items() if pp == tree[-1]]
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def saved_step(ckpt: Path) -> int:
    """The step of the checkpoint in `ckpt`, -1 while there is none. Reads the file only: load_trainer_state's
    recovery of an interrupted rename would race the writer's own rename."""
    try:
        return torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"]
    except Exception:
        return -1


def assert_same_weights(a_dir, b_dir, atol=None):
    a, b = load_state(a_dir), load_state(b_dir)
    assert a.keys() == b.keys()
    if atol is None:
        bad = [k for k in a if not torch.equal(a[k], b[k])]
    else:
        bad = [k for k in a if not torch.allclose(a[k], b[k], rtol=0, atol=atol)]
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert not bad, f"{len(bad)} of {len(a)} tensors differ (max |Δ| {worst:.3g}), e.g. {bad[:3]}"


def test_sharded_state_round_trip(data_dir, tmp_path):
    """save_sharded / load_sharded in one process: after the dense stage the main optimizer holds no state for
    the indexer and the warm-up optimizer none at all; both come back as they were (a zero-lr step's state
    would change their bias corrections), and training continues bit-identically. Missing shard files are
    one-line CheckpointErrors."""
    mk = lambda: Trainer(cfg(data_dir, tmp_path / "run", max_steps=5), quiet=True)
    a = mk()
    for step in range(2):
        a.train_step(step)
    save_sharded(tmp_path / "shards", a.model, a._optimizers())
    assert not a.opt_warm.optimizers[0].state  # saving did not create it
    b = mk()
    load_sharded(tmp_path / "shards", b.model, b._optimizers())
    for oa, ob in zip(a.opt.optimizers + a.opt_warm.optimizers, b.opt.optimizers + b.opt_warm.optimizers):
        pa, pb = oa.param_groups[0]["params"], ob.param_groups[0]["params"]
        assert [i for i, p in enumerate(pa) if p in oa.state] == [i for i, p in enumerate(pb) if p in ob.state]
        for x, y in zip(pa, pb):
            for k, v in oa.state.get(x, {}).items():
                assert torch.equal(v, ob.state[y][k]), k
    assert not b.opt_warm.optimizers[0].state
    assert not any(p in b.opt.optimizers[0].state for p in b.model.indexer_parameters())
    for step in range(2, 5):
        a.train_step(step)
        b.train_step(step)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))

    next((tmp_path / "shards").glob("*.distcp")).unlink()
    with pytest.raises(CheckpointError, match="distcp"):
        load_sharded(tmp_path / "shards", b.model, b._optimizers())
    with pytest.raises(CheckpointError, match="shared filesystem"):
        save_checkpoint(tmp_path / "ckpt", a.model, {"step": 0}, shards=tmp_path / "shards")
    assert not (tmp_path / "ckpt").exists()


@pytest.fixture(scope="module")
def fsdp_runs(data_dir, tmp_path_factory):
    """Two FSDP2 runs of 8 steps on 2 gloo processes. `full`: uninterrupted, one checkpoint at the end (saving
    must not change the math either). `killed`: a checkpoint every 2 steps, every process SIGKILLed as soon as
    the second one is on disk (step 4: the DSA warm-up is over, both optimizers hold state but the main one none
    yet for the indexer; at step 2 the warm-up optimizer had none to save); `killed_copy` keeps that checkpoint."""
    root = tmp_path_factory.mktemp("fsdp")
    args = ["--data-dir", str(data_dir), *FSDP_ARGS, "--fsdp"]
    full = run_torchrun([*args, "--save-every", "0", "--out-dir", str(root / "full")])
    assert full.returncode == 0, full.stderr[-3000:]

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = root / "killed"
    p = subprocess.Popen(torchrun([*args, "--save-every", "2", "--out-dir", str(out)]), cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while saved_step(out / "ckpt") < 4 and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    kill_tree(p.pid)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    killed_at = load_trainer_state(out / "ckpt")["step"]
    assert killed_at < 8
    shutil.copytree(out / "ckpt", root / "killed_copy")
    return dict(root=root, args=args, killed_at=killed_at)


@pytest.mark.slow
def test_fsdp_resume_after_sigkill_is_bit_exact(fsdp_runs):
    """--fsdp --resume auto loads the DCP shards of model and optimizers (and trainer_state.pt's step, RNG,
    data position) and ends bit-identical to the uninterrupted run."""
    r = fsdp_runs
    names = {p.name for p in (r["root"] / "killed" / "ckpt").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "model.safetensors", "trainer_state.pt"} <= names
    state = load_trainer_state(r["root"] / "killed" / "ckpt")
    assert state["sharded"] and state["world"] == 2 and state["optimizers"] == {}
    resumed = run_torchrun([*r["args"], "--save-every", "2", "--out-dir", str(r["root"] / "killed"), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {r['root'] / 'killed' / 'ckpt'} at step {r['killed_at']}" in resumed.stdout
    assert "loaded the sharded model and optimizer state" in resumed.stdout
    assert_same_weights(r["root"] / "full" / "ckpt", r["root"] / "killed" / "ckpt")


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_another_world_size(fsdp_runs, data_dir, tmp_path):
    """DCP reshards: 2 FSDP ranks → 1 process (shards into full tensors), and a 1-process checkpoint (full
    optimizer state in trainer_state.pt) → 2 FSDP ranks. Equal to the uninterrupted run at the checkpoint's
    world size up to reduction order; a lost optimizer state would be off by ~lr (1e-4 and more)."""
    r = fsdp_runs
    one = run_cli([*r["args"], "--out-dir", str(tmp_path / "one"), "--resume", str(r["root"] / "killed_copy")])
    assert one.returncode == 0, one.stderr[-3000:]
    assert "written by 2 ranks, this run has 1: its shards are resharded" in one.stdout
    assert_same_weights(r["root"] / "full" / "ckpt", tmp_path / "one" / "ckpt", atol=2e-6)

    plain = ["--data-dir", str(data_dir), *FSDP_ARGS]
    single = run_cli([*plain, "--out-dir", str(tmp_path / "single")])
    part = run_cli([*plain, "--out-dir", str(tmp_path / "part"), "--max-steps", str(r["killed_at"])])
    assert single.returncode == 0 and part.returncode == 0, (single.stderr + part.stderr)[-3000:]
    two = run_torchrun([*plain, "--fsdp", "--out-dir", str(tmp_path / "part"), "--resume", "auto"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"at step {r['killed_at']}" in two.stdout
    assert_same_weights(tmp_path / "single" / "ckpt", tmp_path / "part" / "ckpt", atol=2e-6)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def text_data_dir(tmp_path_factory):
    """A data dir as data/prepare.py writes it, in miniature: tokenizer.json + token shards of math text."""
    d = tmp_path_factory.mktemp("textdata")
    texts = [f"Problem: {p['question']}\nSolution:\n{p['solution']}" for p in math_problems(400, 0)]
    tok = Tokenizer.train(texts, vocab_size=400)
    tok.save(d / "tokenizer.json")
    ids = np.concatenate([np.array(tok.encode(t) + [tok.eos_id]) for t in texts]).astype(np.uint16)
    (d / "tokens").mkdir()
    ids[: len(ids) * 9 // 10].tofile(d / "tokens" / "train.bin")
    ids[len(ids) * 9 // 10 :].tofile(d / "tokens" / "val.bin")
    (d / "tokens" / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": tok.vocab_size}))
    return d


def _sft_cfg(data, out, init, **kw) -> TrainConfig:
    base = dict(stage="sft", data_dir=str(data), out_dir=str(out), checkpoint=str(init), seq_len=64, batch_size=4,
                micro_batch_size=2, max_steps=4, eval_every=0, save_every=0, eval_seqs=4, sample_tokens=0,
                sft_examples=60, sft_pretrain_mix=0.25, warmup_steps=1, log_every=1, threads=1)
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_sft_mix_resumes_exactly_and_branches_into_qat(text_data_dir, tmp_path):
    """SFT with pretraining text: stopping at --until-step and resuming ends bit-identical to one run; the trunk
    checkpoint branches into QAT (--qat-start-step = its step) and into full precision, while a checkpoint that
    already trained with QAT refuses a full-precision resume; the pretraining val loss is reported."""
    pre = Trainer(cfg(text_data_dir, tmp_path / "pre", model=dict(SMALL), seq_len=64, max_steps=1, dense_steps=1,
                      dsa_warmup_steps=0), quiet=True)
    pre.run()
    init = tmp_path / "pre" / "ckpt"
    one = Trainer(_sft_cfg(text_data_dir, tmp_path / "one", init), quiet=True)
    hist = one.run()
    assert "pretrain_val_loss" in hist[-1] and np.isfinite(hist[-1]["pretrain_val_loss"])
    Trainer(_sft_cfg(text_data_dir, tmp_path / "trunk", init, until_step=2), quiet=True).run()
    trunk = tmp_path / "trunk" / "ckpt"
    assert load_trainer_state(trunk)["step"] == 2
    Trainer(_sft_cfg(text_data_dir, tmp_path / "fp", init, resume=str(trunk)), quiet=True).run()
    a, b = load_state(tmp_path / "one" / "ckpt"), load_state(tmp_path / "fp" / "ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed mix differs from the uninterrupted run"
    qat = dict(qat="int4", qat_layers="all_but_head", qat_group_size=16, qat_start_step=2)
    br = Trainer(_sft_cfg(text_data_dir, tmp_path / "qat", init, resume=str(trunk), **qat), quiet=True)
    assert not br.qat_on
    br.run()
    assert br.qat_on and (tmp_path / "qat" / "ckpt" / "qat_config.json").exists()
    c = load_state(tmp_path / "qat" / "ckpt")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the QAT steps trained other weights
    with pytest.raises(TrainError, match="qat"):  # QAT already ran before step 4: no silent switch back
        Trainer(_sft_cfg(text_data_dir, tmp_path / "x", init, resume=str(tmp_path / "qat" / "ckpt"), max_steps=6),
                quiet=True)


@pytest.mark.slow
def test_pretrain_then_sft_cli(text_data_dir, tmp_path):
    common = ["--data-dir", str(text_data_dir), "--seq-len", "64", "--batch-size", "4", "--micro-batch-size", "4",
              "--sample-tokens", "8", "--eval-seqs", "4"]
    pre = run_cli([*common, *CLI_SMALL, "--out-dir", str(tmp_path / "pre"), "--max-steps", "4", "--dense-steps", "2",
                   "--dsa-warmup-steps", "1", "--eval-every", "2"])
    assert pre.returncode == 0, pre.stderr[-2000:]
    assert "bits/byte" in pre.stderr + pre.stdout and "sample:" in pre.stderr + pre.stdout
    ck = tmp_path / "pre" / "ckpt"
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"} <= {p.name for p in ck.iterdir()}
    sft = run_cli([*common, "--stage", "sft", "--checkpoint", str(ck), "--out-dir", str(tmp_path / "sft"),
                   "--max-steps", "3", "--sft-examples", "60", "--eval-every", "3"])
    assert sft.returncode == 0, sft.stderr[-2000:]
    hist = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert hist[-1]["stage"] == "sparse" and np.isfinite(hist[-1]["val_loss"])
    no_init = run_cli([*common, "--stage", "sft", "--out-dir", str(tmp_path / "x")])
    assert no_init.returncode == 1 and "--checkpoint" in no_init.stderr


def test_long_context_stage_raises_rope_base_extends_positions_and_resumes_exactly(text_data_dir, tmp_path):
    """With its default share of passkey documents (a tokenizer in the data dir), so resume covers the mix."""
    data_dir = text_data_dir
    from transformers import AutoConfig

    from nanoglm5.checkpoint import read_config
    from nanoglm5.training.train_config import LONG_CONTEXT_ROPE_FACTOR

    Trainer(cfg(data_dir, tmp_path / "pre", max_steps=4), quiet=True).run()
    pre = tmp_path / "pre" / "ckpt"
    with pytest.raises(TrainError, match="--stage long_context starts from a pretrained model"):
        Trainer(TrainConfig(stage="long_context", data_dir=str(data_dir), out_dir=str(tmp_path / "x")), quiet=True)
    lc = lambda out, **kw: TrainConfig(**{**dict(  # noqa: E731
        stage="long_context", data_dir=str(data_dir), out_dir=str(out), checkpoint=str(pre), seq_len=192,
        batch_size=2, micro_batch_size=1, max_steps=4, eval_every=0, save_every=0, eval_seqs=2, warmup_steps=1,
        sample_tokens=0, log_every=1), **kw})
    full = Trainer(lc(tmp_path / "full"), quiet=True)
    assert [full.stage_at(s) for s in range(4)] == ["sparse"] * 4  # DSA on from the first step, fixed top-k
    assert full.cfg.passkey_mix == 0.5 and full.data.split(2) == (1, 1)  # one corpus window, one passkey document
    full.run()
    base, ext = read_config(pre), read_config(tmp_path / "full" / "ckpt")
    assert ext.rope_theta == base.rope_theta * LONG_CONTEXT_ROPE_FACTOR and ext.max_position_embeddings == 192
    hf = AutoConfig.from_pretrained(tmp_path / "full" / "ckpt")  # the raised base round-trips through the HF config
    assert hf.rope_parameters["rope_theta"] == ext.rope_theta and hf.max_position_embeddings == 192

    Trainer(lc(tmp_path / "half", until_step=2), quiet=True).run()
    Trainer(lc(tmp_path / "half", resume=str(tmp_path / "half" / "ckpt")), quiet=True).run()
    a, b, p0 = (load_state(d) for d in (tmp_path / "full" / "ckpt", tmp_path / "half" / "ckpt", pre))
    assert any(not torch.equal(a[k], p0[k]) for k in a), "the stage trained nothing"
    assert all(torch.equal(a[k], b[k]) for k in a), "resuming the long_context stage is not exact"
