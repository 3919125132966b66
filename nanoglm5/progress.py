"""The main job's one progress line: which stage of how many, time so far, and how long the rest should take.

What a stage costs on this host is estimated from the last published run (docs/results.json, its stage wall times)
scaled by how fast this host multiplies fp32 matrices against the host that made that run: the training stages are
matmul-bound on CPU, so the ratio of the two rates predicts most of the difference between hosts. Once stages finish,
their measured times replace the guess: the remaining stages are scaled by how much slower or faster the finished
ones ran than predicted (the machine's load counts in that too, which a probe at the start cannot see).
"""

import json
import time
from pathlib import Path

import torch

PUBLISHED = Path(__file__).resolve().parent.parent / "docs" / "results.json"


def matmul_gflops(threads: int, n: int = 512, seconds: float = 0.5) -> float:
    """fp32 GEMM rate of this host with `threads` torch threads, in GFLOP/s (best of short repeats)."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        a @ b  # warm-up: the first call allocates and picks a kernel
        best, t_end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            best = min(best, (time.perf_counter() - t0) / 4)
        return 2 * n ** 3 / best / 1e9
    finally:
        torch.set_num_threads(old)


def published(path: Path = PUBLISHED) -> dict:
    """The last published main job's results.json, or {} if there is none."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class JobProgress:
    """Expected stage times, updated from the measured ones; `line()` is what the job prints before each stage."""

    def __init__(self, stages: list[str], host_gflops: float, ref: dict, comparable: bool = True):
        self.stages, self.host_gflops = stages, host_gflops
        ref_secs = ref.get("stages", {}) if comparable else {}
        self.ref_gflops = ref.get("host", {}).get("matmul_gflops")
        # without a rate recorded beside the reference times, assume this host is as fast as the reference's
        self.speed = self.ref_gflops / host_gflops if self.ref_gflops else 1.0
        self.ref = {k: ref_secs[k] for k in stages if k in ref_secs}
        self.actual: dict[str, float] = {}
        self.skipped: set[str] = set()
        self.t0 = time.time()

    @property
    def known(self) -> bool:
        return len(self.ref) == len(self.stages)

    def scale(self) -> float:
        """Predicted seconds per reference second: the probe's ratio until stages finish, then theirs."""
        timed = [k for k in self.actual if k in self.ref and self.ref[k] > 1 and k not in self.skipped]
        if not timed:
            return self.speed
        return sum(self.actual[k] for k in timed) / sum(self.ref[k] for k in timed)

    def expected_total(self) -> float | None:
        return sum(self.ref.values()) * self.speed if self.known else None

    def remaining(self) -> float | None:
        if not self.known:
            return None
        return sum(self.ref[k] for k in self.stages if k not in self.actual) * self.scale()

    def done(self, name: str, seconds: float, skipped: bool = False):
        # a stage skipped because an earlier run finished it costs nothing now, and says nothing about this host
        self.actual[name] = seconds
        if skipped:
            self.skipped.add(name)

    def start_line(self, target_s: float) -> str:
        ref_txt = (f"the published run's host {self.ref_gflops:.0f} GFLOP/s" if self.ref_gflops else
                   "the published run recorded no rate, so its times are taken as they are")
        head = f"this host multiplies fp32 matrices at {self.host_gflops:.0f} GFLOP/s ({ref_txt})"
        exp = self.expected_total()
        if exp is None:
            return head + "; no published run of this budget to predict the time from"
        verdict = "within" if exp <= target_s else "over"
        return f"{head}: expected {exp / 60:.1f} min in all, {verdict} the {target_s / 60:.0f}-minute target"

    def line(self, name: str) -> str:
        k = self.stages.index(name) + 1
        rem = self.remaining()
        left = f", about {_fmt_s(rem)} to go" if rem is not None else ""
        return f"stage {k}/{len(self.stages)} {name}: {_fmt_s(time.time() - self.t0)} so far{left}"
