"""The design's credit-risk model, end to end: DeepSeekMoE layer -> LSTM (batch_first) -> 5 risk grades,
trained on synthetic enterprise sequences, exported to ONNX, quantised to int8 and served from ONNX Runtime.

Each enterprise is a sequence of ``seq_len`` monthly reports of 256 features. Its sector (one of 8) sets a
feature signature; a hidden risk level r moves the features along a sector-specific direction over time (a
drift that grows with r) and adds shocks (late payments) whose frequency grows with r; the grade is r's quintile.
So the signal is learnable but not linear in any single month: the MoE layer can route by sector, the LSTM
integrates the drift and counts the shocks.

    python examples/risk_model.py [--seconds 60] [--seq-len 64] [--out runs/risk_model]

Prints validation accuracy in PyTorch, ONNX Runtime fp32 and int8, then per-request latency (batch 1) p50/p99
of each, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe import MoE, MoEConfig, collect_aux_loss
from deepseek_moe.export import model_bytes, quantize_int8, to_onnx

N_FEATURES, N_SECTORS, N_GRADES = 256, 8, 5


def make_data(n: int, *, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, seq_len, 256) float32, grade (n,) int64). The sector structure is fixed (seed 0), the sampled
    enterprises depend on ``seed``."""
    world = torch.Generator().manual_seed(0)
    signature = torch.randn(N_SECTORS, N_FEATURES, generator=world) * 0.5
    drift = F.normalize(torch.randn(N_SECTORS, N_FEATURES, generator=world), dim=-1) * 4.0
    shock = F.normalize(torch.randn(N_FEATURES, generator=world), dim=-1) * 3.0
    g = torch.Generator().manual_seed(seed)
    sector = torch.randint(0, N_SECTORS, (n,), generator=g)
    risk = torch.randn(n, generator=g)
    t = torch.linspace(0, 1, seq_len)
    x = torch.randn(n, seq_len, N_FEATURES, generator=g)
    x += signature[sector][:, None, :]
    x += (risk[:, None, None] * t[None, :, None]) * drift[sector][:, None, :]
    shock_rate = torch.sigmoid(1.5 * risk - 2.0)[:, None]  # risky enterprises miss payments more often
    shocks = torch.rand(n, seq_len, generator=g) < shock_rate
    x += shocks[..., None].float() * shock
    edges = torch.quantile(risk, torch.tensor([0.2, 0.4, 0.6, 0.8]))
    return x, torch.bucketize(risk, edges)


class RiskModel(nn.Module):
    """features (B, T, 256) -> MoE (residual) -> LSTM(batch_first) -> last state -> 5 logits."""

    def __init__(self, moe_cfg: MoEConfig, hidden: int = 128) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(moe_cfg.dim)
        self.moe = MoE(moe_cfg)
        self.lstm = nn.LSTM(moe_cfg.dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, N_GRADES)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = features + self.moe(self.norm(features))
        out, _ = self.lstm(h)
        return self.head(out[:, -1])


def risk_moe_config() -> MoEConfig:
    return MoEConfig(dim=N_FEATURES, moe_inter_dim=64, n_routed_experts=8, n_activated_experts=2,
                     n_shared_experts=1, expert_loss_alpha=0.01)


def train(model: RiskModel, x: torch.Tensor, y: torch.Tensor, seconds: float, *, batch_size: int = 64,
          log_every: int = 50) -> int:
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    start, step = time.time(), 0
    while time.time() - start < seconds:
        idx = torch.randint(0, len(y), (batch_size,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        (loss + collect_aux_loss(model)).backward()
        opt.step()
        step += 1
        if log_every and step % log_every == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}  ({time.time() - start:.0f} s)")
    model.eval()
    return step


def latencies_ms(predict, requests: list[np.ndarray]) -> np.ndarray:
    for r in requests[:10]:  # warm-up
        predict(r)
    out = []
    for r in requests:
        t = time.perf_counter()
        predict(r)
        out.append((time.perf_counter() - t) * 1e3)
    return np.array(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--requests", type=int, default=300, help="timed single requests per runtime")
    parser.add_argument("--out", type=Path, default=Path("runs/risk_model"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import onnxruntime as ort

    torch.manual_seed(args.seed)
    x_train, y_train = make_data(8000, seq_len=args.seq_len, seed=args.seed + 1)
    x_val, y_val = make_data(1000, seq_len=args.seq_len, seed=args.seed + 2)
    model = RiskModel(risk_moe_config())
    steps = train(model, x_train, y_train, args.seconds)
    with torch.no_grad():
        acc_torch = float((model(x_val).argmax(-1) == y_val).float().mean())

    args.out.mkdir(parents=True, exist_ok=True)
    fp32_path = to_onnx(model, args.out / "risk.onnx", (x_val[:2],))
    int8_path = quantize_int8(fp32_path, args.out / "risk.int8.onnx")
    sessions = {name: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for name, p in (("ort_fp32", fp32_path), ("ort_int8", int8_path))}
    acc = {"pytorch_fp32": acc_torch}
    for name, s in sessions.items():
        logits = np.concatenate([s.run(None, {"features": x_val[i:i + 100].numpy()})[0]
                                 for i in range(0, len(y_val), 100)])
        acc[name] = float((logits.argmax(-1) == y_val.numpy()).mean())

    requests = [x_val[i:i + 1].numpy() for i in range(args.requests)]

    def torch_predict(r: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(r)).numpy()

    predictors = {"pytorch_fp32": torch_predict,
                  **{n: (lambda r, s=s: s.run(None, {"features": r})[0]) for n, s in sessions.items()}}
    lat = {n: latencies_ms(p, requests) for n, p in predictors.items()}
    size = {"pytorch_fp32": sum(p.numel() * p.element_size() for p in model.parameters()),
            "ort_fp32": model_bytes(fp32_path), "ort_int8": model_bytes(int8_path)}

    print(f"\n{steps} training steps; validation accuracy (5 grades, chance 0.20), latency per request "
          f"(batch 1, seq {args.seq_len}, {args.requests} requests):")
    print(f"{'runtime':<14}{'accuracy':>10}{'p50 ms':>10}{'p99 ms':>10}{'size MB':>10}")
    for n in predictors:
        print(f"{n:<14}{acc[n]:>10.3f}{np.percentile(lat[n], 50):>10.2f}{np.percentile(lat[n], 99):>10.2f}"
              f"{size[n] / 1e6:>10.2f}")
    result = {"steps": steps, "seq_len": args.seq_len, "accuracy": {k: round(v, 4) for k, v in acc.items()},
              "p50_ms": {n: round(float(np.percentile(v, 50)), 3) for n, v in lat.items()},
              "p99_ms": {n: round(float(np.percentile(v, 99)), 3) for n, v in lat.items()},
              "size_bytes": size, "onnx": str(fp32_path), "onnx_int8": str(int8_path)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
