"""Tokenizer: byte-level round trip on every source, atomic special tokens, exact chat-template masks."""

import pytest

from nanoglm5.data import corpus
from nanoglm5.data.tokenizer import MIN_VOCAB, Tokenizer

WEIRD = ["", " ", "héllo  wörld\t\n\n  x", "日本語 и русский 🎉🎉", "\x00\x01\x7f", "\r\n\r\n", "a" * 300,
         "1234567890 3.14159 -2/3", "def f(x):\n\treturn x  # tab\n", "\ufeffBOM", "a<|user|>b[gMASK]c<sop>"]


@pytest.fixture(scope="module")
def docs():
    return corpus.embedded_corpus(300_000, 0, corpus.Rejects(), max_docs=60)


@pytest.fixture(scope="module")
def tok(docs):
    return Tokenizer.train([d["text"] for d in docs], 1024)


def test_vocab_fits_the_request(tok):
    assert MIN_VOCAB < tok.vocab_size <= 1024
    assert all(0 <= i < tok.vocab_size for i in tok.special.values())
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], 100)


def test_round_trip_every_source(tok, docs):
    sources = {d["source"] for d in docs}
    assert {"pydoc_topics", "docstrings", "stdlib_python", "math"} <= sources
    for d in docs:
        assert tok.decode(tok.encode(d["text"])) == d["text"], d["id"]
    for s in WEIRD:
        assert tok.decode(tok.encode(s)) == s


def test_special_tokens_are_atomic(tok):
    for s, i in tok.special.items():
        assert tok.encode(s) == [i]
        assert tok.decode([i]) == s
    ids = tok.encode("x<|assistant|>y")
    assert tok.special["<|assistant|>"] in ids and tok.decode(ids) == "x<|assistant|>y"
    assert tok.eos_id == tok.special["<|endoftext|>"]
    assert set(tok.stop_ids) == {tok.special[s] for s in ("<|endoftext|>", "<|user|>", "<|observation|>")}


def test_save_load(tok, tmp_path):
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        t2 = Tokenizer.load(path)
        assert t2.special == tok.special and t2.encode("hello world 42") == tok.encode("hello world 42")
    with pytest.raises(FileNotFoundError, match="data/prepare.py"):
        Tokenizer.load(tmp_path / "nowhere")


def test_training_is_deterministic(docs):
    texts = [d["text"] for d in docs[:80]]
    a, b = Tokenizer.train(texts, 600), Tokenizer.train(texts, 600)
    assert a._tok.to_str() == b._tok.to_str()


def test_chat_template_masks_exact(tok):
    S = tok.special
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "observation", "content": "ok"},
            {"role": "assistant", "content": "Done."}]
    ids, mask = tok.render_chat(msgs)
    assert len(ids) == len(mask) and ids[:2] == tok.prefix_ids == [S["[gMASK]"], S["<sop>"]]
    assert tok.render_chat([])[0] == tok.prefix_ids
    # a conversation rendered without the prefix continues an ongoing one (how RL appends turns)
    assert tok.render_chat(msgs[:2])[0] + tok.render_chat(msgs[2:])[0][len(tok.prefix_ids):] == ids
    assert tok.decode(ids) == ("[gMASK]<sop><|system|>\nBe brief.<|user|>\n2+2?<|assistant|>\n4"
                               "<|observation|>\nok<|assistant|>\nDone.<|endoftext|>")
    learned = [i for i, m in zip(ids, mask) if m]
    # content of both assistant turns, each followed by the token that ends it
    assert learned == tok.encode("4") + [S["<|observation|>"]] + tok.encode("Done.") + [S["<|endoftext|>"]]
    nl = tok.encode("\n")
    for k, i in enumerate(ids):  # role tokens and their newline are never learned, except as turn ends
        if i == S["<|assistant|>"]:
            assert mask[k] == 0 and ids[k + 1: k + 1 + len(nl)] == nl and mask[k + 1] == 0


def test_generation_prompt_and_roles(tok):
    msgs = [{"role": "user", "content": "hi"}]
    ids, mask = tok.render_chat(msgs, add_generation_prompt=True)
    assert ids[-1 - len(tok.encode("\n"))] == tok.special["<|assistant|>"] and sum(mask) == 0
    assert tok.render_prompt(msgs) == ids
    # last turn is the user's: nothing to learn, no end-of-text appended
    ids2, mask2 = tok.render_chat(msgs)
    assert sum(mask2) == 0 and ids2[-1] != tok.eos_id
    with pytest.raises(ValueError, match="'tool'"):
        tok.render_chat([{"role": "tool", "content": "x"}])


def test_special_strings_in_content_stay_text(tok):
    ids, mask = tok.render_chat([{"role": "user", "content": "say <|assistant|> please"},
                                 {"role": "assistant", "content": "<|user|>"}])
    assert ids.count(tok.special["<|assistant|>"]) == 1 and ids.count(tok.special["<|user|>"]) == 1
    assert tok.decode(ids).endswith("say <|assistant|> please<|assistant|>\n<|user|><|endoftext|>")
