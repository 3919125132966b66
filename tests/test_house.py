"""The house rules, checked statically: imports flow one way, each stage a room, nothing points outside.

The import graph is read from the source with `ast` (every `import nanoglm5...` / `from nanoglm5... import`,
at module level or inside a function), so these tests need no import side effects and fail the moment an
arrow is drawn backwards.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "nanoglm5"
SCRIPTS = [ROOT / "train.py", ROOT / "rl.py", ROOT / "serve.py", ROOT / "data" / "prepare.py"]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The nanoglm5 modules `path` imports (a `from pkg import name` counts name when it is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("nanoglm5")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanoglm5"):
            out.add(node.module)
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() or (ROOT / Path(*sub.split("."))).is_dir():
                    out.add(sub)
    return out


def graph() -> dict[str, set[str]]:
    files = sorted(PKG.rglob("*.py"))
    return {module_name(f): project_imports(f) for f in files}


def reachable(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for n in g.get(m, ()):
            # importing nanoglm5.a.b runs nanoglm5/__init__ and nanoglm5/a/__init__ too
            for k in range(2, n.count(".") + 2):
                parent = ".".join(n.split(".")[:k])
                if parent not in seen:
                    seen.add(parent)
                    todo.append(parent)
    return seen


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in g.get(m, ()):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack[stack.index(n):] + [n]))
            if n in g and state.get(n) is None:
                visit(n, stack + [n])
        state[m] = 2

    for m in g:
        if state.get(m) is None:
            visit(m, [m])


def test_model_imports_only_the_config_and_its_sparse_kernel():
    # dsa.py is model.py's fast DSA path split out for length: torch only, no project import of its own
    assert project_imports(PKG / "model.py") == {"nanoglm5.config", "nanoglm5.dsa"}
    assert project_imports(PKG / "dsa.py") == set()


@pytest.mark.parametrize("room", ["nanoglm5.data", "nanoglm5.training", "nanoglm5.model", "nanoglm5.checkpoint",
                                  "nanoglm5.int4", "nanoglm5.quant", "nanoglm5.engine"])
def test_room_never_reaches_rl(room):
    g = graph()
    starts = [m for m in g if m == room or m.startswith(room + ".")]
    assert starts, f"{room} does not exist"
    for s in starts:
        bad = sorted(m for m in reachable(g, s) if m == "nanoglm5.rl" or m.startswith("nanoglm5.rl."))
        assert not bad, f"{s} reaches {bad}"


def test_server_and_rl_never_import_each_other():
    g = graph()
    assert not [m for m in reachable(g, "nanoglm5.server") if m.startswith("nanoglm5.rl")]
    rl = [m for m in g if m.startswith("nanoglm5.rl")]
    assert not [m for s in rl for m in reachable(g, s) if m in ("nanoglm5.server", "nanoglm5.api")]


def test_project_imports_sit_at_the_top_of_each_file():
    """A reader sees every dependency of a module in its first lines (no import hidden in a function)."""
    hidden = []
    for f in sorted(PKG.rglob("*.py")) + SCRIPTS:
        inner = project_imports(f) - project_imports(f, top_level_only=True)
        hidden += [f"{f.relative_to(ROOT)}: {m}" for m in sorted(inner)]
    assert not hidden, hidden


def test_no_two_modules_share_a_name_and_none_is_huge():
    names: dict[str, Path] = {}
    for f in sorted(PKG.rglob("*.py")):
        if f.name == "__init__.py":
            continue
        assert f.stem not in names, f"{f.relative_to(ROOT)} and {names[f.stem].relative_to(ROOT)} share a name"
        names[f.stem] = f
        n = len(f.read_text().splitlines())
        # ~500 lines a file; model.py, the one file a student reads top to bottom, may run a little longer
        assert n <= 600, f"{f.relative_to(ROOT)} has {n} lines: split it by concept"


OUTSIDE = re.compile(r"research/[\w.]*\.md|\.\./shared|DESIGN\.md|\brl\.md\b|\barch\.md\b|int4_serve_data|anchors\.md")


def test_nothing_points_outside_the_repository():
    files = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".ipynb", ".html", ".txt", ".toml")
             and ".git" not in p.parts and "out" not in p.parts[:1]]
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text(errors="ignore").splitlines(), 1)
           if OUTSIDE.search(line) and p != Path(__file__)]
    assert not bad, bad
