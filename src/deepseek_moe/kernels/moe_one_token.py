"""A whole quantised MoE layer for a few tokens (a decode step, a speculative verification) in one kernel call.

At T = 1 the MoE layer's products are a third of its time: the router's softmax, top-K, gather and
normalisation, the experts' call, the shared experts' three products and ~40 more small tensor operations and
module calls around them took ~300 us a layer of the mid-size int8 model, ~1.5 ms of a ~17 ms decode step.
``dsm_moe_one_token`` (qgemm.cpp) does the selection, the K routed experts, the shared experts (as one expert of
their whole width: an FFN is an expert) and the sum in C++. The router's logits are computed here with the same
``F.linear`` the Router uses, so the selection sees the very logits the plain path ranks.

The readable twin is the layer itself: ``MoE.forward`` under ``reference_paths()`` (the Router, the dispatcher's
one-token call, the shared FeedForward), which the tests compare this against.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from deepseek_moe.kernels.quant_matmul import (
    _check_experts,
    _int4,
    _kernel_for,
    _q8_steps_groups,
    activations,
    layout_key,
    remembered,
)

# Tokens up to which the call runs: a decode step's one, a speculative verification's k + 1 (more: the dispatcher,
# whose sorted grouped products read each expert's weights once for all its rows).
MAX_TOKENS = 16
Weights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # "w1"/"w2"/"w3" -> (codes (E, ...), scales (E, ...))


class SelectionRule(Protocol):
    """The router's selection rule: MoEConfig's fields of these names."""

    @property
    def score_func(self) -> str: ...
    @property
    def n_expert_groups(self) -> int: ...
    @property
    def n_limited_groups(self) -> int: ...
    @property
    def group_score_func(self) -> str: ...
    @property
    def n_activated_experts(self) -> int: ...
    @property
    def norm_topk_prob(self) -> bool: ...
    @property
    def route_scale(self) -> float: ...


class OneTokenLayer(NamedTuple):
    y_1D: torch.Tensor  # the layer's output (T, D) fp32: routed experts gated and summed, plus the shared ones
    indices_K: torch.Tensor  # the selected experts (T, K) int64, each token's best first
    gates_K: torch.Tensor  # their gate values (T, K) fp32
    tokens_per_expert: torch.Tensor  # (E,) int64: the tokens that chose each expert (the layer's statistics)


def _q8(w: Weights, group_size: int) -> bool:
    """Whether these weights take the integer path (int8 activations) now, as ``_run_experts`` decides."""
    return activations() == "int8" and (not _int4(w) or _q8_steps_groups(group_size))


def moe_one_token(x_1D: torch.Tensor, router_weight: torch.Tensor, bias_E: torch.Tensor | None,
                  rule: SelectionRule, experts: Weights, group_size: int, shared: Weights | None = None,
                  shared_group_size: int = 0) -> OneTokenLayer | None:
    """x (T, D) fp32, T <= MAX_TOKENS (a decode step's token, a verification's few), through the MoE layer whose
    router has ``router_weight`` (E, D) (its logits in fp32, as the Router computes them) and ``bias_E`` (the V3
    selection bias, or None), routed experts ``experts`` (stacked codes and scales, as :func:`quant_experts` takes
    them) and shared experts ``shared`` (one expert of their whole width, its codes and scales (1, Fs, ...) or
    (Fs, ...), or None). None where the kernel does not serve it (no kernel, autograd, inside
    ``reference_paths()``, int4 groups the SIMD paths cannot step through, a bias not in fp32, an exact tie at the
    cut of the groups or the experts, which the Router breaks as torch.topk does): the caller runs the plain layer."""
    lib = _kernel_for(x_1D)
    if lib is None:
        return None
    if x_1D.dim() != 2 or not 0 < x_1D.shape[0] <= MAX_TOKENS or x_1D.dtype != torch.float32:
        raise ValueError(f"moe_one_token: x must be 1 to {MAX_TOKENS} fp32 tokens (T, D), got {tuple(x_1D.shape)} "
                         f"{x_1D.dtype}")
    (T, D) = x_1D.shape
    layer = layer_arguments(D, router_weight, bias_E, rule, experts, group_size, shared, shared_group_size)
    if layer is None:
        return None
    E, K, selection, weights = layer
    x = x_1D.contiguous()
    logits = F.linear(x, router_weight.float())  # the Router's logits, the same op
    idx, gates = torch.empty(T, K, dtype=torch.int64), torch.empty(T, K)
    counts, y = torch.empty(E, dtype=torch.int64), torch.empty(T, D)
    tie = lib.dsm_moe_one_token(x.data_ptr(), T, D, logits.data_ptr(), *selection, *weights, idx.data_ptr(),
                                gates.data_ptr(), counts.data_ptr(), y.data_ptr(), torch.get_num_threads())
    if tie:  # an exact tie at a cut: the Router breaks it as torch.topk does
        return None
    return OneTokenLayer(y, idx, gates, counts)


# What the call takes besides the tokens, by everything its checks and contents depend on: the weights' addresses,
# dtypes, shapes and strides (a tensor allocated where a freed one was, alike in all of these, gets the same
# arguments, rightly), the selection rule, the group sizes and the activation format. Checking and packing them
# took ~80 us of a decode step's MoE call on the default model; a lookup takes a few.
_LAYERS: dict[tuple[object, ...], tuple[int, int, tuple[object, ...], tuple[object, ...]] | None] = {}


def layer_arguments(D: int, router_weight: torch.Tensor | None, bias_E: torch.Tensor | None,
                     rule: SelectionRule | None, experts: Weights | None, group_size: int, shared: Weights | None,
                     shared_group_size: int) -> tuple[int, int, tuple[object, ...], tuple[object, ...]] | None:
    """(E, K, the selection's arguments of dsm_moe_one_token from ``E`` on, the routed and shared experts'
    arguments) for tokens of width D, or None where the kernel does not serve these weights (int4 groups the SIMD
    paths cannot step through, a bias not in fp32); ValueError for weights or a rule that do not fit. Without a
    router (``router_weight``, ``rule`` and ``experts`` None) the layer is a dense FFN given as ``shared``: E = K =
    0 (a whole block's call, kernels/block_one_token.py). Memoised (above)."""
    rule_fields = None if rule is None else (rule.score_func, rule.n_expert_groups, rule.n_limited_groups,
                                             rule.group_score_func, rule.n_activated_experts, rule.norm_topk_prob,
                                             rule.route_scale)
    key = (activations(), D, layout_key(router_weight), layout_key(bias_E), rule_fields, group_size, shared_group_size,
           *(() if experts is None else (layout_key(t) for n in ("w1", "w2", "w3") for t in experts[n])),
           *(() if shared is None else (layout_key(t) for n in ("w1", "w2", "w3") for t in shared[n])))
    return remembered(_LAYERS, key, lambda: _check_layer(D, router_weight, bias_E, rule, experts, group_size, shared,
                                                          shared_group_size))


def _check_layer(D: int, router_weight: torch.Tensor | None, bias_E: torch.Tensor | None,
                 rule: SelectionRule | None, experts: Weights | None, group_size: int, shared: Weights | None,
                 shared_group_size: int) -> tuple[int, int, tuple[object, ...], tuple[object, ...]] | None:
    """:func:`layer_arguments` without the memo."""
    tensors = [t for w in (experts, shared) if w is not None for pair in w.values() for t in pair]
    if (shared is not None and _int4(shared) and shared_group_size % 32) or any(not t.is_cpu for t in tensors):
        return None
    if shared is not None:  # one expert: a FeedForward's matrices, stacked as one
        shared = {n: (c[None], sc[None]) if c.dim() == 2 else (c, sc) for n, (c, sc) in shared.items()}
        _check_experts(torch.empty(1, D), [1], None, shared, shared_group_size)
    if router_weight is None or rule is None or experts is None:
        if shared is None or router_weight is not None or rule is not None or experts is not None:
            raise ValueError("moe_one_token: give a router, its rule and the routed experts, or a dense FFN alone")
        return 0, 0, (0, None, 0, 1, 1, 0, 0, 0, 1.0), (*_arguments(None, 0), *_arguments(shared, shared_group_size))
    if _int4(experts) and group_size % 32:
        return None
    E_w = experts["w1"][0].shape[0]
    if router_weight.dim() != 2 or router_weight.shape[1] != D:
        raise ValueError(f"moe_one_token: router weight {tuple(router_weight.shape)} must be (E, {D})")
    E, K, G, M = router_weight.shape[0], rule.n_activated_experts, rule.n_expert_groups, rule.n_limited_groups
    if E != E_w:
        raise ValueError(f"moe_one_token: the router scores {E} experts, the expert weights hold {E_w}")
    top2 = rule.group_score_func == "top2_sum"
    if (not 0 < K <= E or G <= 0 or E % G or not 0 < M <= G or K > M * (E // G)
            or (M < G and top2 and E // G < 2)):
        raise ValueError(f"moe_one_token: top-{K} of {E} experts in {M} of {G} groups "
                         f"({rule.group_score_func} group scores) is not a selection")
    if bias_E is not None and bias_E.shape != (E,):
        raise ValueError(f"moe_one_token: bias must be ({E},), got {tuple(bias_E.shape)}")
    if bias_E is not None and (bias_E.dtype != torch.float32 or not bias_E.is_contiguous() or not bias_E.is_cpu):
        return None  # a bias cast with the model: the Router adds it in its own dtype
    # shapes only: the checks need counts that add up to x's rows
    _check_experts(torch.empty(1, D), [1] + [0] * (E - 1), None, experts, group_size)
    selection = (E, None if bias_E is None else bias_E.data_ptr(), int(rule.score_func == "softmax"), G, M, int(top2),
                 K, int(rule.norm_topk_prob), float(rule.route_scale))
    return E, K, selection, (*_arguments(experts, group_size), *_arguments(shared, shared_group_size))


def _arguments(w: Weights | None, gs: int) -> tuple[object, ...]:
    """One set of experts as dsm_moe_one_token takes it: F, w1, w3, s1, s3, bits13, w2, s2, bits2, gs, q8."""
    if w is None:
        return 0, None, None, None, None, 8, None, None, 8, 0, 0
    (w1, s1), (w3, s3), (w2, s2) = w["w1"], w["w3"], w["w2"]
    return (w1.shape[1], w1.data_ptr(), w3.data_ptr(), s1.data_ptr(), s3.data_ptr(),
            8 if w1.dtype == torch.int8 else 4, w2.data_ptr(), s2.data_ptr(), 8 if w2.dtype == torch.int8 else 4,
            gs, int(_q8(w, gs)))


__all__ = ["MAX_TOKENS", "OneTokenLayer", "SelectionRule", "layer_arguments", "moe_one_token"]
