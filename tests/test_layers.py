"""The layers of cqd, and the rule that keeps them: a module imports only from its own floor or below, no
import circles, no private name imported across modules. Read from the source (every import, lazy ones
inside functions included), so the rule holds for code that runs late too.

Floors, lowest first (docs/design.md says the same):
  0 ground: errors, registry, files, schema, plugins, config (loading, overrides, errors)
  1 building blocks: degradations, models, sym
  2 data, methods, compress
  3 tasks (each task's package; its `report*` modules sit on floor 6)
  4 engine: one run
  5 experiments (grids, studies, rounds), export, predict
  6 reports, analysis, the tasks' report modules
  7 api, cli
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FLOORS = [
    ("cqd.errors", 0), ("cqd.registry", 0), ("cqd.files", 0), ("cqd.schema", 0), ("cqd.plugins", 0), ("cqd.config", 0),
    ("cqd.degradations", 1), ("cqd.models", 1), ("cqd.sym", 1),
    ("cqd.data", 2), ("cqd.methods", 2), ("cqd.compress", 2),
    ("cqd.tasks", 3),
    ("cqd.engine", 4),
    ("cqd.experiments", 5), ("cqd.export", 5), ("cqd.predict", 5),
    ("cqd.reports", 6), ("cqd.analysis", 6),
    ("cqd.api", 7), ("cqd.cli", 7), ("cqd.__main__", 7),
]


def floor(module: str) -> int:
    if module.startswith("cqd.tasks.") and module.rsplit(".", 1)[-1].startswith("report"):
        return 6
    if module.startswith("cqd.tasks.") and "_report" in module.rsplit(".", 1)[-1]:
        return 6
    for prefix, n in FLOORS:
        if module == prefix or module.startswith(prefix + "."):
            return n
    if module == "cqd":
        return 7
    raise AssertionError(f"module {module} is on no floor: add its package to FLOORS (and to docs/design.md)")


def modules(src: Path = SRC) -> dict[str, Path]:
    out = {}
    for p in sorted((src / "cqd").rglob("*.py")):
        parts = list(p.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(name: str, path: Path, known: dict) -> list[tuple[str, list[str], int]]:
    """(imported cqd module, names taken from it, line) for every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "cqd"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != "cqd":
                continue
            names = [a.name for a in node.names]
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]  # `from pkg import module`
            rest = [n for n in names if f"{base}.{n}" not in known]
            out += [(s, [], node.lineno) for s in subs]
            if rest or not subs:
                out.append((base, rest, node.lineno))
    return out


def violations(src: Path = SRC) -> dict[str, list[str]]:
    known = modules(src)
    graph: dict[str, set[str]] = {m: set() for m in known}
    upward, private = [], []
    for name, path in known.items():
        for target, names, line in imports(name, path, known):
            if target not in known:
                continue
            graph[name].add(target)
            if floor(target) > floor(name):
                upward.append(f"{path.relative_to(src)}:{line}: {name} (floor {floor(name)}) imports {target} "
                              f"(floor {floor(target)})")
            if target != name:
                private += [f"{path.relative_to(src)}:{line}: {name} imports {target}.{n}" for n in names
                            if n.startswith("_") and not n.startswith("__")]
    return {"upward": upward, "private": private, "cycles": cycles(graph)}


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every import circle, as 'a -> b -> a' (depth-first search; a package importing its own module is an edge)."""
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                found.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


@pytest.mark.parametrize("kind", ["upward", "private", "cycles"])
def test_the_layers_hold(kind):
    bad = violations()[kind]
    assert not bad, f"{len(bad)} {kind} import(s):\n" + "\n".join(bad)


def test_the_check_catches_each_kind(tmp_path):
    """A tree with one upward import, one private name and one circle: each is reported."""
    pkg = tmp_path / "cqd"
    for sub in ("engine", "methods"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from cqd.files import _atomic\n")
    (pkg / "files.py").write_text("import cqd.errors\n")
    (pkg / "methods" / "a.py").write_text("def f():\n    from cqd.engine import trainer\n")
    (pkg / "engine" / "trainer.py").write_text("")
    got = violations(tmp_path)
    assert got["upward"] == ["cqd/methods/a.py:2: cqd.methods.a (floor 2) imports cqd.engine.trainer (floor 4)"]
    assert got["private"] == ["cqd/errors.py:1: cqd.errors imports cqd.files._atomic"]
    assert got["cycles"] == ["cqd.errors -> cqd.files -> cqd.errors"]
