"""FP8 block-scaled checkpoints (DeepSeek-V3/R1's format) dequantised while streaming, against transformers' own
FP8 dequantisation (FineGrainedFP8, which dequantises on a machine without a GPU), and the errors for bad scales."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' FP8 loading requires it

from hf_fixtures import hf_classes, input_ids, make_hf_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from deepseek_moe.io import CheckpointError, load_pretrained  # noqa: E402
from deepseek_moe.io.hf import hf_to_ours  # noqa: E402

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Block-quantised like DeepSeek-V3: every Linear weight except the router; embeddings, head and norms stay.
_KEEP = re.compile(r".*(embed_tokens|lm_head|norm|mlp\.gate\.|e_score_correction_bias).*")


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 weight_scale_inv) with one scale per block; edge blocks may be partial."""
    rows, cols = w.shape
    bo, bi = block
    n_r, n_c = math.ceil(rows / bo), math.ceil(cols / bi)
    scale = torch.empty(n_r, n_c)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for r in range(n_r):
        for c in range(n_c):
            tile = w[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi].float()
            scale[r, c] = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            q[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi] = (tile / scale[r, c]).to(torch.float8_e4m3fn)
    return q, scale


def to_fp8_checkpoint(path: Path, block: tuple[int, int]) -> list[str]:
    """Rewrite a saved checkpoint's linear weights as FP8 + weight_scale_inv; returns the quantised keys."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    quantised = []
    for key in list(tensors):
        if key.endswith(".weight") and tensors[key].dim() == 2 and not _KEEP.match(key):
            tensors[key], tensors[key + "_scale_inv"] = quantize_blocks(tensors[key], block)
            quantised.append(key)
    save_file(tensors, file, metadata={"format": "pt"})
    data = json.loads((path / "config.json").read_text())
    data["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": list(block)}
    (path / "config.json").write_text(json.dumps(data, indent=2))
    return quantised


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    hf_model, _ = make_hf_model("deepseek_v3", q_lora_rank=24, n_group=4, topk_group=2)
    path = tmp_path_factory.mktemp("fp8")
    hf_model.save_pretrained(path)
    return path, to_fp8_checkpoint(path, (8, 8))  # every width here is a multiple of 8


def test_fp8_dequantised_like_transformers(fp8_checkpoint: tuple[Path, list[str]]) -> None:
    path, quantised = fp8_checkpoint
    _, model_cls = hf_classes("deepseek_v3")
    hf_model = model_cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                         experts_implementation="eager").eval()
    ours = load_pretrained(path, dtype=torch.float32)

    # Weight by weight: every quantised tensor equals transformers' dequantisation exactly.
    hf_state = hf_model.state_dict()
    for key in quantised:
        name, expert = hf_to_ours(key)  # type: ignore[misc]
        mine = ours.get_parameter(name)
        mine = mine[expert] if expert is not None else mine
        if key in hf_state:
            theirs = hf_state[key]
        else:  # transformers fuses experts: gate_up_proj (E, 2F, D) = gate over up, down_proj (E, D, F)
            layer, e, proj = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)_proj", key).groups()
            prefix = f"model.layers.{layer}.mlp.experts."
            if proj == "down":
                theirs = hf_state[prefix + "down_proj"][int(e)]
            else:
                gate, up = hf_state[prefix + "gate_up_proj"][int(e)].chunk(2, dim=0)
                theirs = gate if proj == "gate" else up
        assert torch.equal(mine, theirs.float()), key

    ids = input_ids()
    with torch.no_grad():
        diff = (ours(ids).logits - hf_model(ids).logits.float()).abs().max().item()
    assert diff <= 1e-4, f"max |ours - transformers| on the FP8 checkpoint = {diff:.3g}"
    # With no dtype asked for, config.json's (float32 here: transformers wrote it) decides; FP8 never leaks out.
    assert {p.dtype for p in load_pretrained(path).parameters()} == {torch.float32}


def test_partial_edge_blocks_use_their_own_scale(tmp_path: Path) -> None:
    """Widths that are not multiples of the block (V3's 576-row kv_a_proj_with_mqa at 128) dequantise per block,
    edge blocks included: checked against the blocks computed by hand."""
    from deepseek_moe.io.fp8 import dequantize_rows
    from deepseek_moe.io.safetensors_file import SafetensorsFile

    w = torch.randn(21, 13)
    q, scale = quantize_blocks(w, (8, 5))
    save_file({"w": q}, tmp_path / "x.safetensors")
    expected = q.float() * scale.repeat_interleave(8, 0)[:21].repeat_interleave(5, 1)[:, :13]
    out = torch.empty(21, 13)
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        dequantize_rows(f, "w", scale, (8, 5), out)
        assert torch.equal(out, expected)
        part = torch.empty(9, 13)
        dequantize_rows(f, "w", scale, (8, 5), part, start=6)  # rows 6..14 straddle a block edge
        assert torch.equal(part, expected[6:15])
    torch.testing.assert_close(out, w, rtol=0.07, atol=1e-3)  # and it is the weight, to FP8 precision


def _rewrite(path: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    dst.mkdir()
    for f in path.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_bad_fp8_scale_shape_names_the_tensor(fp8_checkpoint: tuple[Path, list[str]], tmp_path: Path) -> None:
    path, _ = fp8_checkpoint
    key = "model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"
    bad = _rewrite(path, tmp_path / "bad", lambda t: t.__setitem__(key, torch.ones(3, 3)))
    with pytest.raises(CheckpointError, match=re.escape(repr(key)) + r" has shape \[3, 3\], expected \[4, 2\] "
                       r"for weight 'model.layers.1.mlp.experts.2.down_proj.weight' of shape \[32, 16\]"):
        load_pretrained(bad)


def test_missing_fp8_scale_names_the_tensor(fp8_checkpoint: tuple[Path, list[str]], tmp_path: Path) -> None:
    path, _ = fp8_checkpoint
    key = "model.layers.0.self_attn.kv_b_proj.weight_scale_inv"
    bad = _rewrite(path, tmp_path / "bad", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match="'model.layers.0.self_attn.kv_b_proj.weight' has no block scale "
                       + re.escape(repr(key))):
        load_pretrained(bad)


def test_fp8_straight_to_int8(fp8_checkpoint: tuple[Path, list[str]]) -> None:
    """quantize= on an FP8 checkpoint: each weight is dequantised band by band and quantised to int8 while
    streaming (quant's transform reads TensorSource rows), never materialised as a bf16/fp32 model."""
    path, _ = fp8_checkpoint
    ref = load_pretrained(path, dtype=torch.float32)
    q = load_pretrained(path, dtype=torch.float32, quantize="int8")
    assert type(q.layers[0].attn.wkv_a).__name__ == "QuantLinear"
    ids = input_ids()
    with torch.no_grad():
        a, b = ref(ids).logits, q(ids).logits
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 0.05, f"int8 from FP8: relative logit error {rel:.3g}"
