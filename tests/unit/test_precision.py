"""Mixed precision: what the default resolves to, and that bf16 autocast reaches every matrix product of the MoE
layer and the model (autocast does not cast F.grouped_mm's operands) except the router's."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deepseek_moe import MoE, MoEConfig
from deepseek_moe import device as device_mod
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.presets import get_preset
from deepseek_moe.train.build import resolve_precision

PRODUCTS = {"mm", "bmm", "addmm", "baddbmm", "_grouped_mm", "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_flash_attention_for_cpu_backward"}


class ProductDtypes(TorchDispatchMode):
    """Records (op, operand dtypes, operand shapes) of every matrix product that reaches the kernels, i.e. after
    autocast has cast (or not cast) its operands."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in PRODUCTS:
            tensors = [a for a in args[:2] if isinstance(a, torch.Tensor)]
            self.seen[(name, tuple(t.dtype for t in tensors), tuple(tuple(t.shape) for t in tensors))] += 1
        return func(*args, **(kwargs or {}))

    def fp32_products_but_the_routers(self, n_experts: int) -> list:
        """The router's logits (T, D) x (D, E) and its two backward products are the ones with an E-sized side
        (the test configs give no other dimension that size)."""
        return [key for key in self.seen if torch.float32 in key[1]
                and not (key[0] == "mm" and any(n_experts in shape for shape in key[2]))]


CFG = MoEConfig(dim=64, moe_inter_dim=32, n_routed_experts=8, n_activated_experts=2, n_shared_experts=1)


def test_layer_runs_every_expert_product_in_bf16_and_agrees_with_fp32():
    torch.manual_seed(0)
    moe = MoE(CFG).train()
    x = torch.randn(2, 48, 64, requires_grad=True)
    y32 = moe(x)
    y32.square().mean().backward()
    grad32 = {n: p.grad.clone() for n, p in moe.named_parameters()}
    moe.zero_grad()

    audit = ProductDtypes()
    with audit:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = moe(x)
        y16.float().square().mean().backward()
    grouped = [k for k in audit.seen if k[0] == "_grouped_mm"]
    assert sum(audit.seen[k] for k in grouped) == 3 * 3  # w1, w3, w2 forward; two products each backward
    assert all(k[1] == (torch.bfloat16, torch.bfloat16) for k in grouped), grouped
    # The only fp32 products left are the router's: (T, D) x (D, E) and its backward.
    assert not audit.fp32_products_but_the_routers(CFG.n_routed_experts)
    assert all(p.dtype == torch.float32 for p in moe.parameters())  # fp32 master weights
    # bf16 has an 8-bit significand (relative rounding 2^-9 = 0.2%): a few roundings deep, within 2% of the
    # output's scale; gradients within 5% of each tensor's largest entry.
    scale = y32.abs().max()
    torch.testing.assert_close(y16.float(), y32, rtol=0, atol=0.02 * scale.item())
    for name, p in moe.named_parameters():
        assert p.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, grad32[name], rtol=0, atol=0.05 * grad32[name].abs().max().item(),
                                   msg=name)


def test_model_under_bf16_autocast_leaves_only_router_products_in_fp32():
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(vocab_size=512)
    model = DeepSeekMoEForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    audit = ProductDtypes()
    with audit:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels=ids)
        out.loss.backward()
    assert out.loss.dtype == torch.float32  # losses stay fp32
    assert not audit.fp32_products_but_the_routers(cfg.moe.n_routed_experts)
    assert any(k[0] == "_grouped_mm" for k in audit.seen)


@pytest.mark.parametrize(("feature", "expected"), [("AVX512-BF16", torch.bfloat16), ("AMX", torch.bfloat16),
                                                   (None, None)])
def test_auto_dtype_follows_the_cpu(monkeypatch, feature, expected):
    monkeypatch.setattr(device_mod, "cpu_bf16_feature", lambda: feature)
    cpu = torch.device("cpu")
    precision = resolve_precision("auto", cpu)
    assert precision.amp == expected
    assert precision.describe()["dtype"] == ("bf16" if expected else "fp32")
    assert (feature or "no native bf16") in precision.reason
    # Asked-for dtypes win whatever the CPU has.
    assert resolve_precision("fp32", cpu).amp is None
    assert resolve_precision("bf16", cpu).amp == torch.bfloat16


@pytest.mark.parametrize(("amx", "avx", "flags", "expected"), [
    (True, True, "", "AMX"), (False, True, "", "AVX512-BF16"), (False, False, "", None),
    (False, False, "fpu avx512f avx512_bf16 sse", "AVX512-BF16"), (False, False, "amx_bf16 amx_tile", "AMX"),
])
def test_cpu_feature_detection(monkeypatch, amx, avx, flags, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx, raising=False)
    monkeypatch.setattr(device_mod, "_cpuinfo_flags", lambda: set(flags.split()))
    assert device_mod.cpu_bf16_feature() == expected
