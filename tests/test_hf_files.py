"""Checkpoints other tools load unchanged: tokenizer_config.json (GLM's chat template, eos/pad) and
generation_config.json beside the weights, checked with transformers itself as the oracle."""

import json

import pytest
import torch

from conftest import CHAT_TEXTS, require
from nanoglm5.checkpoint import save_hf
from nanoglm5.config import ModelConfig
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.model import GLM5

CONVERSATIONS = [
    [{"role": "user", "content": "hello world"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "1 + 2 = ?"}],
    [{"role": "system", "content": "be nice"}, {"role": "user", "content": "the cat"},
     {"role": "assistant", "content": "sat on the mat"}, {"role": "user", "content": "and then?\nsay more"}],
    [{"role": "user", "content": "compute 2 + 2"}, {"role": "assistant", "content": "CALL add(2, 2)"},
     {"role": "observation", "content": "4"}, {"role": "assistant", "content": "ANSWER 4"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "héllo, 世界"}],
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CHAT_TEXTS, vocab_size=300)


def _save(tmp_path, tok, model=None):
    torch.manual_seed(0)
    model = model or GLM5(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=96))
    return save_hf(model, tmp_path / "ckpt", tokenizer=tok)


@pytest.mark.parametrize("gen_prompt", [True, False])
def test_apply_chat_template_renders_as_render_chat(tmp_path, tok, gen_prompt):
    transformers = require("transformers", "the oracle for tokenizer_config.json's chat template")
    hf = transformers.AutoTokenizer.from_pretrained(_save(tmp_path, tok))
    for msgs in CONVERSATIONS:
        ours = tok.render_chat(msgs, add_generation_prompt=gen_prompt)[0]
        text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
        assert text == tok.decode(ours), msgs
        ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen_prompt, return_dict=True)
        assert ids["input_ids"] == ours, msgs  # and the same ids (no BOS or other token added)
    with pytest.raises(Exception, match="unknown chat role 'tool'|unknown chat role tool"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_special_tokens_and_generation_config(tmp_path, tok):
    transformers = require("transformers", "the oracle for tokenizer_config.json and generation_config.json")
    path = _save(tmp_path, tok)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (tok.eos_id, tok.eos_id, None)
    gen = transformers.GenerationConfig.from_pretrained(path)
    assert gen.eos_token_id == tok.stop_ids and gen.pad_token_id == tok.eos_id
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["eos_token_id"] == tok.stop_ids and cfg["pad_token_id"] == tok.eos_id
    # a checkpoint without a tokenizer gets none of the tokenizer's files
    bare = save_hf(GLM5(ModelConfig.preset("tiny", vocab_size=tok.vocab_size)), tmp_path / "bare")
    assert not (bare / "tokenizer_config.json").exists() and not (bare / "generation_config.json").exists()


def _chain_model(tok, chain: list[int]) -> GLM5:
    """A tiny model rigged to write `chain` greedily: with every attention output and MLP down projection zeroed,
    the last hidden state is the final norm of the current token's embedding, h(t); the head's row for each
    token b holds unit(h(a)) for the a it follows, so the greedy next token after chain[i] is chain[i + 1]. The
    chain ends in a cycle (eos → chain[1] → …): a generator that ignores eos writes until max_new_tokens."""
    torch.manual_seed(0)
    model = GLM5(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=96)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                p.zero_()
        h = model.norm(model.embed_tokens.weight)  # (V, H): h(t) for every token
        h = h / h.norm(dim=-1, keepdim=True)
        model.lm_head.weight.zero_()
        for a, b in zip(chain[:-1], chain[1:]):
            model.lm_head.weight[b] += 10 * h[a]
    return model


def test_pipeline_stops_at_eos(tmp_path, tok):
    transformers = require("transformers", "the oracle for generation stopping at eos")
    newline = tok.render_prompt([])[-1]  # the generation prompt ends `<|assistant|>` `\n`
    words = tok.encode("the cat sat")
    assert len(set(words + [newline, tok.eos_id])) == len(words) + 2, "the chain needs distinct tokens"
    chain = [newline, *words, tok.eos_id, words[0]]
    path = _save(tmp_path, tok, _chain_model(tok, chain))
    pipe = transformers.pipeline("text-generation", model=str(path), device="cpu")
    msgs = [{"role": "user", "content": "hello world"}]
    out = pipe(msgs, max_new_tokens=40, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    new = out[len(tok.render_prompt(msgs)):]
    assert new == words + [tok.eos_id], tok.decode(new)  # the rigged words, then eos, and no more (< 40)
    reply = pipe(msgs, max_new_tokens=40, do_sample=False)[0]["generated_text"][-1]
    assert reply == {"role": "assistant", "content": "the cat sat"}
