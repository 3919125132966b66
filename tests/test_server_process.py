"""The server with its engine in a process of its own (create_app(engine_process=True), serve.py's default): the
same answers as the in-process engine thread, streaming, a disconnect frees its slot at once, 429 when full, and a
killed engine process leaves the server answering (503 in OpenAI's shape, /health 503). One engine process serves
the whole module (each spawn costs seconds); the kill test comes last."""

import time

import httpx
import pytest
from conftest import LiveServer, make_chat_ckpt
from fastapi.testclient import TestClient
from test_server import MSG, assert_openai_error

from nanoglm5.server import create_app

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """tiny_chat_ckpt's model with room for long replies (a disconnect must land while its request still runs)."""
    return make_chat_ckpt(tmp_path_factory, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def server(ckpt):
    srv = LiveServer(create_app(ckpt, max_batch=4, max_queue=2, default_max_tokens=8, engine_process=True))
    yield srv
    srv.close()


def _health(server):
    return httpx.get(server.url + "/health", timeout=30)


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("id", "created")}


def test_same_answers_as_the_engine_thread(server, ckpt):
    assert server.app.state.engine is None and server.app.state.worker.process.is_alive()
    bodies = [(CHAT, {"messages": MSG, "max_tokens": 8, "temperature": 0}),
              (CHAT, {"messages": MSG, "max_tokens": 8, "temperature": 1.0, "seed": 3, "n": 2, "logprobs": True,
                      "top_logprobs": 2}),
              (COMPLETIONS, {"prompt": ["the cat", "hello"], "max_tokens": 6, "temperature": 0, "logprobs": 1}),
              (COMPLETIONS, {"prompt": "the cat sat", "echo": True, "logprobs": 1, "max_tokens": 0}),
              (COMPLETIONS, {"prompt": "the cat", "max_tokens": 12, "stop": ["a"], "temperature": 0.7, "seed": 1})]
    with TestClient(create_app(ckpt, max_batch=4, default_max_tokens=8)) as thread:
        for path, body in bodies:
            want = thread.post(path, json=body)
            got = httpx.post(server.url + path, json=body, timeout=60)
            assert got.status_code == want.status_code == 200, got.text
            assert _strip(got.json()) == _strip(want.json()), (path, body)
    assert _health(server).json()["live"] == 0


def test_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=MSG, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model="tiny-chat", messages=MSG, max_tokens=12, temperature=0)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_disconnect_frees_the_slot_at_once(server):
    before = _health(server).json()["aborted"]
    body = {"prompt": "the cat", "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + COMPLETIONS, json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert _health(server).json()["running"] == 1
    deadline = time.time() + 10
    while (h := _health(server).json())["running"] and time.time() < deadline:
        time.sleep(0.02)
    assert (h["running"], h["waiting"], h["live"]) == (0, 0, 0), h
    assert h["aborted"] == before + 1  # dropped by the engine while it ran, not run to its end


def test_overload_is_429(server):
    r = httpx.post(server.url + COMPLETIONS, json={"prompt": "the cat", "max_tokens": 2, "n": 7}, timeout=60)
    assert_openai_error(r, 429, param=None, code="rate_limit_exceeded")  # 7 choices > max_batch 4 + max_queue 2
    assert httpx.post(server.url + COMPLETIONS, json={"prompt": "the cat", "max_tokens": 2}, timeout=60).status_code == 200


def test_a_killed_engine_process_leaves_the_server_answering(server):
    """Last in the module: it kills the shared engine process."""
    body = {"prompt": "the cat", "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + COMPLETIONS, json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        server.app.state.worker.process.kill()
        rest = "\n".join(lines)  # the stream ends with an error chunk, then [DONE]
    assert '"type":"server_error"' in rest and "engine process is gone" in rest and rest.strip().endswith("[DONE]")
    err = assert_openai_error(httpx.post(server.url + CHAT, json={"messages": MSG, "max_tokens": 2}, timeout=60), 503,
                              param=None, code=None)
    assert "engine process is gone" in err["message"]
    h = _health(server)
    assert h.status_code == 503 and h.json()["error"]["type"] == "server_error"
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 200  # the HTTP process is up
