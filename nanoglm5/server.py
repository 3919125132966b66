"""OpenAI-compatible HTTP server around engine.py: /v1/chat/completions, /v1/completions, /v1/models, /health,
and at `/` a chat page (chat.html: one self-contained file that talks to the same endpoints).

Holds, top to bottom: text assembly (incremental detokenization in constant work per token beside the readable
whole-text version, stop strings cut with the engine's `find_stop`, streaming hold-back); `create_app`, the
FastAPI app; and the request → SamplingParams validation and the response assembly (plain and SSE streaming).
The OpenAI schemas, error shape and log-prob objects are in api.py; what owns and steps the engine, a thread of
this process or an engine process of its own (`engine_process=True`, serve.py's default), is engine_core.py.

Concurrency: every request only tokenizes, submits to the engine core and awaits its queue, so concurrent
requests share the engine's running batch (continuous batching). Beyond max_batch running sequences
requests wait in the engine's queue; beyond max_queue waiting ones the server answers 429 at once.
A client that disconnects (mid-stream or while waiting) has its requests aborted, freeing their slots.
A stream sends what has arrived since its last write in one write (one chunk per token, several chunks per
write when the client lags). A dead engine process: 503 for every request and for /health.

Simplified: no auth, no presence/frequency penalties or logit_bias (accepted, ignored), no `echo` with streaming,
no tools.
"""

from __future__ import annotations

import asyncio
import codecs
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from nanoglm5.api import (
    MAX_N,
    MAX_TOP_LOGPROBS,
    APIError,
    ChatRequest,
    CompletionRequest,
    add_error_handlers,
    chat_logprob,
    completion_logprobs,
    param_path,
    range_error,
    to_json,
)
from nanoglm5.data.tasks import agent_tasks, code_tasks, math_tasks
from nanoglm5.engine import Engine, SamplingParams, find_stop
from nanoglm5.engine_core import EngineProcess, EngineWorker, load_model, load_tokenizer

CHAT_PAGE = Path(__file__).with_name("chat.html")  # served at /: no build step, no CDN


def task_kinds() -> list[dict]:
    """The task kinds the model was trained on, for the chat page (GET /chat/tasks): each environment's system prompt,
    the one its SFT demonstrations and RL prompts carry (nanoglm5/data/tasks.py), and one held-out prompt to try.
    Without its system prompt the model answers a task as free text: it was never trained to answer one that way."""
    kinds, seen = [], set()
    for name, make in (("code", code_tasks), ("math", math_tasks), ("agent", agent_tasks)):  # (the RL envs' tasks)
        messages = make(1, 0, "eval")[0].messages
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        if system and system not in seen:
            seen.add(system)
            kinds.append({"name": name, "system": system, "example": messages[-1]["content"]})
    return kinds
GREEDY_BELOW = 1e-5  # a temperature under this is greedy decoding (vLLM's _SAMPLING_EPS)


# ---------------------------------------------------------------------------------------------- text assembly
class FullTextState:
    """Detokenization of one choice, the readable version: decodes all tokens so far (byte-level BPE can split a
    character across tokens), cuts at the first stop string, and holds back a tail that could still grow into a
    stop string or is an unfinished UTF-8 character, so streamed deltas never need retracting. Work per token
    grows with the reply (quadratic in all); TextState emits the same deltas in constant work per token."""

    def __init__(self, tokenizer, stop: list[str], stop_ids: set[int]):
        self.tok, self.stop, self.stop_ids = tokenizer, stop, stop_ids
        self.ids: list[int] = []
        self.sent = 0  # characters already emitted
        self.text, self.stopped = "", False

    def add(self, token_id: int, final: bool) -> str:
        """Add one token; return the new text that is safe to emit."""
        if self.stopped:
            return ""
        if token_id not in self.stop_ids:
            self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        cut = find_stop(text, self.stop)
        if cut >= 0:
            text, self.stopped, final = text[:cut], True, True
        self.text = text
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):
                safe -= 1
            for s in self.stop:  # longest suffix of text that is a prefix of a stop string
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        safe = min(safe, len(text) - k)
                        break
        delta = text[self.sent : max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        return delta


class TextState:
    """FullTextState's deltas in constant work per token (vLLM's incremental detokenization, done on bytes): each
    token's bytes (tokenizer.token_bytes) go through an incremental UTF-8 decoder, where the bytes of an
    unfinished character wait (FullTextState sees them as one trailing U+FFFD: so does this, virtually); the
    stop strings are searched for only in the window where a new one can be, the last longest-stop - 1
    characters and the new ones, and the held-back tail lies in that window too. The text is kept in pieces."""

    def __init__(self, tokenizer, stop: list[str], stop_ids: set[int]):
        self.bytes_of, self.stop, self.stop_ids = tokenizer.token_bytes, stop, stop_ids
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # maximal-subpart U+FFFD, as decode()
        self.keep = max([len(s) - 1 for s in stop] + [1])  # window characters before the new ones
        self.pieces: list[str] = []
        self.n = self.sent = 0  # characters decoded / already emitted
        self.tail, self.stopped = "", False  # tail: the text's last `keep` characters

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, token_id: int, final: bool) -> str:
        """Add one token; return the new text that is safe to emit."""
        if self.stopped:
            return ""
        piece = self.utf8.decode(b"" if token_id in self.stop_ids else self.bytes_of(token_id), final=final)
        start = self.n - len(self.tail)  # where the window starts in the text
        window = self.tail + piece
        self.pieces.append(piece)
        self.n += len(piece)
        seen = window + ("\ufffd" if self.utf8.getstate()[0] else "")  # what FullTextState's decode would end with
        cut = find_stop(seen, self.stop)
        if cut >= 0:
            cut = min(cut, len(window))
            self.pieces, self.n = [self.text[:start + cut]], start + cut
            window = seen = window[:cut]
            self.stopped, final = True, True
        safe = start + len(seen)
        if not final:
            if seen.endswith("\ufffd"):
                safe -= 1
            for s in self.stop:  # longest suffix of the text that is a prefix of a stop string
                for k in range(min(len(s) - 1, len(seen)), 0, -1):
                    if seen.endswith(s[:k]):
                        safe = min(safe, start + len(seen) - k)
                        break
        hi = max(safe, self.sent)
        delta = window[self.sent - start : hi - start]
        self.sent, self.tail = hi, window[-self.keep:]
        return delta


# ---------------------------------------------------------------------------------------------- the app
@dataclass
class ServerLimits:
    max_seq_len: int
    default_max_tokens: int  # chat requests without max_tokens: min(this, what the context leaves)
    vocab_size: int
    max_tokens_in_flight: int  # the engine's cache positions: it refuses a request with prompt + max_tokens above this


def create_app(source, *, max_batch: int = 16, max_tokens_in_flight: int = 8192, max_seq_len: int | None = None,
               max_queue: int = 64, model_name: str | None = None, default_max_tokens: int = 256,
               device: str | None = None, engine_options: dict | None = None, engine_process: bool = False) -> FastAPI:
    """source: a checkpoint directory (config.json, model.safetensors, tokenizer.json) or (model, tokenizer).
    engine_options: more Engine arguments (speculative="mtp", dtype=torch.bfloat16, graphs=...).
    engine_process: step the engine in a process of its own (engine_core.EngineProcess; app.state.engine is then
    None) instead of a thread of this one (EngineWorker, the default: fast to start, the engine at hand). The
    process is started with `spawn`, which imports the calling script again: call this under
    `if __name__ == "__main__":` in a script (serve.py does; a notebook needs nothing)."""
    tok, default_name = load_tokenizer(source)
    kwargs = dict(max_batch=max_batch, max_tokens_in_flight=max_tokens_in_flight, max_seq_len=max_seq_len,
                  device=device, isolate_errors=True, **(engine_options or {}))  # a request never fails its neighbours
    if engine_process:
        engine, worker = None, EngineProcess(source, kwargs, max_queue, device)
    else:
        engine = Engine(load_model(source, device).eval(), tok, **kwargs)
        worker = EngineWorker(engine, max_queue)
    info = worker.info
    name = model_name or default_name
    limits = ServerLimits(info["max_seq_len"], default_max_tokens, info["vocab_size"], info["max_tokens_in_flight"])
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="nanoGLM5", lifespan=lifespan)
    app.state.engine, app.state.worker, app.state.model_name = engine, worker, name
    add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return CHAT_PAGE.read_text(encoding="utf-8")

    kinds = task_kinds()

    @app.get("/chat/tasks", include_in_schema=False)
    async def chat_tasks():  # the chat page's task menu: system prompts and examples of the trained task kinds
        return {"tasks": kinds}

    @app.get("/health")
    async def health():
        # live: requests the worker holds (submitted, not yet finished or aborted); running/waiting: the engine's;
        # aborted: requests the engine dropped unfinished because their client went away
        if worker.error is not None:
            return JSONResponse({"status": "error", **worker.error.body()}, status_code=worker.error.status)
        return {"status": "ok", **worker.status()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "nanoglm5",
                                            "root": name, "parent": None, "max_model_len": limits.max_seq_len}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check_model(body.model, name)
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
            role = {"developer": "system", "tool": "observation"}.get(m.role, m.role)
            messages.append({"role": role, "content": content or ""})
        prompt = tok.render_prompt(messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        n_top = _range("top_logprobs", body.top_logprobs or 0, 0, MAX_TOP_LOGPROBS)
        if n_top and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        logprobs = max(n_top, 1) if body.logprobs else 0
        params = _params(body, [prompt], max_tokens, limits, logprobs, "messages", list(tok.stop_ids),
                         "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
        return await _respond(request, worker, tok, body, [prompt], params, name, chat=True, n_top=n_top)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model, name)
        if body.echo and body.stream:
            raise APIError(400, "echo with stream: true is not supported by this server; send stream: false",
                           "echo", "unsupported_value")
        p = body.prompt
        if isinstance(p, str):
            prompts = [tok.encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = [tok.encode(x) if isinstance(x, str) else list(x) for x in p]
        if not prompts:
            raise APIError(400, "Invalid 'prompt': empty array. Expected at least one prompt.", "prompt", "empty_array")
        n_top = _range("logprobs", body.logprobs or 0, 0, MAX_TOP_LOGPROBS)
        max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's legacy default
        # echo + logprobs: the prompt's own log-probs (log-likelihood scoring); max_tokens 0 scores without
        # generating (the engine samples one token, which is dropped)
        score = n_top if body.echo and body.logprobs is not None else None
        params = _params(body, prompts, max(max_tokens, 1) if body.echo else max_tokens, limits, n_top, "prompt",
                         [tok.eos_id], prompt_logprobs=score)
        return await _respond(request, worker, tok, body, prompts, params, name, chat=False,
                              n_top=n_top if body.logprobs is not None else None, echo=body.echo,
                              drop=body.echo and max_tokens == 0)

    return app


def _check_model(requested, name):
    if requested is not None and requested != name:
        raise APIError(404, f"The model `{requested}` does not exist; this server serves `{name}` (GET /v1/models)",
                       "model", "model_not_found")


def _range(param, value, lo, hi):
    if not lo <= value <= hi:
        raise range_error(param, value, lo, hi)
    return value


def _params(body, prompts, max_tokens, limits: ServerLimits, logprobs, prompt_param, stop_ids,
            max_tokens_param: str = "max_tokens", prompt_logprobs: int | None = None) -> list[SamplingParams]:
    """Validate the sampling fields against the limits; one SamplingParams per (prompt, choice)."""
    _range("n", body.n, 1, MAX_N)
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0 < top_p <= 1:
        raise APIError(400, f"Invalid 'top_p': {top_p} is out of range: it must be in (0, 1]", "top_p",
                       "decimal_above_max_value" if top_p > 1 else "decimal_below_min_value" if top_p <= 0
                       else "invalid_value")
    temperature = _range("temperature", 1.0 if body.temperature is None else body.temperature, 0, 2)
    if temperature < GREEDY_BELOW:  # logits / 2.4e-68 overflow to inf: such a temperature means greedy (vLLM)
        temperature = 0.0
    top_k = _range("top_k", body.top_k or 0, 0, 1 << 30)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop):
        raise APIError(400, "stop strings must be non-empty", "stop", "invalid_value")
    if body.seed is not None:  # torch.Generator takes a signed or unsigned 64-bit seed; choice i uses seed + i
        _range("seed", body.seed, -(1 << 63), (1 << 63) - MAX_N)
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise APIError(400, "the prompt is empty", prompt_param, "invalid_value")
    for i, p in enumerate(prompts):
        for j, t in enumerate(p):
            if not 0 <= t < limits.vocab_size:
                where = param_path([prompt_param] + ([i] if len(prompts) > 1 else []) + [j])
                raise APIError(400, f"Invalid '{where}': token id {t} is outside the vocabulary [0, "
                                    f"{limits.vocab_size})", where, "invalid_value")
    context = min(limits.max_seq_len, limits.max_tokens_in_flight)
    what = (f"max_seq_len={limits.max_seq_len}" if context == limits.max_seq_len else
            f"max_tokens_in_flight={limits.max_tokens_in_flight}")
    if longest >= context:
        raise APIError(400, f"This model's maximum context length is {what} tokens (prompt + completion), but the "
                            f"prompt has {longest} tokens; shorten the prompt", prompt_param, "context_length_exceeded")
    room = context - longest
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    if max_tokens < 1 or max_tokens > room:
        raise APIError(400, f"Invalid '{max_tokens_param}': {max_tokens} is out of range: the prompt has {longest} "
                            f"tokens and the context is {what}, so {max_tokens_param} must be between 1 and {room}",
                       max_tokens_param, "integer_below_min_value" if max_tokens < 1 else "invalid_value")
    out = []
    for _ in prompts:
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i  # n choices from one seed must differ
            out.append(SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                      seed=seed, stop=stop, stop_token_ids=stop_ids + list(body.stop_token_ids or []),
                                      logprobs=logprobs, prompt_logprobs=prompt_logprobs))
    return out


def _echo(tok, prompt: list[int], comp, choice: dict, n_top, drop: bool) -> dict:
    """A completions choice with `echo`: the prompt's text before the completion's (none when max_tokens is 0),
    and, with logprobs, the prompt tokens' entries (the first token's log-prob is null, as OpenAI's) before the
    completion's."""
    text = tok.decode(prompt)
    out = {"text": text + ("" if drop else choice["text"]), "finish_reason": "length" if drop else
           choice["finish_reason"]}
    if n_top is not None:
        lp = completion_logprobs(tok, list(zip(prompt, comp.prompt_logprobs)), n_top)
        gen = choice["logprobs"] if not drop and choice["logprobs"] else None
        if gen is not None:
            for k in ("tokens", "token_logprobs", "top_logprobs"):
                lp[k] += gen[k]
            lp["text_offset"] += [o + len(text) for o in gen["text_offset"]]
        out["logprobs"] = lp
    return out


async def _events(request: Request, q: asyncio.Queue, poll: bool = True):
    """Items of one HTTP request's queue; with `poll`, raises ConnectionError when the client went away (checked
    each second without an item). A stream does not poll: Starlette watches its client and cancels it."""
    while True:
        if not poll or not q.empty():
            yield await q.get()
            continue
        try:
            yield await asyncio.wait_for(q.get(), timeout=1.0)  # a task per call: only where it is needed
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ConnectionError("client disconnected") from None


async def _respond(request, worker, tok, body, prompts, params, name, chat: bool, n_top, echo=False, drop=False):
    flat_prompts = [p for p in prompts for _ in range(body.n)]
    rids, q = worker.submit(flat_prompts, params)
    created, rid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    obj = "chat.completion" if chat else "text_completion"
    stop_ids = set(params[0].stop_token_ids)
    states = [TextState(tok, p.stop, stop_ids) for p in params]
    want_logprobs = params[0].logprobs > 0
    usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0, "total_tokens": 0}

    def finish_usage():
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return usage

    if not body.stream:
        results: dict[int, dict] = {}
        logs = [[] for _ in params]
        try:
            async for idx, kind, *rest in _events(request, q):
                if kind == "error":
                    worker.abort(rids)
                    raise rest[0]
                t, _, top, comp = rest
                if want_logprobs and t not in stop_ids and not states[idx].stopped:
                    logs[idx].append((t, top))
                states[idx].add(t, final=comp is not None)
                if comp is not None:
                    usage["completion_tokens"] += 0 if drop else len(comp.token_ids)
                    results[idx] = {"finish_reason": comp.finish_reason, "completion": comp}
                    if len(results) == len(params):
                        break
        except ConnectionError:  # nobody is listening any more: free the slots
            worker.abort(rids)
            return JSONResponse(APIError(499, "client disconnected", code="client_disconnected").body(), status_code=499)
        except (asyncio.CancelledError, Exception):  # the handler's own failure (a 500): free the slots too
            worker.abort(rids)
            raise
        choices = []
        for i, st in enumerate(states):
            c = {"index": i, "finish_reason": results[i]["finish_reason"], "logprobs": None}
            if chat:
                c["message"] = {"role": "assistant", "content": st.text}
                if want_logprobs:
                    c["logprobs"] = {"content": [chat_logprob(tok, t, top, n_top) for t, top in logs[i]]}
            else:
                c["text"] = st.text
                if want_logprobs:
                    c["logprobs"] = completion_logprobs(tok, logs[i], n_top)
                if echo:
                    c.update(_echo(tok, flat_prompts[i], results[i]["completion"], c, n_top, drop))
            choices.append(c)
        return {"id": rid, "object": obj, "created": created, "model": name, "choices": choices, "usage": finish_usage()}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk_obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, usage_=None):
        c = {"id": rid, "object": chunk_obj, "created": created, "model": name, "choices": choices}
        if include_usage:
            c["usage"] = usage_
        return f"data: {to_json(c)}\n\n"

    async def stream():
        done = 0
        try:
            if chat:  # first delta carries the role (vLLM, OpenAI)
                yield "".join(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}]) for i in range(len(params)))
            out = []  # chunks not yet written: one write for all that has arrived
            async for idx, kind, *rest in _events(request, q, poll=False):
                if kind == "error":
                    out.append(f"data: {to_json(rest[0].body())}\n\n")  # after the 200 header, errors are a chunk
                    break
                t, _, top, comp = rest
                was_stopped = states[idx].stopped
                delta = states[idx].add(t, final=comp is not None)
                lp = None
                if want_logprobs and t not in stop_ids and not was_stopped:
                    lp = {"content": [chat_logprob(tok, t, top, n_top)]} if chat else \
                        completion_logprobs(tok, [(t, top)], n_top)
                if delta or lp is not None:
                    c = {"index": idx, "logprobs": lp, "finish_reason": None}
                    c.update({"delta": {"content": delta}} if chat else {"text": delta})
                    out.append(chunk([c]))
                if comp is not None:
                    usage["completion_tokens"] += len(comp.token_ids)
                    c = {"index": idx, "logprobs": None, "finish_reason": comp.finish_reason}
                    c.update({"delta": {}} if chat else {"text": ""})
                    out.append(chunk([c]))
                    done += 1
                    if done == len(params):
                        break
                if out and q.empty():
                    yield "".join(out)
                    out.clear()
            if out:
                yield "".join(out)
            if include_usage:
                yield chunk([], finish_usage())
            yield "data: [DONE]\n\n"
        except ConnectionError:  # nobody is listening any more
            return
        except Exception as e:  # after the 200 header a failure can only be reported as an error chunk
            traceback.print_exc()
            err = APIError(500, f"The server had an error while processing your request: {type(e).__name__}: {e}")
            yield f"data: {to_json(err.body())}\n\n"
        finally:
            if done < len(params):  # client gone (or error): free the slots
                worker.abort(rids)

    return StreamingResponse(stream(), media_type="text/event-stream")
