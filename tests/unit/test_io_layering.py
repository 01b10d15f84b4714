"""io sits below quant: no module of deepseek_moe.io imports deepseek_moe.quant (nor anything above io), at
module level or inside a function, and io's own modules import each other without a cycle. Quantisation plugs in
through io/formats.py's registry."""

from __future__ import annotations

import ast
from pathlib import Path

import deepseek_moe.io

IO_DIR = Path(deepseek_moe.io.__file__).parent
ABOVE_IO = ("quant", "export", "serve", "train", "parallel", "cli", "adapters", "finetune", "ablate", "infer")


def _imports(path: Path) -> set[str]:
    """Every deepseek_moe module ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deepseek_moe"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("deepseek_moe"))
    return found


def test_io_imports_nothing_above_it() -> None:
    offending = {p.name: sorted(m for m in _imports(p) if m.split(".")[1] in ABOVE_IO)
                 for p in IO_DIR.glob("*.py")}
    assert {k: v for k, v in offending.items() if v} == {}


def test_io_modules_form_no_cycle() -> None:
    modules = {p.stem for p in IO_DIR.glob("*.py") if p.stem != "__init__"}
    graph = {m: {i.split(".")[2] for i in _imports(IO_DIR / f"{m}.py")
                 if i.startswith("deepseek_moe.io.") and i.split(".")[2] in modules} - {m} for m in modules}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join([*path, m, n])}"
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [])
