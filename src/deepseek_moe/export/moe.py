"""The MoE layer in a form ONNX can hold: every expert in the graph, no data-dependent control flow.

The training layer sorts tokens by expert and runs each expert on its own rows, so the shapes depend on where
the tokens went; a trace keeps only the experts the example happened to reach. Here the gate is the layer's own
``Router`` (the same softmax/sigmoid scores, V3 bias, group limit and top-K), its choice is written into dense
gates (T, E) with zeros for the experts not chosen, and all experts run as two matrix products:

    up   (T, D) @ (D, 2 * (E + S) * F)   gate and up projections of the E routed and S shared experts, fused
    down (T, (E + S) * F) @ ((E + S) * F, D)   after silu(gate) * up, each routed block scaled by its gate

which is Σ_e g_e w2_e(silu(w1_e x) * w3_e x) + shared(x), the layer's sum, with the gate applied to the (T, F)
activation before the down projection exactly as the layer applies it. Plain MatMuls against constant
weights are what ``onnxruntime.quantization.quantize_dynamic`` quantises, so int8 covers the experts too.
The cost is E / K times the routed FLOPs of the sparse layer: the right trade for small expert counts and
short sequences (the models this is for), not for a 256-expert checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.export.errors import ExportError
from deepseek_moe.moe.dispatch import LocalDispatcher
from deepseek_moe.moe.layer import MoE


def check_exportable(moe: MoE, name: str = "MoE") -> None:
    """Raise ExportError for a layer whose inference behaviour a static graph cannot reproduce exactly."""
    cfg = moe.cfg
    where = f"{name} (layer_id {moe.layer_id})"
    if moe.uniform_routing:
        raise ExportError(f"{where}: uniform_routing is on: its routing is a random draw per call, which an "
                          "exported graph cannot reproduce; switch it off (set_uniform_routing(model, False))")
    if cfg.capacity_factor is not None and cfg.drop_at_inference:
        raise ExportError(f"{where}: drop_at_inference=True with capacity_factor={cfg.capacity_factor}: dropping "
                          "ranks assignments over the whole batch and draws protected sequences at random, so "
                          "a request's output would depend on its batch; export with drop_at_inference=False")
    if not isinstance(moe.dispatcher, LocalDispatcher):
        raise ExportError(f"{where}: dispatcher is {type(moe.dispatcher).__name__}; export needs all experts in "
                          "one process (LocalDispatcher): gather the experts before exporting")
    params = [moe.gate.weight, moe.experts.w1, moe.experts.w2, moe.experts.w3]
    if moe.shared_experts is not None:
        params += list(moe.shared_experts.parameters())
    for p in params:
        if p.dtype != torch.float32:
            raise ExportError(f"{where}: parameters are {p.dtype}; export float32 (module.float()) — ONNX "
                              "Runtime's CPU kernels and its int8 quantiser start from float32")
        if p.device.type == "meta":
            raise ExportError(f"{where}: parameters are on the meta device (not materialised)")


class DenseMoE(nn.Module):
    """Drop-in for a :class:`MoE` at export time: the same outputs from dense gates and fused expert matrices.

    Holds the layer's ``gate`` (shared, not copied) and fused copies of the expert weights: ``w13`` (D, 2N) and
    ``w2`` (N, D) with N = (E + S) * F. Inference only (no balance losses, no statistics, no dropping).
    """

    def __init__(self, moe: MoE, name: str = "MoE") -> None:
        super().__init__()
        check_exportable(moe, name)
        cfg = moe.cfg
        self.cfg = cfg
        self.gate = moe.gate
        E, F_, D = moe.experts.w1.shape
        self.n_routed, self.inter_dim = E, F_
        with torch.no_grad():
            w1 = [moe.experts.w1.reshape(E * F_, D)]  # row e*F + f: expert e's hidden unit f
            w3 = [moe.experts.w3.reshape(E * F_, D)]
            w2 = [moe.experts.w2.transpose(1, 2).reshape(E * F_, D)]
            if moe.shared_experts is not None:
                w1.append(moe.shared_experts.w1.weight)
                w3.append(moe.shared_experts.w3.weight)
                w2.append(moe.shared_experts.w2.weight.t())
            # Fresh contiguous copies: the graph's initializers, laid out for x @ W.
            self.w13 = nn.Parameter(torch.cat(w1 + w3).t().contiguous(), requires_grad=False)
            self.w2 = nn.Parameter(torch.cat(w2).contiguous(), requires_grad=False)
        self.n_hidden = self.w2.shape[0]  # N = (E + S) * F

    def forward(self, x: torch.Tensor, *, token_mask: torch.Tensor | None = None,
                protected: object = None) -> torch.Tensor:
        """x (B, S, dim) or (S, dim). ``token_mask`` (B, S) or (S,), False for padding: as in the layer, such
        tokens are routed nowhere and get output 0. ``protected`` (the dropping draw) is unused: no dropping
        at inference, which check_exportable guarantees."""
        D = self.cfg.dim
        x_TD = x.reshape(-1, D)
        routing = self.gate(x_TD)
        T = x_TD.shape[0]
        # The chosen experts' gates, zeros elsewhere: unchosen experts run but add nothing.
        gates_TE = torch.zeros(T, self.n_routed, dtype=routing.weights_TK.dtype, device=x.device)
        gates_TE = gates_TE.scatter(1, routing.indices_TK, routing.weights_TK).to(x.dtype)
        h_TN2 = x_TD @ self.w13
        h_TN = F.silu(h_TN2[:, : self.n_hidden]) * h_TN2[:, self.n_hidden :]
        routed_TEF = h_TN[:, : self.n_routed * self.inter_dim].reshape(T, self.n_routed, self.inter_dim)
        routed_TN = (routed_TEF * gates_TE.unsqueeze(-1)).reshape(T, self.n_routed * self.inter_dim)
        h_TN = torch.cat((routed_TN, h_TN[:, self.n_routed * self.inter_dim :]), dim=1)
        y = (h_TN @ self.w2).reshape(x.shape)
        if token_mask is not None:
            y = y * token_mask.reshape(*x.shape[:-1], 1).to(y.dtype)
        return y


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@contextmanager
def dense_moe_layers(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every MoE inside ``module`` is replaced by its :class:`DenseMoE` (restored after).

    Yields the module to export: ``module`` itself, or a DenseMoE when ``module`` is a bare MoE layer. All
    layers are checked before anything is replaced, so a refusal leaves the module untouched.
    """
    if isinstance(module, MoE):
        yield DenseMoE(module)
        return
    found = [(name, m) for name, m in module.named_modules() if isinstance(m, MoE)]
    dense = [(name, DenseMoE(m, name)) for name, m in found]
    for name, d in dense:
        _set_submodule(module, name, d)
    try:
        yield module
    finally:
        for name, m in found:
            _set_submodule(module, name, m)
