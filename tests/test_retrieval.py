"""Passkey retrieval (nanoglm5/retrieval.py): the tasks leave no shortcut (uniform keys, random filler, the needle
where the depth puts it), scoring is greedy exact match of the key, and the indexer's recall is read from the
top-k the DSA layers really selected."""

import numpy as np
import pytest
import torch

from nanoglm5.config import ModelConfig
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.model import GLM5
from nanoglm5.retrieval import evaluate, main, make_examples, score, selections

TEXTS = ["the cat sat on the mat and looked at the door", "a pass key is a number: 0 1 2 3 4 5 6 7 8 9",
         "what is the pass key? remember it."] * 30


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=320)


@pytest.fixture(scope="module")
def filler(tok):
    return np.array(tok.encode(" ".join(TEXTS * 3)), dtype=np.uint16)


def test_examples_hide_a_uniform_key_at_the_asked_depth(tok, filler):
    exs = make_examples(tok, filler, lengths=[600, 900], depths=[0.1, 0.9], n=6, seed=0)
    assert len(exs) == 2 * 2 * 6 and all(len(e.ids) == e.length for e in exs)
    assert len({e.key for e in exs}) == len(exs)  # keys drawn uniformly: no answer to guess from frequency
    for e in exs:
        assert tok.decode(e.ids[e.answer_at:]).strip() == e.key  # the answer is the key, at the very end
        assert e.key in tok.decode(e.ids[: e.answer_at])  # and the key is in the context, once placed by depth
        rel = e.key_pos[0] / e.length  # the question and answer take the last part, so 0.9 lands a little earlier
        assert rel < 0.3 if e.depth == 0.1 else rel > 0.6, (rel, e.depth)
    starts = {tuple(e.ids[:8]) for e in exs}
    assert len(starts) > 1  # the filler comes from different offsets


def test_too_short_a_length_is_refused_with_the_fix(tok, filler):
    with pytest.raises(ValueError, match="too short"):
        make_examples(tok, filler, lengths=[20], depths=[0.5], n=1)


def test_indexer_recall_reads_the_real_selection_and_dense_sees_everything(tok, filler):
    torch.manual_seed(0)
    model = GLM5(ModelConfig.preset("tiny", vocab_size=len(tok), max_position_embeddings=512, index_topk=16)).eval()
    exs = make_examples(tok, filler, lengths=[200], depths=[0.5], n=2)
    s = score(model, exs[0], sparse=True)
    assert 0.0 <= s["recall"] <= 1.0 and isinstance(s["retrieved"], bool)
    assert not any("select" in vars(m) for m in model.modules())  # the recorder put the class's method back
    # with top-k as large as the context nothing is selected away: no recall to report, and sparse is dense
    wide = GLM5(ModelConfig.preset("tiny", vocab_size=len(tok), max_position_embeddings=512, index_topk=256)).eval()
    wide.load_state_dict(model.state_dict())
    assert np.isnan(score(wide, exs[0], sparse=True)["recall"])
    (cell,) = evaluate(wide, exs)["cells"]
    assert cell["n"] == 2 and cell["sparse"] == cell["dense"] and cell["indexer_recall"] is None
    (narrow,) = evaluate(model, exs)["cells"]
    assert 0.0 <= narrow["indexer_recall"] <= 1.0
    assert cell["sparse_answer_tokens"] == cell["dense_answer_tokens"] and 0.0 <= narrow["sparse_answer_tokens"] <= 1.0


def test_selections_are_the_causal_top_k_the_recall_reads(tok, filler):
    """selections() returns each sparse layer's (T, k) picks: k distinct keys per query, never in the future, and
    exactly the picks score() checks the needle against."""
    torch.manual_seed(0)
    model = GLM5(ModelConfig.preset("tiny", vocab_size=len(tok), max_position_embeddings=512, index_topk=16)).eval()
    (ex,) = make_examples(tok, filler, lengths=[200], depths=[0.5], n=1)
    picked = selections(model, ex.ids[:-1])
    assert len(picked) == model.config.num_hidden_layers and all(t.shape == (199, 16) for t in picked)
    t = torch.arange(199)[:, None]
    assert all(bool((p[16:] <= t[16:]).all()) for p in picked)  # from k on, every pick is causal
    assert all(len(set(row.tolist())) == 16 for p in picked for row in p)
    q = range(ex.answer_at - 1, ex.answer_at - 1 + ex.n_answer)
    hits = [bool(set(ex.key_pos) & set(p[i].tolist())) for p in picked for i in q]
    assert score(model, ex, sparse=True)["recall"] == pytest.approx(np.mean(hits))


def test_cli_names_a_missing_checkpoint(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_training_documents_share_no_key_filler_span_or_depth_with_the_evaluation(tok, filler):
    from nanoglm5.data.passkey import DEPTH_MARGIN, EVAL_DEPTHS, draw_key, draw_train_depth, key_split
    from nanoglm5.training.batches import PasskeyMix, TokenBatches

    rng = np.random.default_rng(0)
    train_keys = {draw_key(rng, "train") for _ in range(300)}
    eval_keys = {e.key for e in make_examples(tok, filler, lengths=[300], depths=list(EVAL_DEPTHS), n=20, seed=1)}
    assert not train_keys & eval_keys and {key_split(int(k)) for k in eval_keys} == {"eval"}
    assert {k[-1] for k in train_keys} == {k[-1] for k in eval_keys} == set("0123456789")  # every digit in both
    depths = [draw_train_depth(rng) for _ in range(500)]
    assert min(abs(d - e) for d in depths for e in EVAL_DEPTHS) >= DEPTH_MARGIN
    mix = PasskeyMix(TokenBatches(filler, 255, seed=3), tok, frac=0.5)
    x, y = mix.batch(step=7, batch_size=4, lo=0, hi=4)
    assert x.shape == (4, 255) and torch.equal(x[:, 1:], y[:, :-1])
    docs = [tok.decode(r.tolist()) for r in x[2:]]  # the passkey documents are the last rows
    keys = [d.split("The pass key is ")[1][:5] for d in docs]
    assert all(key_split(int(k)) == "train" and "What is the pass key?" in d for k, d in zip(keys, docs))
    # a pure function of (seed, step), cut into micro-batches without changing the rows
    x2 = torch.cat([mix.batch(7, 4, lo, lo + 1)[0] for lo in range(4)])
    assert torch.equal(x, x2) and not torch.equal(x, mix.batch(8, 4, 0, 4)[0])


def test_no_shortcut_solves_the_evaluation(tok, filler):
    """Frequency, position, and a copy of the key elsewhere in the context: each shortcut fails."""
    from nanoglm5.data.passkey import EVAL_DEPTHS

    exs = make_examples(tok, filler, lengths=[300, 500], depths=list(EVAL_DEPTHS), n=8, seed=2)
    answers = [tuple(e.ids[e.answer_at:]) for e in exs]
    # frequency: the most common answer (even the evaluation's own, which training never sees) is nearly unique
    top = max(set(answers), key=answers.count)
    assert answers.count(top) / len(exs) <= 0.05
    # position: copying the tokens where the first example's key sat, same length, retrieves almost nothing
    for length in (300, 500):
        cell = [e for e in exs if e.length == length]
        at = cell[0].key_pos[0]
        hit = [tuple(e.ids[at : at + e.n_answer]) == tuple(e.ids[e.answer_at:]) for e in cell]
        assert np.mean(hit) <= 0.2
    # the key is in the context only in the needle (twice: "... is K. Remember it. K is ..."), never in the filler
    for e in exs:
        assert tok.decode(e.ids[: e.answer_at]).count(e.key) == 2
