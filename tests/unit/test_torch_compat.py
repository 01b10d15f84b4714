"""Each use of torch's non-public API (deepseek_moe/_torch_compat.py, parallel/_torch_compat.py) against the
installed torch: a release that renames or drops one fails here, by name, instead of deep in a run."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

from deepseek_moe._torch_compat import (
    KeepsDtypeOnCast,
    clear_dispatch_cache,
    mkldnn_bf16_supported,
    tensor_version,
)
from deepseek_moe.export.flat import flatten, unflatten

WHY = f"torch {torch.__version__} changed what deepseek_moe/_torch_compat.py relies on: "


def test_tensor_version_counts_in_place_writes() -> None:
    t = torch.zeros(3)
    before = tensor_version(t)
    t.add_(1)
    assert tensor_version(t) == before + 1, WHY + "Tensor._version no longer counts in-place writes"
    assert tensor_version(t.clone()) == 0


def test_ops_still_keep_a_dispatch_cache() -> None:
    op = torch.ops.aten.lstm.input
    assert isinstance(getattr(op, "_dispatch_cache", None), dict), (
        WHY + "OpOverload._dispatch_cache is gone: check whether export/onnx.py's repeated-RNN-export workaround "
        "is still needed (tests/export/test_to_onnx.py), then drop clear_dispatch_cache")
    torch.add(torch.ones(1), 1)  # fills aten.add.Tensor's cache
    clear_dispatch_cache(torch.ops.aten.add.Tensor)
    assert torch.ops.aten.add.Tensor._dispatch_cache == {}
    clear_dispatch_cache(object())  # no cache: nothing to do


class _Scaled(KeepsDtypeOnCast):
    def __init__(self) -> None:
        super().__init__()
        self.dtype = torch.float32
        self.weight = nn.Parameter(torch.randn(4))
        self.register_buffer("w_scale", torch.tensor([0.1, 0.2], dtype=torch.float32))
        self.register_buffer("codes", torch.tensor([1, 2], dtype=torch.int8))

    def kept_dtype_buffers(self) -> list[str]:
        return ["w_scale"]


def test_module_casts_still_go_through_apply() -> None:
    assert "fn" in inspect.signature(nn.Module._apply).parameters, WHY + "nn.Module._apply(fn) has another signature"
    m = nn.Sequential(_Scaled())
    scale = m[0].w_scale.clone()
    for cast, dtype in ((lambda x: x.to(torch.bfloat16), torch.bfloat16), (nn.Module.half, torch.float16),
                        (nn.Module.double, torch.float64), (nn.Module.float, torch.float32)):
        cast(m)
        inner = m[0]
        assert inner.weight.dtype == dtype and inner.dtype == dtype
        assert inner.w_scale.dtype == torch.float32 and torch.equal(inner.w_scale, scale), (
            WHY + "a module cast no longer reaches a submodule's _apply: quantisation scales would be cast "
            "(KeepsDtypeOnCast needs another hook)")
        assert "w_scale" in dict(inner.named_buffers()) and inner.codes.dtype == torch.int8
    m.to("meta")
    assert m[0].w_scale.is_meta and m[0].w_scale.dtype == torch.float32 and m[0].dtype == torch.float32
    m.to_empty(device="cpu")
    assert m[0].w_scale.device.type == "cpu" and m[0].w_scale.dtype == torch.float32


def test_flatten_matches_the_exporters_order() -> None:
    """export/flat.py replaces torch.utils._pytree for export's nested inputs: same leaves, same order."""
    import torch.utils._pytree as pytree  # only here, as the reference

    tree = ({"user": torch.ones(1), "item": (torch.zeros(2), None, [torch.ones(3)])}, torch.arange(2), None)
    leaves, structure = flatten(tree)
    theirs, _ = pytree.tree_flatten(tree)
    assert len(leaves) == len(theirs) and all(a is b for a, b in zip(leaves, theirs, strict=True))
    rebuilt = unflatten([t if t is None else t + 1 for t in leaves], structure)
    assert rebuilt[2] is None and rebuilt[0]["item"][1] is None and torch.equal(rebuilt[1], torch.arange(2) + 1)
    shapes = ({"user": {0: "b"}, "item": ({0: "n"}, None, [None])}, None, None)
    is_dims = lambda x: x is None or isinstance(x, dict) and all(isinstance(k, int) for k in x)  # noqa: E731
    dims, _ = flatten(shapes, is_leaf=is_dims)
    assert dims == [{0: "b"}, {0: "n"}, None, None, None, None]


@pytest.mark.parametrize("name", ["compute_local_shape_and_global_offset"])
def test_distributed_privates_are_where_we_take_them_from(name: str) -> None:
    from deepseek_moe.parallel import _torch_compat

    fn = getattr(_torch_compat, name)
    assert callable(fn), WHY + f"{name} is gone (deepseek_moe/parallel/_torch_compat.py)"
    _torch_compat.check()


def _private_torch_uses(path: Path) -> list[str]:
    """``torch.x._y`` attribute chains (through any name bound to a torch module) and imports of ``torch.x._y``
    modules or ``_names``, in one source file."""
    import ast

    tree = ast.parse(path.read_text())
    torch_names = {"torch"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("torch"):
                    torch_names.add((alias.asname or alias.name).split(".")[0])
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        found.append(f"{path.name}:{node.lineno} import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            module = node.module or ""
            for alias in node.names:
                torch_names.add(alias.asname or alias.name)
                if any(p.startswith("_") for p in [*module.split("."), alias.name]):
                    found.append(f"{path.name}:{node.lineno} from {module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root: ast.expr = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in torch_names:
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    return found


def test_only_the_adapters_reach_into_torch() -> None:
    src = Path(__file__).resolve().parents[2] / "src" / "deepseek_moe"
    adapters = {src / "_torch_compat.py", src / "parallel" / "_torch_compat.py"}
    uses = [u for path in sorted(src.rglob("*.py")) if path not in adapters for u in _private_torch_uses(path)]
    assert not uses, "torch's non-public API outside the adapters (move it into _torch_compat.py):\n" + "\n".join(uses)


def test_the_private_use_check_can_fail(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text("import torch\nimport torch.utils._pytree as pt\nfrom torch.distributed.tensor._utils import f\n"
                       "from torch import nn\nx = torch.ops.aten.add.Tensor._dispatch_cache\ny = nn.Module._apply\n")
    assert len(_private_torch_uses(planted)) == 4


def test_torch_still_answers_whether_bf16_matmuls_reach_onednn() -> None:
    answer = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert isinstance(answer, bool), WHY + "torch.ops.mkldnn._is_mkldnn_bf16_supported changed"
    assert mkldnn_bf16_supported() is answer
