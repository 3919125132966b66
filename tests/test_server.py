"""The OpenAI-compatible server, run in-process under uvicorn on a loopback port: the official `openai` client
(non-streaming and streaming), SSE format, every bad-input case, disconnects, overload, shared batching."""

import json
import random
import threading
import time

import httpx
import pytest
import torch
from conftest import LiveServer
from fastapi.testclient import TestClient

from nanoglm5.checkpoint import load_hf, save_hf
from nanoglm5.config import ModelConfig
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.engine import Engine, SamplingParams
from nanoglm5.int4 import Int4Experts
from nanoglm5.model import GLM5
from nanoglm5.quant import convert_checkpoint
from nanoglm5.server import FullTextState, TextState, create_app


@pytest.fixture(scope="module")
def ckpt(tiny_chat_ckpt):
    return tiny_chat_ckpt


@pytest.fixture(scope="module")
def server(ckpt):
    srv = LiveServer(create_app(ckpt, max_batch=4, max_queue=8, default_max_tokens=8))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


MSG = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello model"}]


def test_openai_client_chat_matches_engine(server, client):
    r = client.chat.completions.create(model="tiny-chat", messages=MSG, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the same greedy tokens as the engine on the rendered prompt
    eng = server.app.state.engine
    tok = server.app.state.worker.engine.tokenizer
    prompt = tok.render_prompt(MSG)
    ref = Engine(eng.model, tok).generate([prompt], SamplingParams(max_tokens=6, temperature=0,
                                                                   stop_token_ids=tok.stop_ids))[0]
    ids = [t for t in ref.token_ids if t not in tok.stop_ids]
    assert r.choices[0].message.content == tok.decode(ids)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(ref.token_ids)


def test_openai_client_streaming(client):
    stream = client.chat.completions.create(model="tiny-chat", messages=MSG, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model="tiny-chat", messages=MSG, max_tokens=6, temperature=0)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_openai_client_completions_models_n_seed_logprobs(client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    kw = dict(model="tiny-chat", prompt="the cat", max_tokens=5, n=2, seed=7, temperature=1.0, logprobs=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len(a.choices) == 2 and a.usage.completion_tokens <= 10
    lp = a.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) and all(len(t) <= 3 for t in lp.top_logprobs)
    r = client.chat.completions.create(model="tiny-chat", messages=MSG, max_completion_tokens=4, logprobs=True,
                                       top_logprobs=3, temperature=0)
    content = r.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy picks the top token
    stream = client.completions.create(model="tiny-chat", prompt=[[1, 2, 3], [4, 5]], max_tokens=3, stream=True)
    texts = {}
    for c in stream:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert sorted(texts) == [0, 1]


def test_sse_format(server):
    body = {"model": "tiny-chat", "messages": MSG, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    datas = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all(d["object"] == "chat.completion.chunk" for d in datas)
    assert datas[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert datas[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert datas[-1]["choices"] == [] and datas[-1]["usage"]["completion_tokens"] >= 1
    assert len({d["id"] for d in datas}) == 1


def assert_openai_error(r, status, param=..., code=...):
    """r is an HTTP response in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}, with
    OpenAI's type for its status (invalid_request_error for 4xx, requests for 429, server_error for 5xx)."""
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("requests" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"), err
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)  # OpenAI's codes are strings, never the status
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err


def _post(server, path, body=None, content=None, status=400, param=..., code=...):
    kw = {"content": content, "headers": {"content-type": "application/json"}} if content is not None else {"json": body}
    return assert_openai_error(httpx.post(server.url + path, timeout=60, **kw), status, param, code)


@pytest.mark.parametrize("body,content,param,code", [
    (None, "{not json", None, None),
    (None, '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature", "invalid_value"),
    ([1, 2], None, None, "invalid_type"),
    ({"model": "tiny-chat"}, None, "messages", "missing_required_parameter"),
    ({"model": "tiny-chat", "messages": []}, None, "messages", "empty_array"),
    ({"model": "tiny-chat", "messages": [{"role": "wizard", "content": "hi"}]}, None, "messages[0].role", "invalid_value"),
    ({"model": "tiny-chat", "messages": MSG + [5]}, None, "messages[2]", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None, "messages[0].content", "invalid_value"),
    ({"model": "tiny-chat", "messages": MSG, "max_tokens": "5"}, None, "max_tokens", "invalid_type"),
    ({"model": "tiny-chat", "messages": MSG, "max_tokens": 1.5}, None, "max_tokens", "invalid_type"),
    ({"model": "tiny-chat", "messages": MSG, "temperature": "hot"}, None, "temperature", "invalid_type"),
    ({"model": "tiny-chat", "messages": "hello"}, None, "messages", "invalid_type"),
    ({"model": "tiny-chat", "messages": MSG, "stream": "yes"}, None, "stream", "invalid_type"),
    ({"model": "tiny-chat", "messages": MSG, "stop": 5}, None, "stop", "invalid_type"),
    ({"messages": MSG, "stream_options": {"include_usage": "y"}}, None, "stream_options.include_usage", "invalid_type"),
    ({"messages": MSG, "seed": 1 << 70}, None, "seed", "integer_above_max_value"),
])
def test_malformed_requests_are_400_in_openai_shape(server, body, content, param, code):
    err = _post(server, "/v1/chat/completions", body, content, param=param, code=code)
    if content == "{not json":
        assert "not valid JSON" in err["message"]


def test_limits_are_400_with_the_limit_named(server):
    chat = "/v1/chat/completions"
    long = {"role": "user", "content": "the cat sat on the mat " * 40}
    err = _post(server, chat, {"messages": [long]}, param="messages", code="context_length_exceeded")
    assert "max_seq_len=96" in err["message"]
    err = _post(server, chat, {"messages": MSG, "max_tokens": 500}, param="max_tokens", code="invalid_value")
    assert "max_seq_len=96" in err["message"]
    _post(server, chat, {"messages": MSG, "max_tokens": -3}, param="max_tokens", code="integer_below_min_value")
    assert "between 1 and 16" in _post(server, chat, {"messages": MSG, "n": 17}, param="n",
                                       code="integer_above_max_value")["message"]
    assert "between 1 and 16" in _post(server, chat, {"messages": MSG, "n": 0}, param="n",
                                       code="integer_below_min_value")["message"]
    assert "(0, 1]" in _post(server, chat, {"messages": MSG, "top_p": 1.5}, param="top_p",
                             code="decimal_above_max_value")["message"]
    _post(server, chat, {"messages": MSG, "top_logprobs": 2}, param="top_logprobs", code="invalid_value")
    _post(server, "/v1/completions", {"prompt": [999999]}, param="prompt[0]", code="invalid_value")  # not in vocab
    _post(server, "/v1/completions", {"prompt": [[1, 2], [3, -1]]}, param="prompt[1][1]", code="invalid_value")
    _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 0}, param="max_tokens",
          code="integer_below_min_value")
    _post(server, "/v1/completions", {"prompt": "x", "echo": True, "stream": True}, param="echo", code="unsupported_value")
    _post(server, "/v1/completions", {"prompt": []}, param="prompt", code="empty_array")
    err = _post(server, chat, {"model": "gpt-4", "messages": MSG}, status=404, param="model", code="model_not_found")
    assert "gpt-4" in err["message"]
    err = _post(server, "/v1/nothing", {}, status=404, param=None, code=None)
    assert err["message"] == "Invalid URL (POST /v1/nothing)"
    assert_openai_error(httpx.get(server.url + chat), 405, param=None, code=None)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_openai_client_sees_the_error_fields(client):
    """The official client parses the shape: its exception classes carry type, param and code."""
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=MSG, max_tokens=2)
    assert (e.value.type, e.value.param, e.value.code) == ("invalid_request_error", "model", "model_not_found")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-chat", messages=MSG, max_tokens=10_000)
    assert (e.value.type, e.value.param, e.value.code) == ("invalid_request_error", "max_tokens", "invalid_value")


def test_server_errors_are_500_server_error_and_the_worker_survives(server):
    eng = server.app.state.engine
    body = {"messages": MSG, "max_tokens": 3, "temperature": 0}
    step = eng.step

    def broken():
        raise RuntimeError("injected engine failure")

    eng.step = broken
    try:
        err = assert_openai_error(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60), 500,
                                  param=None, code=None)
        assert "injected engine failure" in err["message"]
    finally:
        eng.step = step
    add = eng.add_request

    def bad_add(*a, **k):
        raise TypeError("injected admission failure")

    eng.add_request = bad_add
    try:  # an unexpected exception while admitting must not kill the worker thread
        assert_openai_error(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60), 500)
    finally:
        eng.add_request = add
    worker = server.app.state.worker
    submit = worker.submit

    def bad_submit(*a, **k):
        raise RuntimeError("injected handler failure")

    worker.submit = bad_submit
    try:  # an exception nobody anticipated, in the request handler itself: still OpenAI's shape
        err = assert_openai_error(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60), 500,
                                  param=None, code=None)
        assert "injected handler failure" in err["message"]
    finally:
        worker.submit = submit
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and server.app.state.worker.live == 0


def test_disconnect_mid_stream_frees_slot(server):
    eng = server.app.state.engine
    aborted, abort = [], eng.abort
    eng.abort = lambda rid: aborted.append(abort(rid)) or aborted[-1]
    try:
        body = {"messages": MSG, "max_tokens": 70, "stream": True, "temperature": 0}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert len(eng.running) == 1
        deadline = time.time() + 20
        while eng.running and time.time() < deadline:
            time.sleep(0.05)
        assert aborted == [True]  # the running request was aborted, not run to its end
        assert not eng.running and sorted(eng.free_slots) == list(range(eng.max_batch))
        assert server.app.state.worker.live == 0
    finally:
        eng.abort = abort


def test_concurrent_requests_share_the_batch_and_overload_is_429(ckpt):
    srv = LiveServer(create_app(ckpt, max_batch=2, max_queue=1))
    try:
        eng, peak = srv.app.state.engine, [0]
        step = eng.step

        def spy():
            peak[0] = max(peak[0], len(eng.running))
            return step()

        eng.step = spy
        codes = []

        def call():
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 40}, timeout=60)
            codes.append(r.status_code)
            if r.status_code == 429:  # OpenAI's rate-limit error: type "requests", code rate_limit_exceeded
                assert_openai_error(r, 429, param=None, code="rate_limit_exceeded")

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes.count(200) >= 3 and set(codes) <= {200, 429} and 429 in codes
        assert peak[0] == 2  # requests decoded together
        assert httpx.get(srv.url + "/health").status_code == 200
        assert srv.app.state.worker.live == 0
    finally:
        srv.close()


@pytest.mark.parametrize("state", [TextState, FullTextState])
def test_text_state_holds_back_stop_prefixes(state):
    class CharTok:
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

        def token_bytes(self, i):
            return chr(i).encode()

    st = state(CharTok(), stop=["END"], stop_ids={0})
    out = [st.add(ord(c), final=False) for c in "abEN"]
    assert "".join(out) == "ab"  # "EN" might become "END"
    assert st.add(ord("D"), final=False) == "" and st.stopped and st.text == "abEN"[:2]
    st = state(CharTok(), stop=["END"], stop_ids={0})
    assert "".join(st.add(ord(c), final=False) for c in "aEx") + st.add(0, final=True) == "aEx"


def test_incremental_text_state_emits_what_the_full_decode_does(ckpt):
    """TextState (constant work per token) against FullTextState (decode everything each token): the same delta
    at every token, the same text and stop, on 300 random replies: byte tokens that split or break UTF-8
    characters, merges, special and stop tokens, stop strings that occur (ASCII and multi-byte) or do not."""
    tok = Tokenizer.load(ckpt)
    rng = random.Random(0)
    chars = tok.encode("é€😀 ok") + tok.encode("the cat sat")  # byte tokens of split multi-byte characters
    stop_ids = set(tok.stop_ids)
    for trial in range(300):
        n = rng.randrange(1, 40)
        ids = [rng.choice(chars) if rng.random() < 0.5 else rng.randrange(tok.vocab_size) for _ in range(n)]
        if trial % 3 == 0:  # no stop token inside the reply: only its end may be one
            ids = [t for t in ids if t not in stop_ids] or [chars[0]]
        text = tok.decode([t for t in ids if t not in stop_ids])
        stop = []
        for _ in range(rng.randrange(0, 3)):
            if text and rng.random() < 0.7:
                i = rng.randrange(len(text))
                stop.append(text[i:i + rng.randrange(1, 5)])
            else:
                stop.append(rng.choice(["é€", "cat", "😀 o", "zz", "t"]))
        stop = [s for s in stop if s and "\ufffd" not in s]
        full, inc = FullTextState(tok, stop, stop_ids), TextState(tok, stop, stop_ids)
        for j, t in enumerate(ids):
            final = j == len(ids) - 1 or (t in stop_ids and rng.random() < 0.5)
            assert inc.add(t, final) == full.add(t, final), (trial, ids[:j + 1], stop)
            if final:
                break
        assert (inc.text, inc.stopped) == (full.text, full.stopped), (trial, ids, stop)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    save_hf(GLM5(ModelConfig.preset("tiny", vocab_size=300)), tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        create_app(tmp_path / "c")


def test_int4_checkpoint_serves_and_decodes_like_its_full_forward(ckpt, tmp_path):
    """`python -m nanoglm5.quant convert` output loads in the engine and the server (issue 7 item 4)."""
    out = tmp_path / "int4"
    convert_checkpoint(ckpt, out)
    model = load_hf(out)
    assert any(isinstance(m, Int4Experts) for m in model.modules())
    tok = Tokenizer.load(out)
    prompt = tok.render_prompt(MSG)
    got = Engine(model, max_batch=2).generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0].token_ids
    ids = list(prompt)
    with torch.no_grad():  # the recompute breaks DSA ties by position, as the engine does
        for _ in range(len(got)):
            ids.append(int(model(torch.tensor([ids]), tie_break="stable").logits[0, -1].argmax()))
    assert got == ids[len(prompt):]
    with TestClient(create_app(out, max_batch=2, default_max_tokens=4)) as c:
        r = c.post("/v1/chat/completions", json={"model": "int4", "messages": MSG, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_echo_logprobs_score_the_prompt(server, ckpt):
    """lm-evaluation-harness's local-completions scoring call: token-id prompts, echo, logprobs 1, max_tokens 0.
    The text is the prompt's, the first token's log-prob is null, every other one is the model's log_softmax at
    the position before it; with max_tokens 1 the completion's token follows the prompt's entries."""
    tok, model = Tokenizer.load(ckpt), load_hf(ckpt).eval()
    ids = tok.encode("def f(xs): return len(xs)")
    body = {"prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    (c,) = r["choices"]
    assert c["text"] == tok.decode(ids) and r["usage"]["completion_tokens"] == 0
    lp = c["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        ref = model(torch.tensor([ids]), tie_break="stable").logits[0].float().log_softmax(-1)
    for j in range(1, len(ids)):
        assert lp["token_logprobs"][j] == pytest.approx(float(ref[j - 1, ids[j]]), abs=1e-3)
    r = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 1}, timeout=60).json()
    (c,) = r["choices"]
    assert len(c["logprobs"]["tokens"]) == len(ids) + 1 and c["text"].startswith(tok.decode(ids))
