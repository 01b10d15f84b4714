"""The package's import graph: no cycles between modules, and every arrow between packages points down the layers.

Read from the source with ``ast`` (nothing is imported), counting every import of ``deepseek_moe``: at module
level, inside functions (a lazy import that only dodges a cycle is still a cycle in the design) and under
``if TYPE_CHECKING``. The one exception is the transformers idiom on the model (``from_pretrained``,
``save_pretrained``, ``generate``), which calls down into io/ and infer/ from above them by design: SANCTIONED.

An edge goes to the module named: ``from deepseek_moe.io import x`` is an edge to ``deepseek_moe.io`` (its
``__init__``), ``from deepseek_moe.nn import compute_copy`` one to ``deepseek_moe.nn.compute_copy``. The parent
packages Python also runs on the way are not edges: a package whose ``__init__`` re-exports its modules would
otherwise be a cycle with each of them.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
ROOT = "deepseek_moe"

# Lowest first. A module may import from its own package, from a package in its own layer (the cycle test still
# holds them apart) and from any layer below; never from a layer above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("config", "env", "device", "kernels", "nn", "figure", "_torch_compat"),  # building blocks: know nothing of MoE
    ("moe",),  # the layer: usable in anyone's network, without the language model
    ("model", "presets"),
    ("io", "infer"),  # checkpoints know nothing of quantisation: quant/ plugs in through the loader's hooks
    ("quant", "parallel", "export", "viz", "adapters"),  # adapters: LoRA, loaded and saved over io (and quant)
    ("train", "serve", "finetune"),
    ("ablate", ROOT),  # ROOT: deepseek_moe/__init__.py, the public API
    ("cli",),
)

# (module, enclosing function) of the imports the layering allows upward, with why: the transformers spelling
# of loading, saving and generating lives on the model class and calls adapters/, io/ and infer/ when it runs.
SANCTIONED: frozenset[tuple[str, str]] = frozenset({
    ("deepseek_moe.model.causal_lm", "DeepSeekMoEForCausalLM.from_pretrained"),
    ("deepseek_moe.model.causal_lm", "DeepSeekMoEForCausalLM.save_pretrained"),
    ("deepseek_moe.model.causal_lm", "DeepSeekMoEForCausalLM.generate"),
    ("deepseek_moe.model.causal_lm", "<TYPE_CHECKING>"),  # generate's return type, GenerateOutput
})


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    file: Path
    line: int

    def __str__(self) -> str:
        return f"{self.source} -> {self.target}  ({self.file.relative_to(self.file.parents[2])}:{self.line})"


def module_names(src: Path, root: str) -> dict[str, Path]:
    """Every module under ``src/root`` by dotted name (a package by its own name, for its ``__init__.py``)."""
    names = {}
    for path in sorted((src / root).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


class _Imports(ast.NodeVisitor):
    """Each import statement with the function (``Class.method``) or ``<TYPE_CHECKING>`` block it sits in."""

    def __init__(self) -> None:
        self.scope: list[str] = []
        self.found: list[tuple[ast.Import | ast.ImportFrom, str]] = []

    def _nested(self, node: ast.AST, name: str) -> None:
        self.scope.append(name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._nested(node, node.name)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._nested(node, node.name)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._nested(node, node.name)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            self.scope.append("<TYPE_CHECKING>")
            for child in node.body:
                self.visit(child)
            self.scope.pop()
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append((node, ".".join(self.scope)))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node, ".".join(self.scope)))


def _existing(name: str, modules: dict[str, Path]) -> str | None:
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in modules else None


def import_edges(src: Path = SRC, root: str = ROOT,
                 sanctioned: frozenset[tuple[str, str]] = SANCTIONED) -> list[Edge]:
    modules = module_names(src, root)
    edges = []
    for source, path in modules.items():
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        is_package = path.name == "__init__.py"
        for node, scope in visitor.found:
            if (source, scope) in sanctioned:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the package this module is in (or is)
                    package = source.split(".")[: None if is_package else -1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                # ``from pkg import sub`` names the module pkg.sub where there is one, else a name in pkg
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                if target != root and not target.startswith(root + "."):
                    continue
                resolved = _existing(target, modules)
                if resolved is not None and resolved != source:
                    edges.append(Edge(source, resolved, path, node.lineno))
    return edges


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges) through each strongly connected set of modules of more than one."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)
        graph.setdefault(e.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        start = min(component)
        # breadth-first inside the component, from start back to start: the shortest cycle through it
        paths: dict[str, list[Edge]] = {start: []}
        frontier = [start]
        cycle: list[Edge] | None = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w, e in sorted(graph[v].items()):
                    if w == start:
                        cycle = paths[v] + [e]
                        break
                    if w in component and w not in paths:
                        paths[w] = paths[v] + [e]
                        nxt.append(w)
                if cycle is not None:
                    break
            frontier = nxt
        assert cycle is not None
        cycles.append(cycle)
    return cycles


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_violations(edges: list[Edge], layers: tuple[tuple[str, ...], ...] = LAYERS) -> list[str]:
    rank = {package: i for i, layer in enumerate(layers) for package in layer}
    problems = []
    for e in edges:
        a, b = package_of(e.source), package_of(e.target)
        for package, module in ((a, e.source), (b, e.target)):
            if package not in rank:
                problems.append(f"{module}: package {package!r} has no layer in LAYERS (tests/unit/"
                                f"test_import_layers.py): put it above every package it imports")
        if a in rank and b in rank and a != b and rank[b] > rank[a]:
            problems.append(f"{e}: {a!r} (layer {rank[a]}) imports {b!r} (layer {rank[b]}), which is above it")
    return sorted(set(problems))


def _cycles_message(cycles: list[list[Edge]]) -> str:
    lines = [f"{len(cycles)} import cycle(s) in {ROOT}:"]
    for cycle in cycles:
        lines.append("  " + " -> ".join([cycle[0].source] + [e.target for e in cycle]))
        lines.extend(f"      {e}" for e in cycle)
    return "\n".join(lines)


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_edges())
    assert not cycles, _cycles_message(cycles)


def test_every_import_points_down_the_layers() -> None:
    problems = layer_violations(import_edges())
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_the_sanctioned_methods_are_the_only_exception() -> None:
    """Without the exemption the model's three methods are upward edges (so the exemption is needed and used)."""
    exempted = set(layer_violations(import_edges(sanctioned=frozenset()))) - set(layer_violations(import_edges()))
    assert all(p.startswith("deepseek_moe.model.causal_lm -> ") for p in exempted), exempted
    # from_pretrained goes through adapters/ (it takes adapters=[...], as the package function does)
    assert {p.split()[2] for p in exempted} == {"deepseek_moe.adapters.pretrained", "deepseek_moe.io.save",
                                                 "deepseek_moe.infer.generate"}


def _write(src: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_planted_cycle_is_found_and_named(tmp_path: Path) -> None:
    """The checks can fail: a lazy import inside a function closing a cycle, a TYPE_CHECKING one, a relative one
    and an upward one are each caught."""
    _write(tmp_path, {
        f"{ROOT}/__init__.py": "",
        f"{ROOT}/moe/__init__.py": "",
        f"{ROOT}/moe/experts.py": f"from {ROOT}.model.compute_copy import Linear\n",
        f"{ROOT}/model/__init__.py": "",
        f"{ROOT}/model/compute_copy.py": f"def attach():\n    from {ROOT}.moe.experts import RoutedExperts\n",
        f"{ROOT}/ablate/__init__.py": "",
        f"{ROOT}/ablate/run.py": "from .report import write_report\n",
        f"{ROOT}/ablate/report.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                     f"    from {ROOT}.ablate.run import AblationConfig\n"),
    })
    edges = import_edges(tmp_path)
    message = _cycles_message(find_cycles(edges))
    assert "deepseek_moe.model.compute_copy -> deepseek_moe.moe.experts -> deepseek_moe.model.compute_copy" in message
    assert "deepseek_moe.ablate.report -> deepseek_moe.ablate.run -> deepseek_moe.ablate.report" in message
    assert "compute_copy.py:2" in message
    problems = layer_violations(edges)
    assert any(p.startswith("deepseek_moe.moe.experts -> deepseek_moe.model.compute_copy") for p in problems)
    assert not find_cycles([e for e in edges if "ablate" not in e.source and e.line != 2])


def test_an_unplaced_package_is_named(tmp_path: Path) -> None:
    _write(tmp_path, {f"{ROOT}/__init__.py": "", f"{ROOT}/newpkg/__init__.py": f"from {ROOT} import config\n",
                      f"{ROOT}/config.py": ""})
    problems = layer_violations(import_edges(tmp_path))
    assert problems and "package 'newpkg' has no layer" in problems[0]


if __name__ == "__main__":  # print the package-level graph, for a look at it
    arrows: dict[tuple[str, str], int] = {}
    for e in import_edges():
        key = (package_of(e.source), package_of(e.target))
        if key[0] != key[1]:
            arrows[key] = arrows.get(key, 0) + 1
    for (a, b), n in sorted(arrows.items()):
        print(f"{a:>10} -> {b:<10} {n}")
    pytest.main([__file__, "-q"])
