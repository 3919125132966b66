"""The command-line convention shared by train.py, rl.py and serve.py.

A script's settings are one dataclass; every field becomes one `--kebab-case` flag (CLI flag = field name),
its help text, its choices and its old names from the field's metadata (`config_field`). A wrong flag gets one
line (the error, a close flag name if there is one, and where --help is), not the whole usage. `check_checkpoint`
tells a missing path from a directory that is not a checkpoint before any data is read. `run_main` is the one
error wrapper: a known error prints one line that names the problem and the fix and exits 1; Ctrl-C says where
the latest checkpoint is.
"""

import argparse
import difflib
import sys
import types
from collections.abc import Callable
from dataclasses import MISSING, field, fields
from pathlib import Path


def base_type(t):
    """int for `int | None`, and the type behind a string annotation."""
    if isinstance(t, types.UnionType):
        t = next(a for a in t.__args__ if a is not type(None))
    return {"int": int, "float": float, "str": str, "bool": bool}.get(t, t) if isinstance(t, str) else t


def parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def config_field(default, help: str, choices=None, aliases: tuple[str, ...] = ()):
    """A config dataclass field with its --help text, which add_config_flags reads (dict defaults get a factory).
    `choices`: the values the flag accepts (argparse checks them and --help lists them); `aliases`: old flag
    names still accepted (e.g. "--init-from" for --checkpoint)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "aliases": tuple(aliases)}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def add_config_flags(p: argparse.ArgumentParser, cls, skip=(), stage_defaults: dict | None = None) -> None:
    """One --kebab-case flag per field of the config dataclass `cls` (CLI flag = field name), its help from
    the field's metadata; bools get --x / --no-x; `resume` takes an optional path (bare --resume = 'auto')."""
    for f in fields(cls):
        if f.name in skip:
            continue
        flag, t = "--" + f.name.replace("_", "-"), base_type(f.type)
        flags = (flag, *f.metadata.get("aliases", ()))
        default = f.default if f.default is not MISSING else None
        per_stage = {s: d[f.name] for s, d in (stage_defaults or {}).items() if f.name in d}
        choices = f.metadata.get("choices")
        help_ = (f.metadata.get("help", "") + (f" [choices: {', '.join(map(str, choices))}]" if choices else "")
                 + (f" (default: {per_stage})" if per_stage else f" (default: {default!r})"))
        if f.name == "resume":
            p.add_argument(*flags, nargs="?", const="auto", default="", help=help_)
        elif t is bool:
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            p.add_argument(*flags, type=t, default=default, choices=choices, help=help_,
                           metavar=f.name.upper() if choices else None)  # the choices are in the help, not the usage


class ShortErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: the error, the closest known flag to a misspelt one,
    and the --help pointer (argparse's default prints the whole usage first: 40 lines for train.py)."""

    def error(self, message: str):
        hint = ""
        if message.startswith("unrecognized arguments:"):
            known = [s for a in self._actions for s in a.option_strings]
            for arg in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(arg.split("=")[0], known, n=1)
                if arg.startswith("-") and close:
                    hint = f" (did you mean {close[0]}?)"
                    break
        self.exit(2, f"{self.prog}: error: {message}{hint}. `python {self.prog} --help` lists every flag\n")


def parser_for(cls, doc: str, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the script docstring's first paragraph and whose epilog is the
    rest (the usage examples), with one flag per field of `cls`."""
    head, _, rest = doc.partition("\n\n")
    p = ShortErrorParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, cls, **kwargs)
    return p


class PathError(Exception):
    """A path flag names nothing, or a directory that is not what the flag needs (the message says which)."""


def check_checkpoint(path: str, flag: str = "--checkpoint") -> None:
    """Raise PathError naming `path` if it does not exist or is not a checkpoint directory (config.json
    beside safetensors weights, what train.py and rl.py write): checked before a script reads any data."""
    p = Path(path)
    if not p.exists() and not p.with_name(f".{p.name}.old").exists():  # .old: a save interrupted mid-rename
        raise PathError(f"{flag} {path}: {path} does not exist; point at a directory train.py wrote "
                                "(e.g. out/pretrain/ckpt or out/sft/ckpt)")
    if p.exists() and not (p.is_dir() and (p / "config.json").exists() and any(p.glob("*.safetensors"))):
        raise PathError(f"{flag} {path}: {path} is not a checkpoint: point at a directory train.py wrote "
                                "(it has config.json and model.safetensors, e.g. out/sft/ckpt)")


def run_main(run: Callable[[], object], errors: tuple[type[BaseException], ...], checkpoint_dir: str = "") -> int:
    """Run a script's body: 0 on success; a known error → `error: …` on stderr and 1; Ctrl-C → 130."""
    try:
        run()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        where = f"; the latest checkpoint (if any) is in {checkpoint_dir} — continue with --resume" if checkpoint_dir else ""
        print(f"\ninterrupted{where}", file=sys.stderr)
        return 130
    return 0
