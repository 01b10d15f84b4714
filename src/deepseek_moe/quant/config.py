"""What to quantise and how: :class:`QuantConfig`, and the ``quantization_config`` entry of config.json.

Scope (default): every linear weight except the token embedding and the router — routed experts, shared
experts, dense FFNs, attention projections and the output head. Parts named in ``keep`` stay in the
unquantised dtype:

* ``routed_experts``, ``shared_experts``, ``dense_ffn``, ``attention``, ``head``: the obvious groups;
* ``wkv_b`` (kept by default): MLA's absorbed attention reads this matrix whole at every step (it folds it into
  the query and output), so a quantised one would be dequantised every step; it is ~2% of V2-Lite's weights.
  Quantised on request, it still works: :class:`QuantLinear` then dequantises its matrix when asked.

A tied head is the embedding, which is never quantised, so with ``tie_word_embeddings`` the head stays too.
int4 groups run along the input; a weight whose input width is not a multiple of ``group_size`` falls back to
int8 per output channel (recorded per tensor: the codes' dtype says which).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

QUANT_METHOD = "deepseek_moe"
FORMAT_VERSION = 1
PARTS = ("routed_experts", "shared_experts", "dense_ffn", "attention", "head", "wkv_b")
GROUP_SIZES = (32, 64, 128)
DEFAULT_KEEP = frozenset({"wkv_b"})


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """bits: 8 (per output channel) or 4 (symmetric groups of ``group_size`` along the input)."""

    bits: Literal[8, 4]
    group_size: int = 32  # as llama.cpp's Q4_0: 4.5 bits per weight with float16 scales
    keep: frozenset[str] = field(default=DEFAULT_KEEP)

    def __post_init__(self) -> None:
        if self.bits not in (8, 4):
            raise ValueError(f"bits ({self.bits}) must be 8 or 4")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size ({self.group_size}) must be one of {GROUP_SIZES}")
        unknown = set(self.keep) - set(PARTS)
        if unknown:
            raise ValueError(f"keep ({sorted(unknown)}) names unknown parts; expected a subset of {PARTS}")
        object.__setattr__(self, "keep", frozenset(self.keep))

    def to_hf(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": self.bits,
                "group_size": self.group_size, "keep": sorted(self.keep),
                "int8": "weight int8 (out, in), weight_scale float32 (out,)",
                "int4": "weight uint8 (out, in/2), column 2j low nibble, 2j+1 high nibble, code+8; "
                        "weight_scale float16 (out, in/group_size)"}

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, source: str = "config.json") -> QuantConfig:
        method = hf.get("quant_method")
        if method != QUANT_METHOD:
            raise ValueError(f"{source}: quantization_config.quant_method {method!r} is not ours ({QUANT_METHOD!r})")
        version = hf.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"{source}: quantization format_version {version} is newer than this library's "
                             f"({FORMAT_VERSION}); upgrade deepseek_moe")
        try:
            return cls(bits=hf["bits"], group_size=hf.get("group_size", 32), keep=frozenset(hf.get("keep", ())))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{source}: bad quantization_config: {e}") from e


def parse_quantize(value: str | int | QuantConfig | None) -> QuantConfig | None:
    """``"int8"`` / ``"int4"`` / 8 / 4 / a QuantConfig / None, as ``from_pretrained(quantize=...)`` takes it."""
    if value is None or isinstance(value, QuantConfig):
        return value
    names: dict[str | int, Literal[8, 4]] = {"int8": 8, "int4": 4, 8: 8, 4: 4, "8": 8, "4": 4}
    if value not in names:
        raise ValueError(f"quantize ({value!r}) must be 'int8', 'int4' or a QuantConfig")
    return QuantConfig(bits=names[value])


def part_of(name: str) -> str | None:
    """Which quantisable part our parameter/module name belongs to, or None for what is never quantised
    (embedding, router, norms). ``layers.3.ffn.experts.w1`` -> routed_experts, ``head`` -> head."""
    if name.startswith("head"):
        return "head"
    if ".attn." in name:
        return "wkv_b" if ".wkv_b" in name else "attention"
    if ".ffn.experts." in name:
        return "routed_experts"
    if ".ffn.shared_experts." in name:
        return "shared_experts"
    if ".ffn.gate" in name:
        return None
    if ".ffn.w" in name:
        return "dense_ffn"
    return None
