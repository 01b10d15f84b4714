"""What int8 / int4 weights cost in quality (issue 9 item 5).

1. On a trained run (default: the default training run's checkpoint): validation loss over the whole validation
   split and mean per-token KL(p_full || p_quantised), for int8 and int4 quantised while streaming from the
   checkpoint (``from_pretrained(..., quantize=...)``), against the unquantised model.
2. On a random DeepSeek-V2-Lite-shaped MoE layer (64 experts of 1408 + 2 shared, dim 2048): the relative output
   error ||y_q - y|| / ||y|| on random unit-RMS inputs, and the same for one expert-shaped matrix.

Each quantised model runs twice, with the kernel multiplying the weights by fp32 activations and by int8-quantised
ones (``quant_matmul.set_activations``): what the int8-activation path adds to the weights' own error.

    python benchmarks/quant_quality.py /work/coord/baseline-run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from common import uptime, v2_lite, validation_batches  # noqa: E402

import deepseek_moe as dm  # noqa: E402
from deepseek_moe.kernels.quant_matmul import kernel_report, set_activations  # noqa: E402
from deepseek_moe.moe.layer import MoE  # noqa: E402
from deepseek_moe.quant import QuantConfig, QuantLinear, QuantRoutedExperts  # noqa: E402


@torch.inference_mode()
def score(models: dict[str, torch.nn.Module], batches: list[torch.Tensor]) -> dict[str, dict[str, float]]:
    """Mean next-token loss per model and mean KL to the "full" model, over every predicted token."""
    ce = dict.fromkeys(models, 0.0)
    kl = dict.fromkeys(models, 0.0)
    n = 0
    for batch in batches:
        logp = {}
        for name, model in models.items():
            _use_activations(name)
            logits = model(batch).logits[:, :-1].float()
            logp[name] = F.log_softmax(logits, dim=-1)
            ce[name] += F.nll_loss(logp[name].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                   reduction="sum").item()
        for name in models:
            kl[name] += F.kl_div(logp[name], logp["full"], log_target=True, reduction="sum").item()
        n += batch[:, 1:].numel()
    return {name: {"val_loss": ce[name] / n, "kl": kl[name] / n} for name in models}


def _use_activations(name: str) -> None:
    """ "int8 int8-act" -> the kernel uses int8 activations from now on; a name without a suffix -> fp32."""
    set_activations(name.rsplit(" ", 1)[1].removesuffix("-act") if name.endswith("-act") else "fp32")


@torch.inference_mode()
def layer_error(bits: int, n_tokens: int = 256) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = v2_lite().moe
    moe = MoE(cfg).eval()
    x = torch.randn(n_tokens, cfg.dim)  # unit RMS, as after the pre-FFN RMSNorm
    y = moe(x)
    w = moe.experts.w1[0].clone()
    qcfg = QuantConfig(bits=bits)  # type: ignore[arg-type]
    moe.experts = QuantRoutedExperts.from_experts(moe.experts, bits=bits, group_size=qcfg.group_size)  # type: ignore[assignment]
    assert moe.shared_experts is not None
    for name in ("w1", "w2", "w3"):
        setattr(moe.shared_experts, name, QuantLinear.from_linear(getattr(moe.shared_experts, name), bits=bits,
                                                                  group_size=qcfg.group_size))
    ref = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    ref.weight.copy_(w)
    lin = QuantLinear.from_linear(ref, bits=bits, group_size=qcfg.group_size)
    out = {}
    for act in ("fp32", "int8"):
        set_activations(act)
        y_q = moe(x)
        out[f"moe_layer_rel_err_{act}_act"] = ((y_q - y).norm() / y.norm()).item()
        out[f"expert_matrix_rel_err_{act}_act"] = ((lin(x) - ref(x)).norm() / ref(x).norm()).item()
    set_activations(None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", default="/work/coord/baseline-run", help="train run directory")
    ap.add_argument("--skip-layer", action="store_true", help="only the trained-model part")
    ap.add_argument("--batches", type=int, default=0, help="score only the first N validation batches (0: all)")
    args = ap.parse_args()
    run = Path(args.run)
    print(uptime())
    full = dm.from_pretrained(run / "model")
    models: dict[str, torch.nn.Module] = {"full": full}
    for bits in ("int8", "int4"):
        q = dm.from_pretrained(run / "model", quantize=bits)
        models[f"{bits} fp32-act"] = models[f"{bits} int8-act"] = q
    batches = validation_batches(run, full.tokenizer)
    if args.batches:
        batches = batches[: args.batches]
    res = score(models, batches)
    n_tokens = sum(b[:, 1:].numel() for b in batches)
    print(f"{run}: {len(batches)} validation batches, {n_tokens} predicted tokens")
    print(f"{'model':14s} {'val loss':>9s} {'change':>8s} {'perplexity':>10s} {'mean KL':>9s}")
    base = res["full"]["val_loss"]
    for name, r in res.items():
        print(f"{name:14s} {r['val_loss']:9.4f} {100 * (r['val_loss'] / base - 1):+7.2f}% "
              f"{np.exp(r['val_loss']):10.3f} {r['kl']:9.5f}")
    out: dict[str, object] = {"benchmark": "quant_quality", "run": str(run), "tokens": n_tokens, "trained": res,
                              "kernel_report": kernel_report()}
    if not args.skip_layer:
        print("random V2-Lite-shaped MoE layer (64 x 1408 experts + 2 shared, dim 2048), 256 tokens:")
        for bits in (8, 4):
            err = layer_error(bits)
            for act in ("fp32", "int8"):
                print(f"int{bits} {act}-act: layer output rel. error {err[f'moe_layer_rel_err_{act}_act']:.4f}, "
                      f"one expert matrix {err[f'expert_matrix_rel_err_{act}_act']:.4f}")
            out[f"layer_int{bits}"] = err
    print(uptime())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
