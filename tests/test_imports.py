"""The package's import graph, read statically (every ``import``, also those inside functions).

Layers, bottom to top; a module may import modules of its own subpackage and of lower layers only:

    0  quantcli (the root: __version__), errors
    1  quant (pure math), artifact (manifest and payload I/O), dist (torch.distributed ranks and reductions)
    2  models (architecture table, base models, weights), calib
    3  algos (driver, algorithms, replay), pack (formats, packed checkpoints), eval
    4  loading (what the user named → a model), resume (per-layer partial state of a stage)
    5  stage, bench
    6  cli
    7  __main__ (python -m quantcli)
"""

from __future__ import annotations

import ast
from pathlib import Path

import quantcli

LAYERS = {
    "quantcli": 0, "errors": 0,
    "quant": 1, "artifact": 1, "dist": 1,
    "models": 2, "calib": 2,
    "algos": 3, "pack": 3, "eval": 3,
    "loading": 4, "resume": 4,
    "stage": 5, "bench": 5,
    "cli": 6,
    "__main__": 7,
}


def package_modules(root: Path) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file of the package at ``root``."""
    modules = {}
    for file in sorted(root.rglob("*.py")):
        parts = list(file.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = file
    return modules


def imported(module: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports anywhere in its file (``from p import m`` → ``p.m`` when a module)."""
    is_package = file.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import quantcli.x.y` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {name: imported(name, file, modules) for name, file in modules.items()}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        for target in targets:
            a, b = layer_of(module), layer_of(target)
            if a != b and LAYERS[b] >= LAYERS[a]:
                bad.append(f"{module} imports {target} ({a} is layer {LAYERS[a]}, {b} layer {LAYERS[b]})")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


ROOT = Path(quantcli.__file__).parent


def test_every_subpackage_has_a_layer():
    graph = import_graph(ROOT)
    assert {layer_of(m) for m in graph} <= set(LAYERS), "add the new subpackage to LAYERS"


def test_imports_only_go_down_the_layers():
    assert layer_violations(import_graph(ROOT)) == []


def test_no_module_level_import_cycle():
    assert cycles(import_graph(ROOT)) == []


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """The checker itself: a function-level import that closes a cycle and goes up a layer is found."""
    pkg = tmp_path / "quantcli"
    (pkg / "models").mkdir(parents=True)
    (pkg / "algos").mkdir()
    for file in ("__init__.py", "models/__init__.py", "algos/__init__.py"):
        (pkg / file).write_text("")
    (pkg / "models" / "load.py").write_text("def f():\n    from quantcli.algos import replay\n")
    (pkg / "algos" / "replay.py").write_text("from ..models.load import f\n")
    graph = import_graph(pkg)
    assert graph["quantcli.models.load"] == {"quantcli.algos.replay"}
    assert graph["quantcli.algos.replay"] == {"quantcli.models.load"}
    assert cycles(graph) == [["quantcli.algos.replay", "quantcli.models.load"]]
    assert layer_violations(graph) == ["quantcli.models.load imports quantcli.algos.replay (models is layer 2, algos layer 3)"]
