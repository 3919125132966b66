"""Serve a checkpoint over an OpenAI-compatible HTTP API (nanoglm5/server.py).

    python serve.py --checkpoint out/tiny/ckpt [--host 127.0.0.1 --port 8000 --max-batch 16]
    python serve.py --checkpoint out/speedrun/sft/ckpt --speculative mtp          # MTP speculative decoding
    python serve.py --checkpoint CKPT --device cuda --dtype bfloat16              # GPU (the default there)
    python serve.py --checkpoint CKPT --no-engine-process     # the engine in a thread of the server's process

By default the engine steps in a process of its own (nanoglm5/engine_core.py) and this one does HTTP,
tokenization and streaming only; if that process dies, every request is answered 503 until a restart.

then point any OpenAI client at it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="ckpt", messages=[{"role": "user", "content": "hi"}])

The model name is the checkpoint directory's name unless --model-name says otherwise (GET /v1/models).
"""

import sys
from dataclasses import dataclass

import torch
import uvicorn

from nanoglm5.checkpoint import CheckpointError
from nanoglm5.cli import PathError, check_checkpoint, config_field, parser_for, run_main
from nanoglm5.server import create_app


@dataclass
class ServeConfig:
    checkpoint: str = config_field("", "a save_hf directory: config.json, model.safetensors, tokenizer.json (required)")
    host: str = config_field("127.0.0.1", "address to listen on")
    port: int = config_field(8000, "port to listen on")
    max_batch: int = config_field(16, "concurrent sequences in the decode batch (cache slots)")
    max_tokens_in_flight: int = config_field(8192, "KV-cache positions (paged blocks) shared by all requests; "
                                                     "no request may need more than this")
    max_seq_len: int = config_field(0, "context per sequence (prompt + completion); 0 = the model's "
                                       "max_position_embeddings, at most max_tokens_in_flight")
    max_queue: int = config_field(64, "requests waiting beyond max_batch before the server answers 429")
    default_max_tokens: int = config_field(256, "max_tokens of chat requests that set none")
    model_name: str = config_field("", "the served model's name; default: the checkpoint directory's name")
    device: str = config_field("auto", "torch device of the model and the cache: auto (cuda if available), cpu, "
                                       "cuda, cuda:1 …")
    dtype: str = config_field("auto", "auto (bfloat16 on CUDA, else as the checkpoint stores it), float32, "
                                      "bfloat16 or float16",
                              choices=("auto", "float32", "bfloat16", "float16"))
    speculative: str = config_field("", "'mtp': speculative decoding with the model's MTP layer (lossless: same "
                                        "output distribution, fewer forwards per token when drafts are accepted)",
                               choices=("", "mtp"))
    num_draft: int = config_field(1, "with --speculative mtp: draft tokens per step (the MTP layer chained)")
    threads: int = config_field(0, "torch CPU threads; 0 = torch's default")
    engine_process: bool = config_field(True, "step the engine in a process of its own (the HTTP process does HTTP, "
                                              "tokenization and streaming only); off: in a thread of the server")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def engine_options(cfg: ServeConfig) -> tuple[str, dict]:
    """The device and the Engine arguments the flags ask for; a ValueError names a bad flag."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if cfg.dtype != "auto" and cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype {cfg.dtype!r}: use auto, {', '.join(DTYPES)}")
    if cfg.speculative not in ("", "mtp"):
        raise ValueError(f"--speculative {cfg.speculative!r}: use mtp (or leave it out)")
    dtype = DTYPES.get(cfg.dtype, torch.bfloat16 if device.startswith("cuda") else None)
    return device, dict(dtype=dtype, speculative=cfg.speculative or None, num_draft=cfg.num_draft)


def parse_args(argv=None) -> ServeConfig:
    p = parser_for(ServeConfig, __doc__)
    cfg = ServeConfig(**vars(p.parse_args(argv)))
    if not cfg.checkpoint:
        p.error("the following arguments are required: --checkpoint")
    return cfg


def serve(cfg: ServeConfig) -> None:
    check_checkpoint(cfg.checkpoint)
    print(f"[serve] {cfg}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, options = engine_options(cfg)
    app = create_app(cfg.checkpoint, max_batch=cfg.max_batch, max_tokens_in_flight=cfg.max_tokens_in_flight,
                     max_seq_len=cfg.max_seq_len or None, max_queue=cfg.max_queue, model_name=cfg.model_name or None,
                     default_max_tokens=cfg.default_max_tokens, device=device, engine_options=options,
                     engine_process=cfg.engine_process)
    info = app.state.worker.info
    print(f"[serve] model {app.state.model_name!r} on http://{cfg.host}:{cfg.port}/v1 "
          f"(device {device}, {info['dtype']}, max_batch={cfg.max_batch}, max_seq_len={info['max_seq_len']}, "
          f"speculative={options['speculative']}, engine {'process' if cfg.engine_process else 'thread'})")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")


def main(argv=None) -> int:
    cfg = parse_args(argv)
    return run_main(lambda: serve(cfg), (CheckpointError, FileNotFoundError, ValueError, PathError))


if __name__ == "__main__":
    sys.exit(main())
