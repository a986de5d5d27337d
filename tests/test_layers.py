"""The package's shape holds: layers import downward only, the box side never imports the
controller side, core stays free of SSH and providers, and no import loop exists.

Read from the source with `ast`, lazy imports inside functions included: a loop or an upward
import that only happens at call time is still one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "abfleet"

# Lowest first. A module may import its own layer and those before it.
LAYERS = ("shared", "job", "core", "demo", "worker", "fleet", "ops", "cli")
BOX_SIDE = {"job", "core", "demo", "worker"}
CONTROLLER_ONLY = {"paramiko", "fabric", "invoke", "vastai"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> str:
    parts = module.split(".")
    if module == "abfleet.__main__":
        return "cli"
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "shared"


def _owner(name: str) -> str | None:
    """The abfleet module an imported dotted name belongs to (a name may be a function)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> tuple[set[str], set[str]]:
    """(abfleet modules, top-level third-party packages) that module imports anywhere."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    ours: set[str] = set()
    theirs: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".") if is_package else module.split(".")[:-1]
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        for name in names:
            if name.startswith("abfleet"):
                owner = _owner(name)
                if owner and owner != module:
                    ours.add(owner)
            elif name:
                theirs.add(name.split(".")[0])
    return ours, theirs


GRAPH = {m: imports(m)[0] for m in MODULES}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} ({layer(m)}) imports {t} ({layer(t)})"
        for m, targets in graph.items()
        for t in targets
        if LAYERS.index(layer(t)) > LAYERS.index(layer(m))
    ]


def test_every_layer_imports_downward_only():
    assert upward_imports(GRAPH) == []


def test_the_box_side_never_imports_ssh_or_a_provider_sdk():
    found = [
        f"{m} imports {pkg}"
        for m in MODULES
        if layer(m) in BOX_SIDE | {"shared"}
        for pkg in imports(m)[1] & CONTROLLER_ONLY
    ]
    assert found == []


def test_only_the_providers_know_which_provider_they_are():
    """`if provider == "vast"` outside fleet/providers/ is a difference that leaked out."""
    leaks = []
    for module, path in MODULES.items():
        if module.startswith("abfleet.fleet.providers"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Constant) and c.value in ("vast", "ssh", "local")
                for c in [node.left, *node.comparators]
            ):
                leaks.append(f"{module}:{node.lineno}")
    assert leaks == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return groups


def test_there_is_no_import_loop():
    assert cycles(GRAPH) == []


def test_the_checker_finds_an_upward_import_and_a_loop():
    """The loop this layout removed (core.model -> job.source -> demo -> core.model) would be
    caught twice: as an upward import and as a loop."""
    graph = {
        "abfleet.core.model": {"abfleet.job.source"},
        "abfleet.job.source": {"abfleet.demo.refusal_tune"},
        "abfleet.demo.refusal_tune": {"abfleet.core.model"},
        "abfleet.cli.run": {"abfleet.core.model"},
    }
    assert upward_imports(graph) == [
        "abfleet.job.source (job) imports abfleet.demo.refusal_tune (demo)"
    ]
    assert cycles(graph) == [
        ["abfleet.core.model", "abfleet.demo.refusal_tune", "abfleet.job.source"]
    ]
    # And the real graph is read: the worker's run imports the search.
    assert "abfleet.core.search" in GRAPH["abfleet.worker.jobrun"]
