"""WeightRelay (nanoglm5/rl/relay.py): round trip, monotonic versions, no torn reads across processes."""

import time

import pytest
import torch
import torch.multiprocessing as mp

from nanoglm5.rl.relay import WeightRelay


def _state(fill: float, big: int = 16) -> dict[str, torch.Tensor]:
    return {"emb": torch.full((big, 64), fill), "w": torch.full((3, 5), fill), "step": torch.full((), fill)}


def test_publish_pull_round_trip_into_module_and_dict():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    relay = WeightRelay(model.state_dict())
    assert relay.latest_version() == 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    relay.publish(model, version=1)
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    assert relay.pull(other) == 1
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    d = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    assert relay.pull(d, min_version=1) == 1 and torch.equal(d["0.weight"], model[0].weight)


def test_versions_monotonic_and_layout_checked():
    relay = WeightRelay(_state(0.0))
    relay.publish(_state(2.0), version=2)
    with pytest.raises(ValueError, match="version=2 after 2"):
        relay.publish(_state(3.0), version=2)
    with pytest.raises(ValueError, match="'w'"):
        relay.publish({**_state(3.0), "w": torch.zeros(2, 2)}, version=3)
    with pytest.raises(TimeoutError, match="version 9"):
        relay.pull(_state(0.0), min_version=9, timeout_s=0.05)
    with pytest.raises(ValueError, match="lacks"):
        relay.pull({"w": torch.zeros(3, 5)})


BIG = 1 << 14  # 1M floats per slot: a copy takes milliseconds, so reads and writes overlap
DURATION_S = 2.0


def _write_for(relay, seconds):
    t_end, v = time.time() + seconds, relay.latest_version()
    while time.time() < t_end:
        v += 1
        relay.publish(_state(float(v), big=BIG), version=v)


def _reader(relay, barrier, out):
    torch.set_num_threads(1)
    buf = _state(0.0, big=BIG)
    stats, last, pulls = {}, -1, 0
    barrier.wait()
    t_end = time.time() + DURATION_S
    while time.time() < t_end:
        v = relay.pull(buf, stats=stats)
        seen = {float(t.min()) for t in buf.values()} | {float(t.max()) for t in buf.values()}
        if seen != {float(v)}:  # every tensor of version v is filled with v
            out.put(("torn", v, sorted(seen)[:5]))
            return
        if v < last:
            out.put(("backwards", last, v))
            return
        last, pulls = v, pulls + 1
    out.put(("ok", pulls, stats.get("retries", 0), last))


def test_no_torn_version_under_concurrency():
    """The trainer (this process) publishes as fast as it can while two spawned readers pull."""
    ctx = mp.get_context("spawn")
    relay = WeightRelay(_state(0.0, big=BIG), ctx=ctx)
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(relay, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        barrier.wait(timeout=120)  # the readers have imported torch
        _write_for(relay, DURATION_S)
        results = [out.get(timeout=60) for _ in range(2)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    assert all(r[0] == "ok" for r in results), results
    assert sum(r[1] for r in results) > 10 and relay.latest_version() > 5, (results, relay.latest_version())
    print("reader results (status, pulls, torn reads retried, last version):", results)
