"""The graphs export traces (export/lm.py) compute what the model's forward does: the same ``forward_logits``,
with the masks always built. Checked in PyTorch, without ONNX, for padded and unpadded batches, prefill and
decode, MLA and standard attention."""

import pytest
import torch

from deepseek_moe import DeepSeekMoEForCausalLM, get_preset
from deepseek_moe.export.lm import DecodeGraph, PrefillGraph, cache_names


def _model(attention: str) -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(vocab_size=64, n_layers=3, max_seq_len=64, original_seq_len=64,
                                     attention=attention)
    return DeepSeekMoEForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("attention", ["mla", "mha"])
@pytest.mark.parametrize("padded", [False, True])
def test_prefill_and_decode_graphs_equal_the_forward(attention: str, padded: bool) -> None:
    model = _model(attention)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    if padded:
        mask[1, :4] = 0
        mask[2, :8] = 0  # one real token
    real = mask.bool()
    with torch.no_grad():
        cache = model.new_cache()
        expected = model(ids, attention_mask=mask, cache=cache).logits
        prefill = PrefillGraph(model)(ids, mask)
        torch.testing.assert_close(prefill[0][real], expected[real], rtol=1e-10, atol=1e-10)
        n = len(cache_names(model))
        assert len(prefill) == 1 + n * len(model.layers)

        past, full_mask = list(prefill[1:]), mask
        for step in range(3):  # the presents fed back as pasts, one token per row, a finished row masked
            nxt = torch.randint(0, 64, (3, 1), generator=g)
            step_mask = torch.tensor([[1], [0 if step == 2 else 1], [1]])
            full_mask = torch.cat((full_mask, step_mask), dim=1)
            expected = model(nxt, attention_mask=step_mask, cache=cache).logits
            decoded = DecodeGraph(model)(nxt, full_mask, *past)
            live = step_mask.bool()[:, 0]
            torch.testing.assert_close(decoded[0][live], expected[live], rtol=1e-10, atol=1e-10)
            past = list(decoded[1:])
            assert past[0].shape[1] == full_mask.shape[1]
