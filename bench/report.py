"""Shared by every bench/*.py: describe the machine and write one section of docs/benchmarks.md.

Each benchmark owns one section, delimited by HTML comments, so re-running one benchmark
replaces its own table and leaves the others alone.
"""

import os
import platform
import re
import time
from pathlib import Path

import torch

BENCH_DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery figure below was measured by the command named beside it; ratios are taken side by side in one run.\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {dev}, {time.strftime('%Y-%m-%d')}")


def write_section(name: str, markdown: str, path: Path = BENCH_DOC) -> None:
    """Replace (or append) the section `name` of docs/benchmarks.md with `markdown`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
