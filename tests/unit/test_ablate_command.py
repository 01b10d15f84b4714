"""`deepseek-moe ablate` end to end at tiny widths: two variants, a few steps, then resumed and refused."""

import json
import shutil

import pytest
from test_train_loop import write_corpus

from deepseek_moe.cli.main import main

TINY = ["--dim", "32", "--n-layers", "2", "--n-experts", "4", "--expert-dim", "16", "--steps", "4",
        "--batch-size", "4", "--seq-len", "32", "--eval-every", "2", "--threads", "1", "--seeds", "0"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablate")
    corpus = write_corpus(tmp / "corpus")
    val = tmp / "val"
    val.mkdir()
    (val / "v.py").write_text("".join(f"def g{j}(x):\n    return x * {j}\n\n" for j in range(60)))
    args = ["ablate", *TINY, "--variants", "gshard_x1.5,deepseekmoe", "--data", str(corpus), "--val-data", str(val),
            "--out", str(tmp / "out"), "--quiet"]
    with pytest.MonkeyPatch.context() as mp:  # the tokenizer and token arrays go to this test's own cache
        mp.setenv("DEEPSEEK_MOE_CACHE", str(tmp / "cache"))
        assert main(args) == 0
        yield tmp / "out", args


def test_writes_results_plots_and_counts(ablation):
    out, _ = ablation
    for name in ("results.json", "claims.json", "results.md", "val_loss_curves.png", "redundancy.png", "shared_expert.png",
                 "ablation.json"):
        assert (out / name).is_file(), name
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(rows) == ["gshard_x1.5", "deepseekmoe"]
    for r in rows.values():
        for key in ("total_params", "activated_params", "flops_per_token", "val_loss", "val_loss_std",
                    "val_loss_seeds", "tokens_per_s", "load_max_over_mean"):
            assert r[key] is not None, key
        assert r["val_loss"] == r["val_loss_seeds"][0] and r["val_loss_std"] == 0.0
        summary = [json.loads(x) for x in (out / "runs" / r["variant"] / "seed0" / "metrics.jsonl").read_text()
                   .splitlines() if '"summary"' in x][-1]
        assert r["val_loss"] == summary["val_loss"]
        assert r["load_max_over_mean"] >= 1.0
        config = json.loads((out / "runs" / r["variant"] / "seed0" / "config.json").read_text())
        assert config["data"]["val_paths"] == [str(out.parent / "val")]  # --val-data reaches training
    # Equal FFN parameters per token for DeepSeekMoE and GShard; x1.5 has 1.5 times.
    assert rows["gshard_x1.5"]["ffn_activated_params"] * 2 == rows["deepseekmoe"]["ffn_activated_params"] * 3
    red = rows["deepseekmoe"]["redundancy"]
    assert [p["masked"] for p in red] == [0, 4]  # 15 routed experts; ratios 0 and 1/4 (N = 4) are <= 0.375
    assert red[0]["val_loss"] == pytest.approx(rows["deepseekmoe"]["val_loss"], abs=1e-6)  # whole split both
    assert [p["masked"] for p in rows["gshard_x1.5"]["redundancy"]] == [0, 1]
    shared = rows["deepseekmoe"]["shared_expert_test"]
    assert shared["shared_disabled_val_loss"] != shared["val_loss"]
    assert "shared_expert_test" not in rows["gshard_x1.5"]
    md = (out / "results.md").read_text()
    assert "| deepseekmoe |" in md and "Redundancy" in md


def test_rerun_skips_finished_runs_and_resumes_interrupted_ones(ablation, capsys):
    out, args = ablation
    run = out / "runs" / "deepseekmoe" / "seed0"
    model_mtime = (run / "model" / "config.json").stat().st_mtime
    # Make deepseekmoe look interrupted after its checkpoint at step 2: no model, no summary, no analysis.
    shutil.rmtree(run / "model")
    shutil.rmtree(run / "state" / "step-4")
    (run / "analysis.json").unlink()
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line)["step"] <= 2))
    before = json.loads((out / "results.json").read_text())
    assert main([a for a in args if a != "--quiet"]) == 0
    log = capsys.readouterr().out
    assert "gshard_x1.5 seed 0: finished earlier, skipped" in log
    assert "deepseekmoe seed 0: resuming" in log and "resuming" in log and "from step-2" in log
    after = json.loads((out / "results.json").read_text())
    assert (run / "model" / "config.json").stat().st_mtime >= model_mtime
    # Resume is exact: the same losses as the uninterrupted run.
    assert [r["val_loss"] for r in after] == pytest.approx([r["val_loss"] for r in before], abs=1e-6)


def test_other_settings_in_the_same_directory_are_refused(ablation, capsys):
    out, args = ablation
    changed = [a if a != "4" or i != args.index("--steps") + 1 else "5" for i, a in enumerate(args)]
    assert main(changed) == 2
    assert "holds an ablation with other settings (steps differ)" in capsys.readouterr().err


def test_balance_ablation_reports_drops_capacity_and_entropy(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    monkeypatch.setenv("DEEPSEEK_MOE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    tiny = [a for a in TINY if a not in ("--seeds", "0")]
    assert main(["ablate", *tiny, "--steps", "6", "--balance", "--seeds", "0,1", "--data", str(corpus), "--out",
                 str(out), "--quiet", "--variants", "deepseekmoe_drop,deepseekmoe_adaptive,deepseekmoe_entropy"]) == 0
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())}
    assert rows["deepseekmoe_drop"]["dropped"] > 0 and "capacity_mean" not in rows["deepseekmoe_drop"]
    adaptive = rows["deepseekmoe_adaptive"]
    assert 0.75 <= adaptive["capacity_final"] <= 1.5 and adaptive["capacity_final"] != 1.0  # it moved
    assert 0 < rows["deepseekmoe_entropy"]["routing_entropy"] <= 1
    claims = {(c["a"], c["b"]) for c in json.loads((out / "claims.json").read_text())}
    assert ("deepseekmoe_adaptive", "deepseekmoe_drop") in claims
    md = (out / "results.md").read_text()
    assert "## Balance" in md and "| deepseekmoe_adaptive |" in md
    assert (out / "routing_entropy.png").is_file() and not (out / "redundancy.png").exists()
