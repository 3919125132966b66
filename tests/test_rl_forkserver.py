"""The warm sandbox (nanoglm5/rl/forkserver.py): a program judged by a fork server comes back as a cold
run would, starts clean of the previous program, and a server that dies mid-run costs nothing but time."""

import os
import threading
import time

import pytest

from nanoglm5.rl import forkserver, sandbox
from nanoglm5.rl.sandbox import run_code

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def _needs_bwrap():
    problem = sandbox.bwrap_problem()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"CI requires bubblewrap: {problem}")
        pytest.skip(f"bubblewrap cannot run here: {problem}")


PROGRAMS = {
    "ok": ("import sys\nprint(sum(map(int, sys.stdin.read().split())))", {"stdin": "1 2 3 4"}),
    "exit code": ("import sys\nprint('bye')\nsys.exit(3)", {}),
    "exit message": ("raise SystemExit('no thanks')", {}),
    "exception": ("def f():\n    return 1 / 0\nf()", {}),
    "syntax error": ("def f(:\n    pass", {}),
    "memory bomb": ("x = bytearray(1 << 30)", {}),
    "file too big": ("open('big', 'wb').write(b'0' * (8 << 20))", {"max_file_mb": 4}),
    "output flood": ("while True:\n    print('x' * 1000)", {"max_output_bytes": 5000}),
    "cpu loop": ("while True:\n    pass", {"timeout_s": 1.0}),
    "fork bomb": ("import os\nwhile True:\n    os.fork()", {"timeout_s": 1.0}),
}


def _same(warm, cold):
    assert warm.sandboxed and cold.sandboxed
    assert (warm.returncode, warm.stdout, warm.timed_out, warm.limit_hit, warm.truncated) == \
           (cold.returncode, cold.stdout, cold.timed_out, cold.limit_hit, cold.truncated)
    assert warm.stderr.splitlines()[-1:] == cold.stderr.splitlines()[-1:]  # the error line (frames above differ)


@pytest.mark.parametrize("name", [n for n in PROGRAMS if n not in ("cpu loop", "fork bomb")])
def test_a_warm_run_returns_what_a_cold_run_returns(name):
    src, kw = PROGRAMS[name]
    kw = {"timeout_s": 3.0, **kw}
    _same(run_code(src, **kw), run_code(src, fork_server=False, **kw))


@pytest.mark.parametrize("name", ["cpu loop", "fork bomb"])
def test_a_warm_run_stops_a_runaway_program_as_a_cold_run_does(name):
    """Which limit stops these first (wall clock, CPU, process count) is a race either way: both stop it."""
    src, kw = PROGRAMS[name]
    for r in (run_code(src, **kw), run_code(src, fork_server=False, **kw)):
        assert r.sandboxed and not r.ok and r.wall_s < kw["timeout_s"] + 1.5
        assert r.timed_out or r.limit_hit in ("wall", "cpu", "processes") or r.returncode != 0


def test_the_next_program_starts_clean_files_processes_and_environment():
    leave = ("import os, subprocess, time\nopen('/tmp/left', 'w').write('x'); open('here', 'w').write('y')\n"
             "os.environ['LEAK'] = '1'\nif os.fork() == 0:\n    os.setsid(); time.sleep(60)\nprint(os.getpid())")
    look = ("import os\nprint(repr((sorted(os.listdir('/tmp')), sorted(os.listdir('.')), 'LEAK' in os.environ,\n"
            "      sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))))")
    for _ in range(2):  # the same server (pool of idle servers) runs both, whichever it is
        assert run_code(leave, timeout_s=3.0).ok
        r = run_code(look, timeout_s=3.0)
        files, here, leak, pids = eval(r.stdout)
        assert files == [] and here == [] and leak is False
        assert len(pids) == 3, f"only init, the server and this program may run: {pids}"


@pytest.mark.skipif(os.geteuid() != 0, reason="as root each program has its own uid; not root the kill succeeds "
                                              "and the program is rerun cold (test below)")
def test_a_program_cannot_kill_or_read_its_server():
    src = ("import os, signal\nfor how in (lambda: os.kill(os.getppid(), signal.SIGKILL),\n"
           "            lambda: open(f'/proc/{os.getppid()}/mem', 'rb').read(1)):\n"
           "    try:\n        how(); print('did it')\n    except Exception as e:\n        print(type(e).__name__)")
    r = run_code(src, timeout_s=3.0)
    assert r.stdout.split() == ["PermissionError", "PermissionError"]
    assert run_code("print(42)", timeout_s=3.0).stdout == "42\n"


def test_a_server_that_dies_mid_run_gives_the_cold_result():
    servers = []
    real = forkserver.ForkServer.call

    def call(self, request, deadline):
        servers.append(self)
        return real(self, request, deadline)

    forkserver.ForkServer.call = call
    try:
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", run_code("import time\ntime.sleep(1.0)\nprint('slept')",
                                                                         timeout_s=5.0)))
        t.start()
        while not servers:
            time.sleep(0.01)
        time.sleep(0.3)
        servers[0].kill()  # what a program that killed its server does (the server's whole sandbox goes)
        t.join()
    finally:
        forkserver.ForkServer.call = real
    r = out["r"]
    assert r.ok and r.stdout == "slept\n" and r.sandboxed and not servers[0].alive()


def test_a_warm_run_costs_a_fraction_of_a_cold_one():
    """Not a timing assertion on the machine: the same 10 programs, side by side, warm well under cold."""
    run_code("pass")  # a server up
    t0 = time.monotonic()
    for _ in range(10):
        run_code("print(1)")
    warm = time.monotonic() - t0
    t0 = time.monotonic()
    for _ in range(10):
        run_code("print(1)", fork_server=False)
    cold = time.monotonic() - t0
    assert warm < cold, (warm, cold)
