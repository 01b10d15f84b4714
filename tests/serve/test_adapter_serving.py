"""Several LoRA adapters on one served base model: rows of different adapters in one batch give what each
adapter gives alone (``generate`` on the base with that adapter loaded, an independent path), prefix-cache blocks
are never shared across adapters, and the HTTP server selects adapters by ``model``, lists them and names an
unknown one."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from scheduler_helpers import Collector, run_all
from serve_fixtures import build_checkpoint, free_port, running_server, tiny_config

from deepseek_moe import DeepSeekMoEForCausalLM, from_pretrained, generate
from deepseek_moe.adapters import GROUPS, LoRAConfig, apply_lora
from deepseek_moe.adapters.peft import load_adapter, save_adapter
from deepseek_moe.cli.main import main
from deepseek_moe.serve.adapters import load_adapters
from deepseek_moe.serve.scheduler import Request, SamplingParams, Scheduler, SchedulerConfig


def make_model() -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(tiny_config(512)).eval()
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # sharp logits: greedy choices far from float-rounding ties
    return model


def write_adapter(model: DeepSeekMoEForCausalLM, path: Path, seed: int) -> Path:
    """A random (non-zero B) adapter on every group, experts included, saved in PEFT's format."""
    adapted = copy.deepcopy(model)
    torch.manual_seed(seed)
    cfg = LoRAConfig(r=2, alpha=8.0, targets=GROUPS, init="random")
    apply_lora(adapted, cfg)
    return save_adapter(adapted, path, cfg)


def alone(model: DeepSeekMoEForCausalLM, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
    ref = copy.deepcopy(model)
    if adapter is not None:
        load_adapter(ref, adapter)
    return generate(ref.eval(), [prompt], max_new_tokens=n).new_tokens[0]


def submit(s: Scheduler, prompt: list[int], adapter: str | None, n: int) -> Collector:
    c = Collector()
    s.submit(Request(prompt, SamplingParams(max_tokens=n, ignore_eos=True), c, adapter=adapter))
    return c


def test_two_adapters_in_one_batch_give_what_each_gives_alone(tmp_path: Path) -> None:
    model = make_model()
    paths = {"a": write_adapter(model, tmp_path / "a", 1), "b": write_adapter(model, tmp_path / "b", 2)}
    g = torch.Generator().manual_seed(3)
    p, q, r = (torch.randint(1, 512, (n,), generator=g).tolist() for n in (21, 9, 30))
    rows = [(p, "a"), (p, "b"), (p, None), (q, "a"), (r, "b"), (q, None)]
    want = [alone(model, paths[k] if k else None, prompt, 8) for prompt, k in rows]
    assert len({tuple(w) for w in want[:3]}) == 3  # the adapters change the output of the same prompt
    s = Scheduler(model, SchedulerConfig(max_batch_size=8, max_batch_tokens=40, block_size=4,
                                         kv_cache_bytes=1 << 22), adapters=load_adapters(model, list(paths.items())))
    assert s.adapter_names == ["a", "b"]
    got = [submit(s, prompt, k, 8) for prompt, k in rows]
    run_all(s)
    assert [c.tokens for c in got] == want
    # The base model the server holds was left without adapters.
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_prefix_cache_blocks_are_never_shared_across_adapters(tmp_path: Path) -> None:
    model = make_model()
    paths = {"a": write_adapter(model, tmp_path / "a", 1), "b": write_adapter(model, tmp_path / "b", 2)}
    s = Scheduler(model, SchedulerConfig(max_batch_size=8, block_size=4, kv_cache_bytes=1 << 22),
                  adapters=load_adapters(model, list(paths.items())))
    prompt = list(range(1, 30))
    runs = []
    for adapter in ("a", "b", None, "a"):  # one after another: each finds the cache the earlier ones left
        before = s.metrics.prefix_cache_hits.value
        c = submit(s, prompt, adapter, 5)
        run_all(s)
        runs.append((c.tokens, s.metrics.prefix_cache_hits.value - before))
    assert [hits for _, hits in runs] == [0, 0, 0, 28]  # only a's second request reuses (a's) blocks
    assert [tokens for tokens, _ in runs] == [alone(model, paths.get(k) if k else None, prompt, 5)
                                              for k in ("a", "b", None, "a")]


def test_unknown_adapters_and_clashing_names_are_refused(tmp_path: Path) -> None:
    model = make_model()
    path = write_adapter(model, tmp_path / "a", 1)
    with pytest.raises(ValueError, match="already taken"):
        load_adapters(model, [("a", path), ("a", path)])
    with pytest.raises(ValueError, match="by the base model"):
        load_adapters(model, [("tiny", path)], reserved=("tiny",))
    with pytest.raises(ValueError, match="nope.*adapter_config.json"):
        load_adapters(model, [("nope", tmp_path)])
    s = Scheduler(model, SchedulerConfig(block_size=4, kv_cache_bytes=1 << 22))
    with pytest.raises(ValueError, match="adapter 'a' is not loaded"):
        s.submit(Request([1, 2], SamplingParams(max_tokens=1), Collector(), adapter="a"))


def test_server_selects_adapters_by_model_and_generate_takes_the_same_flag(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = build_checkpoint(tmp_path / "tiny-ckpt")
    base = from_pretrained(ckpt)
    a, b = write_adapter(base, tmp_path / "a", 1), write_adapter(base, tmp_path / "bee", 2)
    # generate: NAME=PATH (serve's form) and a bare PATH load the same adapter.
    common = ["generate", str(ckpt), "--prompt", "def add", "--max-new-tokens", "6", "--temperature", "0"]
    texts = []
    for argv in ([*common, "--adapter", f"x={a}"], [*common, "--adapter", str(a)], common):
        assert main(argv) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] != texts[2]
    assert main(["serve", str(ckpt), "--adapter", f"a={tmp_path}"]) == 2
    assert "adapter_config.json" in capsys.readouterr().err

    with running_server(ckpt, "--adapter", f"a={a}", "--adapter", str(b), "--block-size", "4") as (url, _):
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert [(m["id"], m.get("parent")) for m in models] == [("tiny", None), ("a", "tiny"), ("bee", "tiny")]
        body = {"prompt": "def add(a, b):\n    return", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        out = {}
        for name in ("tiny", "a", "bee", "a"):
            r = httpx.post(f"{url}/v1/completions", json={**body, "model": name}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == name
            out.setdefault(name, []).append(r.json()["choices"][0]["text"])
            n_prompt = r.json()["usage"]["prompt_tokens"]
        assert out["a"][0] == out["a"][1] and len({out["tiny"][0], out["a"][0], out["bee"][0]}) == 3
        r = httpx.post(f"{url}/v1/completions", json={**body, "model": "c"}, timeout=60)
        assert r.status_code == 404
        err = r.json()["error"]
        assert err["param"] == "model" and "`c`" in err["message"] and "`bee`" in err["message"]
        # Only the second "a" request reused blocks (the first one's): its full blocks but the last token's.
        rate = re.search(r"^deepseek_moe_prefix_cache_hit_rate (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
        assert rate is not None and float(rate.group(1)) == pytest.approx((n_prompt - 1) // 4 * 4 / (4 * n_prompt))


def test_the_serving_pages_adapter_block_runs_as_written(tmp_path: Path) -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    block = next(b for b in re.findall(r"^```bash\n(.*?)^```", page, re.S | re.M) if "--adapter chat=" in b)
    build_checkpoint(tmp_path / "runs" / "longer")
    write_adapter(from_pretrained(tmp_path / "runs" / "longer"), tmp_path / "runs" / "chat" / "adapter", 1)
    port = str(free_port())
    script = "set -e\n" + block.replace("8000", port) + "\nkill %1\nwait\n"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"parent":"base"' in out.stdout.replace(" ", "")
    assert out.stdout.replace(" ", "").count('"model":"chat"') == 2
    rate = re.search(r"^deepseek_moe_prefix_cache_hit_rate (\S+)$", out.stdout, re.M)
    assert rate is not None and float(rate.group(1)) > 0
