"""The transformers spelling (``DeepSeekMoEForCausalLM.from_pretrained``, ``model.save_pretrained``,
``model.generate``) does what the package functions do, end to end: save, load, generate, save again, reload."""

from pathlib import Path

import pytest
import torch
from test_model_configs import small_config

import deepseek_moe
from deepseek_moe import DeepSeekMoEForCausalLM


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_save_load_generate_save_reload(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(small_config())
    first, second = tmp_path / "first", tmp_path / "second"

    fmt = model.save_pretrained(first)
    assert fmt == deepseek_moe.io.checkpoint_format(model.config)
    loaded = DeepSeekMoEForCausalLM.from_pretrained(first)
    assert isinstance(loaded, DeepSeekMoEForCausalLM)
    assert not loaded.training  # like the package function (and transformers): loaded for inference
    original = _state(model)
    assert _state(loaded).keys() == original.keys()
    for k, v in _state(loaded).items():
        torch.testing.assert_close(v, original[k], rtol=0, atol=0, msg=k)

    # The method generates exactly what the package function does, from the model it was saved from.
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8]]
    ours = loaded.generate(prompts, max_new_tokens=6)
    theirs = deepseek_moe.generate(model, prompts, max_new_tokens=6)
    assert ours.new_tokens == theirs.new_tokens and ours.sequences == theirs.sequences
    assert all(len(n) == 6 for n in ours.new_tokens)
    sampled = dict(max_new_tokens=5, temperature=1.0, top_k=10, seed=7)  # keyword arguments reach the function
    assert loaded.generate(prompts, **sampled).new_tokens == deepseek_moe.generate(model, prompts, **sampled).new_tokens

    assert loaded.save_pretrained(second, max_shard_size="4KB") == fmt  # and its keyword arguments, too
    assert len(list(second.glob("*.safetensors"))) > 1
    reloaded = DeepSeekMoEForCausalLM.from_pretrained(second, dtype=torch.float64)
    by_function = deepseek_moe.from_pretrained(second, dtype=torch.float64)
    assert {k: v.dtype for k, v in _state(reloaded).items()} == {k: v.dtype for k, v in _state(by_function).items()}
    assert reloaded.embed.weight.dtype == torch.float64
    for k, v in _state(reloaded).items():
        torch.testing.assert_close(v, original[k].to(v.dtype), rtol=0, atol=0, msg=k)


def test_method_errors_are_the_functions_errors(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="config.json") as method:
        DeepSeekMoEForCausalLM.from_pretrained(tmp_path / "missing")
    with pytest.raises(type(method.value), match="config.json"):
        deepseek_moe.from_pretrained(tmp_path / "missing")
    model = DeepSeekMoEForCausalLM(small_config())
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate([[1] * (model.config.max_seq_len + 1)], max_new_tokens=1)
