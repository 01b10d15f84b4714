"""The DeepSeekMoE layer outside language models: a click-through-rate model for a synthetic recommender.

Users, items and a context (hour of day, device) are embedded and mixed; a DeepSeekMoE layer (shared experts for
what all users have in common, fine-grained routed experts for the rest) sits in the residual stream; a head
predicts the click. The data is made here: users and items belong to hidden segments, and the click probability
depends on the segment pair and the context, so a well-routed MoE can specialise experts by segment.

    python examples/recommender.py [--seconds 60] [--out runs/recommender]

Prints train/validation loss and AUC, and writes the routing heatmap (one row per MoE layer) to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe import MoE, MoEConfig, collect_aux_loss, plot_routing_heatmap, routing_counts


def make_data(n: int, *, n_users: int, n_items: int, n_segments: int, seed: int) -> dict[str, torch.Tensor]:
    """Synthetic impressions: click logit = affinity[user segment, item segment] + context effect + noise."""
    g = torch.Generator().manual_seed(seed)
    user_segment = torch.randint(0, n_segments, (n_users,), generator=torch.Generator().manual_seed(1))
    item_segment = torch.randint(0, n_segments, (n_items,), generator=torch.Generator().manual_seed(2))
    affinity = torch.randn(n_segments, n_segments, generator=torch.Generator().manual_seed(3)) * 2.0
    hour_effect = torch.randn(n_segments, 24, generator=torch.Generator().manual_seed(4))
    users = torch.randint(0, n_users, (n,), generator=g)
    items = torch.randint(0, n_items, (n,), generator=g)
    hours = torch.randint(0, 24, (n,), generator=g)
    device = torch.randint(0, 3, (n,), generator=g)
    logit = (affinity[user_segment[users], item_segment[items]] + hour_effect[item_segment[items], hours]
             + 0.5 * (device == 2).float() - 0.5)
    clicks = torch.bernoulli(torch.sigmoid(logit), generator=g)
    return {"user": users, "item": items, "hour": hours, "device": device, "click": clicks}


class CTRModel(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int, moe_cfg: MoEConfig, n_layers: int = 2) -> None:
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        self.hour = nn.Embedding(24, dim)
        self.device = nn.Embedding(3, dim)
        self.mix = nn.Linear(4 * dim, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_layers))
        self.moes = nn.ModuleList(MoE(moe_cfg, layer_id=i) for i in range(n_layers))
        self.head = nn.Linear(dim, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.mix(torch.cat([self.user(batch["user"]), self.item(batch["item"]), self.hour(batch["hour"]),
                                self.device(batch["device"])], dim=-1))
        for norm, moe in zip(self.norms, self.moes, strict=True):
            h = h + moe(norm(h))  # (N, dim): each impression is one "token"; the residual is ours to add
        return self.head(h).squeeze(-1)


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve via the rank-sum statistic."""
    ranks = torch.empty_like(scores).scatter_(0, scores.argsort(), torch.arange(1, len(scores) + 1, dtype=scores.dtype))
    pos = labels.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / max(n_pos * n_neg, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    parser.add_argument("--out", type=Path, default=Path("runs/recommender"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    n_users, n_items, n_segments, dim = 2000, 500, 8, 64
    train = make_data(200_000, n_users=n_users, n_items=n_items, n_segments=n_segments, seed=args.seed)
    val = make_data(20_000, n_users=n_users, n_items=n_items, n_segments=n_segments, seed=args.seed + 1)
    moe_cfg = MoEConfig(dim=dim, moe_inter_dim=32, n_routed_experts=16, n_activated_experts=3, n_shared_experts=1,
                        expert_loss_alpha=0.01)
    model = CTRModel(n_users, n_items, dim, moe_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = model(val)
        model.train()
        return float(F.binary_cross_entropy_with_logits(logits, val["click"])), auc(logits, val["click"])

    base_rate = float(train["click"].mean())
    print(f"click rate {base_rate:.3f}; a constant predictor's loss is "
          f"{float(F.binary_cross_entropy(torch.tensor(base_rate), torch.tensor(base_rate))):.4f}")
    start, step, batch_size = time.time(), 0, 1024
    while time.time() - start < args.seconds:
        idx = torch.randint(0, len(train["click"]), (batch_size,))
        batch = {k: v[idx] for k, v in train.items()}
        loss = F.binary_cross_entropy_with_logits(model(batch), batch["click"])
        opt.zero_grad(set_to_none=True)
        (loss + collect_aux_loss(model)).backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            val_loss, val_auc = evaluate()
            cv = [round(moe.last_stats.imbalance_cv, 2) for moe in model.moes if moe.last_stats]
            print(f"step {step:5d}  train {loss.item():.4f}  val {val_loss:.4f}  AUC {val_auc:.3f}  load CV {cv}")

    val_loss, val_auc = evaluate()
    model.eval()
    with torch.no_grad():
        model(val)  # route the whole validation set for the heatmap
    heatmap = plot_routing_heatmap(routing_counts(model), args.out / "routing_heatmap.png",
                                   title="Recommender: impressions per expert")
    result = {"steps": step, "val_loss": round(val_loss, 4), "val_auc": round(val_auc, 4), "heatmap": str(heatmap)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
