"""bench/rl_throughput.py: it needs a trained checkpoint and says how to get one; its --quick path runs sync and async
side by side on the multi-turn code workload and reports trained samples/s for both (a check, not a measurement)."""

import json

import pytest

from bench.rl_throughput import main


def test_without_a_checkpoint_it_says_how_to_get_one(tmp_path):
    with pytest.raises(SystemExit, match="--checkpoint out/speedrun/sft/ckpt"):
        main(["--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="is not a checkpoint"):
        main(["--checkpoint", str(tmp_path), "--out-dir", str(tmp_path)])


@pytest.mark.slow
def test_quick_runs_sync_and_async_on_code_mt(tmp_path, capsys):
    main(["--quick", "--out-dir", str(tmp_path), "--group-size", "2", "--groups-per-step", "2", "--worker-groups", "1",
          "--max-turns", "2", "--max-new-tokens", "8", "--max-len", "160"])
    rows = json.loads((tmp_path / "rl_throughput.json").read_text())
    assert [r["mode"] for r in rows] == ["sync", "async"]
    assert all(r["samples_s"] > 0 and r["cfg"]["env"] == "code_mt" and r["judge_latency_s"] == 0 for r in rows)
    assert "async/sync trained samples/s" in capsys.readouterr().out
