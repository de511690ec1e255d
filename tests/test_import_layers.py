"""The package's layers, checked on its import graph (issue 19): nothing imports a higher layer, and no import cycle.

Every ``import`` / ``from ... import`` in fastlora/, kernels/ and bench/ counts, at module level or inside a function
(a function-level import is still a dependency; it only runs later). Importing ``a.b.c`` also runs the package
``a.b``, so a module depends on the packages above each module it imports (except the root ``fastlora``, whose
``__init__`` only re-exports the public API, and the packages the importing module sits in, which are running already). Layers, bottom up:

0. format facts and leaf utilities: ``formats/``, ``tensor_cache``, ``version``;
1. the kernels, the op schemas, the backends and the run-time choice: ``kernels/``, ``backends/``, ``tuning/``,
   ``ops``, ``grouped_ops``;
2. the autograd functions and layer graphs: ``functions/``, ``moe/``;
3. losses and long context: ``training/``;
4. the PEFT wiring: ``wiring/``;
5. the top: the package root, ``memory/``, ``cli``, ``bench/``.

A module may import its own layer or lower ones; a cycle between modules fails even within one layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> the dotted package it installs as (pyproject's package-dir).
SOURCES = {"fastlora": "fastlora", "kernels": "fastlora.kernels", "bench": "fastlora.bench"}
LAYERS = [
    ("formats", ["fastlora.formats", "fastlora.tensor_cache", "fastlora.version"]),
    ("ops", ["fastlora.kernels", "fastlora.backends", "fastlora.tuning", "fastlora.ops", "fastlora.grouped_ops"]),
    ("functions", ["fastlora.functions", "fastlora.moe"]),
    ("training", ["fastlora.training"]),
    ("wiring", ["fastlora.wiring"]),
    ("top", ["fastlora.memory", "fastlora.cli", "fastlora.bench", "fastlora"]),
]


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in SOURCES.items():
        for path in (ROOT / folder).rglob("*.py"):
            if "results" in path.parts:
                continue
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The fastlora modules ``module`` imports (resolved to the longest known module name), with their packages."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            named.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    edges = set()
    for name in named:
        if not name.startswith("fastlora"):
            continue
        while name not in known and "." in name:
            name = name.rpartition(".")[0]
        edges.add(name)
        name = name.rpartition(".")[0]
        # every package the import runs, except the root and the packages ``module`` itself sits in (already running)
        while "." in name and not module.startswith(name + "."):
            edges.add(name)
            name = name.rpartition(".")[0]
        if name == "fastlora" and name in named:
            edges.add(name)
    edges.discard(module)
    return edges


def _layer(module: str) -> int:
    best, depth = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = index, prefix.count(".")
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {module: _imports(module, path, set(modules)) for module, path in modules.items()}


def test_every_module_is_in_a_layer_and_imports_no_higher_layer():
    graph = _graph()
    assert len(graph) > 80, "the scan found too few modules: check SOURCES"
    upward = sorted(
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for module, targets in graph.items()
        for target in targets
        if _layer(target) > _layer(module)
    )
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_catch_what_they_claim():
    """The checker itself: a planted upward import and a planted cycle are found."""
    graph = {"fastlora.formats.a": {"fastlora.wiring.b"}, "fastlora.wiring.b": {"fastlora.formats.a"}}
    assert _layer("fastlora.formats.a") < _layer("fastlora.wiring.b")
    assert _cycles(graph) == [["fastlora.formats.a", "fastlora.wiring.b"]]
    assert _layer("fastlora.kernels.common") == _layer("fastlora.backends.cpp") < _layer("fastlora.functions.lora")
