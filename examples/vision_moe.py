"""The DeepSeekMoE layer in a vision transformer: handwritten digits, MoE FFNs against two dense ViTs.

Three small ViTs that differ only in their FFNs classify scikit-learn's bundled handwritten digits (1,797 real
8x8 images, 10 classes; no download): 2x2 patches are 16 tokens plus a class token, then pre-norm transformer
blocks whose FFN is

    moe            a DeepSeekMoE layer: 1 shared + top-3 of 15 routed experts of width W (activated 4W)
    dense_wide     a dense SwiGLU of width 16W: the MoE's total parameters, 4x its compute per token
    dense_equal    a dense SwiGLU of width 4W: the MoE's activated compute per token

Each trains for the same number of epochs on the same batches (AdamW, cosine schedule), then reports test accuracy,
parameters (total and activated per token) and inference images/s, measured side by side in one run.

    python examples/vision_moe.py [--epochs 30] [--threads 1] [--out runs/vision_moe]

Needs scikit-learn (pip install scikit-learn; it is in the test extra). Prints a table and one JSON line and
writes test accuracy curves and the routing heatmap to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe import MoE, MoEConfig, collect_aux_loss, plot_routing_heatmap, routing_counts
from deepseek_moe.figure import figure
from deepseek_moe.moe.experts import FeedForward

MODELS = ("moe", "dense_wide", "dense_equal")


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> dict[str, torch.Tensor]:
    """The digits as (N, 8, 8) floats in [0, 1] and labels, split at random (fixed seed) into train and test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(y))
    test, train = order[:n_test], order[n_test:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, ffn: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, n_heads, batch_first=True)
        self.ffn = ffn

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.ffn(self.norm2(h))


class ViT(nn.Module):
    """Patches of ``patch`` x ``patch`` pixels as tokens, a class token, learned positions, ``n_layers`` blocks."""

    def __init__(self, make_ffn, *, dim: int, n_layers: int, n_heads: int, patch: int = 2, image: int = 8,
                 n_classes: int = 10) -> None:
        super().__init__()
        self.patch = patch
        n_patches = (image // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, n_heads, make_ffn(i)) for i in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B, H, W = images.shape
        p = self.patch
        patches = images.view(B, H // p, p, W // p, p).permute(0, 1, 3, 2, 4).reshape(B, -1, p * p)
        h = torch.cat([self.cls.expand(B, -1, -1), self.embed(patches)], dim=1) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


def build(name: str, *, dim: int, width: int, n_layers: int, n_heads: int, seed: int) -> nn.Module:
    """One of MODELS; ``width`` is W, one routed expert's hidden width."""
    torch.manual_seed(seed)
    if name == "moe":
        cfg = MoEConfig(dim=dim, moe_inter_dim=width, n_routed_experts=15, n_activated_experts=3,
                        n_shared_experts=1, expert_loss_alpha=0.01, seed=seed)
        return ViT(lambda i: MoE(cfg, layer_id=i), dim=dim, n_layers=n_layers, n_heads=n_heads)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    ffn_width = 16 * width if name == "dense_wide" else 4 * width
    return ViT(lambda i: FeedForward(dim, ffn_width), dim=dim, n_layers=n_layers, n_heads=n_heads)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, activated per token): a routed expert counts toward the activated ones K/E of the time."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            routed = sum(p.numel() for p in m.experts.parameters())
            inactive += routed - routed // m.cfg.n_routed_experts * m.cfg.n_activated_experts
    return total, total - inactive


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def images_per_s(model: nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    """Inference throughput on ``x`` in batches of 256: the best of ``repeats`` passes (after one warm-up)."""
    model.eval()
    best = math.inf
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            for chunk in x.split(256):
                model(chunk)
            if i:
                best = min(best, time.perf_counter() - t0)
    return len(x) / best


def train(models: dict[str, nn.Module], data: dict[str, torch.Tensor], *, epochs: int, batch_size: int, lr: float,
          seed: int, log=print) -> dict[str, list[float]]:
    """All models on the same batches in the same order, interleaved (so a busy machine slows them alike);
    returns each model's test accuracy after every epoch."""
    x, y = data["x_train"], data["y_train"]
    steps = epochs * math.ceil(len(y) / batch_size)
    opts = {n: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.05) for n, m in models.items()}
    scheds = {n: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=lr, total_steps=steps, pct_start=0.1)
              for n, o in opts.items()}
    curves: dict[str, list[float]] = {n: [] for n in models}
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for idx in order.split(batch_size):
            xb = x[idx]
            for name, model in models.items():
                model.train()
                loss = F.cross_entropy(model(xb), y[idx]) + collect_aux_loss(model)
                loss.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                scheds[name].step()
        for name, model in models.items():
            curves[name].append(accuracy(model, data["x_test"], data["y_test"]))
        log(f"epoch {epoch + 1:3d}/{epochs}: " + "  ".join(f"{n} {c[-1]:.3f}" for n, c in curves.items()))
    return curves


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--width", type=int, default=32, help="W: one routed expert's hidden width")
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="runs/vision_moe")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda *a, **k: None) if args.quiet else print
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = load_digits_split(args.seed)
    models = {n: build(n, dim=args.dim, width=args.width, n_layers=args.n_layers, n_heads=args.n_heads,
                       seed=args.seed) for n in MODELS}
    t0 = time.perf_counter()
    curves = train(models, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, log=log)
    results: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        total, activated = parameter_counts(model)
        results[name] = {"test_accuracy": curves[name][-1], "best_test_accuracy": max(curves[name]),
                         "total_params": total, "activated_params": activated}
    for _ in range(2):  # interleaved rounds: each model's best
        for name, model in models.items():
            results[name]["images_per_s"] = max(results[name].get("images_per_s", 0.0),
                                                images_per_s(model, data["x_test"]))

    log(f"\n{len(data['y_train'])} train / {len(data['y_test'])} test digits, {args.epochs} epochs, "
        f"{time.perf_counter() - t0:.0f} s; {torch.get_num_threads()} threads")
    log(f"{'model':12s} {'test acc':>8s} {'best':>6s} {'params':>9s} {'activated':>9s} {'images/s':>9s}")
    for name, r in results.items():
        log(f"{name:12s} {r['test_accuracy']:8.3f} {r['best_test_accuracy']:6.3f} {r['total_params']:9,d} "
            f"{r['activated_params']:9,d} {r['images_per_s']:9,.0f}")

    with figure(out / "test_accuracy.png", figsize=(6, 4), title="Handwritten digits: test accuracy",
                xlabel="epoch", ylabel="test accuracy", legend=True) as ax:
        for name, c in curves.items():
            ax.plot(range(1, len(c) + 1), c, label=name)
    moe_model = models["moe"]
    moe_model.eval()
    with torch.no_grad():
        moe_model(data["x_test"])
    plot_routing_heatmap(routing_counts(moe_model), out / "routing_heatmap.png",
                         title="ViT-MoE: test images' tokens per routed expert")
    record = {"example": "vision_moe", "epochs": args.epochs, **{n: r for n, r in results.items()}}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))
    return results


if __name__ == "__main__":
    main()
