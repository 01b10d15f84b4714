"""What routing looks like: tokens per expert of each MoE layer (``routing_counts``) and the heatmap of them."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deepseek_moe.figure import figure


def routing_counts(model: nn.Module) -> torch.Tensor | None:
    """(L, E) tokens per expert of each MoE layer's last forward (float32, CPU); None before any forward or in a
    model without MoE layers."""
    from deepseek_moe.moe.all_layers import moe_layers

    rows = [moe.last_stats.tokens_per_expert.float().cpu() for _, moe in moe_layers(model)
            if moe.last_stats is not None]
    return torch.stack(rows) if rows else None


def plot_routing_heatmap(counts_LE: torch.Tensor, path: str | Path, *, title: str = "Tokens routed per expert",
                         layer_labels: list[str] | None = None) -> Path:
    """Write a heatmap of the share of each layer's assignments that each expert received."""
    if counts_LE is None:
        raise ValueError("no MoE layer has routing statistics yet: run a forward pass first")
    counts = torch.as_tensor(counts_LE, dtype=torch.float32)
    if counts.dim() != 2:
        raise ValueError(f"counts_LE must be 2-D (layers, experts), got shape {tuple(counts.shape)}")
    share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1e-9)
    n_layers, n_experts = share.shape
    path = Path(path)
    with figure(path, figsize=(max(6.0, 0.12 * n_experts + 2), max(2.5, 0.35 * n_layers + 1.5)), grid=False,
                title=f"{title} (uniform = {1 / n_experts:.3f})", xlabel="expert", ylabel="MoE layer") as ax:
        image = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(n_layers), layer_labels or [str(i) for i in range(n_layers)])
        ax.figure.colorbar(image, ax=ax, label="share of assignments")
    return path
