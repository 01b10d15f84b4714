"""The paged KV cache against the dense one: same logits through the model's own cache interface."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from serve_fixtures import tiny_config

from deepseek_moe import DeepSeekMoEForCausalLM
from deepseek_moe.model.kv_cache import BlockPool, BlockTable


@pytest.mark.parametrize("variant", ["mla-absorb", "mla-naive", "mha"])
def test_chunked_prefill_and_batched_decode_match_the_dense_cache(variant: str) -> None:
    cfg = tiny_config(300)
    if variant == "mla-naive":
        cfg = dataclasses.replace(cfg, attn_impl="naive")
    if variant == "mha":
        cfg = dataclasses.replace(cfg, attention="mha", kv_lora_rank=0, qk_nope_head_dim=0, qk_rope_head_dim=16,
                                  rope_interleave=False)
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 23, 11)]
    steps = 3
    pool = BlockPool(cfg.n_layers, 40, 4)
    tables = [BlockTable() for _ in ps]
    with torch.inference_mode():
        want = []  # per prompt: last logits after the prompt and after each greedy step (dense cache, alone)
        for p in ps:
            cache = model.new_cache()
            logits = model(torch.tensor([p]), cache=cache).logits[:, -1]
            row = [logits]
            for _ in range(steps):
                logits = model(logits.argmax(-1)[:, None], cache=cache).logits[:, -1]
                row.append(logits)
            want.append(row)

        last = []
        for table, p in zip(tables, ps, strict=True):
            assert pool.reserve(table, len(p) + steps)
            for start in range(0, len(p), 7):  # chunks of 7: the blocks hold 4, so chunks straddle blocks
                chunk = p[start:start + 7]
                cache = pool.batch([table], [len(chunk)])
                logits = model(torch.tensor([chunk]), attention_mask=cache.new_token_mask, cache=cache).logits[:, -1]
                cache.commit()
            last.append(logits[0])
        for i in range(3):
            torch.testing.assert_close(last[i], want[i][0][0], atol=1e-5, rtol=1e-5)
        tokens = torch.stack(last).argmax(-1)
        for step in range(1, steps + 1):
            cache = pool.batch(tables, [1, 1, 1])
            logits = model(tokens[:, None], attention_mask=cache.new_token_mask, cache=cache).logits[:, -1]
            cache.commit()
            for i in range(3):
                torch.testing.assert_close(logits[i], want[i][step][0], atol=1e-5, rtol=1e-5)
            tokens = logits.argmax(-1)
    assert [t.length for t in tables] == [len(p) + steps for p in ps]


def test_rows_with_different_numbers_of_new_tokens_share_one_step() -> None:
    """Row 0 decodes one token while row 1 prefills three: the new tokens are right-aligned with a gap of
    padding after row 0's cached tokens; each row's logits equal its own dense run."""
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(tiny_config(300)).eval()
    pool = BlockPool(model.config.n_layers, 16, 4)
    a, b = BlockTable(), BlockTable()
    pool.reserve(a, 8)
    pool.reserve(b, 8)
    with torch.inference_mode():
        c = pool.batch([a], [5])
        model(torch.tensor([[1, 2, 3, 4, 5]]), attention_mask=c.new_token_mask, cache=c)
        c.commit()
        c = pool.batch([a, b], [1, 3])
        ids = torch.tensor([[0, 0, 6], [7, 8, 9]])
        got = model(ids, attention_mask=c.new_token_mask, cache=c).logits
        c.commit()
        ref_a = model(torch.tensor([[1, 2, 3, 4, 5, 6]])).logits[0, -1]
        ref_b = model(torch.tensor([[7, 8, 9]])).logits[0, -1]
    torch.testing.assert_close(got[0, -1], ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, -1], ref_b, atol=1e-5, rtol=1e-5)
    assert (a.length, b.length) == (6, 3)


def test_blocks_are_reserved_released_and_checked() -> None:
    pool = BlockPool(n_layers=1, n_blocks=4, block_size=4)  # 3 usable blocks
    a, b = BlockTable(), BlockTable()
    assert pool.reserve(a, 9)  # 3 blocks
    assert not pool.reserve(b, 1) and b.blocks == []
    with pytest.raises(ValueError, match="owns 3 blocks of 4 slots"):
        pool.batch([a], [13])
    pool.release(a)
    assert pool.free_blocks == 3 and 0 not in a.blocks
    assert pool.reserve(b, 12) and sorted(b.blocks) == [1, 2, 3]  # block 0 is never handed out
    with pytest.raises(ValueError, match="n_blocks"):
        BlockPool(1, 1, 4)


def test_a_failed_forward_leaves_the_tables_as_they_were() -> None:
    pool = BlockPool(n_layers=1, n_blocks=4, block_size=4)
    a = BlockTable()
    pool.reserve(a, 4)
    cache = pool.batch([a], [2])
    with pytest.raises(ValueError, match="attention mask"):
        cache.extend_mask(torch.zeros(1, 3, dtype=torch.bool))
    assert a.length == 0  # nothing committed


@pytest.mark.parametrize("n_tokens", [8, 10])
def test_fork_shares_full_blocks_and_copies_a_partial_one(n_tokens: int) -> None:
    """n > 1 choices: a fork holds its source's full blocks (one more reference each) and its own copy of a
    partly filled last block, whose slots equal the source's; releasing both frees everything."""
    pool = BlockPool(2, 12, 4, prefix_cache=False)
    src, dst = BlockTable(), BlockTable()
    assert pool.reserve(src, n_tokens)
    with torch.inference_mode():
        cache = pool.batch([src], [n_tokens])
        x = torch.randn(1, n_tokens, 3)
        for layer in cache.layers:
            layer.append(x)
        cache.commit()
        assert pool.fork(src, dst)  # (the scheduler's step runs in inference mode, where the pool was written)
    full, rest = divmod(n_tokens, 4)
    assert dst.length == n_tokens and dst.blocks[:full] == src.blocks[:full]
    assert len(dst.blocks) == full + (rest > 0) and (not rest or dst.blocks[-1] != src.blocks[-1])
    assert pool.audit([src, dst]) == []  # the shared blocks' reference counts are 2
    for layer in range(2):
        buf = pool.storage[layer][0]
        slots = [b * 4 + i for b in dst.blocks for i in range(4)][:n_tokens]
        torch.testing.assert_close(buf[slots], x[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="must be empty"):
        pool.fork(src, dst)
    pool.release(src)
    assert pool.audit([dst]) == []
    pool.release(dst)
    assert pool.free_blocks == pool.capacity_blocks and pool.audit([]) == []
    # No block for the copy: nothing taken.
    tight, a, b = BlockPool(1, 4, 4), BlockTable(), BlockTable()
    assert tight.reserve(a, 10)
    a.length = 10  # (as if written)
    assert not tight.fork(a, b) and b.blocks == [] and b.length == 0 and tight.audit([a]) == []
