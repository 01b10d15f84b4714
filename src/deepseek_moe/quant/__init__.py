"""Weight-only int8 / int4 quantisation: modules, the checkpoint format, quantise-on-load.

``quantize_model(model, QuantConfig(bits=8))`` quantises a model in memory; ``from_pretrained(path,
quantize="int8")`` while streaming; ``save_pretrained`` of a quantised model writes the format documented in
``quant/format.py`` (and docs/quantisation.md).
"""

from deepseek_moe.quant.apply import prepare_model, quant_config_of, quantize_model
from deepseek_moe.quant.config import PARTS, QUANT_METHOD, QuantConfig, parse_quantize
from deepseek_moe.quant.format import save_quantized
from deepseek_moe.quant.load import is_quantized_checkpoint, load_quantized, quantize_checkpoint
from deepseek_moe.quant.modules import QuantLinear, QuantRoutedExperts

__all__ = [
    "PARTS",
    "QUANT_METHOD",
    "QuantConfig",
    "QuantLinear",
    "QuantRoutedExperts",
    "is_quantized_checkpoint",
    "load_quantized",
    "parse_quantize",
    "prepare_model",
    "quant_config_of",
    "quantize_checkpoint",
    "quantize_model",
    "save_quantized",
]
