"""Byte-level BPE tokenizer (trained with HF `tokenizers`) and GLM's chat template.

GLM-4/GLM-5 tokenizers are byte-level BPE with GPT-4-style pre-splitting; chat is rendered as
`[gMASK]<sop>` (`prefix_ids`) then, per message, `<|role|>\\n{content}`, and an assistant turn ends at the
next role token or `<|endoftext|>` (GLM-4 `chat_template`; GLM-5 keeps it and adds `<think>…</think>`, which are
atomic tokens here too). `render_chat` returns token ids and the assistant loss mask that SFT and RL use;
`CHAT_TEMPLATE` is the same template in Jinja and `hf_tokenizer_config` the tokenizer_config.json that carries it,
so transformers, vLLM, SGLang and lm-eval render a conversation as we do.
Simplified: one vocabulary for all languages, sized by a flag (the tiny preset uses 4096), no merges
for Chinese; GLM-5 uses ~154K.
Read top to bottom: special tokens → training/loading → encode/decode → chat template.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<think>", "</think>"]
ROLES = ("system", "user", "assistant", "observation")
EOS, PAD = "<|endoftext|>", "<|endoftext|>"  # GLM-5 pads with its end-of-text token and has no BOS (config.py)
# GPT-4's split pattern (digits in runs of at most 3), as GLM-4's tiktoken-style tokenizer uses.
SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def _byte_of_symbol() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable symbol ByteLevel writes for each byte → that byte
    (printable Latin-1 bytes stand for themselves, the other 68 are shifted to U+0100...)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


def _pipeline(model) -> HFTokenizer:
    tok = HFTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes → 256 printable symbols
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """`encode` maps special-token strings in text to their atomic ids; `decode(encode(x)) == x` for any str."""

    def __init__(self, tok: HFTokenizer):
        self._tok = tok
        self.special = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
        missing = [s for s, i in self.special.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; retrain it with Tokenizer.train")
        # Chat content is text: a "<|user|>" typed by a user must not end the turn. A twin that spells
        # special strings out as bytes renders message content.
        self._plain = HFTokenizer.from_str(tok.to_str())
        self._plain.encode_special_tokens = True
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self.special[EOS]
        self.stop_ids = [self.eos_id, self.special["<|user|>"], self.special["<|observation|>"]]
        self._bytes: list[bytes] | None = None  # token_bytes' table, built on first use

    # --- training and files ---------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
        """Byte-level BPE with every byte in the base alphabet; vocab_size counts specials and bytes."""
        if vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size={vocab_size} is below {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} "
                             "special tokens); pass a larger --vocab-size")
        tok = _pipeline(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=show_progress, min_frequency=2)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @staticmethod
    def _file(path) -> Path:
        path = Path(path)
        return path / "tokenizer.json" if path.is_dir() or not path.suffix else path

    @classmethod
    def load(cls, path) -> Tokenizer:
        """From a tokenizer.json file or a directory holding one (a checkpoint, data/)."""
        f = cls._file(path)
        if not f.exists():
            raise FileNotFoundError(f"no tokenizer at {f}; build one with `python data/prepare.py` "
                                    "(writes data/tokenizer.json)")
        return cls(HFTokenizer.from_file(str(f)))

    def save(self, path) -> Path:
        f = self._file(path)
        f.parent.mkdir(parents=True, exist_ok=True)
        # tokenizers writes keys in a fixed order; re-dump sorted so identical tokenizers give identical bytes
        f.write_text(json.dumps(json.loads(self._tok.to_str()), ensure_ascii=False, indent=1))
        return f

    # --- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Parallel (Rust threads) encode of many documents."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token i stands for: `decode(ids)` is the UTF-8 decoding (errors replaced) of the
        concatenation of its tokens' bytes, what incremental detokenization builds on (server.TextState).
        A token the byte alphabet cannot spell is its text's UTF-8, as the ByteLevel decoder treats it."""
        if self._bytes is None:
            table = _byte_of_symbol()
            self._bytes = []
            for t in (self._tok.id_to_token(j) for j in range(self.vocab_size)):
                try:
                    self._bytes.append(bytes(table[c] for c in t))
                except KeyError:
                    self._bytes.append(t.encode())
        return self._bytes[int(i)]

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def __len__(self) -> int:
        return self.vocab_size

    # --- chat template --------------------------------------------------------------------------

    @property
    def prefix_ids(self) -> list[int]:
        """What the chat template puts before the first message (`[gMASK]<sop>`): a rendered conversation
        minus this prefix is the continuation of an ongoing one (RL rollouts append turns this way)."""
        return [self.special["[gMASK]"], self.special["<sop>"]]

    def _text(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """`[gMASK]<sop>` + per message `<|role|>` `\\n` `{content}`. The mask is 1 on what the model must
        produce for an assistant message: its content tokens and the token that ends the turn (the next
        role token, or `<|endoftext|>` appended after a final assistant message); 0 elsewhere.
        add_generation_prompt appends `<|assistant|>\\n` (mask 0) for the model to continue."""
        ids = self.prefix_ids
        mask = [0] * len(ids)
        prev_assistant = False
        for k, msg in enumerate(messages):
            role = msg.get("role") if isinstance(msg, dict) else None
            if role not in ROLES:
                raise ValueError(f"unknown chat role {role!r} in message {k}; use one of {ROLES}")
            content = msg.get("content") or ""
            if not isinstance(content, str):
                raise ValueError(f"message {k} content must be a str, got {type(content).__name__}")
            ids.append(self.special[f"<|{role}|>"])
            mask.append(int(prev_assistant))  # this role token ends the previous assistant turn
            head, body = self._text("\n"), self._text(content)
            ids += head + body
            mask += [0] * len(head) + [int(role == "assistant")] * len(body)
            prev_assistant = role == "assistant"
        if prev_assistant:
            ids.append(self.eos_id)
            mask.append(1)
        if add_generation_prompt:
            head = [self.special["<|assistant|>"]] + self._text("\n")
            ids += head
            mask += [0] * len(head)
        return ids, mask

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """Ids to feed the model so it writes the next assistant turn."""
        return self.render_chat(messages, add_generation_prompt=True)[0]


# render_chat in Jinja, for the tools that read tokenizer_config.json (transformers' apply_chat_template, vLLM,
# SGLang, lm-eval): the same text, piece for piece (tests/test_hf_files.py checks it against render_chat).
# Whitespace control (`-`) everywhere, so the only newlines are the `\n` after each role token.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'observation'] -%}"
    "{{- raise_exception('unknown chat role ' ~ message['role'] ~ ' in message ' ~ loop.index0"
    " ~ '; use one of system, user, assistant, observation') -}}"
    "{%- endif -%}"
    "{%- if message['content'] is not none and message['content'] is not string -%}"
    "{{- raise_exception('message ' ~ loop.index0 ~ ' content must be a str') -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>\\n' ~ (message['content'] or '') -}}"
    "{%- endfor -%}"
    "{%- if messages and messages[-1]['role'] == 'assistant' -%}{{- '" + EOS + "' -}}{%- endif -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def hf_tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json beside tokenizer.json: the chat template and the special tokens, so
    `AutoTokenizer.from_pretrained(checkpoint)` can render chats and knows where generation ends."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "eos_token": EOS,
        "pad_token": PAD,
        "bos_token": None,
        "model_max_length": model_max_length,
        "padding_side": "left",  # batched generation pads on the left, so every row continues at the end
        "clean_up_tokenization_spaces": False,  # byte-level: decode must give back the exact text
        "extra_special_tokens": [t for t in SPECIAL_TOKENS if t != EOS],
    }
