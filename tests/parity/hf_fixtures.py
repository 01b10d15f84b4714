"""Tiny, fully randomised transformers DeepSeek-V2/V3 checkpoints built inside the tests, and routing margins.

Every parameter and buffer (norm weights and V3's correction bias too) is redrawn, so a mapping that swaps two
same-shaped tensors or drops a norm cannot go unnoticed. A seed is accepted only if every token's routing
decision has a margin > MARGIN, so a 1e-6 numerical difference between the two implementations can't flip an
expert choice and hide (or fake) a bug.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

MARGIN = 1e-4
VOCAB = 96
BATCH, SEQ = 2, 12

BASE: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=2,
    num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1,
)

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}


def hf_classes(model_type: str) -> tuple[type, type]:
    import transformers

    if model_type == "deepseek_v2":
        return transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM
    return transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM


def hf_config(model_type: str, **overrides: Any) -> Any:
    config_cls, _ = hf_classes(model_type)
    kwargs = {**BASE, **overrides}
    if model_type == "deepseek_v3":
        kwargs.setdefault("num_nextn_predict_layers", 0)
    cfg = config_cls(**kwargs)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter and persistent buffer: norms around 1, weights at a scale that keeps logits O(1)."""
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "rotary_emb" in name:
                continue
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            if "norm" in name:
                tensor.copy_(1.0 + 0.2 * noise)
            elif "e_score_correction_bias" in name:
                tensor.copy_(0.05 * noise)
            elif "gate.weight" in name:
                tensor.copy_(0.5 * noise)  # spread router scores so top-K margins are wide
            else:
                fan_in = tensor.shape[-1]
                tensor.copy_(noise / fan_in**0.5)


def input_ids(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def routing_margins(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """The smallest decision margin over every token and MoE layer of a transformers DeepSeek model.

    Expert margin: gap between the K-th and (K+1)-th choice score among experts of the kept groups; group
    margin: gap between the topk_group-th and next group score.
    """
    cfg = model.config
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach()))
             for name, m in model.named_modules() if name.endswith("mlp.gate")]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    gates = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    with torch.no_grad():
        return _smallest_margin(cfg, gates, captured)


def _smallest_margin(cfg: Any, gates: list[torch.nn.Module], captured: list[torch.Tensor]) -> float:
    smallest = float("inf")
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    for gate, x in zip(gates, captured, strict=True):
        logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).float(), gate.weight.float())
        if cfg.model_type == "deepseek_v2":
            choice = logits.softmax(-1)
            grouped = cfg.topk_method == "group_limited_greedy"
            group_scores = choice.view(-1, cfg.n_group, E // cfg.n_group).amax(-1) if grouped else None
        else:
            choice = logits.sigmoid() + gate.e_score_correction_bias
            grouped = True
            group_scores = choice.view(-1, cfg.n_group, E // cfg.n_group).topk(2, dim=-1).values.sum(-1)
        if grouped and cfg.topk_group < cfg.n_group:
            top = group_scores.sort(-1, descending=True).values
            smallest = min(smallest, float((top[:, cfg.topk_group - 1] - top[:, cfg.topk_group]).min()))
            kept = group_scores.topk(cfg.topk_group, dim=-1).indices
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
            choice = choice.view(-1, cfg.n_group, E // cfg.n_group).masked_fill(~mask[..., None], float("-inf"))
            choice = choice.view(-1, E)
        top = choice.sort(-1, descending=True).values
        if torch.isfinite(top[:, K]).all():
            smallest = min(smallest, float((top[:, K - 1] - top[:, K]).min()))
    return smallest


def make_hf_model(model_type: str, *, seed: int = 0, tries: int = 30, **overrides: Any) -> tuple[Any, int]:
    """A randomised transformers model whose routing margins on ``input_ids(seed)`` all exceed MARGIN."""
    _, model_cls = hf_classes(model_type)
    cfg = hf_config(model_type, **overrides)
    for attempt in range(tries):
        torch.manual_seed(seed + attempt)
        model = model_cls(cfg).eval()
        randomise(model, torch.Generator().manual_seed(seed + attempt))
        if model.config.tie_word_embeddings:
            assert model.lm_head.weight is model.model.embed_tokens.weight
        if routing_margins(model, input_ids(seed)) > MARGIN:
            return model, seed + attempt
    raise AssertionError(f"no seed in [{seed}, {seed + tries}) gives routing margins > {MARGIN}")


def rewrite_config(path: Path, **changes: Any) -> dict[str, Any]:
    """Edit a saved config.json (None removes a key); returns the new dict."""
    file = path / "config.json"
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    file.write_text(json.dumps(data, indent=2))
    return data


def to_published_rope(path: Path) -> None:
    """Rewrite transformers-5 ``rope_parameters`` as DeepSeek's published ``rope_theta`` + ``rope_scaling``."""
    data = json.loads((path / "config.json").read_text())
    params = dict(data.pop("rope_parameters"))
    data["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    data["rope_scaling"] = params if params["type"] != "default" else None
    (path / "config.json").write_text(json.dumps(data, indent=2))
