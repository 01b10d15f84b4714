"""Protected sequences (DeepSeek-V2 §2.2.4): ~10% of sequences are exempt from dropping in every MoE layer.

The draw is made once per forward and shared by the layers (a model's forward) and covers each sequence
independently, so the protected share is 10% in expectation at every batch size.
"""

import torch

from deepseek_moe import DeepSeekMoEForCausalLM, ModelConfig, MoE, MoEConfig
from deepseek_moe.moe.dispatch import LocalDispatcher


class RecordingDispatcher(LocalDispatcher):
    """The local dispatcher, keeping each call's protected-token mask (None when nothing is dropped)."""

    def __init__(self) -> None:
        self.protected: list[torch.Tensor | None] = []

    def __call__(self, x_TD, routing, experts, drop):
        self.protected.append(None if drop is None else drop.protected_T.clone())
        return super().__call__(x_TD, routing, experts, drop)


def _moe_cfg(**changes):
    return MoEConfig(**{**dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2,
                               n_expert_groups=4, capacity_factor=0.5), **changes})


def test_one_draw_protects_the_same_sequences_in_every_layer():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=16, inter_dim=32, n_layers=4, n_dense_layers=1, n_heads=2,
                      kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=16,
                      moe=_moe_cfg(protected_fraction=0.5))
    model = DeepSeekMoEForCausalLM(cfg).train()
    recorders = []
    for layer in model.layers[1:]:
        layer.ffn.dispatcher = RecordingDispatcher()
        recorders.append(layer.ffn.dispatcher)
    B, S = 16, 5
    for _ in range(3):  # three forwards: each has one set, and the sets differ between forwards
        ids = torch.randint(0, 64, (B, S))
        model(ids, labels=ids)
    sets = []
    for step in range(3):
        masks = [r.protected[step] for r in recorders]
        for mask in masks[1:]:
            assert torch.equal(mask, masks[0]), "layers of one forward protected different sequences"
        per_sequence = masks[0].view(B, S)
        assert torch.equal(per_sequence, per_sequence[:, :1].expand(B, S))  # whole sequences
        assert 0 < int(per_sequence[:, 0].sum()) < B
        sets.append(per_sequence[:, 0])
    assert not torch.equal(sets[0], sets[1]) or not torch.equal(sets[1], sets[2])


def test_protected_share_is_the_fraction_in_expectation():
    # 4-sequence batches (rounding the count up would protect 1 of 4 = 25%). 600 forwards = 2400 sequences:
    # the share's standard deviation is sqrt(0.1 * 0.9 / 2400) = 0.0061; tolerance ±0.025 (about 4 sigma).
    moe = MoE(_moe_cfg(), layer_id=1).train()
    moe.dispatcher = recorder = RecordingDispatcher()
    x = torch.randn(4, 2, 16)
    with torch.no_grad():
        for _ in range(600):
            moe(x)
    share = torch.cat([m.view(4, 2)[:, 0] for m in recorder.protected]).float().mean()
    assert abs(float(share) - 0.10) < 0.025, float(share)


def test_a_one_sequence_batch_can_be_dropped():
    moe = MoE(_moe_cfg(capacity_factor=0.25), layer_id=1).train()
    x = torch.randn(1, 8, 16)
    dropped = []
    with torch.no_grad():
        for _ in range(40):  # protected with probability 0.1 each time, so dropped most times
            moe(x)
            dropped.append(int(moe.last_stats.dropped))
    assert sum(d > 0 for d in dropped) >= 20


def test_routing_state_restores_the_model_level_draw():
    from deepseek_moe import load_routing_state, routing_state

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=16, inter_dim=32, n_layers=2, n_dense_layers=1, n_heads=2,
                      kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=16,
                      moe=_moe_cfg(protected_fraction=0.5))
    model = DeepSeekMoEForCausalLM(cfg).train()
    model.layers[1].ffn.dispatcher = recorder = RecordingDispatcher()
    ids = torch.randint(0, 64, (16, 4))
    model(ids)
    state = routing_state(model)
    assert set(state) == {"layers.1.ffn", "protected_sequences"}
    assert all(isinstance(v, torch.Tensor | str | bool | None) for e in state.values() for v in e.values())
    model(ids)
    model(ids)
    load_routing_state(model, state)
    model(ids)
    model(ids)
    assert not torch.equal(recorder.protected[1], recorder.protected[2])  # the draws move on
    assert torch.equal(recorder.protected[1], recorder.protected[3])  # and resume where they were
    assert torch.equal(recorder.protected[2], recorder.protected[4])
