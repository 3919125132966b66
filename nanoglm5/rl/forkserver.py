"""Warm sandboxes: a fork server inside bubblewrap, so a judged program costs a fork, not a new interpreter.

RL and its evaluation judge thousands of tiny programs (GLM-5 arXiv 2602.15763 §4.1: the environment runs
the model's code and answers back), and on a small CPU a fresh bubblewrap + Python start per program (40-
100 ms of CPU, most of it the interpreter's start-up) costs more than the model's turn that wrote it. So a
pool of long-lived *fork servers* does it the way Python's own multiprocessing "forkserver" and Android's
zygote do: one trusted Python process per slot, started once inside the same bubblewrap sandbox as a cold
run (sandbox.py's layers 1 and 4), forks a child per program. The child does what sandbox.py's launcher
does, in the same order (rlimits, the fresh uid, refuse uid 0, a fresh working directory, an empty
environment), then runs the program in a fresh namespace.

What keeps one program from touching the next or the server:
- One program at a time per server. After it, the server SIGKILLs every other process in its PID
  namespace (the program's leftovers included) and wipes /tmp and the program's directory, so the next
  program starts as a cold run would.
- As root, each program gets its own fresh uid (as cold runs do): it cannot signal, trace or read the
  server, which keeps only the capabilities it needs (setuid/setgid to drop, kill to sweep, chown/fowner/
  dac_override to clean up); setuid clears them in the child. Not root, the program shares the server's
  uid, so the server makes itself undumpable (PR_SET_DUMPABLE 0: no ptrace, no /proc/<pid>/mem).
- Only the server's stdin/stdout talk to the host; the child's fds 0-2 are fresh pipes and every other fd
  is closed before the program runs. The verdict is still made outside (judge.py compares the returned
  reprs), so a program that forged its output line gains nothing.
- A server that dies or stops answering mid-run (a program that killed it) is discarded, and that one
  program is run again the cold way, so its verdict is exactly what a cold run gives. Servers are only
  used with bubblewrap; the unsandboxed fallback always runs cold.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

MAX_SERVERS = 8  # per host process: programs judged at once (more would only share the same cores)

# Runs inside the sandbox: trusted. One JSON request per line on stdin, one JSON result per line on stdout.
_SERVER = r"""
import json, os, resource, selectors, signal, sys, time, traceback
ROOT = os.geteuid() == 0
if not ROOT:  # the programs share our uid: no ptrace, no /proc/<pid>/mem of this process
    import ctypes
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
chan_in, chan_out = os.fdopen(0, "rb", buffering=0), os.fdopen(os.dup(1), "wb", buffering=0)
ME, N = os.getpid(), [0]

def child(req, run_dir, fds):
    os.setsid()
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
    os.closerange(3, 65536)
    for name, lim in req["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (lim, lim) if name != "RLIMIT_CPU" else (lim, lim + 1))
    if req["uid"] is not None:
        os.setgroups([]); os.setgid(req["uid"]); os.setuid(req["uid"])
    if 0 in (os.getuid(), os.geteuid()):
        os.write(2, b"sandbox: refusing to run the program as root\n"); os._exit(126)
    os.chdir(run_dir)
    os.environ.clear(); os.environ.update(PATH=req["path"], LANG="C.UTF-8", HOME=run_dir)
    sys.argv, code = ["main.py"], 0
    try:
        exec(compile(req["source"], "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else (print(e.code, file=sys.stderr), 1)[1])
    except BaseException:
        traceback.print_exc(); code = 1
    try:
        import atexit; atexit._run_exitfuncs(); sys.stdout.flush(); sys.stderr.flush()
    except BaseException:
        code = code or 120
    os._exit(code & 0xFF)

def pump(pid, fds, stdin, deadline, cap):
    out = {fds[0]: bytearray(), fds[1]: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in out:
        sel.register(fd, selectors.EVENT_READ)
    if stdin:
        os.set_blocking(fds[2], False); sel.register(fds[2], selectors.EVENT_WRITE)
    else:
        os.close(fds[2])
    pos, status, timed_out, truncated = 0, None, False, False
    while sel.get_map() or status is None:
        now = time.monotonic()
        if status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status, deadline = st, min(deadline, now + 0.2)  # a leftover holding the pipe gets 0.2 s
        if now >= deadline:
            timed_out = status is None
            break
        if not sel.get_map():
            time.sleep(0.001); continue
        for key, _ in sel.select(timeout=min(0.05, deadline - now)):
            if key.fd in out:
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd); continue
                out[key.fd] += chunk
                if len(out[key.fd]) > cap:
                    truncated = True; del out[key.fd][cap:]
            else:
                try:
                    pos += os.write(key.fd, stdin[pos:pos + 65536])
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    pos = len(stdin)
                if pos >= len(stdin):
                    sel.unregister(key.fd); os.close(key.fd)
        if truncated:
            break
    if status is None:  # a flood or the deadline: kill it before its pipes close (no EPIPE exit of its own)
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for key in list(sel.get_map().values()):
        os.close(key.fd)
    sel.close()
    return out[fds[0]], out[fds[1]], status, timed_out, truncated

def sweep():
    for _ in range(200):
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, ME)]
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in pids:
            try:
                os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.002)

def wipe(path, keep_root):
    for dirpath, dirs, files in os.walk(path, topdown=False):
        for name in files + dirs:
            p = os.path.join(dirpath, name)
            try:
                os.rmdir(p) if (name in dirs and not os.path.islink(p)) else os.unlink(p)
            except OSError:
                pass
    if not keep_root:
        try:
            os.rmdir(path)
        except OSError:
            pass

def run(req):
    N[0] += 1
    run_dir = "/sandbox/run%d" % N[0]
    os.mkdir(run_dir, 0o700)
    if req["uid"] is not None:
        os.chown(run_dir, req["uid"], req["uid"])
    pipes = [os.pipe() for _ in range(3)]  # the child's stdin, stdout, stderr
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(req, run_dir, [pipes[0][0], pipes[1][1], pipes[2][1]])
    for fd in (pipes[0][0], pipes[1][1], pipes[2][1]):
        os.close(fd)
    out, err, status, timed_out, truncated = pump(pid, [pipes[1][0], pipes[2][0], pipes[0][1]],
                                                  req["stdin"].encode(), t0 + req["timeout_s"], req["cap"])
    if status is None:
        status = os.waitpid(pid, 0)[1]
    wall = time.monotonic() - t0
    sweep()
    wipe(run_dir, keep_root=False); wipe("/tmp", keep_root=True)
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return {"rc": rc, "stdout": out.decode("utf-8", "replace"), "stderr": err.decode("utf-8", "replace"),
            "timed_out": timed_out, "truncated": truncated, "wall_s": wall}

while True:
    line = chan_in.readline()
    if not line:
        break
    chan_out.write((json.dumps(run(json.loads(line))) + "\n").encode())
"""

# what the server needs beyond a cold run's two (sandbox.py _bwrap_argv); setuid clears them in the child
ROOT_CAPS = ("CAP_KILL", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE")


class ForkServer:
    """One sandboxed fork server: `call(request, deadline)` → its result dict, or None if it died or
    overran the deadline (then it is dead: killed here)."""

    def __init__(self, argv: list[str], cwd: str):
        self.proc = subprocess.Popen(argv + ["-I", "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, cwd=cwd, env={"PATH": "/usr/bin:/bin"},
                                     start_new_session=True, close_fds=True)
        self.buf = bytearray()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def call(self, request: dict, deadline: float) -> dict | None:
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            return self.kill()
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(timeout=left):
                    return self.kill()
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return self.kill()
                self.buf += chunk
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        try:
            return json.loads(line)
        except ValueError:
            return self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        return None


class Pool:
    """Up to MAX_SERVERS fork servers per sandbox layout (`key`: the interpreter and tmpfs size), shared by
    the threads of this process. A process forked from this one starts its own (the pid check)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.idle: dict[tuple, list[ForkServer]] = {}
        self.count: dict[tuple, int] = {}
        self.pid = os.getpid()
        # bwrap's --die-with-parent follows the *thread* that started it: start servers from one thread
        # that lives as long as the process, not from a judge thread that may exit mid-run
        self.spawner = ThreadPoolExecutor(1, thread_name_prefix="forkserver")

    def _check_pid(self) -> None:
        if self.pid != os.getpid():  # inherited through fork: those servers belong to the parent
            self.idle, self.count, self.pid = {}, {}, os.getpid()
            self.spawner = ThreadPoolExecutor(1, thread_name_prefix="forkserver")

    def acquire(self, key: tuple, argv: list[str], cwd: str) -> ForkServer:
        with self.cond:
            self._check_pid()
            while True:
                idle = self.idle.setdefault(key, [])
                while idle:
                    srv = idle.pop()
                    if srv.alive():
                        return srv
                    self.count[key] -= 1  # died idle (its spawning thread exited: bwrap's --die-with-parent)
                if self.count.get(key, 0) < MAX_SERVERS:
                    self.count[key] = self.count.get(key, 0) + 1
                    break
                self.cond.wait()
        try:
            return self.spawner.submit(ForkServer, argv, cwd).result()
        except OSError:
            self.release(key, None)
            raise

    def release(self, key: tuple, srv: ForkServer | None) -> None:
        with self.cond:
            self._check_pid()
            if srv is not None and srv.alive():
                self.idle.setdefault(key, []).append(srv)
            else:
                self.count[key] = max(0, self.count.get(key, 0) - 1)
            self.cond.notify()


POOL = Pool()


def run(key: tuple, argv: list[str], cwd: str, request: dict) -> dict | None:
    """`request` (source, stdin, rlimits, uid, path, timeout_s, cap) run by a warm server of layout `key`
    (started with `argv`, the bubblewrap command line ending in the interpreter); None when no server could
    start or it died mid-run: the caller then runs the program cold. The server enforces timeout_s itself;
    the extra 5 s here is for its sweep and clean-up on a loaded machine."""
    try:
        srv = POOL.acquire(key, argv, cwd)
    except OSError:
        return None
    res = srv.call(request, time.monotonic() + request["timeout_s"] + 5.0)
    POOL.release(key, srv)
    return res
