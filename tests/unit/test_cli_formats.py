"""Issue 8 item 10: whatever a training run writes loads back through from_pretrained, generate and info — the
DeepSeekMoE 16B layout for MHA runs, our own format for configs no public format expresses (and the undocumented
version-0 form train/loop.py wrote before)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from test_cli_generate_info import tiny_tokenizer

from deepseek_moe import from_pretrained, save_pretrained
from deepseek_moe.cli.main import main
from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM


def _cfg(vocab: int, moe: dict[str, Any], **changes: Any) -> ModelConfig:
    heads = {"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, **changes}
    return ModelConfig(vocab_size=vocab, dim=32, inter_dim=64, n_layers=2, n_dense_layers=1, n_heads=2,
                       max_seq_len=64, original_seq_len=64,
                       moe=MoEConfig(dim=32, moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2, **moe),
                       **heads)


MHA = {"attention": "mha", "kv_lora_rank": 0, "qk_nope_head_dim": 0, "qk_rope_head_dim": 16, "v_head_dim": 16,
       "rope_interleave": False}
RUNS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "mha_16b_layout": ({}, MHA, "deepseek"),
    "softmax_with_bias_ours": ({"use_routing_bias": True}, {}, "deepseek_moe"),
    "mha_with_groups_ours": ({"n_expert_groups": 2}, MHA, "deepseek_moe"),
}


def _write_v0(model: DeepSeekMoEForCausalLM, path: Path) -> None:
    """What train/loop.py's save_model wrote for such configs before the format was documented."""
    path.mkdir(parents=True)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "deepseek_moe"})
    (path / "config.json").write_text(json.dumps({"format": "deepseek_moe", **model.config.to_dict()}))
    model.tokenizer.save(str(path / "tokenizer.json"))


@pytest.mark.parametrize("run", [*RUNS, "v0_written_by_old_train"])
def test_run_outputs_load_generate_and_info(run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tok = tiny_tokenizer()
    moe, changes, fmt = RUNS.get(run, ({"use_routing_bias": True}, {}, "deepseek_moe"))
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(_cfg(tok.get_vocab_size(), moe, **changes)).eval()
    model.tokenizer = tok
    run_dir = tmp_path / "run"
    if run == "v0_written_by_old_train":
        _write_v0(model, run_dir / "model")
    else:
        assert save_pretrained(model, run_dir / "model") == fmt

    loaded = from_pretrained(run_dir / "model")
    assert loaded.config == model.config
    ids = torch.tensor([tok.encode("hello world").ids])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    assert main(["info", str(run_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"]["attention"] == model.config.attention
    assert main(["generate", str(run_dir), "--prompt", "hello", "--max-new-tokens", "4", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("hello")


def test_an_mha_training_run_writes_the_16b_layout_that_loads_back(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """End to end: `train` with LLaMA-style attention writes model/ as DeepSeekMoE 16B's layout (model_type
    "deepseek"), which from_pretrained, info and generate read; the weights are the final checkpoint's."""
    from test_train_loop import small_config

    from deepseek_moe.train.checkpoint import read_model_state
    from deepseek_moe.train.loop import run

    cfg = small_config(tmp_path, "schedule.steps=2", "routing.uniform_steps=0", "eval.sample_tokens=0",
                       'model.attention="mha"', "model.kv_lora_rank=0", "model.qk_nope_head_dim=0",
                       "model.qk_rope_head_dim=16", "model.v_head_dim=16", "model.rope_interleave=false",
                       "model.moe.n_expert_groups=1", "model.moe.n_limited_groups=1")  # 16B's format has no groups
    result = run(cfg, progress=False)
    model_dir = result.run_dir / "model"
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "deepseek"
    model = from_pretrained(model_dir)
    saved = read_model_state(result.run_dir / "state/step-2")
    state = model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k].to(saved[k].dtype)) for k in saved)
    assert main(["info", str(result.run_dir)]) == 0
    assert "MHA" in capsys.readouterr().out
    assert main(["generate", str(result.run_dir), "--prompt", "def f", "--max-new-tokens", "3", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("def f")
