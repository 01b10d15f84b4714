"""A fine-tune of a checkpoint through the Trainer: resumes exactly, keeps a frozen router routing as before,
writes an adapter that loads back, and refuses a BASE without a tokenizer."""

import json

import pytest
import torch
from test_adapters_lora import small_config, small_model
from test_finetune_data import TEMPLATE, word_tokenizer

from deepseek_moe import from_pretrained, save_pretrained
from deepseek_moe.adapters import LoRAConfig
from deepseek_moe.finetune.config import FinetuneConfig
from deepseek_moe.finetune.run import FinetuneTrainer, run
from deepseek_moe.train.config import CheckpointConfig, EvalConfig, OptimConfig, ScheduleConfig, TrainConfig
from deepseek_moe.train.errors import TrainError

REPLIES = ["hello there", "ok", "four", "bye", "hello", "ok bye"]


def _write_base(tmp_path, model):
    model.tokenizer = word_tokenizer()
    save_pretrained(model, tmp_path / "base")
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    data = tmp_path / "chat.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": "what is two"},
                                      {"role": "assistant", "content": REPLIES[i % len(REPLIES)]}]})
             for i in range(24)]
    data.write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.fixture
def base(tmp_path):
    return _write_base(tmp_path, small_model())


@pytest.fixture
def biased_base(tmp_path):
    """Routing bias on (DeepSeek-V3's aux-loss-free balancing): a run that updated it would route differently."""
    moe = small_config().moe.replace(use_routing_bias=True, score_func="sigmoid")
    model = small_model(moe=moe)
    with torch.no_grad():
        for layer in model.layers:
            if layer.is_moe:
                layer.ffn.gate.e_score_correction_bias.normal_(std=0.05)
    return _write_base(tmp_path, model)


def config(tmp, out, **changes):
    train = TrainConfig(optim=OptimConfig(lr=1e-2, weight_decay=0.0), seed=3, threads=1,
                        schedule=ScheduleConfig(steps=4, batch_size=2, warmup_fraction=0.0),
                        eval=EvalConfig(every=2, batches=1, log_every=1, sample_tokens=0),
                        checkpoint=CheckpointConfig(every=2, keep_last=2))
    fields = dict(base=str(tmp / "base"), data=(str(tmp / "chat.jsonl"),), out=str(tmp / out), seq_len=16,
                  val_fraction=0.25, lora=LoRAConfig(r=2, targets=("attention", "routed_experts")), train=train)
    return FinetuneConfig(**{**fields, **changes})


def _metrics(run_dir):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "wall_s", "resumed_from")} for r in records]


def _check_resumes_exactly(base, monkeypatch, **changes):
    ref = run(config(base, "ref", **changes), progress=False)
    assert (ref.run_dir / "adapter" / "adapter_model.safetensors").is_file()

    original_step = FinetuneTrainer.step

    def interrupted(self, step):
        if step == 3:  # steps 1-3 done, the checkpoint is at step 2
            raise KeyboardInterrupt
        return original_step(self, step)

    monkeypatch.setattr(FinetuneTrainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(config(base, "cut", **changes), progress=False)
    monkeypatch.setattr(FinetuneTrainer, "step", original_step)
    resumed = run(config(base, "cut", **changes), resume=True, progress=False)
    assert resumed.val_loss == ref.val_loss
    assert _metrics(resumed.run_dir) == _metrics(ref.run_dir)
    return ref


def test_a_finetune_resumes_exactly(base, monkeypatch):
    _check_resumes_exactly(base, monkeypatch)


def test_lora_on_a_quantised_base_resumes_exactly_and_merges_into_the_float_base(base, monkeypatch):
    from deepseek_moe import DeepSeekMoEForCausalLM
    from deepseek_moe.cli.main import main
    from deepseek_moe.quant import QuantLinear, QuantRoutedExperts

    lora = LoRAConfig(r=2, targets=("attention", "shared_experts", "routed_experts"))
    ref = _check_resumes_exactly(base, monkeypatch, quantize="int8", lora=lora)
    adapter = ref.run_dir / "adapter"
    ids = torch.randint(0, 16, (2, 12), generator=torch.Generator().manual_seed(0))
    # Applied unmerged onto the quantised base (the classmethod takes adapters as the package function does) ...
    quantised = DeepSeekMoEForCausalLM.from_pretrained(base / "base", quantize="int8", adapters=[adapter]).eval()
    assert isinstance(quantised.layers[1].ffn.experts, QuantRoutedExperts)
    assert isinstance(quantised.layers[1].attn.wq_a, QuantLinear) and quantised.layers[1].ffn.experts.adapter
    # ... and merged into the unquantised BASE: the merged checkpoint computes what BASE + adapter unmerged does
    assert main(["merge", str(base / "base"), str(adapter), str(base / "merged")]) == 0
    merged = from_pretrained(base / "merged").eval()
    unmerged = from_pretrained(base / "base", adapters=[adapter]).eval()
    plain = from_pretrained(base / "base").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.equal(merged(ids).logits, plain(ids).logits)  # the adapter learned something
        # the float base with the adapter is near the quantised one with it (int8 rounding apart)
        torch.testing.assert_close(quantised(ids).logits, unmerged(ids).logits, rtol=0.05, atol=0.05)


def test_lora_on_a_bf16_base_resumes_exactly_and_trains_only_fp32_adapters(base, monkeypatch):
    import sys

    finetune_run = sys.modules[FinetuneTrainer.__module__]  # the module (the package exports a function `run`)
    held = []
    narrow = finetune_run.narrow_frozen_matrices
    monkeypatch.setattr(finetune_run, "narrow_frozen_matrices", lambda m, d: (held.append(m), narrow(m, d))[1])
    ref = _check_resumes_exactly(base, monkeypatch, quantize="bf16")
    model = held[0]  # the model the reference run trained
    assert model.layers[1].ffn.experts.w1.dtype == torch.bfloat16 and model.embed.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    # the adapter it wrote applies to the fp32 BASE (where it is merged) and changes what BASE computes
    unmerged = from_pretrained(base / "base", adapters=[ref.run_dir / "adapter"]).eval()
    plain = from_pretrained(base / "base").eval()
    ids = torch.randint(0, 16, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(unmerged(ids).logits, plain(ids).logits)


def test_quantize_takes_lora_only(base):
    with pytest.raises(ValueError, match="quantize .'int8'. freezes BASE"):
        config(base, "q", quantize="int8", method="full")
    with pytest.raises(ValueError, match="quantize .'bf16'. freezes BASE"):
        config(base, "q", quantize="bf16", method="full")
    with pytest.raises(ValueError, match="quantize .'int3'."):
        config(base, "q", quantize="int3")


def _gate_inputs(model, ids):
    captured = []
    hooks = [layer.ffn.gate.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
             for layer in model.layers if layer.is_moe]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return captured


def _routes(model, inputs):
    gates = [layer.ffn.gate for layer in model.layers if layer.is_moe]
    with torch.no_grad():
        return [gate(x).indices_TK for gate, x in zip(gates, inputs, strict=True)]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_frozen_router_routes_base_tokens_as_before(biased_base, method):
    result = run(config(biased_base, f"ft_{method}", method=method), progress=False)
    plain = from_pretrained(biased_base / "base").eval()
    tuned = (from_pretrained(biased_base / "base", adapters=[result.run_dir / "adapter"]) if method == "lora"
             else from_pretrained(result.run_dir / "model")).eval()
    ids = torch.randint(0, 16, (2, 12), generator=torch.Generator().manual_seed(0))
    base_inputs = _gate_inputs(plain, ids)
    assert all(torch.equal(a, b) for a, b in zip(_routes(plain, base_inputs), _routes(tuned, base_inputs),
                                                 strict=True))
    with torch.no_grad():
        assert not torch.equal(tuned(ids).logits, plain(ids).logits)  # it did learn something


def test_the_router_and_its_bias_train_only_when_asked(biased_base):
    result = run(config(biased_base, "ft_router", method="full", train_router=True), progress=False)
    tuned, plain = from_pretrained(result.run_dir / "model"), from_pretrained(biased_base / "base")
    assert (result.run_dir / "model" / "tokenizer_config.json").is_file()
    gate, base_gate = tuned.layers[1].ffn.gate, plain.layers[1].ffn.gate
    assert not torch.equal(gate.weight, base_gate.weight)
    assert not torch.equal(gate.e_score_correction_bias, base_gate.e_score_correction_bias)


def test_a_base_without_a_tokenizer_is_refused(base):
    (base / "base" / "tokenizer.json").unlink()
    with pytest.raises(TrainError, match="--tokenizer"):
        run(config(base, "none"), progress=False)
    word_tokenizer().save(str(base / "tok.json"))
    run(config(base, "with_tok", tokenizer=str(base / "tok.json")), progress=False)


def test_the_command_runs_resumes_and_names_what_is_missing(base, capsys):
    from deepseek_moe.cli.main import main

    run_dir = base / "cli"
    args = ["finetune", str(base / "base"), "--data", str(base / "chat.jsonl"), "--out", str(run_dir), "--steps",
            "2", "--batch-size", "2", "--seq-len", "16", "--val-fraction", "0.25", "--rank", "2", "--targets",
            "attention,routed_experts", "--eval-every", "1", "--checkpoint-every", "1", "--quiet"]
    assert main(args) == 0
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert main(["finetune", "--resume", str(run_dir), "--quiet"]) == 0
    assert main(["finetune", str(base / "base"), "--quiet"]) == 2
    assert "--data" in capsys.readouterr().err
    assert main([*args[:-1], "--targets", "attention,nothing_here", "--force", "--quiet"]) == 2
    assert "'nothing_here'" in capsys.readouterr().err


def test_generate_with_an_adapter_equals_the_merged_checkpoint(base, capsys):
    from deepseek_moe import finetune
    from deepseek_moe.cli.main import main

    result = finetune.run(config(base, "gen"), progress=False)  # the package's run(FinetuneConfig)
    adapter = str(result.run_dir / "adapter")
    assert main(["merge", str(base / "base"), adapter, str(base / "merged")]) == 0
    capsys.readouterr()
    common = ["--prompt", "what is two", "--max-new-tokens", "6", "--temperature", "0"]
    outputs = []
    for argv in (["generate", str(base / "base"), *common, "--adapter", adapter],
                 ["generate", str(base / "merged"), *common], ["generate", str(base / "base"), *common]):
        assert main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert main(["generate", str(base / "base"), *common, "--adapter", str(base)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


@pytest.fixture
def mtp_base(tmp_path):
    return _write_base(tmp_path, small_model(mtp_depth=1))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_base_mtp_modules_train_along_and_are_kept(mtp_base, method):
    """A BASE with an MTP module: its loss is logged and trains the module (full) or only the adapters (LoRA,
    the module frozen as the base is); the full fine-tune's model keeps it; --no-mtp loads BASE without it."""
    result = run(config(mtp_base, f"ft_{method}", method=method), progress=False)
    train = [r for r in _metrics(result.run_dir) if r["kind"] == "train"]
    assert all(r["mtp_loss"] > 0 for r in train)
    assert [r["mtp_lambda"] for r in train] == [0.3, 0.3, 0.3, 0.1]  # V3's stages over 4 steps
    base = from_pretrained(mtp_base / "base")
    if method == "full":
        tuned = from_pretrained(result.run_dir / "model")
        assert tuned.config.mtp_depth == 1
        assert not torch.equal(tuned.mtp[0].eh_proj.weight, base.mtp[0].eh_proj.weight)
    lean = run(config(mtp_base, f"ft_{method}_lean", method=method, mtp=False), progress=False)
    assert all("mtp_loss" not in r for r in _metrics(lean.run_dir))
    if method == "full":
        assert from_pretrained(lean.run_dir / "model").config.mtp_depth == 0


def test_data_flags_take_several_paths_each():
    # `--data DIR/*.md` is how a shell hands over a glob: every path it expands to is data, in order.
    from deepseek_moe.cli.finetune_cmd import build_config
    from deepseek_moe.cli.main import build_parser

    args = build_parser().parse_args(["finetune", "base", "--data", "a.md", "b.md", "--data", "c.jsonl",
                                      "--val-data", "v1.txt", "v2.txt", "--out", "run"])
    cfg = build_config(args)
    assert cfg.base == "base" and cfg.data == ("a.md", "b.md", "c.jsonl") and cfg.val_data == ("v1.txt", "v2.txt")


def test_expert_activations_is_validated_naming_the_field():
    from deepseek_moe.finetune.config import FinetuneConfig

    with pytest.raises(ValueError, match="expert_activations"):
        FinetuneConfig(base="b", data=("d",), expert_activations="float16")  # type: ignore[arg-type]
    assert FinetuneConfig(base="b", data=("d",), expert_activations="bfloat16").expert_activations == "bfloat16"


def test_a_chat_finetune_on_the_default_template_learns_to_end_its_reply(tmp_path, capsys):
    """A BASE without tokenizer_config.json (as the default train run writes it) renders chats with the default
    template, whose reply ends with the eos token: trained on the replies with that token in the loss, the model
    answers `generate --chat` with the reply and stops on its own, well before --max-new-tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from deepseek_moe.cli.main import main

    words = ["<|endoftext|>", "User:", "Assistant:", "what", "is", "two", "four", "[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.add_special_tokens(["<|endoftext|>"])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"<\|endoftext\|>"), "isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    model = small_model(eos_token_id=0)
    model.tokenizer = tok
    save_pretrained(model, tmp_path / "base")
    assert not (tmp_path / "base" / "tokenizer_config.json").exists()
    chat = {"messages": [{"role": "user", "content": "what is two"}, {"role": "assistant", "content": "four"}]}
    (tmp_path / "chat.jsonl").write_text((json.dumps(chat) + "\n") * 8)
    result = run(config(tmp_path, "tuned", method="full", train=config(tmp_path, "x").train.replace(
        schedule=ScheduleConfig(steps=12, batch_size=2, warmup_fraction=0.0))), progress=False)
    capsys.readouterr()
    argv = ["--chat", "--prompt", "what is two", "--temperature", "0", "--max-new-tokens", "8"]
    for path, stops in ((tmp_path / "base", False), (result.run_dir, True)):
        assert main(["generate", str(path), *argv]) == 0
        out = capsys.readouterr()
        assert ("[2 new tokens" in out.err) == stops, out.err  # "four" and the eos
        assert out.out.endswith("Assistant:four\n") == stops, out.out
