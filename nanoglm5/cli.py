"""The command-line convention shared by train.py, rl.py and serve.py.

A script's settings are one dataclass; every field becomes one `--kebab-case` flag (CLI flag = field name),
its help text from the field's metadata (`config_field`). `run_main` is the one error wrapper: a known error
prints one line that names the problem and the fix and exits 1; Ctrl-C says where the latest checkpoint is.
"""

import argparse
import sys
import types
from collections.abc import Callable
from dataclasses import MISSING, field, fields


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


def config_field(default, help: str):
    """A config dataclass field with its --help text, which add_config_flags reads (dict defaults get a factory)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def add_config_flags(p: argparse.ArgumentParser, cls, skip=(), stage_defaults: dict | None = None) -> None:
    """One --kebab-case flag per field of the config dataclass `cls` (CLI flag = field name), its help from
    the field's metadata; bools get --x / --no-x; `resume` takes an optional path (bare --resume = 'auto')."""
    for f in fields(cls):
        if f.name in skip:
            continue
        flag, t = "--" + f.name.replace("_", "-"), base_type(f.type)
        default = f.default if f.default is not MISSING else None
        per_stage = {s: d[f.name] for s, d in (stage_defaults or {}).items() if f.name in d}
        help_ = f.metadata.get("help", "") + (f" (default: {per_stage})" if per_stage else f" (default: {default!r})")
        if f.name == "resume":
            p.add_argument(flag, nargs="?", const="auto", default="", help=help_)
        elif t is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            p.add_argument(flag, type=t, default=default, help=help_)


def parser_for(cls, doc: str, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the script docstring's first paragraph and whose epilog is the
    rest (the usage examples), with one flag per field of `cls`."""
    head, _, rest = doc.partition("\n\n")
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, cls, **kwargs)
    return p


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
