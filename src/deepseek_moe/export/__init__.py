"""ONNX export of modules with DeepSeekMoE layers and of the language model, int8 quantisation, and ONNX
Runtime inference. Needs the optional ``[export]`` extra (onnx, onnxruntime, onnxscript).

* :func:`to_onnx` — any nn.Module; its MoE layers are exported in the dense all-experts form (:class:`DenseMoE`).
* :func:`quantize_int8` — ONNX Runtime dynamic quantisation, experts included.
* :func:`export_language_model` — prefill/decode graphs with the latent cache as explicit tensors
  (``deepseek-moe export onnx``); :class:`OnnxLM` / :func:`generate_onnx` generate with ONNX Runtime alone.
"""

from deepseek_moe.export.errors import ExportError
from deepseek_moe.export.lm import export_language_model
from deepseek_moe.export.moe import DenseMoE, check_exportable, dense_moe_layers
from deepseek_moe.export.onnx import to_onnx
from deepseek_moe.export.quantize import model_bytes, quantize_int8
from deepseek_moe.export.runtime import OnnxLM, generate_onnx

__all__ = ["DenseMoE", "ExportError", "OnnxLM", "check_exportable", "dense_moe_layers", "export_language_model",
           "generate_onnx", "model_bytes", "quantize_int8", "to_onnx"]
