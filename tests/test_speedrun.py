"""The main job end to end (quick budget): every stage runs, the report is written, re-running skips
finished stages, and a broken earlier stage is named with what to delete."""

import json
import subprocess
import sys

import pytest

from nanoglm5.speedrun import main


@pytest.mark.slow
def test_quick_speedrun_end_to_end_resume_and_broken_stage(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--quick", "--threads", "1", "--out-dir", str(out)]) == 0
    report = (out / "report" / "report.md").read_text()
    for stage in ("data", "pretrain", "SFT with INT4 QAT", "PTQ vs QAT", "RL, sync", "RL, async", "int4 conversion"):
        assert f"| {stage} |" in report
    for png in ("val_loss", "expert_load", "indexer_kl", "rl_reward", "ptq_vs_qat"):
        assert (out / "report" / f"{png}.png").stat().st_size > 1000, png
    res = json.loads((out / "report" / "results.json").read_text())
    assert res["int4/weight_bytes"] < 0.75 * res["fp32/weight_bytes"]
    assert (out / "int4" / "config.json").exists() and "quantization_config" in (out / "int4" / "config.json").read_text()

    # re-running skips every finished stage
    capsys.readouterr()
    assert main(["--quick", "--threads", "1", "--out-dir", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("done earlier") == 7

    # a broken pretraining checkpoint is named, with what to delete
    (out / "pretrain" / "ckpt" / "model.safetensors").write_bytes(b"not a safetensors file")
    (out / "sft" / "DONE.json").unlink()
    assert main(["--quick", "--threads", "1", "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "pretraining checkpoint missing or broken" in err and f"Delete {out / 'pretrain'}" in err
    assert "Traceback" not in err


def test_speedrun_help_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "nanoglm5.speedrun", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--quick" in r.stdout and "--preset" in r.stdout
