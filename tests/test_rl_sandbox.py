"""Hostile-program battery for the judge's sandbox (nanoglm5/rl/sandbox.py), with and without bwrap.

Every hostile program must come back as a SandboxResult within its time bound, leave no process
behind, change nothing on the host and never run as root; without bubblewrap nothing runs unless
the caller allowed it; and no program can forge a pass from the judge (`run_calls`).

The bubblewrap cases are skipped (with the reason) where bubblewrap cannot run, except in CI
(CI=true), where they fail. The fallback cases (no bubblewrap: the program drops to a fresh uid) run
as root only with an interpreter an unprivileged uid can read (this one, else /usr/bin/python3,
/usr/local/bin/python3 or python3 on PATH); without one they are skipped, except in CI, where they
fail too: CI tests the fallback path explicitly, with use_bwrap=False, even where bubblewrap exists.
"""

import functools
import json
import logging
import os
import random
import shutil
import socket
import stat
import sys
import tempfile
import time
import uuid

import pytest

from nanoglm5.rl import sandbox
from nanoglm5.rl.judge import RESULTS_MARK, run_calls
from nanoglm5.rl.sandbox import SandboxUnavailable, run_code

# bwrap: a warm sandbox (forkserver.py, the default); cold: a fresh bubblewrap + interpreter per run (what a
# warm server that died falls back to); fallback: no bubblewrap
MODES = [pytest.param(False, id="fallback"), pytest.param(True, id="bwrap"), pytest.param("cold", id="bwrap-cold")]
LAUNCHER_MARK = "cfg = json.loads(sys.argv[1])"  # appears in every sandboxed process's cmdline
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@functools.lru_cache(maxsize=1)
def _fallback_python() -> str | None:
    """An interpreter the fallback can run the program with (as root: one an unprivileged uid can read)."""
    if os.geteuid() != 0:
        return sys.executable
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")):
        if python and os.path.exists(python) and sandbox._unprivileged_problem(python) is None:
            return python
    return None


def _fallback_python_or_skip() -> str:
    """_fallback_python(), or skip the test (fail it in CI) naming what is missing and the fix."""
    python = _fallback_python()
    if python is None:
        msg = ("running as root and no interpreter here is readable by an unprivileged uid (tried this one, "
               "/usr/bin/python3, /usr/local/bin/python3, python3 on PATH): install one outside /root "
               "(apt-get install python3) to test the unsandboxed fallback")
        if IN_CI:
            pytest.fail("CI tests the unsandboxed fallback: " + msg)
        pytest.skip(msg)
    return python


def _mode(bw: bool | str) -> dict:
    """run_code keyword arguments for a mode; skips (fails in CI) where bubblewrap cannot run."""
    if bw:
        problem = sandbox.bwrap_problem()
        if problem is not None:
            msg = f"bubblewrap cannot run here: {problem}. {sandbox.INSTALL_HINT}"
            if IN_CI:
                pytest.fail("CI requires bubblewrap: " + msg)
            pytest.skip(msg)
        return {"use_bwrap": True, "fork_server": bw != "cold"}
    return {"use_bwrap": False, "allow_unsandboxed": True, "python": _fallback_python_or_skip()}


@pytest.fixture(scope="module", autouse=True)
def _own_tempdir(tmp_path_factory):
    """Our runs' judge dirs live under a directory of our own, so `_leftovers` can tell our sandboxed
    processes from those of other test sessions running on the same machine. pytest's own temp root is
    fixed first: it is chosen from `tempfile.gettempdir()` on first use, and must not land in `own`,
    which is removed when this module ends."""
    tmp_path_factory.getbasetemp()
    own = tempfile.mkdtemp(prefix="nanoglm5_sbxtest_")
    os.chmod(own, 0o755)  # the fallback's unprivileged uid must reach its working directory
    saved, tempfile.tempdir = tempfile.tempdir, own
    yield own
    tempfile.tempdir = saved
    shutil.rmtree(own, ignore_errors=True)


def _descends_from_us(pid: int) -> bool:
    while pid > 1:
        try:
            with open(f"/proc/{pid}/status") as f:
                pid = int(next(line for line in f if line.startswith("PPid:")).split()[1])
        except (OSError, StopIteration):
            return False
        if pid == os.getpid():
            return True
    return False


def _leftovers() -> list[int]:
    """Our processes still running the sandbox launcher, or owned by a sandbox uid. Ours: the command
    line names our judge dir (fallback; survives re-parenting) or we are an ancestor (bwrap's PID
    namespace dies with bwrap, so its processes cannot be re-parented out of our tree)."""
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
        sandboxed = LAUNCHER_MARK in cmd or sandbox.SANDBOX_UID_BASE <= uid < sandbox.SANDBOX_UID_BASE + 10**8
        if sandboxed and (tempfile.gettempdir() in cmd or _descends_from_us(int(d))):
            left.append(int(d))
    return left


def _run(src, bw, **kw):
    kw.setdefault("timeout_s", 2.0)
    t0 = time.monotonic()
    r = run_code(src, **_mode(bw), **kw)
    assert time.monotonic() - t0 < kw["timeout_s"] + 3.0, "the sandbox did not return in time"
    assert r.sandboxed is bool(bw)
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


def test_bad_arguments_raise_with_the_value():
    with pytest.raises(ValueError, match="timeout_s=0"):
        run_code("pass", timeout_s=0)


# ----------------------------------------------------------------------------------------------
# no bubblewrap: refuse unless allowed


@pytest.fixture
def bwrap_path(monkeypatch, tmp_path):
    """PATH holds only tmp_path (put a fake `bwrap` there, or none); the bwrap probe is rerun."""
    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox.bwrap_problem.cache_clear()
    yield tmp_path
    sandbox.bwrap_problem.cache_clear()


def _assert_refusal_message(err: SandboxUnavailable) -> None:
    msg = str(err)
    for needle in (
        "bubblewrap",
        "apt-get install bubblewrap",
        "dnf install bubblewrap",
        "--allow-unsandboxed",
    ):
        assert needle in msg, msg


def test_refuses_without_bubblewrap_unless_allowed(bwrap_path, monkeypatch, caplog):
    with pytest.raises(SandboxUnavailable) as err:
        run_code("print(6 * 7)", timeout_s=2.0)
    _assert_refusal_message(err.value)
    assert "not installed" in str(err.value)
    with pytest.raises(SandboxUnavailable):  # requiring bubblewrap is never overridden
        run_code("print(6 * 7)", timeout_s=2.0, use_bwrap=True, allow_unsandboxed=True)
    python = _fallback_python_or_skip()
    monkeypatch.setattr(sandbox, "_warned_fallback", False)
    with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
        r = run_code("print(6 * 7)", timeout_s=2.0, allow_unsandboxed=True, python=python)
    assert r.ok and r.stdout.strip() == "42" and r.sandboxed is False
    assert any("WITHOUT bubblewrap" in rec.getMessage() for rec in caplog.records)


def test_refuses_when_bubblewrap_cannot_create_namespaces(bwrap_path):
    fake = bwrap_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace") as err:
        run_code("print(1)", timeout_s=2.0)
    _assert_refusal_message(err.value)


def test_no_bwrap_env_var_needs_allow_unsandboxed(monkeypatch):
    monkeypatch.setenv(sandbox.NO_BWRAP_ENV, "1")
    with pytest.raises(SandboxUnavailable, match=sandbox.NO_BWRAP_ENV):
        run_code("print(6 * 7)", timeout_s=2.0)
    python = _fallback_python_or_skip()
    r = run_code("print(6 * 7)", timeout_s=2.0, allow_unsandboxed=True, python=python)
    assert r.ok and r.stdout.strip() == "42" and r.sandboxed is False


# ----------------------------------------------------------------------------------------------
# never root


@pytest.mark.parametrize("bw", MODES)
def test_program_never_runs_as_root(bw):
    r = _run("import os\nprint(*os.getresuid(), *os.getresgid())", bw)
    assert r.ok, r.stderr
    ids = [int(x) for x in r.stdout.split()]
    assert len(ids) == 6 and 0 not in ids, ids


@pytest.mark.skipif(os.geteuid() != 0, reason="as non-root the program already runs under our own uid")
def test_refuses_as_root_when_no_unprivileged_uid_can_run_the_interpreter(tmp_path):
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)  # like /root: only root may look inside
    python = hidden / "python"
    python.symlink_to(sys.executable)
    assert stat.S_IMODE(hidden.stat().st_mode) == 0o700
    with pytest.raises(SandboxUnavailable, match="as root") as err:
        run_code("print(1)", timeout_s=2.0, use_bwrap=False, allow_unsandboxed=True, python=str(python))
    assert "bubblewrap" in str(err.value)


# ----------------------------------------------------------------------------------------------
# the judge: results go out, expected values never go in

SECRET = random.SystemRandom().randrange(10**6, 10**7)  # f(x) = x * SECRET; never shown to the program
CALLS = [(3,), (5,), (7,), (11,)]
EXPECTED = [repr(x * SECRET) for (x,) in CALLS]
FAKE = json.dumps(["True", "0", "1", "PASS"])


@pytest.mark.parametrize("bw", MODES)
def test_run_calls_returns_the_results_of_an_honest_candidate(bw):
    out = run_calls(
        f"def f(x):\n    print('noise')\n    return x * {SECRET}\n", CALLS, timeout_s=2.0, **_mode(bw)
    )
    assert out.reprs == EXPECTED and out.passed(EXPECTED) == len(CALLS), out.run
    out = run_calls("def f(x):\n    return 1 // (x - 5)\n", CALLS, timeout_s=2.0, **_mode(bw))
    assert out.reprs == ["-1", None, "0", "0"] and out.passed(["-1", "0", "0", "0"]) == 3


# Each tries to get a pass without computing x * SECRET.
FORGERS = {
    "reads_every_file_and_prints_a_verdict": r"""
import os, re, sys
harness = sys._getframe(1).f_globals  # the judge's own namespace
seen = [repr(harness)]
for top in {"/judge", os.getcwd(), os.path.dirname(os.getcwd())} - {"/"}:
    for root, dirs, files in os.walk(top):
        for name in files:
            try:
                seen.append(open(os.path.join(root, name), errors="replace").read())
            except Exception:
                pass
for name in ("cmdline", "environ", "status"):
    try:
        seen.append(open("/proc/self/" + name, errors="replace").read())
    except Exception:
        pass
numbers = sorted({int(n) for n in re.findall(r"\d{7,}", "\n".join(seen))})
sys.stderr.write("found: " + repr(numbers) + "\n" + "\n".join(seen)[-20000:])
print("PASS"); print("all tests passed"); print("passed: 4/4")
def f(x):  # any number found that fits the task's shape (x * a 7-digit constant)
    return next((n for n in numbers if n % x == 0 and 10**6 <= n // x < 10**7), x)
""",
    "prints_fake_results_and_exits_early": r"""
import json, os, sys
n = len(sys._getframe(1).f_globals["_calls"])
for line in ("PASS", "OK " * n, MARK + json.dumps(["True"] * n), MARK + FAKE):
    sys.__stdout__.write("\n" + line + "\n")
sys.__stdout__.flush()
os._exit(0)
""",
    "writes_the_result_channel_then_exits_inside_a_call": r"""
import json, os, sys
def f(x):
    os.write(1, ("\n" + MARK + json.dumps([str(x)] * 4) + "\n").encode())
    raise SystemExit(0)
""",
    "overwrites_the_channel_after_the_harness": r"""
import atexit, os
atexit.register(lambda: os.write(1, ("\n" + MARK + FAKE + "\n").encode()))
def f(x):
    return x
""",
    "monkeypatches_builtins": r"""
import builtins, json
class Yes(str):
    def __eq__(self, other):
        return True
    __hash__ = str.__hash__
builtins.repr = lambda obj: Yes("forged")
_dumps = json.dumps
json.dumps = lambda obj, *a, **k: _dumps([Yes("forged")] * len(obj))
class Always:
    def __eq__(self, other):
        return True
    __hash__ = object.__hash__
def f(x):
    return Always()
""",
    "garbles_the_channel": r"""
import os
for junk in (MARK + "[1, 2", MARK + '{"passed": 4}', MARK + "[" + '"x", ' * 10**4 + '"x"]', MARK + "null"):
    os.write(1, ("\n" + junk + "\n").encode())
os._exit(0)
""",
}


@pytest.mark.parametrize("bw", MODES)
@pytest.mark.parametrize("name", sorted(FORGERS))
def test_a_program_cannot_forge_a_pass(bw, name):
    src = FORGERS[name].replace("MARK", repr(RESULTS_MARK)).replace("FAKE", repr(FAKE))
    out = run_calls(src, CALLS, timeout_s=2.0, **_mode(bw))
    assert out.passed(EXPECTED) == 0, (out.reprs, out.run)
    seen = out.run.stdout + out.run.stderr
    assert not any(e in seen for e in EXPECTED), "an expected value reached the sandbox"
    assert not _leftovers()
