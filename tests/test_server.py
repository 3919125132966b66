"""The OpenAI-compatible server, run in-process under uvicorn on a loopback port: the official `openai` client
(non-streaming and streaming), SSE format, every bad-input case, disconnects, overload, shared batching."""

import json
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn

from nanoglm5.checkpoint import save_hf
from nanoglm5.config import ModelConfig
from nanoglm5.engine import Engine, SamplingParams
from nanoglm5.model import GLM5
from nanoglm5.server import TextState, create_app
from nanoglm5.tokenizer import Tokenizer

TEXTS = ["the cat sat on the mat", "hello world, hello model", "1 + 2 = 3 and 2 + 2 = 4"] * 20


class Server:
    """uvicorn in a daemon thread on a free loopback port."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = GLM5(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=96, index_topk=16))
    path = tmp_path_factory.mktemp("ckpt") / "tiny-chat"
    save_hf(model, path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    srv = Server(create_app(ckpt, max_batch=4, max_queue=8, default_max_tokens=8))
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


def _post(server, path, body=None, content=None, status=400):
    kw = {"content": content, "headers": {"content-type": "application/json"}} if content is not None else {"json": body}
    r = httpx.post(server.url + path, timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


@pytest.mark.parametrize("body,content,param", [
    (None, "{not json", None),
    ({"model": "tiny-chat"}, None, "messages"),
    ({"model": "tiny-chat", "messages": []}, None, "messages"),
    ({"model": "tiny-chat", "messages": [{"role": "wizard", "content": "hi"}]}, None, "messages.0.role"),
    ({"model": "tiny-chat", "messages": MSG, "max_tokens": "5"}, None, "max_tokens"),
    ({"model": "tiny-chat", "messages": MSG, "temperature": "hot"}, None, "temperature"),
    ({"model": "tiny-chat", "messages": "hello"}, None, "messages"),
    ({"model": "tiny-chat", "messages": MSG, "stream": "yes"}, None, "stream"),
])
def test_malformed_requests_are_400(server, body, content, param):
    err = _post(server, "/v1/chat/completions", body, content)
    assert param is None or err["param"] == param


def test_limits_are_400_with_the_limit_named(server):
    long = {"role": "user", "content": "the cat sat on the mat " * 40}
    assert "max_seq_len=96" in _post(server, "/v1/chat/completions", {"messages": [long]})["message"]
    err = _post(server, "/v1/chat/completions", {"messages": MSG, "max_tokens": 500})
    assert err["param"] == "max_tokens" and "max_seq_len=96" in err["message"]
    assert "between 1 and 16" in _post(server, "/v1/chat/completions", {"messages": MSG, "n": 17})["message"]
    assert "between 1 and 16" in _post(server, "/v1/chat/completions", {"messages": MSG, "n": 0})["message"]
    assert "(0, 1]" in _post(server, "/v1/chat/completions", {"messages": MSG, "top_p": 1.5})["message"]
    assert _post(server, "/v1/completions", {"prompt": [999999]})["code"] == 400  # out of vocabulary
    assert _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 0})["param"] == "max_tokens"
    err = _post(server, "/v1/chat/completions", {"model": "gpt-4", "messages": MSG}, status=404)
    assert err["param"] == "model" and "gpt-4" in err["message"]
    _post(server, "/v1/nothing", {}, status=404)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


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
    srv = Server(create_app(ckpt, max_batch=2, max_queue=1))
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
            if r.status_code == 429:
                assert r.json()["error"]["code"] == 429

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


def test_text_state_holds_back_stop_prefixes():
    class CharTok:
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    st = TextState(CharTok(), stop=["END"], stop_ids={0})
    out = [st.add(ord(c), final=False) for c in "abEN"]
    assert "".join(out) == "ab"  # "EN" might become "END"
    assert st.add(ord("D"), final=False) == "" and st.stopped and st.text == "abEN"[:2]
    st = TextState(CharTok(), stop=["END"], stop_ids={0})
    assert "".join(st.add(ord(c), final=False) for c in "aEx") + st.add(0, final=True) == "aEx"


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    save_hf(GLM5(ModelConfig.preset("tiny", vocab_size=300)), tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        create_app(tmp_path / "c")


@pytest.mark.slow
def test_notebook_06_serve():
    import nbformat

    nbclient = pytest.importorskip("nbclient")
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    nb = nbformat.read(root / "notebooks" / "06_serve.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()


def test_int4_checkpoint_serves_and_decodes_like_its_full_forward(ckpt, tmp_path):
    """`python -m nanoglm5.quant convert` output loads in the engine and the server (issue 7 item 4)."""
    from fastapi.testclient import TestClient

    from nanoglm5.checkpoint import load_hf
    from nanoglm5.engine import Engine, SamplingParams
    from nanoglm5.quant import Int4Experts, convert_checkpoint

    out = tmp_path / "int4"
    convert_checkpoint(ckpt, out)
    model = load_hf(out)
    assert any(isinstance(m, Int4Experts) for m in model.modules())
    tok = Tokenizer.load(out)
    prompt = tok.render_prompt(MSG)
    got = Engine(model, max_batch=2).generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0].token_ids
    ids = list(prompt)
    with torch.no_grad():  # the engine set the model's tie-break; the recompute uses the same model
        for _ in range(len(got)):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prompt):]
    with TestClient(create_app(out, max_batch=2, default_max_tokens=4)) as c:
        r = c.post("/v1/chat/completions", json={"model": "int4", "messages": MSG, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
