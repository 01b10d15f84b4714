"""model.memory counts what FSDP2 + expert parallelism really hold: per rank, the bytes of the parameter,
gradient and optimizer shards after a step equal sharded_state's, on 4 ranks with ep = 2 (experts split over
"ep" and FSDP-sharded over "dp_mod_ep", everything else over all 4)."""

from harness import run_ranks

from deepseek_moe.model.memory import FP32, MeshLayout, sharded_state
from deepseek_moe.presets import tiny


def test_shards_hold_what_model_memory_counts() -> None:
    ep = 2
    ranks = run_ranks(4, "shards", module="memory_workers", extra_env={"MEMORY_EP": str(ep)})
    for r in ranks:
        expected = sharded_state(tiny(), MeshLayout(world=4, ep=ep), FP32, r["rank"])
        assert r["ep"] == ep
        assert (r["params"], r["grads"], r["optimizer"]) == (
            expected.param_bytes, expected.grad_bytes, expected.optimizer_bytes)
    assert sum(r["params"] for r in ranks) == 4 * 8_190_464  # every parameter once, fp32
