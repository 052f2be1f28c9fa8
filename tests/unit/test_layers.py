"""The project's import graph, built from the source: layers that run one way, no cycles.

Every ``import iiotfl.…`` is at module level (an import inside a function hides a wrong
layering), no module imports a higher layer, and the module graph has no cycle. The test
prints the layers it found, with the packages in each and the imports between them.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("configs", "compat", "tasks", "strategies", "links", "security", "privacy", "clients", "server")

# Lowest first. A module may import modules of its own layer or below, never above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("configs", ("iiotfl.configs", "iiotfl.compat")),
    ("domain", ("iiotfl.tasks", "iiotfl.strategies", "iiotfl.links")),
    ("security", ("iiotfl.security",)),
    ("privacy", ("iiotfl.privacy",)),
    ("clients", ("iiotfl.clients",)),
    ("serverapp", ("iiotfl.server", "iiotfl.server.app", "iiotfl.server.rounds", "iiotfl.server.checks")),
    ("reports", ("iiotfl.server.report", "iiotfl.server.export")),
    ("launchers", ("iiotfl.server.launch",)),
    ("cli", ("iiotfl.server.cli",)),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["iiotfl", *parts])


def modules() -> dict[str, Path]:
    found = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found[module_name(path)] = path
    return found


def layer_of(module: str) -> int:
    """The layer of the longest matching prefix."""
    best, level = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    if level < 0:
        raise AssertionError(f"{module} is in no layer; add its package to LAYERS in tests/unit/test_layers.py")
    return level


def imports_of(name: str, path: Path, known: set[str]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(module-level project imports, project imports inside functions) as (module, line)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    top, nested = [], []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import sub` names the submodule when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target == "iiotfl" or target.startswith("iiotfl."):
                bucket = nested if id(node) in inner else top
                if (target, node.lineno) not in bucket:
                    bucket.append((target, node.lineno))
    return top, nested


def graph() -> tuple[dict[str, set[str]], list[str]]:
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = defaultdict(set)
    problems = []
    for name, path in mods.items():
        top, nested = imports_of(name, path, known)
        for target, line in nested:
            problems.append(f"{path.relative_to(ROOT)}:{line}: imports {target} inside a function; "
                            "import it at module level (a nested import hides a wrong layering)")
        for target, line in top:
            if target not in known:
                problems.append(f"{path.relative_to(ROOT)}:{line}: imports {target}, which is not a module of "
                                "the project")
                continue
            edges[name].add(target)
            if layer_of(target) > layer_of(name):
                problems.append(f"{path.relative_to(ROOT)}:{line}: {name} ({LAYERS[layer_of(name)][0]}) imports "
                                f"{target} ({LAYERS[layer_of(target)][0]}), a higher layer")
    return edges, problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def describe(edges: dict[str, set[str]]) -> str:
    lines = ["layers (lowest first):"]
    for i, (label, prefixes) in enumerate(LAYERS):
        members = sorted({m for m in modules() if layer_of(m) == i})
        lines.append(f"  {i} {label}: {', '.join(prefixes)} ({len(members)} modules)")
    pkg = lambda m: ".".join(m.split(".")[:3]) if m.startswith("iiotfl.server.") else ".".join(m.split(".")[:2])  # noqa: E731
    between = sorted({(pkg(a), pkg(b)) for a, bs in edges.items() for b in bs if pkg(a) != pkg(b)})
    lines.append("imports between packages:")
    lines += [f"  {a} -> {b}" for a, b in between]
    return "\n".join(lines)


def test_imports_run_one_way_without_cycles():
    edges, problems = graph()
    print(describe(edges))
    found = cycles(edges)
    problems += [f"import cycle: {' <-> '.join(c)}" for c in found]
    assert not problems, "\n".join(problems)


def test_every_module_is_in_a_layer():
    for name in modules():
        layer_of(name)


@pytest.mark.parametrize("source, problem", [
    ("def f():\n    from iiotfl.server import app\n", "inside a function"),
    ("from iiotfl.server.cli import main\n", "a higher layer"),
])
def test_the_checks_catch_what_they_are_for(tmp_path, monkeypatch, source, problem):
    """A nested import and an upward import in a low layer are reported."""
    probe = ROOT / "configs" / "_layer_probe.py"
    probe.write_text(source)
    try:
        _, problems = graph()
    finally:
        probe.unlink()
    assert any("_layer_probe.py" in p and problem in p for p in problems), problems


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
