"""The causal LM: losses, the aux-loss sum, parameter names, initialisation, tying, config errors."""

import pytest
import torch
import torch.nn.functional as F
from test_model_configs import small_config

from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.moe.layer import MoE


def test_loss_equals_manual_cross_entropy_with_ignored_labels() -> None:
    torch.manual_seed(0)
    cfg = small_config()
    model = DeepSeekMoEForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    labels = ids.clone()
    labels[0, 3] = -100
    labels[1, -1] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, cfg.vocab_size)
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    manual = -logits.log_softmax(-1)[keep].gather(1, targets[keep, None]).mean()
    torch.testing.assert_close(out.ce_loss, manual)
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_loss)
    # Ignored labels change nothing else: the same loss over the kept positions.
    torch.testing.assert_close(F.cross_entropy(logits[keep], targets[keep]), out.ce_loss)


def test_aux_loss_is_the_sum_over_moe_layers() -> None:
    torch.manual_seed(1)
    cfg = small_config(n_layers=3, n_dense_layers=1)
    model = DeepSeekMoEForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    out = model(ids, labels=ids)
    moe_losses = [m.aux_loss for m in model.modules() if isinstance(m, MoE)]
    assert len(moe_losses) == 2
    torch.testing.assert_close(out.aux_loss, sum(moe_losses))
    assert out.aux_loss.item() > 0  # expert_loss_alpha defaults on
    out.loss.backward()
    assert model.layers[1].ffn.gate.weight.grad is not None


def test_dense_model_has_zero_aux_loss() -> None:
    cfg = small_config(n_dense_layers=2)
    model = DeepSeekMoEForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    assert model(ids, labels=ids).aux_loss.item() == 0.0


def test_parameter_names_the_io_mapping_relies_on() -> None:
    model = DeepSeekMoEForCausalLM(small_config())
    names = set(dict(model.named_parameters()))
    expected = {"embed.weight", "norm.weight", "head.weight",
                "layers.0.attn_norm.weight", "layers.0.ffn_norm.weight",
                "layers.0.attn.wq_a.weight", "layers.0.attn.q_norm.weight", "layers.0.attn.wq_b.weight",
                "layers.0.attn.wkv_a.weight", "layers.0.attn.kv_norm.weight", "layers.0.attn.wkv_b.weight",
                "layers.0.attn.wo.weight", "layers.0.ffn.w1.weight", "layers.0.ffn.w2.weight", "layers.0.ffn.w3.weight",
                "layers.1.ffn.gate.weight", "layers.1.ffn.experts.w1", "layers.1.ffn.experts.w2",
                "layers.1.ffn.experts.w3", "layers.1.ffn.shared_experts.w1.weight"}
    assert expected <= names
    assert "layers.0.attn.wq.weight" in dict(DeepSeekMoEForCausalLM(small_config(q_lora_rank=0)).named_parameters())
    mha = set(dict(DeepSeekMoEForCausalLM(small_config(attention="mha")).named_parameters()))
    assert {"layers.0.attn.wq.weight", "layers.0.attn.wk.weight", "layers.0.attn.wv.weight"} <= mha
    # The rotary frequencies are derived from the config, never saved.
    assert not any("inv_freq" in k for k in model.state_dict())


def test_initialisation_and_tying() -> None:
    torch.manual_seed(2)
    cfg = small_config(dim=32, init_std=0.05)
    model = DeepSeekMoEForCausalLM(cfg)
    assert model.config is cfg and model.tokenizer is None
    assert model.embed.weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert torch.equal(model.layers[0].attn.kv_norm.weight, torch.ones(cfg.kv_lora_rank))
    tied = DeepSeekMoEForCausalLM(small_config(tie_word_embeddings=True))
    assert tied.head.weight is tied.embed.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    assert n_tied == sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.dim


def test_sequence_longer_than_max_seq_len_is_an_error() -> None:
    cfg = small_config(max_seq_len=8)
    model = DeepSeekMoEForCausalLM(cfg)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_bad_configs_name_the_field() -> None:
    with pytest.raises(ValueError, match="kv_lora_rank"):
        small_config(kv_lora_rank=0)
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        small_config(qk_rope_head_dim=3)
    with pytest.raises(ValueError, match="moe.dim"):
        small_config(dim=48)


def test_meta_built_model_materialises() -> None:
    """Rotary frequencies survive building on meta and ``to_empty`` (big checkpoints load that way)."""
    cfg = small_config()
    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict(DeepSeekMoEForCausalLM(cfg).state_dict())
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long)).logits).all()
