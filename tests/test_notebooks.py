"""The notebooks (notebooks/*.ipynb): each one runs top to bottom where Jupyter runs it, and does what it teaches.

Jupyter starts a notebook's kernel in the notebook's folder, so every run here has cwd = notebooks/ (each
notebook's first cell finds the repository root from there). Small settings are injected the way papermill
does it: a cell with the overrides goes right after the cell tagged `parameters`. Each notebook ends with a
cell that prints one JSON line of the numbers it stands for; the tests parse that line and check them.
Executing here never writes the files back: the committed notebooks keep the outputs of a full run
(refresh them with `jupyter nbconvert --to notebook --execute --inplace notebooks/NAME.ipynb` from the
repository root: nbconvert also runs the kernel in notebooks/).
"""

import json
import re
from pathlib import Path

import pytest
from conftest import require

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def run_notebook(name: str, overrides: str = "", timeout: int = 600):
    """Execute notebooks/`name` with cwd = notebooks/; `overrides` runs right after the `parameters` cell.
    Returns (the executed notebook, the dict its last code cell printed as JSON)."""
    nbformat = require("nbformat", "the notebook tests read notebooks (requirements-dev.txt)")
    nbclient = require("nbclient", "the notebook tests run notebooks (requirements-dev.txt)")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    if overrides:
        at = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
        assert len(at) == 1, f"{name}: overrides need exactly one cell tagged 'parameters', found {len(at)}"
        cell = nbformat.v4.new_code_cell(overrides.strip(), metadata={"tags": ["injected-parameters"]})
        nb.cells.insert(at[0] + 1, cell)
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb, final_json(nb)


def final_json(nb) -> dict:
    """The JSON line printed by the notebook's last code cell."""
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    text = "".join(o.get("text", "") for o in last.get("outputs", []) if o.get("output_type") == "stream")
    lines = [x for x in text.splitlines() if x.startswith("{")]
    assert lines, f"the last code cell printed no JSON line; it printed {text[-500:]!r}"
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------- static checks
# Path("data"), open("data/..."), "out/...", "../data": paths that resolve against the working directory
RELATIVE_PATH = re.compile(r"""(?<![\w/])(?:Path|open)\(\s*f?["'](?:\.\./)?(?:data|out|nanoglm5|bench|notebooks)\b"""
                           r"""|(?<!/ )(?<!\w)f?["'](?:\.\./|(?:data|out)/)""")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_runnable(name):
    """Committed with the outputs of a clean run (no errors), small, and with no path that only works from
    one working directory (paths go through ROOT, found in the first code cell)."""
    nb = json.loads((NOTEBOOKS / name).read_text())
    size = (NOTEBOOKS / name).stat().st_size
    assert size < 1_000_000, f"{name} is {size:,} bytes: keep outputs small (no long logs, modest figures)"
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert cells and "ROOT" in "".join(cells[0]["source"]), f"{name}: the first code cell must define ROOT"
    assert cells[-1].get("outputs"), f"{name}: commit it executed, with its outputs"
    errors = [o.get("ename") for c in cells for o in c["outputs"] if o.get("output_type") == "error"]
    assert not errors, f"{name} was committed with errors: {errors}"
    counts = [c["execution_count"] for c in cells]
    assert counts == list(range(1, len(cells) + 1)), f"{name}: run top to bottom once (execution counts {counts})"
    bad = [line for c in cells for line in "".join(c["source"]).splitlines() if RELATIVE_PATH.search(line)]
    assert not bad, f"{name}: paths relative to the working directory (use ROOT / ...): {bad}"


def test_every_notebook_has_a_test_here():
    tested = set(re.findall(r'run_notebook\("([\w.]+)"', Path(__file__).read_text()))
    assert set(NAMES) == tested, f"untested notebooks: {set(NAMES) - tested}; unknown: {tested - set(NAMES)}"


# ---------------------------------------------------------------------------------------------- one run each
@pytest.mark.slow
def test_00_scale():
    _, r = run_notebook("00_scale.ipynb")
    assert r["meta_equals_analytic"] and r["total"] == 743_911_218_432
    assert 15 < r["total_over_active"] < 25  # 744B total, ~40B active
    assert r["dsa_over_dense_prefill_128k"] < 0.25
    assert r["kv_expanded_B_per_token"] / r["kv_compressed_B_per_token"] > 40


@pytest.mark.slow
def test_01_data():
    _, r = run_notebook("01_data.ipynb", "BUDGET_CHARS = 400_000\nVOCAB_SIZE = 1024")
    assert r["dedup_recall"] > 0.9 and r["dedup_precision"] > 0.9, r
    assert r["quality_auc"] > 0.9 and r["language_accuracy"] > 0.8 and r["math_judge_auc"] > 0.8, r
    assert r["tokenizer_round_trip"] and 0 < r["learned_tokens"] < r["template_tokens"]
    assert 0 < r["kept"] < r["documents"]


@pytest.mark.slow
def test_02_model(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the kernel inherits it: torch would sum in 2 threads
    _, r = run_notebook("02_model.ipynb", "TRAIN_STEPS = 10")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _, r1 = run_notebook("02_model.ipynb", "TRAIN_STEPS = 10")
    assert r1 == r, (r1, r)  # saved outputs reproduce under any thread count (the notebook runs on one thread)
    assert r["train_loss_last"] < r["train_loss_first"], r
    assert r["absorbed_vs_expanded_max_diff"] < 1e-4 and r["gathered_vs_masked_max_diff"] < 1e-4, r
    assert not r["selected_future_key"]
    assert r["imbalance_last"] < r["imbalance_first"], r  # the sign rule evens out the tilted router
    assert 0 <= r["acc_main"] <= 1 and 0 <= r["acc_mtp"] <= 1


@pytest.mark.slow
def test_03_pretrain():
    _, r = run_notebook("03_pretrain.ipynb", "DENSE, WARM, SPARSE = 8, 3, 5\nSEQ_LEN = 64")
    assert len(r["stages"]) == 3 and r["steps"] == 16, r  # dense → indexer warm-up → sparse
    assert r["val_loss_dsa"] < r["first_train_loss"] and r["val_loss_dense"] < r["first_train_loss"], r
    assert abs(r["gap_percent"]) < 25, r


@pytest.mark.slow
def test_05_int4():
    _, r = run_notebook("05_int4.ipynb", "PRETRAIN_STEPS, SFT_STEPS = 6, 4")
    assert r["max_error_over_scale"] <= 0.5 + 1e-6 and r["straight_through_grad_ones"], r
    assert r["qat_equals_packed_bitwise"], r  # one quantizer for training and conversion
    assert all(v == v and v > 0 for v in r["held_out"].values()), r
    assert r["int4_layers_over_bf16_g32"] < 0.3 and r["model_over_fp32_g128"] < 1, r


@pytest.mark.slow
def test_06_serve():
    _, r = run_notebook("06_serve.ipynb", "CKPT = None")
    assert r["cache_equals_recompute"], r
    assert r["cache_over_expanded"] < 1 and len(r["models"]) == 1 and r["finish_reason"] in ("stop", "length"), r
    assert r["stream_chunks"] >= 2 and r["bad_request_status"] == 400, r
    assert all(v > 0 for v in r["tokens_per_s"].values()), r


@pytest.mark.slow
def test_04_async_rl():
    """The buffer refuses the group that would break η, DDIS masks nothing on-policy and more the staler the
    rollouts, the step by hand publishes version 1 and the worker then holds the learner's weights exactly, the
    simulated async schedule beats sync, both real Controller runs finish their steps within η, and the code_mt
    episode alternates trained attempts with untrained observations, its pass@1 per turn growing with the turns."""
    _, r = run_notebook("04_async_rl.ipynb", "USE_SFT = False\nSTEPS = 3")
    assert r["refused_stale_group"] and r["admitted_after_step"] == [4, 5], r
    assert set(r["buffer_staleness_hist"]) == {"0", "1"}, r  # η = 1: groups 2, 3 trained one version late
    masks = r["ddis_mask_frac_by_staleness"]
    assert all(0 <= m <= 1 for m in masks) and masks[0] == 0 and masks[-1] > masks[1] > 0, masks
    assert r["on_policy_max_abs_log_ratio"] < 1e-4, r  # the learner's log-probs reproduce the sampler's
    assert r["sim_seconds"]["async"] < r["sim_seconds"]["sync"], r
    runs = r["runs"]
    assert runs["sync"]["steps"] == runs["async"]["steps"] == 3, runs
    assert set(runs["sync"]["staleness_hist"]) == {"0"}, runs
    assert max(int(k) for k in runs["async"]["staleness_hist"]) <= r["eta"], runs
    assert all(0 <= m <= 1 for run in runs.values() for m in run["is_mask_frac"]), runs
    hand = r["hand_step"]
    assert hand["relay_versions"] == hand["worker_versions"] == [0, 1] and hand["moved"] > 0, hand
    assert hand["worker_equals_learner"], hand  # the learner moved off version 0; the pull brought the worker along
    assert hand["next_group_versions"] == [1] and hand["is_mask_frac"] == 0, hand  # one step by hand is on-policy
    ep = r["episode"]  # runs of one loss-mask value: prompt (0), attempt (1), observation (0), revision (1), ...
    assert ep["masks"][0] == 0 and 1 <= ep["masks"].count(1) == ep["masks"].count(0) == ep["turns"] <= r["max_turns"], ep
    for when in ("before", "after"):
        for key, curve in r["by_turn"][when].items():  # solved within k attempts: never fewer for a larger k
            assert len(curve) == r["max_turns"] and all(0 <= a <= b <= 1 for a, b in zip(curve, curve[1:])), curve
            assert curve[-1] == pytest.approx(r["pass_at_1"][when][key]), r  # no turn discount: k = max_turns is pass@1


@pytest.mark.slow
def test_07_long_context():
    """From a checkpoint the notebook pretrains itself (a clean checkout has none): the stage raises the RoPE base and
    the context, the retrieval tables hold every length and depth before and after, recall and answer shares lie in
    [0, 1], the indexer never selects a future key, and the 200K savings are the calculator's."""
    _, r = run_notebook("07_long_context.ipynb", "CKPT = None\nPRETRAIN_STEPS = 30\nSEQ_LEN, STEPS = 256, 4\n"
                                                 "LENGTHS, N = [128, 256], 1\nDECODE_CONTEXTS = [256, 1024]")
    assert r["rope_plot"] and r["rope_theta_after"] == 100 * r["rope_theta_before"], r
    assert r["max_position_after"] >= r["seq_len"] == 256 and r["steps"] == 4, r
    for table in ("retrieval_before", "retrieval_after"):
        cells = {(c["length"], c["depth"]): c for c in r[table]}
        assert set(cells) == {(n, d) for n in r["lengths"] for d in r["depths"]}, (table, sorted(cells))
        for c in cells.values():
            assert all(0 <= c[k] <= 1 for k in ("sparse", "dense", "sparse_answer_tokens", "dense_answer_tokens")), c
            assert c["indexer_recall"] is None or 0 <= c["indexer_recall"] <= 1, c
    assert set(r["chance_recall"]) == {str(n) for n in r["lengths"]} and all(0 < v <= 1 for v in r["chance_recall"].values())
    assert not r["selected_future_key"] and r["selection_layers"] >= 1, r
    assert all(0 <= h <= 1 for h in r["needle_hit_per_layer"]), r
    from nanoglm5 import scale
    from nanoglm5.config import ModelConfig
    expected = scale.dsa_saving(ModelConfig.preset("glm5_744b"), 200_000)
    assert r["saving_200k"] == pytest.approx(expected, abs=1e-4), r["saving_200k"]
    assert r["saving_200k"]["attention_decode"] > 2 > r["saving_200k"]["kv_stored"], r  # beyond the quoted 1.5-2x
    assert set(r["decode_ms"]) == {"256", "1024"} and all(v["dense"] > 0 and v["dsa"] > 0 for v in r["decode_ms"].values())
