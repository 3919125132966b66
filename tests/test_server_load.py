"""The server under load and abuse, on loopback only: the real app under uvicorn in a thread (as test_server.py
runs it), 1,000 requests at 16-way concurrency from the official `openai` client with no error, then 50
malformed requests that must each get a 4xx in OpenAI's error shape (49 of them; the 50th is a client that
disconnects mid-stream, which gets no response: its engine slot must be freed), and the server must still
answer a normal request afterwards. Prints requests/s and p50/p99 latency (run with -s to see them)."""

import asyncio
import json
import time

import httpx
import pytest
import torch
from conftest import LiveServer
from test_server import MSG, assert_openai_error

from nanoglm5.server import create_app

pytestmark = pytest.mark.slow

N_REQUESTS, CONCURRENCY, MAX_TOKENS = 1000, 16, 4
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def server(tiny_chat_ckpt):
    path = tiny_chat_ckpt
    # max_batch + max_queue >= CONCURRENCY: a well-behaved client at this concurrency is never refused (429)
    srv = LiveServer(create_app(path, max_batch=CONCURRENCY, max_queue=CONCURRENCY, default_max_tokens=8))
    yield srv
    srv.close()


def _health(server):
    return httpx.get(server.url + "/health", timeout=30).json()


def test_1000_requests_at_16_way_concurrency_without_error(server):
    from openai import AsyncOpenAI

    eng = server.app.state.engine
    batch_sizes, step = [], eng.step

    def spy():  # the batch each engine step decodes: concurrent requests must share it
        batch_sizes.append(len(eng.running) + len(eng.waiting))
        return step()

    eng.step = spy
    latencies, errors = [], []

    async def run():
        client = AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(i):
            async with sem:
                t0 = time.perf_counter()
                try:
                    if i % 4 == 3:  # a mix: chat and legacy completions, plain and streamed
                        r = await client.completions.create(model="tiny-chat", prompt=f"the cat {i}",
                                                            max_tokens=MAX_TOKENS, temperature=1.0, seed=i)
                        assert r.choices[0].finish_reason in ("stop", "length")
                    elif i % 4 == 2:
                        stream = await client.chat.completions.create(model="tiny-chat", messages=MSG, stream=True,
                                                                      max_tokens=MAX_TOKENS, temperature=0)
                        chunks = [c async for c in stream]
                        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
                    else:
                        r = await client.chat.completions.create(model="tiny-chat", messages=MSG, seed=i,
                                                                 max_tokens=MAX_TOKENS, temperature=0.7)
                        assert r.choices[0].finish_reason in ("stop", "length")
                        assert 1 <= r.usage.completion_tokens <= MAX_TOKENS
                except Exception as e:  # counted, not raised: the test reports how many and which
                    errors.append(f"request {i}: {type(e).__name__}: {e}")
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(N_REQUESTS)))
        wall = time.perf_counter() - t0
        await client.close()
        return wall

    try:
        wall = asyncio.run(run())
    finally:
        eng.step = step
    lat = torch.tensor(sorted(latencies))
    p50, p99 = (float(torch.quantile(lat, q)) for q in (0.5, 0.99))
    mean_batch = sum(batch_sizes) / max(len(batch_sizes), 1)
    print(f"\nload: {N_REQUESTS} requests, {CONCURRENCY}-way concurrency, max_tokens={MAX_TOKENS}: "
          f"{wall:.1f}s wall, {N_REQUESTS / wall:.1f} requests/s, latency p50 {p50 * 1e3:.0f} ms, "
          f"p99 {p99 * 1e3:.0f} ms, max {float(lat[-1]) * 1e3:.0f} ms; {len(batch_sizes)} engine steps, "
          f"mean batch {mean_batch:.1f} sequences, {len(errors)} errors")
    assert not errors, errors[:5]
    assert len(latencies) == N_REQUESTS
    assert max(batch_sizes) > 1  # the concurrent requests were decoded together
    h = _health(server)
    assert (h["running"], h["waiting"], h["live"]) == (0, 0, 0), h


LONG = "the cat sat on the mat " * 40  # ~240 tokens: beyond max_seq_len=96
OK = {"model": "tiny-chat", "messages": MSG, "max_tokens": 2}

# 49 malformed requests: (path, JSON body or raw bytes, expected status, expected param (... = any))
MALFORMED = [
    # not JSON, or not a JSON object
    (CHAT, b"{not json", 400, None),
    (CHAT, b'{"messages": [', 400, None),
    (CHAT, b"", 400, None),
    (CHAT, b"null", 400, None),
    (CHAT, b"[1, 2, 3]", 400, None),
    (CHAT, b'"hello"', 400, None),
    (COMPLETIONS, b"\xff\xfe\x00garbage", 400, None),
    # wrong types
    (CHAT, {**OK, "max_tokens": "5"}, 400, "max_tokens"),
    (CHAT, {**OK, "max_tokens": 2.5}, 400, "max_tokens"),
    (CHAT, {**OK, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {**OK, "messages": "hello"}, 400, "messages"),
    (CHAT, {**OK, "messages": {"role": "user"}}, 400, "messages"),
    (CHAT, {**OK, "stream": "yes"}, 400, "stream"),
    (CHAT, {**OK, "n": "2"}, 400, "n"),
    (CHAT, {**OK, "stop": 5}, 400, "stop"),
    (CHAT, {**OK, "top_p": [0.5]}, 400, "top_p"),
    (CHAT, {**OK, "seed": 1.5}, 400, "seed"),
    (CHAT, {**OK, "model": 5}, 400, "model"),
    (CHAT, {**OK, "logprobs": "yes"}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": 5, "max_tokens": 2}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [1, "a"], "max_tokens": 2}, 400, "prompt"),
    # unknown model
    (CHAT, {**OK, "model": "gpt-4"}, 404, "model"),
    (CHAT, {**OK, "model": ""}, 404, "model"),
    (COMPLETIONS, {"model": "davinci", "prompt": "x", "max_tokens": 2}, 404, "model"),
    # negative or huge max_tokens
    (CHAT, {**OK, "max_tokens": -1}, 400, "max_tokens"),
    (CHAT, {**OK, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {**OK, "max_tokens": 10**9}, 400, "max_tokens"),
    (CHAT, {**OK, "max_tokens": 2**80}, 400, "max_tokens"),
    (CHAT, {**OK, "max_completion_tokens": -5}, 400, "max_completion_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    # empty or invalid messages, unknown roles
    (CHAT, {"model": "tiny-chat", "max_tokens": 2}, 400, "messages"),
    (CHAT, {**OK, "messages": []}, 400, "messages"),
    (CHAT, {**OK, "messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    (CHAT, {**OK, "messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content"),
    (CHAT, {**OK, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content"),
    (CHAT, {**OK, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    (CHAT, {**OK, "messages": MSG + [{"role": "function", "content": "x"}]}, 400, "messages[2].role"),
    # oversize prompts
    (CHAT, {**OK, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    (CHAT, {**OK, "messages": [{"role": "user", "content": "x" * 200_000}]}, 400, "messages"),
    (COMPLETIONS, {"prompt": [1] * 5000, "max_tokens": 2}, 400, "prompt"),
    # other out-of-range values
    (CHAT, {**OK, "n": 0}, 400, "n"),
    (CHAT, {**OK, "n": 1000}, 400, "n"),
    (CHAT, {**OK, "temperature": -1}, 400, "temperature"),
    (CHAT, {**OK, "top_p": 0}, 400, "top_p"),
    (CHAT, {**OK, "seed": 2**70}, 400, "seed"),
    (COMPLETIONS, {"prompt": [10**6], "max_tokens": 2}, 400, "prompt[0]"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 2, "echo": True, "stream": True}, 400, "echo"),
    # wrong route or method
    ("/v1/chat/completion", OK, 404, None),
    ("GET " + CHAT, None, 405, None),
]


def test_50_malformed_requests_are_4xx_in_openai_shape_and_the_server_survives(server):
    assert len(MALFORMED) == 49  # + the disconnecting client below = 50
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for path, body, status, param in MALFORMED:
            if path.startswith("GET "):
                r = c.get(path[4:])
            elif isinstance(body, bytes):
                r = c.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = c.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (path, body if not isinstance(body, dict) else list(body), r.text)
            assert_openai_error(r, status, param=param)

    # the 50th: a client that reads one chunk of a stream and hangs up; its slot must come back
    eng = server.app.state.engine
    aborted, abort, step = [], eng.abort, eng.step
    eng.abort = lambda rid: aborted.append(abort(rid)) or aborted[-1]
    # 10 ms per engine step: the 70 tokens cannot all be decoded before the client has read its first chunk
    # (the engine thread otherwise can finish the reply first on a fast or loaded machine, and nothing is left to abort)
    eng.step = lambda: time.sleep(0.01) or step()
    try:
        body = {"messages": MSG, "max_tokens": 70, "stream": True, "temperature": 0}
        with httpx.stream("POST", server.url + CHAT, json=body, timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_raw())  # one chunk, then close mid-stream
            # the first chunk (the role) can be written before the engine thread has taken the request: wait for it
            held = time.time() + 10
            while time.time() < held and len(eng.running) + len(eng.waiting) == 0:
                time.sleep(0.005)
            assert len(eng.running) + len(eng.waiting) == 1
        deadline = time.time() + 30
        while time.time() < deadline and any(_health(server)[k] for k in ("running", "waiting", "live")):
            time.sleep(0.05)
    finally:
        eng.abort, eng.step = abort, step
    h = _health(server)
    assert (h["running"], h["waiting"], h["live"]) == (0, 0, 0), h
    assert True in aborted  # freed by the abort, not by running to its end
    assert sorted(eng.free_slots) == list(range(eng.max_batch))

    # and it still answers a normal request
    r = httpx.post(server.url + CHAT, json=OK, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
