"""Memory and traffic arithmetic (model/memory.py, model/activations.py, model/traffic.py) against values worked
out by hand for the tiny preset, and the activation formula against what autograd actually saves."""

import itertools
import random

import pytest
import torch
from torch import nn

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.model.activations import activation_bytes, block_bytes, head_bytes
from deepseek_moe.model.block import set_activation_checkpointing
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.model.counting import count_parameters, parameter_shapes
from deepseek_moe.model.memory import (
    BF16_MIXED,
    FP32,
    V3_RECIPE,
    MeshLayout,
    Unit,
    chunk_rows,
    default_ep,
    estimate_memory,
    fsdp_units,
    largest_unit,
    local_numel,
    sharded_state,
    transient_bytes,
)
from deepseek_moe.model.traffic import (
    all_to_all,
    all_to_all_bytes,
    expected_ranks_per_token,
    fsdp_traffic,
    max_remote_ranks_per_token,
)
from deepseek_moe.presets import get_preset, tiny

# The tiny preset by hand (vocab 4096, dim 256, 4 layers of which 1 dense (768), 4 heads, MLA without q-LoRA:
# kv-LoRA 64, nope 32, rope 16, v 32; 16 routed experts of 128 in 4 groups, top-4, 1 shared):
EMBED = 4096 * 256  # and the head, the same
ATTN = 4 * 48 * 256 + 80 * 256 + 64 + 4 * 64 * 64 + 256 * 4 * 32 + 2 * 256  # wq wkv_a kv_norm wkv_b wo 2 norms
DENSE = 3 * 768 * 256
EXPERTS = 3 * 16 * 128 * 256  # per MoE layer
MOE = 16 * 256 + EXPERTS + 3 * 128 * 256  # gate, routed, shared
TOTAL = EMBED + 4 * ATTN + DENSE + 3 * MOE + 256 + EMBED
TENSORS = 1 + 4 * 7 + 3 + 3 * 7 + 2  # embed; per block 5 attention + 2 norms; dense 3; MoE gate + 3 + 3; norm, head


def test_parameter_shapes_cover_the_model() -> None:
    shapes = parameter_shapes(tiny())
    assert ATTN == 119_360 and TOTAL == 8_190_464
    assert sum(p.numel for p in shapes) == TOTAL == count_parameters(tiny())[0]
    assert len(shapes) == TENSORS
    assert sum(p.numel for p in shapes if p.routed_expert) == 3 * EXPERTS
    assert {p.name for p in shapes if p.routed_expert} == {f"layers.{i}.ffn.experts.w{j}" for i in (1, 2, 3)
                                                           for j in (1, 2, 3)}


def test_chunk_rows_splits_like_torch_chunk() -> None:
    for rows, parts in itertools.product([1, 5, 80, 97, 4096], [1, 2, 3, 4, 7, 64]):
        chunks = torch.arange(rows).chunk(parts)
        expected = [len(c) for c in chunks] + [0] * (parts - len(chunks))
        assert [chunk_rows(rows, parts, i) for i in range(parts)] == expected


def test_sharded_state_by_hand() -> None:
    cfg, mesh = tiny(), MeshLayout(world=4, ep=2)
    # Everything divides: each rank holds a quarter of the non-expert parameters, and of each layer's experts
    # (half of them on its ep rank, halved again over the 2 ranks holding that half).
    local = (TOTAL - 3 * EXPERTS) // 4 + 3 * EXPERTS // 2 // 2
    assert local == 2_047_616
    for rank in range(4):
        state = sharded_state(cfg, mesh, FP32, rank)
        assert (state.elements, state.tensors) == (local, TENSORS)
        assert state.param_bytes == state.grad_bytes == 4 * local
        assert state.optimizer_bytes == 8 * local + 4 * TENSORS  # exp_avg, exp_avg_sq, one fp32 step per tensor
    v3 = sharded_state(cfg, mesh, V3_RECIPE)
    assert (v3.param_bytes, v3.grad_bytes, v3.optimizer_bytes) == (4 * local, 4 * local, 4 * local + 4 * TENSORS)


def test_uneven_shards_follow_chunk_and_sum_to_the_model() -> None:
    cfg = tiny()
    wkv_a = next(p for p in parameter_shapes(cfg) if p.name == "layers.0.attn.wkv_a.weight")  # (80, 256)
    assert [local_numel(wkv_a, MeshLayout(world=3, ep=1), r) for r in range(3)] == [27 * 256, 27 * 256, 26 * 256]
    w1 = next(p for p in parameter_shapes(cfg) if p.name == "layers.1.ffn.experts.w1")  # (16, 128, 256)
    # world 6, ep 2: 8 experts per ep rank, chunked over 3 ranks as 3, 3, 2; rank r = dp_index * 2 + ep_index
    assert [local_numel(w1, MeshLayout(world=6, ep=2), r) // (128 * 256) for r in range(6)] == [3, 3, 3, 3, 2, 2]
    # Sharded on dim 1 instead, each of rank r's 8 experts keeps a third of its 128 rows (w1) or 256 (w2).
    assert [local_numel(w1, MeshLayout(world=6, ep=2, expert_fsdp_dim=1), r) for r in range(6)] == (
        [8 * 43 * 256] * 4 + [8 * 42 * 256] * 2)
    for (world, ep), dim in itertools.product([(1, 1), (2, 2), (3, 1), (4, 4), (6, 2), (8, 4), (12, 4)], (0, 1)):
        mesh = MeshLayout(world=world, ep=ep, expert_fsdp_dim=dim)
        assert sum(sharded_state(cfg, mesh, FP32, r).elements for r in range(world)) == TOTAL
        assert sharded_state(cfg, mesh, FP32, 0).elements == max(sharded_state(cfg, mesh, FP32, r).elements
                                                                  for r in range(world))


def test_fsdp_units_and_transient_by_hand() -> None:
    cfg, mesh = tiny(), MeshLayout(world=4, ep=2)
    units = {u.name: u.elements for u in fsdp_units(cfg, mesh)}
    moe_block = ATTN + MOE - EXPERTS // 2  # this ep rank's half of the experts
    assert units == {"embed": EMBED, "layers.0": ATTN + DENSE, "layers.1": moe_block, "layers.2": moe_block,
                     "layers.3": moe_block, "root": 256, "head": EMBED}
    assert {u.expert_elements for u in fsdp_units(cfg, mesh) if u.name.startswith("layers.")} == {0, EXPERTS // 2}
    assert largest_unit(cfg, mesh).elements == EMBED
    assert transient_bytes(cfg, mesh, FP32) == EMBED * 16
    assert transient_bytes(cfg, mesh, BF16_MIXED) == EMBED * (3 * 2 + 4)
    assert largest_unit(cfg, MeshLayout(world=4, ep=1)) == Unit("layers.1", ATTN + MOE, EXPERTS)  # ep 1: all experts
    assert transient_bytes(cfg, MeshLayout(world=4, ep=1), FP32) == (ATTN + MOE) * 16
    # ep = N: each expert slice is on one rank only and used in place (its gradient still made whole and copied);
    # one rank: nothing is gathered at all
    ep4 = fsdp_units(cfg, MeshLayout(world=4, ep=4))
    block = ATTN + MOE - 3 * EXPERTS // 4
    assert Unit("layers.1", block, EXPERTS // 4) in ep4
    assert transient_bytes(cfg, MeshLayout(world=4, ep=4), FP32) == EMBED * 16
    assert transient_bytes(cfg.replace(vocab_size=256), MeshLayout(world=4, ep=4), FP32) == max(
        (ATTN + DENSE) * 16, (block - EXPERTS // 4) * 8 + block * 8)
    assert transient_bytes(cfg, MeshLayout(world=1, ep=1), FP32) == (ATTN + MOE) * 8
    tied = {u.name: u.elements for u in fsdp_units(cfg.replace(tie_word_embeddings=True), mesh)}
    assert tied["root"] == EMBED + 256 and "embed" not in tied and "head" not in tied


def test_activation_formula_by_hand() -> None:
    cfg = tiny()
    norm, kv_norm = 256 * (4 + 2 * 2) + 4, 64 * (4 + 2 * 2) + 4
    attn = norm + kv_norm + 4 * 4 + (2 * 4 * 48 + 4 * (32 + 32) + 4 * 32) * 2
    dense = norm + 4 * 768 * 2
    moe = norm + (4 * 256 + 2 * 4 * 16) + 4 * (256 + 5 * 128 + 1) * 2 + 3 * 4 * 8 + 4 * 128 * 2
    head = norm + 4 * 4096 + 4 + 1 + 2 * 8
    assert [block_bytes(cfg, i, 2) for i in range(4)] == [attn + dense] + [attn + moe] * 3
    assert head_bytes(cfg, 2) == head
    assert activation_bytes(cfg, tokens=10, compute=2, checkpointing=False) == 10 * (4 * attn + dense + 3 * moe + head)
    assert activation_bytes(cfg, tokens=10, compute=2, checkpointing=True) == 10 * (4 * 256 * 2 + attn + moe + head)
    assert 10 * (4 * attn + dense + 3 * moe + head) == 776_330


def _saved_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward (parameters excluded), plus the logits
    the output holds."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids)
    saved[out.logits.untyped_storage().data_ptr()] = out.logits.untyped_storage().nbytes()
    return sum(saved.values())


def _small(**changes: object) -> ModelConfig:
    dim = 128
    cfg = ModelConfig(vocab_size=512, dim=dim, inter_dim=384, n_layers=3, n_dense_layers=1, n_heads=4,
                      q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                      max_seq_len=128, original_seq_len=128,
                      moe=MoEConfig(dim=dim, moe_inter_dim=64, n_routed_experts=8, n_activated_experts=2,
                                    n_shared_experts=1, n_expert_groups=4, n_limited_groups=2))
    return cfg.replace(**changes)


@pytest.mark.parametrize(("changes", "dtype"), [
    ({}, torch.bfloat16),
    ({"q_lora_rank": 0}, torch.float32),
    ({"attention": "mha", "kv_lora_rank": 0, "qk_nope_head_dim": 0, "qk_rope_head_dim": 16}, torch.bfloat16),
])
def test_activation_formula_matches_what_autograd_saves(changes: dict, dtype: torch.dtype) -> None:
    cfg = _small(**changes)
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(cfg).to(dtype).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    # On CPU MLA pads v for SDPA's fused kernel; the formula knows. What it leaves out (cos/sin, shared by all
    # layers; the loss's int64 targets) is a fraction of a percent here, up to 1.7% of the checkpointed total.
    c, pads = dtype.itemsize, cfg.attention == "mla"
    formula = activation_bytes(cfg, tokens=128, compute=c, checkpointing=False, sdpa_pads_v=pads)
    assert _saved_bytes(model, ids) == pytest.approx(formula, rel=0.005)
    # Checkpointed blocks keep only their input until the backward recomputes them one at a time.
    set_activation_checkpointing(model)
    largest_block = max(block_bytes(cfg, i, c, sdpa_pads_v=pads) for i in range(cfg.n_layers))
    kept = activation_bytes(cfg, tokens=128, compute=c, checkpointing=True, sdpa_pads_v=pads) - 128 * largest_block
    assert _saved_bytes(model, ids) == pytest.approx(kept, rel=0.02)


def test_expected_ranks_by_hand_and_by_simulation() -> None:
    moe = tiny().moe  # G 4, M 2, K 4, 4 experts per group
    # ep 4 (a group per rank): both chosen groups are reached unless all 4 experts fall in one (2 / C(8, 4)).
    assert expected_ranks_per_token(moe, 4) == pytest.approx(2 - 2 / 70)
    assert expected_ranks_per_token(moe, 1) == pytest.approx(1.0)
    assert max_remote_ranks_per_token(moe, 4) == 2 and max_remote_ranks_per_token(moe, 2) == 1
    v2 = get_preset("deepseek-v2").moe  # G 8, M 3, K 6, 20 experts per group
    rng = random.Random(0)
    for ep in (2, 4, 8):
        reached = 0
        for _ in range(20000):
            groups = rng.sample(range(8), 3)
            experts = rng.sample([g * 20 + i for g in groups for i in range(20)], 6)
            reached += len({e // (160 // ep) for e in experts})
        assert expected_ranks_per_token(v2, ep) == pytest.approx(reached / 20000, rel=0.01)


def test_all_to_all_by_hand() -> None:
    cfg, mesh = tiny(), MeshLayout(world=4, ep=4)
    bound = all_to_all(cfg, mesh, FP32, checkpointing=False, bound=True)
    # k = min(K, E/ep) = 4 slots; fp32: x + gates, 4 ids; D back; the backward's (D + k) and D gradients.
    assert (bound.dispatch_row_bytes, bound.combine_row_bytes, bound.gradient_row_bytes) == (260 * 4 + 16, 1024, 516 * 4)
    assert bound.remote_ranks == 2
    assert bound.bytes_per_token == 2 * (1056 + 1024) + 2 * 2064 == 8288
    again = all_to_all(cfg, mesh, FP32, checkpointing=True, bound=True)
    assert again.bytes_per_token == 2 * 2 * (1056 + 1024) + 2 * 2064
    mean = all_to_all(cfg, mesh, FP32, checkpointing=False)
    assert mean.remote_ranks == pytest.approx((2 - 2 / 70) * 3 / 4)
    assert all_to_all_bytes(cfg, mesh, FP32, tokens=100, checkpointing=False, bound=True) == 100 * 3 * 8288
    dropping = all_to_all(cfg.replace(moe=cfg.moe.replace(capacity_factor=1.0)), mesh, BF16_MIXED,
                          checkpointing=False)
    assert dropping.dispatch_row_bytes == 260 * 2 + 4 * (4 + 4 + 1)  # ids, affinities, protected flag
    assert all_to_all(cfg, MeshLayout(world=4, ep=1), FP32, checkpointing=False).bytes_per_token == 0


def test_fsdp_traffic_by_hand() -> None:
    cfg, mesh = tiny(), MeshLayout(world=4, ep=2)
    dense = (TOTAL - 3 * EXPERTS) * 3 / 4  # a ring brings (n - 1) / n of the unit to each rank
    experts = 3 * EXPERTS / 2 * 1 / 2  # this ep rank's half, gathered over 2 ranks
    traffic = fsdp_traffic(cfg, mesh, BF16_MIXED)
    assert traffic.all_gather_bytes == pytest.approx(2 * 2 * (dense + experts))  # forward + backward, bf16
    assert traffic.reduce_scatter_bytes == pytest.approx(4 * (dense + experts))  # fp32
    assert traffic.expert_all_gather_bytes == pytest.approx(2 * 2 * experts)


def test_estimate_adds_up_and_layouts_are_checked() -> None:
    cfg, mesh = tiny(), MeshLayout(world=4, ep=2)
    est = estimate_memory(cfg, mesh, BF16_MIXED, batch=2, seq_len=64, checkpointing=True)
    assert est.total_bytes == (sharded_state(cfg, mesh, BF16_MIXED).total_bytes
                               + transient_bytes(cfg, mesh, BF16_MIXED)
                               + activation_bytes(cfg, tokens=128, compute=2, checkpointing=True))
    assert default_ep(cfg, 4) == 4 and default_ep(cfg, 6) == 2 and default_ep(get_preset("deepseek-v3"), 64) == 8
    with pytest.raises(ValueError, match=r"n_expert_groups \(4\) must be a multiple of MeshLayout.ep \(8\)"):
        sharded_state(cfg, MeshLayout(world=8, ep=8), FP32)
    with pytest.raises(ValueError, match=r"n_limited_groups \(4\) must be <= MeshLayout.ep \(2\)"):
        sharded_state(get_preset("deepseek-v3"), MeshLayout(world=64, ep=2), FP32)
    assert default_ep(get_preset("deepseek-v3"), 2) == 1 and default_ep(get_preset("deepseek-v2"), 12) == 4
    with pytest.raises(ValueError, match=r"ep \(3\) must divide world \(4\)"):
        MeshLayout(world=4, ep=3)


@pytest.mark.parametrize("cfg", [
    tiny(),
    tiny().replace(n_dense_layers=0, tie_word_embeddings=True),
    tiny().replace(n_dense_layers=4),
    get_preset("deepseek-moe-2b").replace(n_layers=3),
])
def test_parameter_shapes_equal_the_whole_model(cfg: ModelConfig) -> None:
    """One block of each kind stands for the others: the list equals the full model's, name for name."""
    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(cfg)
    assert [(p.name, p.shape) for p in parameter_shapes(cfg)] == [(n, tuple(p.shape))
                                                                   for n, p in model.named_parameters()]
