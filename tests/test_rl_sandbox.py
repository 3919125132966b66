"""Hostile-program battery for the judge's sandbox (nanoglm5/rl/sandbox.py), with and without bwrap.

Every hostile program must come back as a SandboxResult within its time bound, leave no process
behind and change nothing on the host.
"""

import os
import socket
import time
import uuid

import pytest

from nanoglm5.rl import sandbox
from nanoglm5.rl.sandbox import run_code

MODES = [False] + ([True] if sandbox.bwrap_available() else [])
LAUNCHER_MARK = "cfg = json.loads(sys.argv[1])"  # appears in every sandboxed process's cmdline


def _leftovers() -> list[int]:
    """Processes still running the sandbox launcher, or owned by a sandbox uid."""
    left = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{d}/status") as f:
                uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
        except (OSError, StopIteration):
            continue
        if LAUNCHER_MARK in cmd or sandbox.SANDBOX_UID_BASE <= uid < sandbox.SANDBOX_UID_BASE + 10**8:
            left.append(int(d))
    return left


def _run(src, bw, **kw):
    kw.setdefault("timeout_s", 2.0)
    t0 = time.monotonic()
    r = run_code(src, use_bwrap=bw, **kw)
    assert time.monotonic() - t0 < kw["timeout_s"] + 3.0, "the sandbox did not return in time"
    assert r.sandboxed is bw
    assert not _leftovers(), "a sandboxed process survived the run"
    return r


@pytest.mark.parametrize("bw", MODES)
def test_ok_program_stdin_stdout_exit_code(bw):
    r = _run(
        "import sys\ndata = sys.stdin.read()\nprint(sum(map(int, data.split())))\nsys.exit(3)",
        bw,
        stdin=" ".join(map(str, range(30000))),
    )
    assert r.stdout.strip() == str(sum(range(30000))) and r.returncode == 3 and r.exit_code == 3
    assert not r.timed_out and r.limit_hit is None and not r.ok
    assert _run("print('hi')", bw).ok


@pytest.mark.parametrize("bw", MODES)
def test_crash_and_syntax_error_return_nonzero(bw):
    r = _run("def f(:\n  pass", bw)
    assert r.returncode != 0 and "SyntaxError" in r.stderr
    r = _run("raise ValueError('boom')", bw)
    assert r.returncode == 1 and "ValueError: boom" in r.stderr


@pytest.mark.parametrize("bw", MODES)
def test_infinite_loop_is_killed(bw):
    r = _run("while True:\n    pass", bw, timeout_s=1.5)
    assert r.limit_hit in ("wall", "cpu") and r.returncode != 0 and not r.ok


@pytest.mark.parametrize("bw", MODES)
def test_sleeping_program_hits_wall_clock(bw):
    r = _run("import time\ntime.sleep(60)", bw, timeout_s=1.0)
    assert r.timed_out and r.limit_hit == "wall" and r.wall_s < 2.5


@pytest.mark.parametrize("bw", MODES)
def test_memory_bomb_hits_memory_limit(bw):
    r = _run("x = []\nwhile True:\n    x.append(bytearray(1 << 24))", bw, memory_mb=128)
    assert r.limit_hit == "memory" and r.returncode != 0


@pytest.mark.parametrize("bw", MODES)
def test_fork_bomb_is_contained_and_leaves_nothing(bw):
    src = "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass"
    r = _run(src, bw, timeout_s=2.0)
    assert not r.ok and r.limit_hit in ("wall", "cpu", "processes")
    time.sleep(0.2)
    assert not _leftovers()


@pytest.mark.parametrize("bw", MODES)
def test_daemonized_child_does_not_hold_the_judge(bw):
    src = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\nprint('parent done')"
    r = _run(src, bw, timeout_s=3.0)
    assert r.wall_s < 2.0  # returns shortly after the parent exits, whatever the child does


@pytest.mark.parametrize("bw", MODES)
def test_huge_output_is_truncated_and_flagged(bw):
    r = _run("while True:\n    print('x' * 10000)", bw, max_output_bytes=50_000)
    assert r.truncated and r.limit_hit == "output" and len(r.stdout) == 50_000


@pytest.mark.parametrize("bw", MODES)
def test_big_file_hits_file_size_limit(bw):
    r = _run("with open('big', 'wb') as f:\n    f.write(b'0' * (64 << 20))", bw, max_file_mb=4)
    assert r.limit_hit == "file_size" and r.returncode != 0


@pytest.mark.parametrize("bw", MODES)
def test_writes_outside_workdir_do_not_reach_the_host(bw, tmp_path):
    os.chmod(tmp_path, 0o777)
    target = tmp_path / "evil.txt"
    host_tmp = f"/tmp/nanoglm5_evil_{uuid.uuid4().hex}"
    src = (
        "import os\n"
        f"for p in [{str(target)!r}, {host_tmp!r}, os.path.expanduser('~/../evil')]:\n"
        "    try:\n        open(p, 'w').write('pwned'); print('wrote', p)\n"
        "    except Exception as e:\n        print('refused', p, type(e).__name__)\n"
        "open('mine.txt', 'w').write('ok'); print(open('mine.txt').read())\n"
    )
    r = _run(src, bw)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok")  # its own cwd is writable
    assert not target.exists() and not os.path.exists(host_tmp)


@pytest.mark.parametrize("bw", MODES)
def test_parent_environment_is_not_visible(bw, monkeypatch):
    monkeypatch.setenv("NANOGLM5_TEST_SECRET", "s3cr3t-token")
    src = (
        "import os\nprint(dict(os.environ))\n"
        "for pid in {os.getppid(), 1, " + str(os.getpid()) + "}:\n"
        "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except Exception as e:\n        print('no', pid, type(e).__name__)\n"
    )
    r = _run(src, bw)
    assert "s3cr3t-token" not in r.stdout + r.stderr
    assert "NANOGLM5_TEST_SECRET" not in r.stdout


@pytest.mark.parametrize("bw", MODES)
def test_network_is_unreachable(bw):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    src = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"
    try:
        r = _run(src, bw)
    finally:
        srv.close()
    assert "connected" not in r.stdout and r.returncode != 0
    # the host's listener is up, so "refused" proves a separate network namespace
    assert r.limit_hit == "network" or "ConnectionRefusedError" in r.stderr, r.stderr


@pytest.mark.parametrize("bw", MODES)
def test_stdlib_extension_modules_import(bw):
    r = _run("import math, json, re, itertools, collections, decimal, socket\nprint(math.isqrt(49))", bw)
    assert r.ok and r.stdout.strip() == "7", r.stderr


@pytest.mark.parametrize("bw", MODES)
def test_cannot_kill_the_parent(bw):
    r = _run(
        f"import os, signal\nfor p in (os.getppid(), {os.getpid()}):\n    try:\n        os.kill(p, signal.SIGKILL)\n"
        "    except Exception as e:\n        print(type(e).__name__)",
        bw,
    )
    assert r.returncode in (0, 1)  # and we are still alive to assert it


def test_no_bwrap_env_var_forces_fallback(monkeypatch):
    monkeypatch.setenv(sandbox.NO_BWRAP_ENV, "1")
    r = run_code("print(6 * 7)", timeout_s=2.0)
    assert r.ok and r.stdout.strip() == "42" and r.sandboxed is False


def test_bad_arguments_raise_with_the_value():
    with pytest.raises(ValueError, match="timeout_s=0"):
        run_code("pass", timeout_s=0)
