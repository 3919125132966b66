"""Serve a checkpoint over an OpenAI-compatible HTTP API (nanoglm5/server.py).

    python serve.py --checkpoint out/tiny/ckpt [--host 127.0.0.1 --port 8000 --max-batch 16]

then point any OpenAI client at it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="ckpt", messages=[{"role": "user", "content": "hi"}])

The model name is the checkpoint directory's name unless --model-name says otherwise (GET /v1/models).
"""

import argparse
import dataclasses
from dataclasses import dataclass

import torch
import uvicorn

from nanoglm5.server import create_app


@dataclass
class ServeConfig:
    checkpoint: str = ""  # a save_hf directory: config.json, model.safetensors, tokenizer.json
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16  # concurrent sequences in the decode batch (cache slots)
    max_tokens_in_flight: int = 8192  # Σ (prompt + max_tokens) over running sequences
    max_seq_len: int = 0  # context per sequence (prompt + completion); 0 = the model's max_position_embeddings
    max_queue: int = 64  # requests waiting beyond max_batch before the server answers 429
    default_max_tokens: int = 256  # chat requests that set no max_tokens
    model_name: str = ""  # default: the checkpoint directory's name
    device: str = "cpu"
    threads: int = 0  # torch CPU threads; 0 = torch's default


def parse_args(argv=None) -> ServeConfig:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(ServeConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                        required=f.name == "checkpoint")
    return ServeConfig(**vars(ap.parse_args(argv)))


def main(argv=None):
    cfg = parse_args(argv)
    print(f"[serve] {cfg}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    app = create_app(cfg.checkpoint, max_batch=cfg.max_batch, max_tokens_in_flight=cfg.max_tokens_in_flight,
                     max_seq_len=cfg.max_seq_len or None, max_queue=cfg.max_queue, model_name=cfg.model_name or None,
                     default_max_tokens=cfg.default_max_tokens, device=cfg.device)
    print(f"[serve] model {app.state.model_name!r} on http://{cfg.host}:{cfg.port}/v1 "
          f"(max_batch={cfg.max_batch}, max_seq_len={app.state.engine.max_seq_len})")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")


if __name__ == "__main__":
    main()
