"""int8 weights through ONNX Runtime's dynamic quantisation (the design's path).

``quantize_dynamic`` rewrites MatMuls whose weight is a constant into int8 MatMulInteger (activations quantised
per call), Gathers of constant tables (embeddings) into int8 tables, and LSTMs into DynamicQuantizeLSTM. The
dense MoE form keeps every expert's weights in two such MatMuls per layer, so the experts are quantised with
the rest. The MoE gates (the router's ``gate.weight``) are left in float32: an int8 router would move the
top-K choice of near-tied experts, a discrete change, for a saving of E * D weights per layer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from deepseek_moe.export.errors import ExportError
from deepseek_moe.export.onnx import check_writable, staged_directory


def quantize_int8(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, per_channel: bool = False,
                  reduce_range: bool = True) -> Path:
    """Write the int8 (QInt8 weights, dynamic activations) version of the ONNX model ``src`` to ``dst``.

    ``reduce_range`` (default on) stores 7-bit weights: ONNX Runtime's u8 x s8 kernels on x86 CPUs without VNNI
    (AVX2, AVX-512F) add pairs of products in saturating int16 (vpmaddubsw), which 8-bit weights overflow. On an
    AVX2-only EPYC, tests/export/test_to_onnx.py's classifier erred by a mean 10.6% of its logits' range with
    8-bit weights and 1.9% with 7-bit ones (1.5% with 8-bit on a VNNI machine). A quantised file runs wherever
    it is copied, so the safe range is the default; turn it off only for models that run on VNNI/AMX CPUs.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ExportError(f"{src}: no such ONNX file")
    check_writable(dst)
    external = Path(f"{src}.data").exists()
    keep_float = router_nodes(src)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # its advice to run shape-inference pre-processing, printed every call
    try:
        with staged_directory(dst.parent) as stage:
            quantize_dynamic(src, stage / dst.name, weight_type=QuantType.QInt8, per_channel=per_channel,
                             reduce_range=reduce_range, use_external_data_format=external, nodes_to_exclude=keep_float,
                             extra_options={"MatMulConstBOnly": True})
    finally:
        logging.disable(previous)
    return dst


def router_nodes(path: Path) -> list[str]:
    """Names of the nodes that multiply by a MoE router weight (an initializer named ``...gate.weight``),
    directly or through a Transpose/Cast of it."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    sources = {t.name for t in graph.initializer if t.name.endswith("gate.weight")}
    names = []
    for node in graph.node:  # topological order: a Transpose of the weight comes before its consumer
        if any(i in sources for i in node.input):
            if node.op_type in ("Transpose", "Cast", "Identity"):
                sources.update(node.output)
            else:
                # The quantiser splits a Gemm into MatMul + Add before matching names.
                names += [node.name, f"{node.name}_MatMul"]
    return names


def model_bytes(path: str | os.PathLike[str]) -> int:
    """Size of an ONNX model on disk, its external data files included."""
    import onnx

    path = Path(path)
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return total + sum((path.parent / loc).stat().st_size for loc in locations)
