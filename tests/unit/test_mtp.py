"""Multi-token prediction (model/mtp.py): the loss against a plain per-depth, per-position reference, the
drafting API against the training path, and mtp_depth = 0 leaving the model as it was."""

import pytest
import torch
from test_model_configs import small_config

from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.model.kv_cache import LayerCache


def _model(depth: int, **overrides: object) -> DeepSeekMoEForCausalLM:
    return DeepSeekMoEForCausalLM(small_config(mtp_depth=depth, **overrides), init_seed=3).eval()


def reference_mtp_loss(model: DeepSeekMoEForCausalLM, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(1/D) Σ_k CE_k written out from V3 §2.2, one position at a time, each depth's block run token by token over
    its own cache: h'_i^k = M_k[RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})], h_i^k = norm_k(TRM_k(h'_i^k)),
    P^k_{i+k+1} = head(h_i^k); CE_k the mean of -log P^k[t_{i+k+1}] over the positions with a label."""
    B, T = ids.shape
    with torch.no_grad():
        h_prev = [model(ids[b:b + 1]).hidden[0] for b in range(B)]  # h^0: (T, dim) per sequence
    ce = []
    for k, module in enumerate(model.mtp, start=1):
        nll, count = torch.zeros(()), 0
        h_next = []
        for b in range(B):
            cache, hs = LayerCache(), []
            for i in range(T - k):  # the positions whose input token t_{i+k} exists
                emb = model.embed.weight[ids[b, i + k]]
                x = module.eh_proj(torch.cat((module.enorm(emb), module.hnorm(h_prev[b][i]))))
                cos, sin = model.rope(torch.tensor([[i + k]]))  # the input token's position
                h = module.norm(module.block(x[None, None], cos, sin, None, cache))[0, 0]
                hs.append(h)
                if i + k + 1 < T and labels[b, i + k + 1] != -100:
                    logp = model.head(h).float().log_softmax(-1)
                    nll = nll - logp[labels[b, i + k + 1]]
                    count += 1
            h_next.append(torch.stack(hs) if hs else torch.zeros(0, model.config.dim))
        h_prev = h_next
        ce.append(nll / max(count, 1))
    return torch.stack(ce).mean()


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_loss_equals_the_per_position_reference(depth: int) -> None:
    torch.manual_seed(0)
    model = _model(depth)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    labels = ids.clone()
    labels[0, 5] = -100
    labels[1, -2:] = -100
    with torch.no_grad():
        out = model(ids, labels=labels, mtp_lambda=0.25)
        expected = reference_mtp_loss(model, ids, labels)
    torch.testing.assert_close(out.mtp_loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_loss + 0.25 * out.mtp_loss)
    assert out.mtp_loss.item() > 1.0  # an untrained model: CE near log(vocab), not a vanishing term


def test_loss_weight_defaults_to_the_config_and_gradients_reach_the_modules() -> None:
    torch.manual_seed(1)
    model = _model(1, mtp_lambda=0.5).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_loss + 0.5 * out.mtp_loss)
    out.mtp_loss.backward()
    mtp = model.mtp[0]
    for p in (mtp.eh_proj.weight, mtp.enorm.weight, mtp.hnorm.weight, mtp.norm.weight, mtp.block.attn.wo.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.layers[0].attn.wo.weight.grad.abs().sum() > 0  # the MTP loss trains the main model too (V3)
    assert mtp.block.is_moe  # V3's MTP layer is an MoE layer


def test_short_sequences_give_a_finite_loss() -> None:
    model = _model(2)
    for T in (1, 2, 3):
        ids = torch.randint(0, model.config.vocab_size, (2, T))
        out = model(ids, labels=ids)
        assert torch.isfinite(out.mtp_loss), T


def test_drafting_with_a_cache_equals_the_training_path_and_chains() -> None:
    """mtp_forward, one token at a time over each depth's own cache, gives the logits the training forward
    computes for every position; depth 2 chained on depth 1's hidden states gives the training path's depth 2."""
    torch.manual_seed(2)
    model = _model(2)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    T = ids.shape[1]
    with torch.no_grad():
        out = model(ids)
        positions = torch.arange(T)[None].expand(2, T)
        train = model.mtp_train_logits(ids, out.hidden, positions, None)
        caches = model.new_mtp_caches()
        h1, lg1 = [], []
        for i in range(T - 1):
            step = model.mtp_forward(1, out.hidden[:, i:i + 1], ids[:, i + 1:i + 2], cache=caches[0])
            h1.append(step.hidden)
            lg1.append(step.logits)
        torch.testing.assert_close(torch.cat(lg1, 1), train[0], rtol=1e-5, atol=1e-5)
        hidden1 = torch.cat(h1, 1)
        lg2 = [model.mtp_forward(2, hidden1[:, i:i + 1], ids[:, i + 2:i + 3], cache=caches[1]).logits
               for i in range(T - 2)]
        torch.testing.assert_close(torch.cat(lg2, 1), train[1], rtol=1e-5, atol=1e-5)
        # a whole stretch at once, no cache: the same as the training path's depth 1
        whole = model.mtp_forward(1, out.hidden[:, :-1], ids[:, 1:])
        torch.testing.assert_close(whole.logits, train[0])


def test_drafting_with_left_padding_equals_the_unpadded_row() -> None:
    torch.manual_seed(4)
    model = _model(1)
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    padded = torch.cat((torch.zeros(1, 2, dtype=torch.long), ids), 1)
    mask = torch.tensor([[0, 0] + [1] * 7])
    with torch.no_grad():
        h = model(ids).hidden
        hp = model(padded, attention_mask=mask).hidden
        plain = model.mtp_forward(1, h[:, :-1], ids[:, 1:])
        pad = model.mtp_forward(1, hp[:, :-1], padded[:, 1:], attention_mask=mask[:, :-1])  # the hidden states' mask
    torch.testing.assert_close(pad.logits[:, 2:], plain.logits, rtol=1e-5, atol=1e-5)


def test_mtp_depth_zero_leaves_the_model_as_it_was() -> None:
    """No module, no parameter, no loss term; the main model's parameters and logits are bit for bit those of
    the same model with MTP modules (each parameter is drawn from its own name's generator)."""
    torch.manual_seed(5)
    plain, with_mtp = _model(0), _model(1)
    assert not any(n.startswith("mtp.") for n in plain.state_dict())
    main = {n: p for n, p in with_mtp.state_dict().items() if not n.startswith("mtp.")}
    assert main.keys() == plain.state_dict().keys()
    assert all(torch.equal(p, plain.state_dict()[n]) for n, p in main.items())
    ids = torch.randint(0, plain.config.vocab_size, (2, 8))
    a, b = plain(ids, labels=ids), with_mtp(ids, labels=ids)
    assert a.mtp_loss is None and torch.equal(a.loss, a.ce_loss + a.aux_loss)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.ce_loss, b.ce_loss)
    assert plain.new_mtp_caches() == []


def test_config_and_api_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"mtp_depth \(-1\)"):
        small_config(mtp_depth=-1)
    with pytest.raises(ValueError, match=r"mtp_lambda \(-0.1\)"):
        small_config(mtp_lambda=-0.1)
    model = _model(1)
    with pytest.raises(ValueError, match=r"depth \(2\) must be in 1..mtp_depth \(1\)"):
        model.mtp_forward(2, torch.zeros(1, 1, model.config.dim), torch.zeros(1, 1, dtype=torch.long))


def test_packed_rows_keep_each_example_apart() -> None:
    """Fine-tuning's packed rows (finetune/packing.py): the MTP loss over two examples and padding in one row is
    the loss over each example run alone, its predictions pooled per depth (no target, input token or attention
    crosses an example)."""
    import torch.nn.functional as F

    from deepseek_moe.finetune.packing import packed_forward

    torch.manual_seed(6)
    model = _model(2)
    lengths, pad = (6, 5), 3
    ids = torch.randint(0, model.config.vocab_size, (sum(lengths) + pad,))
    labels = ids.clone()
    labels[1] = -100  # a prompt token
    labels[sum(lengths):] = -100
    docs = torch.tensor([1] * lengths[0] + [2] * lengths[1] + [0] * pad)
    with torch.no_grad():
        packed = packed_forward(model, torch.stack((ids, labels, docs))[None])
        nll, count = torch.zeros(2), torch.zeros(2)
        start = 0
        for n in lengths:
            doc, lab = ids[None, start:start + n], labels[None, start:start + n]
            hidden = model(doc).hidden
            for k, lg in enumerate(model.mtp_train_logits(doc, hidden, torch.arange(n)[None], None), start=1):
                for i in range(n - k - 1):
                    if lab[0, i + k + 1] != -100:
                        nll[k - 1] -= F.log_softmax(lg[0, i], -1)[lab[0, i + k + 1]]
                        count[k - 1] += 1
            start += n
    torch.testing.assert_close(packed.mtp_loss, (nll / count).mean(), rtol=1e-5, atol=1e-5)


def test_a_quantised_model_keeps_its_mtp_module_through_save_and_load(tmp_path) -> None:
    """int8 (quant/): the module's experts are quantised with the rest, it drafts as the float module does to
    int8 accuracy, and a save in the quantised format loads back drafting the same logits."""
    from deepseek_moe import from_pretrained, save_pretrained

    torch.manual_seed(7)
    model = _model(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    save_pretrained(model, tmp_path / "float")
    quant = from_pretrained(tmp_path / "float", quantize="int8")
    assert type(quant.mtp[0].block.ffn.experts).__name__ == "QuantRoutedExperts"
    with torch.no_grad():
        want = model.mtp_forward(1, model(ids).hidden[:, :-1], ids[:, 1:]).logits
        got = quant.mtp_forward(1, quant(ids).hidden[:, :-1], ids[:, 1:]).logits
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
        save_pretrained(quant, tmp_path / "int8")
        again = from_pretrained(tmp_path / "int8")
        assert torch.equal(again.mtp_forward(1, again(ids).hidden[:, :-1], ids[:, 1:]).logits, got)


def test_a_depth_too_long_for_the_sequence_leaves_no_stale_balance_loss() -> None:
    """Depth 2 cannot run on 2 tokens: its MoE must not keep the balance loss (and graph) of an earlier, longer
    forward, which the model's aux loss would sum and a second backward would trip over."""
    model = _model(2).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    model(ids, labels=ids).loss.backward()
    short = torch.randint(0, model.config.vocab_size, (2, 2))
    out = model(short, labels=short)
    deep = model.mtp[1].block.ffn
    assert float(deep.aux_loss) == 0.0 and deep.last_stats is None
    out.loss.backward()  # raised "backward through the graph a second time" before


def test_a_model_without_shared_experts_keeps_its_mtp_module_through_save_and_load(tmp_path) -> None:
    """transformers writes zero-width shared experts when n_shared_experts == 0; the MTP layer's were read as
    tensors the module does not have."""
    from deepseek_moe import from_pretrained, save_pretrained

    cfg = small_config(mtp_depth=1)
    model = DeepSeekMoEForCausalLM(cfg.replace(moe=cfg.moe.replace(n_shared_experts=0)), init_seed=3).eval()
    save_pretrained(model, tmp_path / "ckpt")
    again = from_pretrained(tmp_path / "ckpt")
    state, loaded = model.state_dict(), again.state_dict()
    assert state.keys() == loaded.keys() and any(k.startswith("mtp.0.") for k in state)
    assert all(torch.equal(state[k], loaded[k]) for k in state)
