"""bench/gpu.py's logic on the CPU (`--device cpu --dry-run`, tiny preset, tiny step counts), so the first GPU run
does not die on a typo: every stage and every check runs, the figures land in the named file's "gpu" section and
nowhere else, a failed check fails the run and says so in the file."""

import pytest
import torch

import bench.gpu as gpu

OTHER = "<!-- bench:model -->\n## Model\nkept as it is\n<!-- /bench:model -->"


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_check_and_writes_only_its_section(tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n{OTHER}\n")
    assert gpu.main(["--device", "cpu", "--dry-run", "--doc", str(doc)]) == 0, capsys.readouterr().out
    text = doc.read_text()
    assert OTHER in text  # another benchmark's section is left alone
    section = text[text.index("<!-- bench:gpu -->"):text.index("<!-- /bench:gpu -->")]
    assert "dry run on CPU" in section and "preset `tiny`" in section
    for name in [*gpu.STAGES, *gpu.CHECKS]:
        assert f"| {name} |" in section, name
    assert section.count("**pass**") == len(gpu.CHECKS) and "FAIL" not in section
    for figure in ("mfu_measured_matmul", "eager, batch 1", "graphs+mtp, batch 4", "trained_tokens_per_s"):
        assert figure in section, figure


def test_a_failed_check_fails_the_run_and_the_file_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu, "LOGIT_TOL", 0.0)  # no gap is < 0: the CPU-vs-CPU comparison now fails
    doc = tmp_path / "b.md"
    rc = gpu.main(["--device", "cpu", "--dry-run", "--stages", "cuda_vs_cpu_fp32", "--doc", str(doc)])
    assert rc == 1 and "failed: cuda_vs_cpu_fp32" in capsys.readouterr().out
    assert "| cuda_vs_cpu_fp32 | **FAIL**" in doc.read_text()


def test_bad_arguments_name_the_fix(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        gpu.main(["--device", "cpu", "--doc", str(tmp_path / "c.md")])  # CPU figures never go into the real doc
    assert "add --dry-run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu.main(["--device", "cpu", "--dry-run", "--stages", "train,trian"])
    assert "unknown ['trian']" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 0 and "--device cpu --dry-run" in capsys.readouterr().out
    assert not (tmp_path / "c.md").exists()
