"""Generation: batched prompts of different lengths equal one at a time; stopping; sampling; errors."""

import pytest
import torch
from test_model_configs import small_config

from deepseek_moe.infer.generate import generate
from deepseek_moe.infer.sampling import sample
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM


@pytest.fixture(scope="module")
def model() -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)
    return DeepSeekMoEForCausalLM(small_config()).double()


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_batched_equals_one_prompt_at_a_time(model: DeepSeekMoEForCausalLM, attn_impl: str) -> None:
    for layer in model.layers:
        layer.attn.attn_impl = attn_impl
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 11, 4], [30]]
    batched = generate(model, prompts, max_new_tokens=6)
    singles = [generate(model, [p], max_new_tokens=6).new_tokens[0] for p in prompts]
    assert batched.new_tokens == singles
    assert batched.sequences == [p + n for p, n in zip(prompts, singles, strict=True)]
    assert all(len(n) == 6 for n in singles)


def test_greedy_equals_argmax_of_full_forward(model: DeepSeekMoEForCausalLM) -> None:
    prompt = [3, 14, 15, 9]
    new = generate(model, [prompt], max_new_tokens=4).new_tokens[0]
    seq = list(prompt)
    for _ in range(4):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert new == seq[len(prompt):]


def test_stop_tokens_stream_and_row_limits(model: DeepSeekMoEForCausalLM) -> None:
    first = generate(model, [[1, 2, 3]], max_new_tokens=5).new_tokens[0]
    streamed: list[tuple[int, int]] = []
    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=5, stop_tokens=[first[1]],
                   stream=lambda row, tok: streamed.append((row, tok)))
    assert out.new_tokens[0] == first[:2]
    assert sorted(streamed) == sorted((r, t) for r, toks in enumerate(out.new_tokens) for t in toks)
    # A row never grows past max_seq_len.
    near_full = list(range(1, model.config.max_seq_len - 1))
    assert len(generate(model, [near_full], max_new_tokens=10).new_tokens[0]) == 2


def test_prompt_longer_than_max_seq_len_is_an_error(model: DeepSeekMoEForCausalLM) -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * (model.config.max_seq_len + 1)], max_new_tokens=1)


def test_seeded_sampling_is_reproducible(model: DeepSeekMoEForCausalLM) -> None:
    kwargs = dict(max_new_tokens=5, temperature=1.0, top_k=10, top_p=0.9, seed=123)
    assert generate(model, [[1, 2]], **kwargs).new_tokens == generate(model, [[1, 2]], **kwargs).new_tokens


def test_top_k_and_top_p_restrict_candidates() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -2.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample(logits, temperature=1.0, top_k=2, generator=gen).tolist()) <= {0, 1}
    probs = logits[0].softmax(-1)  # ~0.66, 0.24, 0.09, ...: top_p 0.8 keeps the first two
    assert probs[0] < 0.8 < probs[:2].sum()
    assert set(sample(logits, temperature=1.0, top_p=0.8, generator=gen).tolist()) == {0, 1}
    assert sample(logits, temperature=1.0, top_p=0.5, generator=gen).unique().tolist() == [0]
    assert sample(logits[:1], temperature=0.0).tolist() == [0]
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, temperature=1.0, top_p=0.0)
