"""GLM-5's chain, exact (arXiv 2602.15763 §2.4.3): RL trains the QAT model. A checkpoint with a QAT recipe
loads QAT-prepared in the learner and in the rollout workers (the relay carries the latent weights under the
same names), the workers' behaviour log-probs are the quantized model's, the RL checkpoint keeps the recipe,
and `python -m nanoglm5.quant convert` of it gives an int4 model whose logits equal the RL model's bit for bit.
"""

import math

import pytest
import torch

from bench.toy import toy_checkpoint
from nanoglm5.checkpoint import load_hf, save_hf
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.int4 import QATLinear, prepare_qat, qat_extra_files
from nanoglm5.quant import convert_checkpoint, read_qat_recipe
from nanoglm5.rl.buffer import Lease
from nanoglm5.rl.controller import Controller
from nanoglm5.rl.learner import build_policy, load_policy, pad_trajectories, policy_config, sequence_logprobs
from nanoglm5.rl.relay import WeightRelay
from nanoglm5.rl.rl_config import RLConfig
from nanoglm5.rl.rollout import Rollout
from nanoglm5.rl.task_source import TaskSource

RECIPE = dict(layers="all_but_head", group_size=16)


@pytest.fixture(scope="module")
def qat_ckpt(tmp_path_factory):
    """A toy SFT checkpoint trained "with QAT": its recipe (qat_config.json) beside the weights. index_topk 512:
    DSA selects every key at these lengths, so decode and full forward agree to float precision."""
    d = tmp_path_factory.mktemp("rlqat")
    fp = toy_checkpoint(d / "fp", index_topk=512)
    model = prepare_qat(load_hf(fp), **RECIPE)
    save_hf(model, d / "qat", tokenizer=Tokenizer.load(fp / "tokenizer.json"), extra_files=qat_extra_files(model))
    return d / "qat"


def _ids(model, n=3, T=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n, T), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, sparse=True, tie_break="stable").logits


def test_policy_loads_qat_and_workers_build_the_same_modules(qat_ckpt):
    policy = load_policy(qat_ckpt)
    assert read_qat_recipe(qat_ckpt).layers == "all_but_head" and policy.qat_config.group_size == 16
    assert any(isinstance(m, QATLinear) for m in policy.modules())
    worker = build_policy(policy_config(policy))
    assert worker.qat_config == policy.qat_config
    relay = WeightRelay(policy.state_dict())  # the latent fp32 weights, by name
    relay.pull(worker)
    ids = _ids(policy)
    assert torch.equal(_logits(worker, ids), _logits(policy, ids))
    fp = load_hf(qat_ckpt)  # the same weights without fake quant: really different logits
    assert (_logits(fp, ids) - _logits(policy, ids)).abs().max() > 1e-3


def test_rollout_logprobs_are_the_quantized_models(qat_ckpt):
    """In-process worker loop: behaviour log-probs = the learner's log-probs on the QAT model (IS ratio 1)."""
    policy, tok = load_policy(qat_ckpt), Tokenizer.load(qat_ckpt / "tokenizer.json")
    cfg = RLConfig(checkpoint=str(qat_ckpt), env="math", group_size=4, max_new_tokens=10, max_len=160, worker_groups=2)
    src = TaskSource(cfg)
    worker = build_policy(policy_config(policy))
    WeightRelay(policy.state_dict()).pull(worker)
    ro = Rollout(worker, tok, cfg)
    try:
        groups = ro.run([(Lease(i, 0, math.inf, 0), src(i)) for i in range(2)])
    finally:
        ro.close()
    ids, lp_mu, mask = pad_trajectories([t for g in groups for t in g.trajectories])
    m = mask[:, 1:].bool()
    with torch.no_grad():
        lp_qat, lp_fp = sequence_logprobs(policy, ids), sequence_logprobs(load_hf(qat_ckpt), ids)
    assert m.sum() > 20
    assert (lp_qat - lp_mu[:, 1:])[m].abs().max() < 2e-4
    assert (lp_fp - lp_mu[:, 1:])[m].abs().max() > 1e-3  # the worker sampled from the quantized model


@pytest.mark.slow
def test_rl_on_qat_model_converts_bit_identically(qat_ckpt, tmp_path):
    """Two sync RL steps with real worker processes: their log-probs are the QAT learner's, the RL checkpoint
    carries the recipe, and its int4 conversion has the RL model's logits bit for bit."""
    cfg = RLConfig(checkpoint=str(qat_ckpt), out_dir=str(tmp_path / "rl"), mode="sync", env="math", workers=2,
                   worker_groups=1, group_size=4, groups_per_step=2, max_steps=2, max_new_tokens=10, max_len=128,
                   n_eval_tasks=0, n_train_tasks=20, lr=3e-3, plot=False, progress=False)
    ctl = Controller(cfg, quiet=True)
    assert ctl.model.qat_config is not None
    seen, update = [], ctl.learner.update

    def spy(groups):  # before the first update the learner holds version 0, the weights every group used
        trajs = [t for g in groups for t in g.trajectories]
        if not seen:
            ids, lp_mu, mask = pad_trajectories(trajs)
            with torch.no_grad():
                seen.append(((sequence_logprobs(ctl.model, ids) - lp_mu[:, 1:])[mask[:, 1:].bool()]).abs().max())
        for i, t in enumerate(trajs):  # a random toy model earns no reward: give the update a direction
            t.advantage = 1.0 if i % 2 else -1.0
        return update(groups)

    ctl.learner.update = spy
    ctl.run()
    assert seen and seen[0] < 2e-4, f"worker vs learner log-probs on the QAT model differ by {seen}"
    rl_ckpt = tmp_path / "rl" / "ckpt"
    assert read_qat_recipe(rl_ckpt) == ctl.model.qat_config
    rl_model = load_policy(rl_ckpt)
    before = load_hf(qat_ckpt).state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in rl_model.state_dict().items())  # RL moved the weights
    r = convert_checkpoint(rl_ckpt, tmp_path / "int4")
    assert r["source"] == "qat"
    int4 = load_hf(tmp_path / "int4")
    ids = _ids(rl_model, seed=1)
    assert torch.equal(_logits(int4, ids), _logits(rl_model, ids))
