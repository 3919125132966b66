"""A checkpoint scored by EleutherAI's evaluation harness as users run it (`lm_eval --model hf`; here its Python API,
lm_eval.simple_evaluate) on a small local generate_until task, with the chat template from tokenizer_config.json:
the harness renders our chat format, its greedy generations stop and equal our engine's, and its exact_match is
its comparison of those generations with the targets (one target is set to the model's own answer: score 1/4).
This is the call that died with "TypeError: 'None' is not an instance of 'Sequence'" when checkpoints had no eos."""

import json

import pytest
import torch
from conftest import CHAT_TEXTS, require

from nanoglm5.checkpoint import load_hf, save_hf
from nanoglm5.config import ModelConfig
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.engine import Engine, SamplingParams
from nanoglm5.model import GLM5

TASK = """task: nanoglm5_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  max_gen_toks: 6
  do_sample: false
  until: ["<|user|>"]
metric_list:
  - metric: exact_match
"""


@pytest.mark.slow
def test_lm_eval_hf_scores_a_local_task_on_our_checkpoint(tmp_path):
    lm_eval = require("lm_eval", "the evaluation harness check (requirements-dev.txt)")
    from lm_eval.tasks import TaskManager

    tok = Tokenizer.train(CHAT_TEXTS, vocab_size=300)
    torch.manual_seed(0)  # index_topk 32 ≥ prompt + 6 tokens: DSA keeps every key, so no tie-break can differ
    save_hf(GLM5(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=96, index_topk=32)),
            tmp_path / "ck", tokenizer=tok)
    questions = [f"What is {i} plus {i}?" for i in range(4)]
    prompts = [tok.render_prompt([{"role": "user", "content": q}]) for q in questions]
    engine = Engine(load_hf(tmp_path / "ck"), max_batch=4, graphs="off")
    ours = [tok.decode([t for t in c.token_ids if t not in tok.stop_ids])
            for c in engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0))]
    answers = [ours[0], "0", "2", "4"]  # the first target is the model's own greedy answer
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                                 for q, a in zip(questions, answers)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "sums.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'ck'},dtype=float32",
                                  tasks=["nanoglm5_sums"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                  apply_chat_template=True, log_samples=True, device="cpu", batch_size=1)
    samples = sorted(out["samples"]["nanoglm5_sums"], key=lambda s: s["doc_id"])
    assert [s["arguments"][0][0] for s in samples] == [tok.decode(p) for p in prompts]  # our chat format, rendered
    assert [s["filtered_resps"][0] for s in samples] == ours
    expected = sum(o == a for o, a in zip(ours, answers)) / 4
    assert expected >= 0.25 and out["results"]["nanoglm5_sums"]["exact_match,none"] == pytest.approx(expected)
