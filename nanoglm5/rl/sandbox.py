"""Sandbox for the grounded judge: run untrusted Python, return what happened, harm nothing.

RL rewards come from *running* model output (verifiable rewards, GLM-5 arXiv 2602.15763 §3.2). The
model is tiny and its code is often broken or accidentally hostile (infinite loops, fork bombs,
memory bombs, floods of output), so every run is bounded and always returns a `SandboxResult`; it
never hangs and never raises for anything the program does.

Layers, outermost first:
1. bubblewrap (`bwrap`): a fresh root holding only read-only system dirs and the Python install, a
   size-capped private tmpfs as the only writable place (cwd `/sandbox`, and `/tmp`), no network
   (`--unshare-net`), its own PID namespace (`--unshare-pid`, so everything it spawned dies with
   it), `--die-with-parent`, `--new-session`, an empty environment (`--clearenv`). The host never
   sees the files it writes.
2. Never root: as root, the program runs under a fresh, unused uid (one per run), because Linux
   does not enforce RLIMIT_NPROC for uid 0; a fork bomb then stops at `max_procs` tasks, and
   leftover processes of that uid are swept after the run. Not root: the uid stays ours (inside
   bubblewrap it shows as "nobody") and RLIMIT_NPROC is set to (our current task count +
   `max_procs`). The launcher refuses to start the program if it still holds uid 0.
3. rlimits set by a small trusted launcher inside the child before the program starts:
   RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_CORE=0. (A launcher
   rather than `preexec_fn`: `preexec_fn` can deadlock in a threaded parent such as a torch
   rollout worker; the launcher runs after exec, so the parent stays safe.)
4. The parent: `start_new_session=True`, a wall-clock deadline that SIGKILLs the whole process
   group, stdout/stderr read with a byte cap (a flood is cut, flagged `limit_hit="output"` and
   killed), an empty temporary working directory and a scrubbed environment.

Without bubblewrap (not installed, no namespaces in this container, `use_bwrap=False`, or
`NANOGLM5_NO_BWRAP=1`) `run_code` refuses with `SandboxUnavailable`, unless the caller passes
`allow_unsandboxed=True` (`--allow-unsandboxed` on the command lines): then layers 2-4 remain and a
loud one-line warning says so. That fallback has no filesystem or network isolation from the OS,
only a PEP 578 audit-hook tripwire in the launcher that refuses fork/exec/subprocess, sockets,
ctypes, writes outside the working directory and reads of other processes' /proc entries. Audit
hooks are not a security boundary (PEP 578 says so): they stop accidents, not a determined
attacker. As root it also needs an interpreter that an unprivileged uid can run (`python=`;
a Python under a 0700 /root is not), else it refuses rather than run the program as root.

With bubblewrap a run goes to a warm sandbox by default (forkserver.py): the same layers, one
long-lived server per slot that forks the program instead of starting bubblewrap and Python again (a
judged program then costs ~5 ms instead of ~50), falling back to the cold run described above.

The code judge builds on `run_code` in judge.py (`run_calls`: call inside, compare outside).
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from nanoglm5.rl import forkserver

log = logging.getLogger(__name__)

NO_BWRAP_ENV = "NANOGLM5_NO_BWRAP"  # 1: skip bubblewrap (then runs need allow_unsandboxed)
SANDBOX_UID_BASE = 1_500_000_000  # fresh uids are drawn from [base, base + 10^8): unused by any account
_PATH = "/usr/local/bin:/usr/bin:/bin"


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run this program safely (no working bubblewrap and unsandboxed runs were
    not allowed, or the program could only run as root); nothing was run."""


@dataclass
class SandboxResult:
    """What a sandboxed run did.

    returncode: the program's exit status; negative = killed by that signal (subprocess convention).
    timed_out:  the wall-clock deadline passed and we killed it.
    limit_hit:  the limit that stopped it, best effort: "wall", "cpu", "memory", "file_size",
                "processes", "output", "network", "filesystem", "introspection", or None.
    truncated:  stdout/stderr were cut at `max_output_bytes`.
    sandboxed:  True when it ran inside bubblewrap; False for the rlimits-only fallback.
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    limit_hit: str | None
    wall_s: float
    sandboxed: bool
    truncated: bool = False

    @property
    def exit_code(self) -> int:
        return self.returncode

    @property
    def ok(self) -> bool:
        """Exited 0 on its own, within every limit."""
        return self.returncode == 0 and not self.timed_out and self.limit_hit is None


# ----------------------------------------------------------------------------------------------
# The launcher: trusted code that runs first inside the child (after exec), then runs main.py.

_LAUNCHER = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
for name, lim in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (lim, lim) if name != "RLIMIT_CPU" else (lim, lim + 1))
if cfg["uid"] is not None:  # root only: drop to the fresh uid (clears all capabilities)
    os.setgroups([]); os.setgid(cfg["uid"]); os.setuid(cfg["uid"])
if 0 in (os.getuid(), os.geteuid()):
    sys.stderr.write("sandbox: refusing to run the program as root\n"); sys.exit(126)
os.chdir(cfg["cwd"])
src = open(cfg["main"], encoding="utf-8").read()
GUARD
sys.argv = ["main.py"]
del json, resource, cfg
exec(compile(src, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""

# PEP 578 tripwire for the fallback. Constants are inlined (co_consts are immutable) so the
# program cannot switch the checks off by editing a global; still not a security boundary.
_GUARD = r"""
def _guard(event, args):
    if event in ("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                 "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill"):
        raise PermissionError("sandbox blocked processes: " + event)
    if event == "import" and args[0] in ("_posixsubprocess", "multiprocessing", "ctypes", "_ctypes"):
        raise PermissionError("sandbox blocked processes: import " + args[0])
    if event.startswith("socket."):
        raise PermissionError("sandbox blocked network: " + event)
    if event in ("gc.get_objects", "gc.get_referrers", "gc.get_referents") or (
            event == "object.__setattr__" and args[1] in ("__code__", "__defaults__", "__kwdefaults__")):
        raise PermissionError("sandbox blocked introspection: " + event)
    paths = ()
    if event == "open":
        path, mode, flags = args
        if isinstance(path, (str, bytes)):
            p = os.path.abspath(os.fsdecode(path))
            if p.startswith("/proc/") and p.split("/")[2] not in ("self", "thread-self"):
                raise PermissionError("sandbox blocked filesystem: " + p)
            if (mode and any(c in mode for c in "wax+")) or (flags & 0o3103):  # O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND
                paths = (path,)
    elif event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                   "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move"):
        paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
    for a in paths:
        p = os.path.realpath(os.fsdecode(a))
        if not (p == ROOT or p.startswith(ROOT + "/")):
            raise PermissionError("sandbox blocked filesystem: " + event + " " + p)
sys.addaudithook(_guard)
"""


def _launcher_source(guard: bool, root: str) -> str:
    guard_src = _GUARD.replace("ROOT", repr(root)) if guard else ""
    return _LAUNCHER.replace("GUARD", guard_src)


# ----------------------------------------------------------------------------------------------
# bubblewrap


@functools.lru_cache(maxsize=8)
def _python_roots(python: str) -> tuple[str, ...]:
    """Host dirs the sandbox needs to run `python` (its install prefix, maybe outside /usr)."""
    if python == sys.executable:
        dirs = [sys.base_prefix, sys.prefix]
    else:  # another interpreter: ask it where it lives
        query = "import sys; print(sys.base_prefix); print(sys.prefix)"
        out = subprocess.run([python, "-I", "-c", query], capture_output=True, text=True, timeout=30)
        dirs = out.stdout.splitlines()[:2]
    dirs += [os.path.dirname(python), os.path.dirname(os.path.realpath(python))]
    roots = {os.path.realpath(p) for p in dirs if p}
    return tuple(sorted(r for r in roots if not r.startswith("/usr/")))


def _ancestors(path: str) -> list[str]:
    """'/a/b/c' -> ['/a', '/a/b'] (outermost first)."""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _bwrap_argv(bwrap: str, python: str, judge_dir: str, tmpfs_bytes: int, as_root: bool,
                extra_caps: tuple = ()) -> list[str]:
    argv = [bwrap, "--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):  # merged-/usr systems: symlinks
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    # the private /tmp first: a Python installed under /tmp (a venv there) is then bound on top of it
    argv += ["--size", str(tmpfs_bytes), "--perms", "1777", "--tmpfs", "/tmp"]
    made = {"/tmp"}
    for r in _python_roots(python):
        # bwrap would create the parents 0700 (unreadable once the program drops to its own uid)
        parents = [p for p in _ancestors(r) if p not in made]
        for p in parents:
            argv += ["--perms", "0755", "--dir", p]
        made.update(parents)
        argv += ["--ro-bind", r, r]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(tmpfs_bytes), "--perms", "1777", "--tmpfs", "/sandbox",
             "--ro-bind", judge_dir, "/judge", "--chdir", "/sandbox",
             "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--die-with-parent", "--new-session", "--clearenv",
             "--setenv", "PATH", _PATH, "--setenv", "LANG", "C.UTF-8", "--setenv", "HOME", "/sandbox"]
    if as_root:  # the launcher needs these two to drop to the fresh uid; setuid then clears them
        for cap in ("CAP_SETUID", "CAP_SETGID") + extra_caps:
            argv += ["--cap-add", cap]
    else:  # unprivileged bwrap makes a user namespace anyway; show the program "nobody"
        argv += ["--unshare-user", "--uid", "65534", "--gid", "65534"]
    return argv + ["--"]


INSTALL_HINT = (
    "Install bubblewrap: `apt-get install bubblewrap` (Debian/Ubuntu) or `dnf install bubblewrap` "
    "(Fedora/RHEL); inside a container it also needs permission to create user namespaces."
)


@functools.lru_cache(maxsize=1)
def bwrap_problem() -> str | None:
    """Why bubblewrap cannot isolate a run here (not installed, or the container forbids
    namespaces), or None when it works. Probed once per process."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bwrap is not installed (not found on PATH)"
    with tempfile.TemporaryDirectory(prefix="nanoglm5_probe_") as d:
        os.chmod(d, 0o755)
        argv = _bwrap_argv(bwrap, sys.executable, d, 1 << 20, os.geteuid() == 0)
        argv += [sys.executable, "-I", "-c", "pass"]
        try:
            probe = subprocess.run(argv, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{bwrap} could not start a sandbox here ({e})"
    if probe.returncode != 0:
        why = probe.stderr.decode(errors="replace").strip().splitlines()
        return f"{bwrap} could not start a sandbox here ({why[-1] if why else f'exit status {probe.returncode}'})"
    return None


def bwrap_available() -> bool:
    """Does bubblewrap exist *and* work here?"""
    return bwrap_problem() is None


_warned_fallback = False


def _warn_fallback(why: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        log.warning(
            "sandbox: running model-written code WITHOUT bubblewrap (%s; allowed by --allow-unsandboxed): "
            "resource limits and an audit-hook tripwire only, no filesystem or network isolation. %s",
            why,
            INSTALL_HINT,
        )


def _use_bwrap(use_bwrap: bool | None, allow_unsandboxed: bool) -> bool:
    """True to run inside bubblewrap; False for the fallback, only when the caller allowed it."""
    if use_bwrap is False:
        why = "use_bwrap=False"
    elif use_bwrap is None and os.environ.get(NO_BWRAP_ENV, "") not in ("", "0"):
        why = f"{NO_BWRAP_ENV}=1"
    else:
        why = bwrap_problem()
        if why is None:
            return True
    if use_bwrap or not allow_unsandboxed:
        raise SandboxUnavailable(
            f"refusing to run model-written code without bubblewrap: {why}. {INSTALL_HINT} "
            "Or pass --allow-unsandboxed (run_code(..., allow_unsandboxed=True)) to run it with "
            "resource limits only, without filesystem or network isolation."
        )
    _warn_fallback(why)
    return False


# ----------------------------------------------------------------------------------------------
# processes of a uid (for NPROC accounting and the post-run sweep)


def _tasks_by_uid(uid: int) -> tuple[list[int], int]:
    """(pids whose real uid is `uid`, their total thread count), read from /proc."""
    pids, threads = [], 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                st = f.read()
        except OSError:
            continue  # exited meanwhile
        fields = dict(line.split(":", 1) for line in st.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 0").split()[0]) == uid:
            pids.append(int(d))
            threads += int(fields.get("Threads", "1"))
    return pids, threads


def _sweep_uid(uid: int, rounds: int = 100) -> int:
    """SIGKILL every process of `uid` until none is left; returns how many were killed."""
    killed = 0
    for _ in range(rounds):
        pids, _ = _tasks_by_uid(uid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    return killed


@functools.lru_cache(maxsize=8)
def _unprivileged_problem(python: str) -> str | None:
    """As root without bubblewrap: why an unprivileged uid cannot run `python` and import its
    standard library (e.g. it lives under a 0700 /root), or None when it can."""
    try:  # Popen's user/group switch happens in C after fork: safe in a threaded parent
        probe = subprocess.run(
            [python, "-I", "-c", "import collections, decimal, json, math, re, resource"],
            user=SANDBOX_UID_BASE,
            group=SANDBOX_UID_BASE,
            extra_groups=[],
            capture_output=True,
            timeout=30,
            cwd="/",
            env={"PATH": _PATH},
        )
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    if probe.returncode != 0:
        why = probe.stderr.decode(errors="replace").strip().splitlines()
        return why[-1] if why else f"exit status {probe.returncode}"
    return None


# ----------------------------------------------------------------------------------------------
# the parent side: feed stdin, read capped output, enforce the wall clock


def _pump(proc: subprocess.Popen, stdin: bytes, deadline: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    """Returns (stdout, stderr, timed_out, truncated). Kills the group on deadline or flood."""
    out = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for fd in out:
        sel.register(fd, selectors.EVENT_READ)
    if stdin:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    pos, timed_out, truncated = 0, False, False
    while sel.get_map():
        now = time.monotonic()
        if now >= deadline:
            timed_out = proc.poll() is None
            break
        if proc.poll() is not None:  # exited: a leftover child holding the pipe gets 0.2 s more
            deadline = min(deadline, now + 0.2)
        for key, _ in sel.select(timeout=min(0.05, deadline - now)):
            fd = key.fd
            if fd in out:
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    continue
                out[fd] += chunk
                if len(out[fd]) > cap:
                    truncated = True
                    del out[fd][cap:]
            else:  # stdin
                try:
                    pos += os.write(fd, stdin[pos : pos + 65536])
                except BlockingIOError:
                    continue
                except BrokenPipeError:  # it stopped reading: drop the rest
                    pos = len(stdin)
                if pos >= len(stdin):
                    sel.unregister(fd)
                    proc.stdin.close()
        if truncated:
            break
    sel.close()
    return bytes(out[proc.stdout.fileno()]), bytes(out[proc.stderr.fileno()]), timed_out, truncated


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass


def _classify(rc: int, stderr: str, timed_out: bool, truncated: bool) -> str | None:
    if truncated:
        return "output"
    if timed_out:
        return "wall"
    if rc == -signal.SIGXCPU or rc == -signal.SIGKILL:  # soft CPU limit, then the hard one
        return "cpu"
    if rc == 0:
        return None
    tail = stderr[-2000:]
    if "sandbox blocked " in tail:
        return tail.rsplit("sandbox blocked ", 1)[1].split(":", 1)[0]
    for needle, kind in (
        ("MemoryError", "memory"),
        ("File too large", "file_size"),
        ("No space left on device", "file_size"),
        ("Network is unreachable", "network"),
        ("BlockingIOError", "processes"),
        ("Resource temporarily unavailable", "processes"),
    ):
        if needle in tail:
            return kind
    return None


def check_sandbox(
    allow_unsandboxed: bool = False, *, use_bwrap: bool | None = None, python: str | None = None
) -> bool:
    """Raise `SandboxUnavailable` if `run_code` would refuse with these settings (a preflight for
    long jobs); else return whether runs will be isolated by bubblewrap."""
    python = python or sys.executable
    bwrap = _use_bwrap(use_bwrap, allow_unsandboxed)
    problem = _unprivileged_problem(python) if os.geteuid() == 0 and not bwrap else None
    if problem is not None:
        raise SandboxUnavailable(
            f"refusing to run model-written code as root: an unprivileged uid cannot run {python} "
            f"({problem}); without bubblewrap the program would have to keep uid 0. {INSTALL_HINT} "
            "Or pass python= an interpreter every user can read (e.g. /usr/bin/python3), "
            "or run as a non-root user."
        )
    return bwrap


@functools.lru_cache(maxsize=1)
def _empty_dir() -> str:
    """An empty directory for a warm sandbox's /judge bind (its programs arrive over the pipe)."""
    d = tempfile.mkdtemp(prefix="nanoglm5_forkserver_")
    os.chmod(d, 0o755)
    atexit.register(shutil.rmtree, d, True)
    return d


_own = [0.0, 0]  # (when, our uid's task count): reading every /proc entry costs ~5 ms, a warm run ~3 ms


def _own_tasks() -> int:
    if time.monotonic() - _own[0] > 1.0:
        _own[:] = [time.monotonic(), _tasks_by_uid(os.getuid())[1]]
    return _own[1]


def _run_warm(source, stdin, timeout_s, rlimits, uid, cap, python, file_bytes, as_root) -> SandboxResult | None:
    """The run in a warm sandbox (forkserver.py), or None: no server, or it died mid-run (run it cold)."""
    caps = forkserver.ROOT_CAPS if as_root else ()
    argv = _bwrap_argv(shutil.which("bwrap") or "bwrap", python, _empty_dir(), file_bytes, as_root, caps) + [python]
    request = {"source": source, "stdin": stdin, "rlimits": rlimits, "uid": uid, "path": _PATH,
               "timeout_s": timeout_s, "cap": cap}
    out = forkserver.run((python, file_bytes), argv, _empty_dir(), request)
    if out is None:
        return None
    rc, stderr = out["rc"], out["stderr"]
    return SandboxResult(returncode=rc, stdout=out["stdout"], stderr=stderr, timed_out=out["timed_out"],
                         limit_hit=_classify(rc, stderr, out["timed_out"], out["truncated"]), wall_s=out["wall_s"],
                         sandboxed=True, truncated=out["truncated"])


def run_code(
    source: str,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    *,
    use_bwrap: bool | None = None,
    allow_unsandboxed: bool = False,
    python: str | None = None,
    max_output_bytes: int = 1 << 16,
    max_file_mb: int = 16,
    max_procs: int = 32,
    fork_server: bool = True,
) -> SandboxResult:
    """Run `source` as a Python program (`python -I main.py` semantics) under the sandbox.

    timeout_s: wall-clock limit for the whole run (CPU limit: ceil(timeout_s) s, then SIGKILL 1 s later).
    memory_mb: address-space limit (RLIMIT_AS). max_file_mb: per-file size limit and the size of
    each private tmpfs. max_procs: tasks (processes + threads) the program may add.
    use_bwrap: None = bubblewrap (unless NANOGLM5_NO_BWRAP=1), True = bubblewrap or refuse,
    False = the rlimits-only fallback. allow_unsandboxed: without it, every run that would not be
    isolated by bubblewrap raises `SandboxUnavailable` instead. python: path of the interpreter that
    runs the program (default: this one; the program gets its standard library only).
    Raises SandboxUnavailable or ValueError before running anything; never raises for anything
    the program does.
    """
    if timeout_s <= 0 or memory_mb < 32 or max_output_bytes < 1 or max_procs < 1:
        raise ValueError(
            f"run_code: need timeout_s > 0, memory_mb >= 32, max_output_bytes >= 1, max_procs >= 1; "
            f"got timeout_s={timeout_s}, memory_mb={memory_mb}, max_output_bytes={max_output_bytes}, "
            f"max_procs={max_procs}"
        )
    python = python or sys.executable
    bwrap = check_sandbox(allow_unsandboxed, use_bwrap=use_bwrap, python=python)
    as_root = os.geteuid() == 0
    # root: a fresh uid of its own; not root: the program keeps our (unprivileged) uid
    uid = SANDBOX_UID_BASE + random.SystemRandom().randrange(10**8) if as_root else None
    nproc = max_procs if uid is not None else _own_tasks() + max_procs + 8
    file_bytes = max_file_mb << 20
    rlimits = {
        "RLIMIT_CPU": max(1, math.ceil(timeout_s)),
        "RLIMIT_AS": memory_mb << 20,
        "RLIMIT_FSIZE": file_bytes,
        "RLIMIT_NPROC": nproc,
        "RLIMIT_NOFILE": 256,
        "RLIMIT_CORE": 0,
    }
    if bwrap and fork_server:
        if uid is None:  # the servers' own tasks count against our uid too
            rlimits["RLIMIT_NPROC"] += forkserver.MAX_SERVERS
        warm = _run_warm(source, stdin, timeout_s, rlimits, uid, max_output_bytes, python, file_bytes, as_root)
        if warm is not None:
            return warm
    judge_dir = tempfile.mkdtemp(prefix="nanoglm5_sbx_")
    try:
        os.chmod(judge_dir, 0o755)
        main = os.path.join(judge_dir, "main.py")
        with open(main, "w", encoding="utf-8") as f:
            f.write(source)
        os.chmod(main, 0o644)
        if bwrap:
            cwd, main_in, host_cwd = "/sandbox", "/judge/main.py", judge_dir
            prefix = _bwrap_argv(shutil.which("bwrap") or "bwrap", python, judge_dir, file_bytes, as_root)
        else:
            cwd = host_cwd = os.path.join(judge_dir, "work")
            os.mkdir(cwd)
            if uid is not None:
                os.chown(cwd, uid, uid)
            main_in, prefix = main, []
        env = {"PATH": _PATH, "LANG": "C.UTF-8", "HOME": cwd}  # bwrap clears it again for the program
        cfg = {"rlimits": rlimits, "uid": uid, "cwd": cwd, "main": main_in}
        argv = prefix + [python, "-I", "-c", _launcher_source(not bwrap, cwd), json.dumps(cfg)]
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=host_cwd,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
        try:
            out, err, timed_out, truncated = _pump(proc, stdin.encode(), t0 + timeout_s, max_output_bytes)
        finally:
            if proc.poll() is None:
                _kill_group(proc)
            rc = proc.wait()
            wall = time.monotonic() - t0
            _kill_group(proc)  # stragglers of a process that exited on its own
            if uid is not None:
                _sweep_uid(uid)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None and not pipe.closed:
                    pipe.close()
    finally:
        shutil.rmtree(judge_dir, ignore_errors=True)
    if bwrap and rc > 128:  # bwrap reports "child killed by signal N" as exit status 128 + N
        rc = -(rc - 128)
    stderr = err.decode("utf-8", errors="replace")
    return SandboxResult(
        returncode=rc,
        stdout=out.decode("utf-8", errors="replace"),
        stderr=stderr,
        timed_out=timed_out,
        limit_hit=_classify(rc, stderr, timed_out, truncated),
        wall_s=wall,
        sandboxed=bwrap,
        truncated=truncated,
    )
