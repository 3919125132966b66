"""A request never harms its neighbours (issue 21 item 8): sampling parameters that are non-finite are a 400
naming the field, a vanishing temperature is greedy, an exception in one request's sampling fails that request
alone while its batch goes on, /openapi.json documents every request body, and a bounded property-based fuzzer
over that schema gets no 500 and leaves the server alive."""

import json
import threading
import time

import httpx
import pytest
import torch
from conftest import LiveServer
from test_server import MSG, _post, assert_openai_error

import nanoglm5.engine as engine_mod
from nanoglm5.checkpoint import load_hf
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.engine import Engine, SamplingParams
from nanoglm5.server import create_app

BAD_SEED = 666  # the request whose sampling the tests break


@pytest.fixture(scope="module")
def server(tiny_chat_ckpt):
    srv = LiveServer(create_app(tiny_chat_ckpt, max_batch=4, max_queue=8, default_max_tokens=8))
    yield srv
    srv.close()


@pytest.fixture
def planted_failure(monkeypatch):
    """Break the sampling of the request seeded BAD_SEED from its second draw on (its first token comes out, so it
    is decoding beside the others when it fails). Records the batch size of each failing draw."""
    real, calls, batch_sizes = engine_mod.draw, [0], []

    def draw(probs, gens):
        if any(g.initial_seed() == BAD_SEED for g in gens):
            calls[0] += 1
            if calls[0] > 1:
                batch_sizes.append(len(gens))
                raise RuntimeError("injected sampling failure")
        return real(probs, gens)

    monkeypatch.setattr(engine_mod, "draw", draw)
    return batch_sizes


# ---------------------------------------------------------------------------------------------- sampling parameters
@pytest.mark.parametrize("field,value,code", [
    ("temperature", "NaN", "invalid_value"),
    ("temperature", "Infinity", "decimal_above_max_value"),
    ("temperature", "-Infinity", "decimal_below_min_value"),
    ("top_p", "NaN", "invalid_value"),
    ("top_p", "Infinity", "decimal_above_max_value"),
])
@pytest.mark.parametrize("path,head", [("/v1/chat/completions", '"messages": [{"role": "user", "content": "hi"}]'),
                                       ("/v1/completions", '"prompt": "the cat"')])
def test_non_finite_sampling_parameters_are_400_naming_the_field(server, path, head, field, value, code):
    err = _post(server, path, content=f'{{{head}, "{field}": {value}}}', param=field, code=code)
    assert field in err["message"]


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "the cat", "max_tokens": 6}),
                                       ("/v1/chat/completions", {"messages": MSG, "max_tokens": 6})])
def test_vanishing_temperature_is_greedy(server, path, body):
    """temperature 2.4e-68 divided the logits into inf and the draw into a 500 (found by a fuzzer): it is greedy."""
    tiny = httpx.post(server.url + path, json={**body, "temperature": 2.4e-68}, timeout=60)
    greedy = httpx.post(server.url + path, json={**body, "temperature": 0}, timeout=60)
    assert tiny.status_code == 200 and greedy.status_code == 200, tiny.text
    text = (lambda r: [c.get("text", c.get("message", {}).get("content")) for c in r.json()["choices"]])
    assert text(tiny) == text(greedy)


def test_wrong_content_type_says_to_send_json(server):
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "hi"}',
                   headers={"content-type": "text/plain"}, timeout=60)
    err = assert_openai_error(r, 400, param=None, code="invalid_type")
    assert "text/plain" in err["message"] and "send Content-Type: application/json" in err["message"]


# ---------------------------------------------------------------------------------------------- isolation
def _engine(ckpt, isolate):
    torch.manual_seed(0)
    return Engine(load_hf(ckpt), Tokenizer.load(ckpt), max_batch=4, isolate_errors=isolate)


def test_engine_fails_one_request_and_the_batch_goes_on(tiny_chat_ckpt, planted_failure):
    sp = dict(max_tokens=12, temperature=1.0)
    solo = _engine(tiny_chat_ckpt, True).generate([[5, 6, 7]], SamplingParams(seed=1, **sp))[0]
    eng = _engine(tiny_chat_ckpt, True)
    good = eng.add_request([5, 6, 7], SamplingParams(seed=1, **sp))
    bad = eng.add_request([8, 9], SamplingParams(seed=BAD_SEED, **sp))
    events = []
    while eng.has_unfinished():
        events += eng.step()
    failed = [e for e in events if e.error is not None]
    assert [e.request_id for e in failed] == [bad] and "injected sampling failure" in failed[0].error
    assert failed[0].completion.finish_reason == "error" and len(failed[0].completion.token_ids) == 1
    assert planted_failure[0] == 2  # it failed inside a batched draw beside the good request
    done = {e.request_id: e.completion for e in events if e.completion is not None}
    assert done[good].token_ids == solo.token_ids  # log-probs: within fp32 batching noise of the solo run
    assert done[good].logprobs == pytest.approx(solo.logprobs, abs=1e-5)
    assert sorted(eng.free_slots) == list(range(eng.max_batch))


def test_engine_without_isolation_raises_as_before(tiny_chat_ckpt, planted_failure):
    eng = _engine(tiny_chat_ckpt, False)
    eng.add_request([5, 6, 7], SamplingParams(max_tokens=12, temperature=1.0, seed=1))
    eng.add_request([8, 9], SamplingParams(max_tokens=12, temperature=1.0, seed=BAD_SEED))
    with pytest.raises(RuntimeError, match="injected sampling failure"):
        while eng.has_unfinished():
            eng.step()


def test_server_fails_one_request_and_its_neighbour_completes(server, planted_failure):
    eng = server.app.state.engine
    good_body = {"prompt": "the cat", "max_tokens": 60, "temperature": 1.0, "seed": 1}
    solo = httpx.post(server.url + "/v1/completions", json=good_body, timeout=60).json()["choices"][0]["text"]
    step = eng.step
    eng.step = lambda: time.sleep(0.01) or step()  # slow decoding down so the two requests overlap
    try:
        got = {}
        t = threading.Thread(target=lambda: got.update(good=httpx.post(server.url + "/v1/completions",
                                                                       json=good_body, timeout=60)))
        t.start()
        deadline = time.time() + 20
        while not eng.running and time.time() < deadline:
            time.sleep(0.002)
        bad = httpx.post(server.url + "/v1/completions", timeout=60,
                         json={"prompt": "hello", "max_tokens": 20, "temperature": 1.0, "seed": BAD_SEED})
        stream_body = {"prompt": "hello", "max_tokens": 20, "temperature": 1.0, "seed": BAD_SEED, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=stream_body, timeout=60) as r:
            streamed = r.read().decode()
        t.join()
    finally:
        eng.step = step
    err = assert_openai_error(bad, 500, param=None, code=None)
    assert "injected sampling failure" in err["message"]
    assert '"type":"server_error"' in streamed and "injected sampling failure" in streamed
    assert planted_failure and max(planted_failure) >= 2  # it failed while batched with the good request
    assert got["good"].status_code == 200 and got["good"].json()["choices"][0]["text"] == solo
    assert server.app.state.worker.live == 0 and not eng.running


# ---------------------------------------------------------------------------------------------- the schema
def test_openapi_documents_every_request_body(server):
    spec = httpx.get(server.url + "/openapi.json", timeout=60).json()
    schemas = spec["components"]["schemas"]
    posts = {path: ops["post"] for path, ops in spec["paths"].items() if "post" in ops}
    assert set(posts) == {"/v1/chat/completions", "/v1/completions"}
    for path, op in posts.items():
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        props = schemas[ref.rsplit("/", 1)[1]]["properties"]
        assert {"temperature", "top_p", "max_tokens", "n", "stream", "seed"} <= set(props), path
        assert ("messages" if "chat" in path else "prompt") in props


def test_fuzzer_over_the_schema_finds_no_server_error(server):
    """Property-based requests built from /openapi.json's own request schemas: every field drawn from JSON
    values of many kinds (non-finite and vanishing floats, huge and negative ints, wrong types), bounded in
    examples and time; no answer is a 500 and the server is alive after."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    spec = httpx.get(server.url + "/openapi.json", timeout=60).json()
    schemas = spec["components"]["schemas"]
    routes = {path: schemas[ops["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                            .rsplit("/", 1)[1]] for path, ops in spec["paths"].items() if "post" in ops}
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.integers(-3, 40),
                        st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([2.4e-68, 1e-300, 5e-6, 0.5]),
                        st.text(max_size=12))
    values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                          max_leaves=6)
    good = {"/v1/chat/completions": {"messages": MSG}, "/v1/completions": {"prompt": "the cat"}}

    @st.composite
    def request(draw):
        path = draw(st.sampled_from(sorted(routes)))
        fields = sorted(routes[path]["properties"])
        body = dict(good[path], max_tokens=draw(st.integers(1, 8)))
        for name in draw(st.lists(st.sampled_from(fields), max_size=4, unique=True)):
            body[name] = draw(values)
        return path, body

    seen = []

    @hypothesis.settings(max_examples=60, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(request())
    def one(req):
        path, body = req
        r = httpx.post(server.url + path, content=json.dumps(body), timeout=60,
                       headers={"content-type": "application/json"})
        seen.append(r.status_code)
        assert r.status_code < 500, (body, r.text)
        if r.status_code != 200:
            assert_openai_error(r, r.status_code)

    one()
    assert 200 in seen and 400 in seen  # the fuzzer reached the engine and the validation both
    health = httpx.get(server.url + "/health", timeout=60).json()
    assert {k: health[k] for k in ("status", "running", "waiting", "live")} == {"status": "ok", "running": 0,
                                                                               "waiting": 0, "live": 0}
