"""Hugging Face DeepSeek-V2/V3 interop: the one name-mapping table, and config.json <-> ModelConfig.

Semantics follow transformers' ``deepseek_v2`` and ``deepseek_v3`` models (5.x):

* ``deepseek_v2``: softmax scores; ``topk_method`` ``greedy`` (plain top-K) or ``group_limited_greedy`` (the
  ``topk_group`` groups with the highest *max* affinity); ``norm_topk_prob`` is ignored (transformers never
  normalises V2 gates); ``routed_scaling_factor`` always applied; RoPE always on adjacent pairs.
* ``deepseek_v3``: sigmoid scores plus ``e_score_correction_bias`` for choosing only; always grouped, a group
  ranked by the sum of its two best bias-corrected scores; gates normalised when ``norm_topk_prob``;
  ``routed_scaling_factor`` always applied; RoPE on adjacent pairs when ``rope_interleave`` else split halves.

V2 ``greedy`` keeps ``n_group`` as ``n_expert_groups`` (so device-level balance losses still see the groups)
with ``n_limited_groups == n_expert_groups``: no group limit, exactly plain top-K.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, NoReturn

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.io.hf_common import FP8_METHOD, check_quantization, token_id
from deepseek_moe.io.hf_deepseek import config_from_deepseek
from deepseek_moe.io.recipe import with_published_recipe
from deepseek_moe.model.rope import yarn_mscale

# One row per tensor: our name <-> the Hugging Face checkpoint name. {i}: layer index, {e}: expert index.
# A ``[{e}]`` suffix on our side is one slice of a stacked (E, ...) expert parameter.
KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("embed.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("head.weight", "lm_head.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.attn.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attn.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),  # MHA (DeepSeekMoE 16B layout)
    ("layers.{i}.attn.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),  # MHA
    ("layers.{i}.attn.wq_a.weight", "model.layers.{i}.self_attn.q_a_proj.weight"),
    ("layers.{i}.attn.q_norm.weight", "model.layers.{i}.self_attn.q_a_layernorm.weight"),
    ("layers.{i}.attn.wq_b.weight", "model.layers.{i}.self_attn.q_b_proj.weight"),
    ("layers.{i}.attn.wkv_a.weight", "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"),
    ("layers.{i}.attn.kv_norm.weight", "model.layers.{i}.self_attn.kv_a_layernorm.weight"),
    ("layers.{i}.attn.wkv_b.weight", "model.layers.{i}.self_attn.kv_b_proj.weight"),
    ("layers.{i}.attn.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    # attention_bias: MLA has biases on q_a_proj, kv_a_proj_with_mqa and o_proj; MHA on q/k/v/o_proj.
    ("layers.{i}.attn.wq.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("layers.{i}.attn.wk.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("layers.{i}.attn.wv.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("layers.{i}.attn.wq_a.bias", "model.layers.{i}.self_attn.q_a_proj.bias"),
    ("layers.{i}.attn.wkv_a.bias", "model.layers.{i}.self_attn.kv_a_proj_with_mqa.bias"),
    ("layers.{i}.attn.wo.bias", "model.layers.{i}.self_attn.o_proj.bias"),
    ("layers.{i}.ffn.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.ffn.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("layers.{i}.ffn.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.ffn.gate.weight", "model.layers.{i}.mlp.gate.weight"),
    ("layers.{i}.ffn.gate.e_score_correction_bias", "model.layers.{i}.mlp.gate.e_score_correction_bias"),
    ("layers.{i}.ffn.shared_experts.w1.weight", "model.layers.{i}.mlp.shared_experts.gate_proj.weight"),
    ("layers.{i}.ffn.shared_experts.w2.weight", "model.layers.{i}.mlp.shared_experts.down_proj.weight"),
    ("layers.{i}.ffn.shared_experts.w3.weight", "model.layers.{i}.mlp.shared_experts.up_proj.weight"),
    ("layers.{i}.ffn.experts.w1[{e}]", "model.layers.{i}.mlp.experts.{e}.gate_proj.weight"),
    ("layers.{i}.ffn.experts.w2[{e}]", "model.layers.{i}.mlp.experts.{e}.down_proj.weight"),
    ("layers.{i}.ffn.experts.w3[{e}]", "model.layers.{i}.mlp.experts.{e}.up_proj.weight"),
)

# DeepSeek-V3's multi-token-prediction modules follow the main layers: MTP depth k (our ``mtp.{k-1}``) is checkpoint
# layer num_hidden_layers + k - 1, its block under that layer's usual keys (the table above with ``layers.{i}.`` ->
# ``mtp.{k}.block.``), beside its own tensors below and copies of the shared embedding and head.
MTP_KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("enorm.weight", "enorm.weight"),
    ("hnorm.weight", "hnorm.weight"),
    ("eh_proj.weight", "eh_proj.weight"),
    ("norm.weight", "shared_head.norm.weight"),
)
# (our shared tensor, the key of its copy in each MTP layer)
MTP_SHARED_COPIES: tuple[tuple[str, str], ...] = (
    ("embed.weight", "embed_tokens.weight"),
    ("head.weight", "shared_head.head.weight"),
)

# transformers 5 holds experts fused in memory; checkpoints saved that way are read too (load only).
# gate_up_proj (E, 2F, D) is gate_proj stacked over up_proj; down_proj (E, D, F).
FUSED_EXPERT_KEYS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("layers.{i}.ffn.experts.w1", "layers.{i}.ffn.experts.w3"), "model.layers.{i}.mlp.experts.gate_up_proj"),
    (("layers.{i}.ffn.experts.w2",), "model.layers.{i}.mlp.experts.down_proj"),
)


def _pattern(template: str) -> re.Pattern[str]:
    regex = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(regex + r"\Z")


_HF_TO_OURS = [(_pattern(hf), ours) for ours, hf in KEY_TABLE]
_OURS_TO_HF = [(_pattern(ours.removesuffix("[{e}]")), ours.endswith("[{e}]"), hf) for ours, hf in KEY_TABLE]
_FUSED = [(_pattern(hf), ours) for ours, hf in FUSED_EXPERT_KEYS]
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_HF_COMPANION = re.compile(r"(.*\.weight)(_\w+)\Z")
_OURS_COMPANION = re.compile(r"(.*\.(?:weight|w1|w2|w3))(_\w+)\Z")


def hf_layer_index(hf_key: str) -> int | None:
    m = _LAYER.match(hf_key)
    return int(m.group(1)) if m else None


def hf_to_ours(hf_key: str) -> tuple[str, int | None] | None:
    """``(our tensor name, expert index or None)`` for a checkpoint key, or None if it has no counterpart.

    A companion of a weight (``<key>.weight_<suffix>``, e.g. a quantised weight's ``weight_scale``) maps to our
    name of that weight plus ``_<suffix>``: ``...q_proj.weight_scale`` -> ``layers.0.attn.wq.weight_scale``,
    ``...experts.3.gate_proj.weight_scale`` -> ``layers.1.ffn.experts.w1_scale`` row 3.
    """
    for pattern, ours in _HF_TO_OURS:
        m = pattern.match(hf_key)
        if m:
            groups = m.groupdict()
            name = ours.removesuffix("[{e}]").replace("{i}", groups.get("i") or "")
            return name, (int(groups["e"]) if "e" in groups else None)
    companion = _HF_COMPANION.match(hf_key)
    if companion:
        base = hf_to_ours(companion.group(1))
        if base is not None:
            return base[0] + companion.group(2), base[1]
    return None


def hf_fused_to_ours(hf_key: str) -> list[str] | None:
    """Our stacked names for a transformers-fused expert tensor (``gate_up_proj`` -> [w1, w3]), or None."""
    for pattern, ours in _FUSED:
        m = pattern.match(hf_key)
        if m:
            return [part.replace("{i}", m.group("i")) for part in ours]
    return None


def ours_to_hf(name: str) -> tuple[str, bool] | None:
    """``(Hugging Face key template, stacked)`` for our tensor name; ``{e}`` in the key when stacked."""
    for pattern, stacked, hf in _OURS_TO_HF:
        m = pattern.match(name)
        if m:
            return hf.replace("{i}", m.groupdict().get("i") or ""), stacked
    companion = _OURS_COMPANION.match(name)
    if companion:
        base = ours_to_hf(companion.group(1))
        if base is not None:
            return base[0] + companion.group(2), base[1]
    return None


_MTP_NAME = re.compile(r"mtp\.(\d+)\.(.*)\Z")


def mtp_hf_to_ours(hf_key: str, n_layers: int) -> tuple[str, int | None] | str | None:
    """A key of an MTP layer (layer index >= ``n_layers``) in our names: ``(name, expert)`` like
    :func:`hf_to_ours`, or the name of the shared tensor (``embed.weight``, ``head.weight``) when the key is that
    layer's copy of it, or None for a key with no counterpart."""
    m = _LAYER.match(hf_key)
    if m is None or int(m.group(1)) < n_layers:
        return None
    k, rest = int(m.group(1)) - n_layers, hf_key[m.end():]
    for ours, theirs in MTP_KEY_TABLE:
        if rest == theirs:
            return f"mtp.{k}.{ours}", None
    for ours, theirs in MTP_SHARED_COPIES:
        if rest == theirs:
            return ours
    mapped = hf_to_ours(f"model.layers.0.{rest}")
    if mapped is None or not mapped[0].startswith("layers.0."):
        return None
    return f"mtp.{k}.block.{mapped[0].removeprefix('layers.0.')}", mapped[1]


def mtp_ours_to_hf(name: str, n_layers: int) -> tuple[str, bool] | None:
    """:func:`ours_to_hf` for a tensor of an MTP module (``mtp.{k}....``), whose layer index needs ``n_layers``."""
    m = _MTP_NAME.match(name)
    if m is None:
        return None
    layer, rest = n_layers + int(m.group(1)), m.group(2)
    for ours, theirs in MTP_KEY_TABLE:
        if rest == ours:
            return f"model.layers.{layer}.{theirs}", False
    if not rest.startswith("block."):
        return None
    mapped = ours_to_hf(f"layers.0.{rest.removeprefix('block.')}")
    if mapped is None:
        return None
    return mapped[0].replace("model.layers.0.", f"model.layers.{layer}.", 1), mapped[1]


# ----------------------------------------------------------------------------------------------------------
# config.json -> ModelConfig

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")

# transformers' defaults for the keys that change behaviour, used when config.json leaves them out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {"topk_method": "greedy", "scoring_func": "softmax", "n_group": None, "topk_group": None,
                    "norm_topk_prob": False, "routed_scaling_factor": 1.0, "n_shared_experts": 2,
                    "first_k_dense_replace": 0, "q_lora_rank": 1536, "rms_norm_eps": 1e-6,
                    "max_position_embeddings": 2048, "tie_word_embeddings": False, "initializer_range": 0.02,
                    "bos_token_id": 1, "eos_token_id": 2},
    "deepseek_v3": {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 8, "topk_group": 4,
                    "norm_topk_prob": True, "routed_scaling_factor": 2.5, "n_shared_experts": 1,
                    "first_k_dense_replace": 3, "q_lora_rank": 1536, "rms_norm_eps": 1e-6,
                    "max_position_embeddings": 4096, "tie_word_embeddings": False, "initializer_range": 0.02,
                    "bos_token_id": 0, "eos_token_id": 1, "rope_interleave": True},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
             "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
             "n_routed_experts", "num_experts_per_tok")


def _rope_fields(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """RoPE from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (DeepSeek's own)."""
    max_pos = int(hf.get("max_position_embeddings") or 0)
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = dict(hf.get(key) or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{source}: per-layer {key} are not supported (DeepSeek uses one RoPE for all layers)")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return {"rope_theta": theta}
    if rope_type != "yarn":
        raise ValueError(f"{source}: {key}.rope_type {rope_type!r} is not supported; "
                         "DeepSeek checkpoints use 'yarn' or 'default'")
    original = int(params.get("original_max_position_embeddings") or max_pos)
    factor = params.get("factor")
    factor = float(factor) if factor is not None else max_pos / original
    mscale: Any = params.get("mscale")
    mscale_all_dim: Any = params.get("mscale_all_dim")
    if params.get("truncate", True) is not True:
        raise ValueError(f"{source}: {key}.truncate False is not supported (YaRN here floors/ceils the "
                         "correction range, as DeepSeek does)")
    # transformers multiplies cos/sin by m(mscale)/m(mscale_all_dim) when both are set, by m(1) otherwise, and
    # the softmax scale by m(mscale_all_dim)^2 when mscale_all_dim is set. Only the combinations that one
    # (mscale, mscale_all_dim) pair expresses are accepted.
    if mscale_all_dim and not mscale:
        raise ValueError(f"{source}: {key} sets mscale_all_dim ({mscale_all_dim}) without mscale; "
                         "set both (DeepSeek uses equal values)")
    if not mscale_all_dim:
        mscale, mscale_all_dim = 1.0, 0.0
    if params.get("attention_factor") is not None:
        expected = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all_dim))
        if not math.isclose(float(params["attention_factor"]), expected, rel_tol=1e-6):
            raise ValueError(f"{source}: {key}.attention_factor ({params['attention_factor']}) is not supported; "
                             f"remove it so it follows from mscale/mscale_all_dim ({expected:.6g})")
    beta_fast = params.get("beta_fast") or 32.0
    beta_slow = params.get("beta_slow") or 1.0
    return {"rope_theta": theta, "rope_factor": factor, "original_seq_len": original,
            "beta_fast": float(beta_fast), "beta_slow": float(beta_slow),
            "mscale": float(mscale), "mscale_all_dim": float(mscale_all_dim)}


def mtp_layers(hf: Mapping[str, Any], source: str) -> int:
    """``num_nextn_predict_layers`` (DeepSeek-V3's MTP depth; absent: 0)."""
    value = hf.get("num_nextn_predict_layers") or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{source}: num_nextn_predict_layers ({value!r}) must be an integer >= 0")
    return value


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face DeepSeek ``config.json`` dict (``deepseek_v2``, ``deepseek_v3``, or DeepSeekMoE
    16B's ``deepseek``). Errors name ``source`` and the key. The MoE balance fields are the published training
    recipe that fits the routing (io/recipe.py), so fine-tuning a loaded model trains it as it was trained."""
    model_type = hf.get("model_type")
    if model_type == "deepseek":
        return config_from_deepseek(hf, source=source)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; expected one of "
                         f"{', '.join(map(repr, ('deepseek', *SUPPORTED_MODEL_TYPES)))}")
    check_quantization(hf, source)
    missing = [k for k in _REQUIRED if hf.get(k) is None]
    if missing:
        raise ValueError(f"{source}: missing key(s) {', '.join(missing)}")
    defaults = _DEFAULTS[model_type]

    def get(key: str) -> Any:
        value = hf.get(key, defaults.get(key))
        return defaults.get(key) if value is None and key in ("scoring_func", "norm_topk_prob") else value

    def reject(key: str, value: Any, rule: str) -> NoReturn:
        raise ValueError(f"{source}: {key} ({value!r}) {rule}")

    if hf.get("hidden_act", "silu") != "silu":
        reject("hidden_act", hf["hidden_act"], "is not supported; DeepSeek uses 'silu'")
    if hf.get("mlp_bias"):
        reject("mlp_bias", hf["mlp_bias"], "is not supported (no biases in DeepSeek's FFNs)")
    if hf.get("moe_layer_freq", 1) != 1:
        reject("moe_layer_freq", hf["moe_layer_freq"], "is not supported; every layer after "
               "first_k_dense_replace is MoE")
    n_heads = int(hf["num_attention_heads"])
    if hf.get("num_key_value_heads") not in (None, n_heads):
        reject("num_key_value_heads", hf["num_key_value_heads"], f"must equal num_attention_heads ({n_heads}) "
               "for MLA")

    n_experts = int(hf["n_routed_experts"])
    n_group = int(get("n_group") or 1)
    topk_group = int(get("topk_group") or n_group)
    scoring = get("scoring_func")
    topk_method = get("topk_method")
    if model_type == "deepseek_v2":
        if scoring != "softmax":
            reject("scoring_func", scoring, "contradicts model_type 'deepseek_v2' (softmax); "
                   "use model_type 'deepseek_v3' for sigmoid routing")
        if topk_method == "greedy":
            n_limited = n_group
        elif topk_method == "group_limited_greedy":
            n_limited = topk_group
        else:
            reject("topk_method", topk_method, "contradicts model_type 'deepseek_v2'; expected 'greedy' or "
                   "'group_limited_greedy'")
        routing: dict[str, Any] = {"score_func": "softmax", "group_score_func": "max",
                                   "norm_topk_prob": False, "use_routing_bias": False}
        rope_interleave = True
    else:
        if scoring != "sigmoid":
            reject("scoring_func", scoring, "contradicts model_type 'deepseek_v3' (sigmoid)")
        if topk_method not in (None, "noaux_tc"):
            reject("topk_method", topk_method, "contradicts model_type 'deepseek_v3'; expected 'noaux_tc'")
        n_limited = topk_group
        routing = {"score_func": "sigmoid", "group_score_func": "top2_sum",
                   "norm_topk_prob": bool(get("norm_topk_prob")), "use_routing_bias": True}
        rope_interleave = bool(get("rope_interleave"))

    dim = int(hf["hidden_size"])
    init_std = float(get("initializer_range"))
    max_pos = int(get("max_position_embeddings"))
    rope = _rope_fields({**hf, "max_position_embeddings": max_pos}, source)
    rope.setdefault("original_seq_len", max_pos)
    try:
        moe = MoEConfig(dim=dim, moe_inter_dim=int(hf["moe_intermediate_size"]), n_routed_experts=n_experts,
                        n_activated_experts=int(hf["num_experts_per_tok"]),
                        n_shared_experts=int(get("n_shared_experts") or 0),
                        n_expert_groups=n_group, n_limited_groups=n_limited,
                        route_scale=float(get("routed_scaling_factor")), init_std=init_std, **routing)
        return ModelConfig(
            attention_bias=bool(hf.get("attention_bias", False)), moe=with_published_recipe(moe),
            vocab_size=int(hf["vocab_size"]), dim=dim, inter_dim=int(hf["intermediate_size"]),
            n_layers=int(hf["num_hidden_layers"]), n_dense_layers=int(get("first_k_dense_replace") or 0),
            n_heads=n_heads, max_seq_len=max_pos, attention="mla", mtp_depth=mtp_layers(hf, source),
            q_lora_rank=int(get("q_lora_rank") or 0), kv_lora_rank=int(hf["kv_lora_rank"]),
            qk_nope_head_dim=int(hf["qk_nope_head_dim"]), qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
            v_head_dim=int(hf["v_head_dim"]), rope_interleave=rope_interleave,
            norm_eps=float(get("rms_norm_eps")), tie_word_embeddings=bool(get("tie_word_embeddings")),
            init_std=init_std, bos_token_id=token_id(get("bos_token_id"), "bos_token_id", source),
            eos_token_id=token_id(get("eos_token_id"), "eos_token_id", source), **rope)
    except ValueError as err:  # the dataclasses' rules (ours), said about this file (HF key names differ)
        raise ValueError(f"{source}: {err}") from err


# ----------------------------------------------------------------------------------------------------------
# ModelConfig -> config.json

def hf_model_type(cfg: ModelConfig) -> str:
    """``deepseek_v2`` or ``deepseek_v3`` for a config, or ValueError saying what transformers can't express."""
    def cannot(what: str) -> ValueError:
        return ValueError(f"transformers' DeepSeek models cannot express {what}")

    if cfg.attention != "mla":
        raise cannot(f"attention={cfg.attention!r} (only 'mla')")
    moe = cfg.moe
    if moe.score_func == "softmax":
        if moe.use_routing_bias:
            raise cannot("use_routing_bias=True with score_func='softmax' (the bias exists only in deepseek_v3, "
                         "which uses sigmoid)")
        if moe.norm_topk_prob:
            raise cannot("norm_topk_prob=True with score_func='softmax' (deepseek_v2 never normalises gates)")
        if moe.group_limited and moe.group_score_func != "max":
            raise cannot(f"group_score_func={moe.group_score_func!r} with softmax (deepseek_v2 ranks groups by max)")
        if not cfg.rope_interleave:
            raise cannot("rope_interleave=False with softmax routing (deepseek_v2 always rotates adjacent pairs)")
        return "deepseek_v2"
    if moe.group_limited and moe.group_score_func != "top2_sum":
        raise cannot(f"group_score_func={moe.group_score_func!r} with sigmoid (deepseek_v3 ranks groups by the "
                     "sum of their two best scores)")
    # sigmoid without the bias is deepseek_v3 with a zero e_score_correction_bias.
    return "deepseek_v3"


def config_to_hf(cfg: ModelConfig, *, dtype: str | None = None) -> dict[str, Any]:
    """A transformers-5 ``config.json`` dict for ``cfg`` (``rope_parameters`` style)."""
    model_type = hf_model_type(cfg)
    moe = cfg.moe
    if cfg.rope_factor > 1.0:
        rope: dict[str, Any] = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                                "original_max_position_embeddings": cfg.original_seq_len,
                                "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
                                "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale_all_dim}
        if not cfg.mscale_all_dim and cfg.mscale != 1.0:
            raise ValueError(f"transformers' DeepSeek models cannot express mscale ({cfg.mscale}) with "
                             "mscale_all_dim 0 (transformers then uses mscale 1)")
    else:
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    out: dict[str, Any] = {
        "architectures": ["DeepseekV2ForCausalLM" if model_type == "deepseek_v2" else "DeepseekV3ForCausalLM"],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": moe.moe_inter_dim, "num_hidden_layers": cfg.n_layers,
        "first_k_dense_replace": cfg.n_dense_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads, "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rope_parameters": rope,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.init_std, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "attention_bias": cfg.attention_bias,
        "n_routed_experts": moe.n_routed_experts, "n_shared_experts": moe.n_shared_experts,
        "num_experts_per_tok": moe.n_activated_experts, "n_group": moe.n_expert_groups,
        "topk_group": moe.n_limited_groups, "routed_scaling_factor": moe.route_scale,
        "norm_topk_prob": moe.norm_topk_prob,
    }
    if model_type == "deepseek_v2":
        out["topk_method"] = "group_limited_greedy" if moe.group_limited else "greedy"
        out["scoring_func"] = "softmax"
    else:
        out["topk_method"] = "noaux_tc"
        out["scoring_func"] = "sigmoid"
        out["rope_interleave"] = cfg.rope_interleave
    # DeepSeek-V3's key; a deepseek_v2 model with MTP modules stores them the same way (V2 never shipped any)
    if model_type == "deepseek_v3" or cfg.mtp_depth:
        out["num_nextn_predict_layers"] = cfg.mtp_depth
    if dtype is not None:
        out["dtype"] = dtype
    return out


__all__ = ["FP8_METHOD", "FUSED_EXPERT_KEYS", "KEY_TABLE", "MTP_KEY_TABLE", "MTP_SHARED_COPIES", "SUPPORTED_MODEL_TYPES",
           "config_from_hf", "config_to_hf", "hf_fused_to_ours", "hf_layer_index", "hf_model_type", "hf_to_ours",
           "mtp_hf_to_ours", "mtp_layers", "mtp_ours_to_hf", "ours_to_hf"]
