"""``deepseek-moe quantize``: writes the format, copies the tokenizer, refuses other bits on quantised input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import deepseek_moe as dm
from deepseek_moe.cli.main import main


def test_quantize_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = dm.DeepSeekMoEForCausalLM(dm.get_preset("tiny"))
    run = tmp_path / "run"
    dm.save_pretrained(model, run / "model")  # a train run directory holds model/
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(run / "model" / "tokenizer.json"))
    assert main(["quantize", str(run), str(tmp_path / "q4"), "--bits", "4", "--keep", "head,wkv_b"]) == 0
    assert "int4" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]
    assert cfg["bits"] == 4 and cfg["keep"] == ["head", "wkv_b"]
    assert (tmp_path / "q4" / "tokenizer.json").read_text() == (run / "model" / "tokenizer.json").read_text()
    assert main(["quantize", str(tmp_path / "q4"), str(tmp_path / "q8"), "--bits", "8"]) == 2
    assert "already quantised to int4" in capsys.readouterr().err
    assert main(["quantize", str(run), str(tmp_path / "x"), "--bits", "8", "--keep", "experts"]) == 2
    assert "unknown parts" in capsys.readouterr().err
