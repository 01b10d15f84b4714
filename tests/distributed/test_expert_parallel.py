"""Expert parallelism on 2 and 4 gloo processes equals one process on the concatenated batch (fp32, 1e-5):
outputs, balance losses, gradients, dropping, the routing-bias update, a full causal LM step under FSDP2 (with
ep = N, and ep = 2 on 4 ranks), gradient clipping, checkpoints, and the meta-device initialisation (bit for bit).

Each world size is spawned once per module (all cases run inside it) to keep CI on 2 cores fast.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from harness import RanksFailed, run_ranks
from workers import (
    B,
    S,
    hybrid_config,
    init_reference,
    layer_cases,
    layer_mask,
    layer_reference,
    model_reference,
)

WORLDS = [2, 4]
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    export = tmp_path_factory.mktemp(f"export{request.param}")
    ranks = run_ranks(request.param, "all_worker", extra_env={"DSMOE_EXPORT": str(export)})
    return {"world": request.param, "layer": [r["layer"] for r in ranks], "model": [r["model"] for r in ranks],
            "export": export, "hybrid": [r.get("hybrid") for r in ranks]}


@pytest.fixture
def layer_runs(runs: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    return runs["world"], runs["layer"]


@pytest.fixture
def model_runs(runs: dict[str, Any]) -> tuple[int, Any, Any]:
    return runs["world"], runs["model"], runs["export"]


def _assemble(world: int, ranks: list[dict[str, Any]], case: str) -> dict[str, Any]:
    """The ranks' pieces put back together as one process would have them."""
    parts = [r[case] for r in ranks]
    y = torch.cat([torch.cat([p["y"][:B // world] for p in parts]),  # first forward, then second
                   torch.cat([p["y"][B // world:] for p in parts])])
    grads = dict(parts[0]["grads"])
    for name in parts[0]["sharded"]:
        grads[name] = torch.cat([p["grads"][name] for p in parts])
    return {"y": y, "aux": sum(p["aux"] for p in parts) / world, "x_grad": torch.cat([p["x_grad"] for p in parts]),
            "grads": grads, "dropped": sum(p["dropped"] for p in parts), "bias": parts[0]["bias"]}


def test_layer_matches_single_process(layer_runs: tuple[int, list[dict[str, Any]]]) -> None:
    world, ranks = layer_runs
    for case, cfg in layer_cases(world).items():
        ref, got = layer_reference(cfg, case), _assemble(world, ranks, case)
        assert got["dropped"] == ref["dropped"], case
        if cfg.capacity_factor is not None:
            assert ref["dropped"] > 0, f"{case}: the case should drop something"
        torch.testing.assert_close(got["y"], ref["y"], **TOL, msg=lambda m, c=case: f"{c} output: {m}")
        torch.testing.assert_close(got["aux"], ref["aux"], **TOL, msg=lambda m, c=case: f"{c} aux: {m}")
        torch.testing.assert_close(got["x_grad"], ref["x_grad"], **TOL, msg=lambda m, c=case: f"{c} dx: {m}")
        assert set(got["grads"]) == set(ref["grads"]), case
        for name in ref["grads"]:
            torch.testing.assert_close(got["grads"][name], ref["grads"][name], **TOL,
                                       msg=lambda m, c=case, n=name: f"{c} grad {n}: {m}")
        if ref["bias"] is not None:
            torch.testing.assert_close(got["bias"], ref["bias"], rtol=0, atol=0)
        for r in ranks:  # replicated state stays identical on every rank
            if r[case]["bias"] is not None:
                assert torch.equal(r[case]["bias"], ref["bias"])


def test_no_token_reaches_more_than_m_ranks(layer_runs: tuple[int, list[dict[str, Any]]]) -> None:
    world, ranks = layer_runs
    for case, cfg in layer_cases(world).items():
        # A token reaches at most M groups, so at most M ranks (fewer when a rank holds several of them).
        bound = min(cfg.n_limited_groups, world)
        for r in ranks:
            stats = r[case]["stats"]
            assert 1 <= stats.max_ranks_per_token <= bound, (case, stats.max_ranks_per_token, bound)
            assert sum(stats.ranks_per_token_hist[bound + 1:]) == 0
            assert stats.rows_sent <= bound * stats.tokens


def test_traffic_accounting(layer_runs: tuple[int, list[dict[str, Any]]]) -> None:
    """One row per (token, destination rank): rows sent equal the tokens' distinct ranks; bytes exclude self."""
    world, ranks = layer_runs
    for case, cfg in layer_cases(world).items():
        stats = [r[case]["stats"] for r in ranks]
        mask = layer_mask(case)
        for rank, s in enumerate(stats):
            assert s.rows_sent == sum(n * c for n, c in enumerate(s.ranks_per_token_hist))
            b0, b1 = rank * B // world, (rank + 1) * B // world
            real_tokens = (b1 - b0) * S if mask is None else int(mask[b0:b1].sum())  # padding is never sent
            assert s.calls == 2 and s.tokens == 2 * real_tokens
            k = min(cfg.n_activated_experts, cfg.n_routed_experts // world)  # expert slots per row
            # x and gates (fp32), then expert ids, and with dropping affinities and the protected flag
            meta = 4 * (2 * k + 1) if cfg.capacity_factor is not None else 4 * k
            row = (cfg.dim + k) * 4 + meta
            assert s.dispatch_bytes == s.rows_sent_remote * row
            # Both directions: a token's bytes are bounded by M rows each way.
            assert s.dispatch_bytes / s.tokens <= min(cfg.n_limited_groups, world) * row
        assert sum(s.rows_sent for s in stats) == sum(s.rows_received for s in stats)
        assert sum(s.combine_bytes for s in stats) == sum(s.rows_sent_remote for s in stats) * cfg.dim * 4


def _assert_same_step(ranks: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    torch.testing.assert_close(ranks[0]["loss"], ref["loss"], **TOL)
    torch.testing.assert_close(torch.cat([r["logits"] for r in ranks]), ref["logits"], **TOL)
    assert all(r["dropped"] == ref["dropped"] for r in ranks), ([r["dropped"] for r in ranks], ref["dropped"])
    assert set(ranks[0]["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        for r in ranks:  # gathered from the shards: every rank sees the same full gradient
            torch.testing.assert_close(r["grads"][name], g, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")
    for r in ranks:  # the norm over every shard of both meshes
        torch.testing.assert_close(r["norm"], ref["norm"], **TOL)


def test_causal_lm_step_matches_single_process(model_runs: tuple[int, Any, Any]) -> None:
    world, ranks, _ = model_runs
    ref = model_reference(world)
    assert ref["dropped"] > 0, "the model case should drop something"
    _assert_same_step(ranks, ref)
    assert ranks[0]["sharded"] == [f"layers.{i}.ffn.experts.{w}" for i in (1, 2) for w in ("w1", "w2", "w3")]


def test_activation_checkpointing_under_fsdp_matches_single_process(model_runs: tuple[int, Any, Any]) -> None:
    """Blocks recomputed in the backward (all-to-alls and FSDP gathers included): the same step."""
    world, ranks, _ = model_runs
    _assert_same_step([r["checkpointed"] for r in ranks], model_reference(world))


def test_meta_init_equals_single_process_bit_for_bit(model_runs: tuple[int, Any, Any]) -> None:
    """Built on meta, sharded, each rank initialising only its shards: gathered, the 1-process model exactly."""
    world, ranks, _ = model_runs
    ref, got = init_reference(world), ranks[0]["init"]
    assert set(got) == set(ref)
    for case, state in ref.items():
        assert set(got[case]) == set(state), case
        for key, value in state.items():
            assert torch.equal(got[case][key], value), f"{case}: {key} differs"


def test_checkpoint_saved_on_n_loads_anywhere(model_runs: tuple[int, Any, Any]) -> None:
    world, ranks, export = model_runs
    ref = model_reference(world)
    state = ranks[0]["state"]
    assert set(state) == set(ref["state"])
    for key, value in ref["state"].items():  # the gathered checkpoint is the unsplit model after the step
        torch.testing.assert_close(state[key], value, **TOL, msg=lambda m, k=key: f"{k}: {m}")
    torch.testing.assert_close(torch.cat([r["eval_logits"] for r in ranks]), ref["eval_logits"], **TOL)
    torch.testing.assert_close(ranks[0]["plain_eval_logits"], ref["eval_logits"], **TOL)
    torch.testing.assert_close(torch.cat([r["reloaded_eval_logits"] for r in ranks]), ref["eval_logits"], **TOL)

    # Load on 1 process: the Hugging Face export of the gathered model.
    from workers import model_config, model_data

    from deepseek_moe.io import load_pretrained

    loaded = load_pretrained(export).eval()
    ids = model_data(model_config(world))
    torch.testing.assert_close(loaded(ids).logits, ref["eval_logits"], **TOL)


def test_ep2_on_4_ranks_matches_single_process(runs: dict[str, Any]) -> None:
    """4 ranks as a (dp_mod_ep=2, ep=2) mesh: each expert slice FSDP-sharded over two ranks. Dropping, the
    batch-scope losses and the gradients still cover the whole batch: the single process's step."""
    if runs["world"] != 4:
        pytest.skip("needs 4 ranks")
    ranks = runs["hybrid"]
    ref = model_reference(4, hybrid_config())
    assert [r["ep_rank"] for r in ranks] == [0, 1, 0, 1]
    assert ref["dropped"] > 0, "the case should drop something"
    _assert_same_step(ranks, ref)
    for key, value in ref["state"].items():
        torch.testing.assert_close(ranks[0]["state"][key], value, **TOL, msg=lambda m, k=key: f"{k}: {m}")


def test_a_dead_rank_fails_the_others_instead_of_hanging() -> None:
    with pytest.raises(RanksFailed) as info:
        run_ranks(2, "dead_rank_worker", grace_s=45)
    codes = info.value.codes
    assert codes[1] == 3
    assert codes[0] == 1, f"rank 0 should fail by itself (exit 1), not be killed: {codes}"
    assert "rank 0 of 2 failed" in info.value.stderr[0]
