"""The engine core: what owns the engine and steps it, behind the one small interface the HTTP server (server.py)
uses. vLLM V1's engine core is the anchor: the engine steps in a process of its own and sends token deltas back.

Holds, top to bottom: `load_tokenizer` / `load_model` (a checkpoint directory or a (model, tokenizer) pair);
`EngineLoop`, the engine's side wherever it runs (apply add/abort messages, step, turn each step's events into
result items); `Requests`, the server's side (each engine request's asyncio queue, the count in flight, the 429);
and the two cores built from them:

  - `EngineWorker`: the engine in a thread of the server's process. Fast to start and the engine object is at
    hand, what tests and notebooks use; but the event loop, the engine and torch share one GIL.
  - `EngineProcess`: the engine in a child process (started with `spawn`: torch and fork do not mix) that loads
    the model and runs the step loop, and sends back ONE message per engine step holding every request's new
    token. The server's process does HTTP, tokenization and streaming only. serve.py's default.

The interface both give the server: `start()` (in the server's event loop), `stop()`, `submit(prompts, params)`
→ (request ids, asyncio.Queue), `abort(ids)` (frees their slots at the engine's next step), `live` (requests in
flight), `status()` (for /health), `info` (the engine's limits: max_batch, max_seq_len, max_tokens_in_flight,
vocab_size, dtype) and `error` (an APIError once the engine is gone). The queue carries (index, "token",
token_id, logprob, top_logprobs, completion) and (index, "error", APIError) items.

Simplified: a dead engine process is not restarted; every request in flight and every new one is answered 503
(OpenAI's error shape), /health answers 503 too, and the server stays up to say so.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import queue
import signal
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoglm5.api import APIError
from nanoglm5.checkpoint import load_hf
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.engine import Engine, SamplingParams


# ---------------------------------------------------------------------------------------------- loading
def load_tokenizer(source) -> tuple[Tokenizer, str]:
    """The tokenizer and the served model's default name: a checkpoint directory's, or (model, tokenizer)'s."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"{path / 'tokenizer.json'} not found: the server needs the checkpoint's tokenizer; "
                                    "save it with save_hf(model, dir, tokenizer=tok) or copy data/tokenizer.json there")
        return Tokenizer.load(path), path.name
    return source[1], "nanoglm5"


def load_model(source, device):
    return load_hf(Path(source), device=device or "cpu") if isinstance(source, (str, Path)) else source[0]


def engine_info(engine: Engine) -> dict:
    return {"max_batch": engine.max_batch, "max_seq_len": engine.max_seq_len, "vocab_size": engine.cfg.vocab_size,
            "max_tokens_in_flight": engine.max_tokens_in_flight, "dtype": str(engine.cache.kv.dtype)}


# ---------------------------------------------------------------------------------------------- the engine's side
class EngineLoop:
    """Messages in, result items out: ("add", id, prompt, params) and ("abort", id) messages; items (id, token_id,
    logprob, top_logprobs, completion, error), error None or (status, message, code). An exception in one
    request's sampling or stop check fails that request alone (the engine runs with isolate_errors); one in the
    batched forward fails the requests in flight (500); either way the loop goes on."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.aborted = 0  # requests dropped while running or waiting (their client went away)

    def apply(self, msgs: list[tuple]) -> list[tuple]:
        out = []
        for msg in msgs:
            if msg[0] == "add":
                _, rid, prompt, params = msg
                try:
                    self.engine.add_request(prompt, params, request_id=rid)
                except ValueError as e:  # a limit the server's own checks did not catch
                    out.append((rid, -1, 0.0, None, None, (400, str(e), "invalid_value")))
                except Exception as e:  # never let one request kill the loop
                    traceback.print_exc()
                    out.append((rid, -1, 0.0, None, None, _server_error(f"{type(e).__name__}: {e}")))
            elif msg[0] == "abort":
                self.aborted += self.engine.abort(msg[1])
        return out

    def step(self) -> list[tuple]:
        if not self.engine.has_unfinished():
            return []
        try:
            events = self.engine.step()
        except Exception as e:  # fail what is in flight, keep serving
            traceback.print_exc()
            err = _server_error(f"engine error: {type(e).__name__}: {e}")
            return [(rid, -1, 0.0, None, None, err) for rid in self.engine.abort_all()]
        return [(ev.request_id, ev.token_id, ev.logprob, ev.top_logprobs, ev.completion,
                 None if ev.error is None else _server_error(ev.error)) for ev in events]


def _server_error(why: str) -> tuple:
    return 500, f"The server had an error while processing your request: {why}", None


# ---------------------------------------------------------------------------------------------- the server's side
@dataclass
class _Sub:
    q: asyncio.Queue
    index: int  # choice index within its HTTP request


class Requests:
    """The server's side of either core, run in the server's event loop: submit (429 when full), abort, and
    `dispatch`, which puts each result item onto its request's queue. Subclasses say how messages travel."""

    def __init__(self, info: dict, max_queue: int):
        self.info, self.max_queue = info, max_queue
        self.subs: dict[str, _Sub] = {}
        self.live = 0  # requests submitted and not yet finished or aborted
        self.error: APIError | None = None  # set when the engine is gone
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()

    def _send(self, msgs: list[tuple]) -> None:
        raise NotImplementedError

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list[str], asyncio.Queue]:
        """Queue one engine request per (prompt, params); 429 when the server is full, 503 when the engine is gone."""
        if self.error is not None:
            raise self.error
        cap = self.info["max_batch"] + self.max_queue
        if self.live + len(prompts) > cap:
            raise APIError(429, f"Rate limit reached: the server is busy with {self.live} requests in flight, "
                                f"limit max_batch + max_queue = {cap}; retry later", code="rate_limit_exceeded")
        q, rids = asyncio.Queue(), [f"r{next(self._ids)}" for _ in prompts]
        for i, rid in enumerate(rids):
            self.subs[rid] = _Sub(q, i)
        self.live += len(rids)
        self._send([("add", rid, p, sp) for rid, p, sp in zip(rids, prompts, params)])
        return rids, q

    def abort(self, rids: list[str]) -> None:
        """The client is gone: forget its requests now; the engine frees their slots before its next step."""
        gone = [rid for rid in rids if self.subs.pop(rid, None) is not None]
        self.live -= len(gone)
        if gone and self.error is None:
            try:
                self._send([("abort", rid) for rid in gone])
            except APIError:  # the engine is gone, and its slots with it
                pass

    def dispatch(self, items: list[tuple]) -> None:
        for rid, token, logprob, top, completion, err in items:
            final = err is not None or completion is not None
            sub = self.subs.pop(rid, None) if final else self.subs.get(rid)
            if sub is None:  # aborted
                continue
            if final:
                self.live -= 1
            sub.q.put_nowait((sub.index, "error", APIError(*err)) if err is not None else
                             (sub.index, "token", token, logprob, top, completion))

    def fail_all(self, err: APIError) -> None:
        self.error = err
        for rid, sub in list(self.subs.items()):
            sub.q.put_nowait((sub.index, "error", err))
        self.subs.clear()
        self.live = 0


# ---------------------------------------------------------------------------------------------- in a thread
class EngineWorker(Requests):
    """The engine in one background thread of the server's process: it takes messages from an inbox, steps the
    engine while any request is live, and hands each step's items to the event loop in one call."""

    def __init__(self, engine: Engine, max_queue: int = 64):
        super().__init__(engine_info(engine), max_queue)
        self.engine, self.core = engine, EngineLoop(engine)
        self.inbox: queue.Queue = queue.Queue()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)

    def start(self):
        self.loop = asyncio.get_running_loop()
        self.thread.start()

    def stop(self):
        self.stopped = True
        self.inbox.put([])
        self.thread.join(timeout=10)

    def status(self) -> dict:
        return {"running": len(self.engine.running), "waiting": len(self.engine.waiting), "live": self.live,
                "aborted": self.core.aborted}

    def _send(self, msgs):
        self.inbox.put(msgs)

    def _messages(self, block: bool) -> list[tuple]:
        msgs = []
        try:
            msgs += self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            while True:
                msgs += self.inbox.get_nowait()
        except queue.Empty:
            return msgs

    def _run(self):
        while not self.stopped:
            items = self.core.apply(self._messages(block=not self.engine.has_unfinished()))
            items += self.core.step()
            if items:
                try:
                    self.loop.call_soon_threadsafe(self.dispatch, items)
                except RuntimeError:  # the event loop is closed: the server is shutting down
                    return


# ---------------------------------------------------------------------------------------------- in a process
def _engine_main(conn, source, device, engine_kwargs: dict, threads: int) -> None:
    """The engine process: load, report the limits, then loop: read every message waiting (block while idle),
    apply them, step once, send one ("step", items, status) message. Ends when the server hangs up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it stops us
    torch.set_num_threads(threads)
    try:
        tok, _ = load_tokenizer(source)
        engine = Engine(load_model(source, device).eval(), tok, **engine_kwargs)
    except Exception as e:
        conn.send(("failed", e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}"), traceback.format_exc()))
        return
    conn.send(("ready", engine_info(engine)))
    core = EngineLoop(engine)
    while True:
        msgs = []
        try:
            if not engine.has_unfinished():
                conn.poll(None)
            while conn.poll(0):
                msgs += conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        if any(m[0] == "stop" for m in msgs):
            return
        items = core.apply(msgs)
        items += core.step()
        try:
            conn.send(("step", items, {"running": len(engine.running), "waiting": len(engine.waiting),
                                       "aborted": core.aborted}))
        except (EOFError, OSError):
            return


def _picklable(e: Exception) -> bool:
    try:
        mp.reduction.ForkingPickler.dumps(e)
        return True
    except Exception:
        return False


class EngineProcess(Requests):
    """The engine in a child process; its messages come back over a pipe that the event loop watches
    (`add_reader`: no thread of ours in the server's process competes for the GIL). The child runs with this
    process's torch thread count. Construction blocks until the model is loaded (a load error is raised here)."""

    def __init__(self, source, engine_kwargs: dict, max_queue: int = 64, device: str | None = None,
                 start_timeout: float = 600):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_engine_main, name="nanoglm5-engine", daemon=True,
                                   args=(child, source, device, engine_kwargs, torch.get_num_threads()))
        self.process.start()
        child.close()  # our copy: the child's end closes when the child dies, which we then read as EOF
        try:
            if not self.conn.poll(start_timeout):
                raise TimeoutError(f"the engine process did not load the model in {start_timeout:.0f} s")
            msg = self.conn.recv()
        except (EOFError, OSError, TimeoutError) as e:
            self.process.kill()
            raise RuntimeError(f"the engine process died while loading the model (exit code "
                               f"{self.process.exitcode}): {e}") from None
        if msg[0] == "failed":
            self.process.join(timeout=10)
            raise msg[1] from RuntimeError("in the engine process:\n" + msg[2])
        super().__init__(msg[1], max_queue)
        self.engine_status = {"running": 0, "waiting": 0, "aborted": 0}  # as the engine's last message said

    def start(self):
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.conn.fileno(), self._receive)

    def stop(self):
        if self.loop is not None and self.error is None:
            self.loop.remove_reader(self.conn.fileno())
        try:
            self.conn.send([("stop",)])
        except OSError:
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()

    def status(self) -> dict:
        return {**self.engine_status, "live": self.live}

    def _send(self, msgs):
        try:
            self.conn.send(msgs)
        except OSError:  # BrokenPipeError: the engine process is gone
            self._died()
            raise self.error from None

    def _receive(self):
        try:
            while self.conn.poll():
                _, items, self.engine_status = self.conn.recv()
                self.dispatch(items)
        except (EOFError, OSError):
            self._died()

    def _died(self):
        if self.error is not None:
            return
        if self.loop is not None:
            self.loop.remove_reader(self.conn.fileno())
        self.process.join(timeout=1)
        print(f"[server] the engine process is gone (exit code {self.process.exitcode}); answering 503 from now on")
        self.engine_status = {**self.engine_status, "running": 0, "waiting": 0}
        self.fail_all(APIError(503, f"The engine process is gone (exit code {self.process.exitcode}); this server "
                                    "cannot generate until it is restarted"))
