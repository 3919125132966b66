"""Shared test helpers. `LiveServer` runs an app under uvicorn on a free loopback port. `require` imports an optional test oracle (transformers, torchao, nbclient): in CI
(CI=true, as .ci/run sets it) a missing oracle FAILS the test that needs it, so a cross-check can never pass by
not running; elsewhere the test is skipped with the reason."""

import importlib
import os
import socket
import threading
import time
import warnings

import pytest
import torch
import uvicorn

from nanoglm5.checkpoint import save_hf
from nanoglm5.config import ModelConfig
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.model import GLM5

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(module: str, why: str = ""):
    """Import `module` and return it; if it cannot be imported, fail in CI and skip (with the reason) elsewhere."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 — any import failure (missing, broken build) means no oracle here
        msg = f"{module} cannot be imported ({type(e).__name__}: {e})" + (f"; {why}" if why else "")
        if IN_CI:
            pytest.fail(f"CI requires {module}: {msg}", pytrace=False)
        pytest.skip(msg)


class LiveServer:
    """uvicorn in a daemon thread on a free loopback port (127.0.0.1 only)."""

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


CHAT_TEXTS = ["the cat sat on the mat", "hello world, hello model", "1 + 2 = 3 and 2 + 2 = 4"] * 20


def make_chat_ckpt(tmp_path_factory, max_position_embeddings: int = 96):
    """A tiny random chat checkpoint with its tokenizer (DSA selects: index_topk 16 < the positions)."""
    tok = Tokenizer.train(CHAT_TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = GLM5(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=max_position_embeddings,
                                    index_topk=16))
    path = tmp_path_factory.mktemp("ckpt") / "tiny-chat"
    save_hf(model, path, tokenizer=tok)
    return path


@pytest.fixture(scope="session")
def tiny_chat_ckpt(tmp_path_factory):
    """The checkpoint the server, load and chat-page tests serve (96 positions)."""
    return make_chat_ckpt(tmp_path_factory)
