"""rl.py --backend ray: the same controller over Ray actors (nanoglm5/rl/ray_transport.py), on a local Ray cluster.

(a) sync mode with one group per worker engine trains bit-identical weights to --backend mp on the same seed;
(b) a worker actor killed mid-group (ray.kill): its leases are re-queued at once and every group is trained
    exactly once;
(c) the controller stopped after a save (the steps after it lost), then --resume auto, reaches the uninterrupted
    run's weights bit for bit.
One Ray cluster serves the whole module (starting one costs seconds). In CI a missing ray fails these tests;
elsewhere they are skipped with the reason (conftest.require).
"""

import os
import sys

import pytest
import torch
from conftest import require
from test_rl_system import (
    _cfg,
    assert_training_moved,
    coin_checkpoint,
    coin_controller,
    kill_busiest_then_finish,
)

import rl
from bench.toy import toy_checkpoint
from nanoglm5.rl.controller import Controller

STEPS = 4


@pytest.fixture(scope="module")
def ray_cluster():
    ray = require("ray", "rl.py --backend ray runs on it (requirements-dev.txt)")
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(toy_checkpoint(tmp_path_factory.mktemp("rl_ray") / "init"))


@pytest.fixture(scope="module")
def coin(tmp_path_factory):
    """test_rl_system.coin_checkpoint: groups with rewards 0 and 1, so the compared updates move the weights."""
    return str(coin_checkpoint(tmp_path_factory.mktemp("rl_ray_coin")))


@pytest.fixture(scope="module")
def mp_run(coin, tmp_path_factory):
    """The reference: --backend mp, sync, STEPS steps, on coin tasks (test_rl_system.CoinTasks)."""
    ctl = coin_controller(_cfg(coin, tmp_path_factory.mktemp("mp"), mode="sync", max_steps=STEPS))
    ctl.run()
    assert_training_moved(ctl, "--backend mp")
    return ctl


def test_backend_ray_without_ray_says_what_to_install(monkeypatch, ckpt, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as where it is not installed
    rc = rl.main(["--checkpoint", ckpt, "--backend", "ray", "--env", "math", "--out-dir", str(tmp_path),
                  "--n-eval-tasks", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "--backend ray needs Ray" in err and "pip install ray" in err, err


def _same_weights(a, b, what):
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), f"{k}: {what}"


@pytest.mark.slow
def test_sync_ray_trains_the_same_weights_as_mp(ray_cluster, coin, mp_run, tmp_path):
    ctl = coin_controller(_cfg(coin, tmp_path / "ray", mode="sync", max_steps=STEPS, backend="ray"))
    ctl.run()
    assert_training_moved(ctl, "--backend ray")
    assert [h["group_ids"] for h in ctl.history] == [h["group_ids"] for h in mp_run.history]
    assert [h["loss"] for h in ctl.history] == [h["loss"] for h in mp_run.history]
    _same_weights(ctl, mp_run, "--backend ray differs from --backend mp")
    assert (tmp_path / "ray" / "ckpt" / "trainer_state.pt").exists()


@pytest.mark.slow
def test_killed_worker_actor_group_requeued_at_once_and_trained_once(ray_cluster, ckpt, tmp_path):
    cfg = _cfg(ckpt, tmp_path / "run", mode="async", max_staleness=2, max_steps=4, max_new_tokens=24,
               lease_timeout_s=30.0, backend="ray")
    ctl = Controller(cfg, quiet=True)
    _, dt = kill_busiest_then_finish(ctl, step_timeout_s=60)
    assert dt < 3.0, f"re-queued after {dt:.1f}s: the death should be seen at once, not at the lease timeout"
    trained = [g for h in ctl.history for g in h["group_ids"]]
    assert sorted(trained) == list(range(cfg.max_steps * cfg.groups_per_step)), trained
    assert ctl.counters["worker_deaths"] == 1 and ctl.counters["respawned"] == 1
    assert ctl.buffer.counters["requeued_dead"] >= 1 and ctl.buffer.counters["expired"] == 0


@pytest.mark.slow
def test_resume_after_the_controller_stops_reaches_the_uninterrupted_result(ray_cluster, coin, mp_run, tmp_path):
    """Train 2 steps, save, train a third that is never saved, stop (as a crash would); --resume auto continues
    from the step-2 checkpoint (the in-flight leases re-issued) to STEPS steps. (a) showed --backend mp gives the
    uninterrupted run's weights, so mp_run is the reference."""
    out = tmp_path / "r"
    first = coin_controller(_cfg(coin, out, mode="sync", max_steps=STEPS, backend="ray"))
    first.start()
    try:
        for _ in range(2):
            first.train_one()
        first.save()
        first.train_one()  # lost with the crash
    finally:
        first.stop()
    second = coin_controller(_cfg(coin, out, mode="sync", max_steps=STEPS, backend="ray", resume="auto"))
    assert second.step == 2 and second.buffer.requeue, "the checkpoint should hold the in-flight leases"
    second.run()
    assert_training_moved(second, "the resumed Ray run")
    assert [h["group_ids"] for h in second.history] == [h["group_ids"] for h in mp_run.history]
    _same_weights(second, mp_run, "the resumed run differs from the uninterrupted one")
