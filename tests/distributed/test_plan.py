"""Layouts that cannot be split over the processes fail before any process-group work, naming the field."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from deepseek_moe.config import MoEConfig
from deepseek_moe.moe.layer import MoE
from deepseek_moe.parallel import check_expert_parallel, check_model, expert_shard


def cfg(**kw: object) -> MoEConfig:
    base = dict(dim=8, moe_inter_dim=4, n_routed_experts=8, n_activated_experts=2, n_expert_groups=4,
                n_limited_groups=2)
    return MoEConfig(**{**base, **kw})


def test_process_count_must_divide_the_groups() -> None:
    with pytest.raises(ValueError, match=r"n_expert_groups \(4\) must be a multiple of the expert-parallel size "
                                         r"\(3 processes\).*\[1, 2, 4\]"):
        check_expert_parallel(cfg(), 3)
    assert not dist.is_initialized()


def test_m_larger_than_the_devices_is_refused() -> None:
    with pytest.raises(ValueError, match=r"n_limited_groups \(3\) must be <= the number of expert-parallel "
                                         r"devices \(2\)"):
        check_expert_parallel(cfg(n_limited_groups=3, n_activated_experts=2), 2)
    check_expert_parallel(cfg(n_limited_groups=4), 2)  # M == G: no device limit, nothing to bound


def test_a_model_is_checked_layer_by_layer() -> None:
    with pytest.raises(ValueError, match=r"moe config.n_expert_groups"):
        check_model(MoE(cfg()), 8)


@pytest.mark.parametrize("ep_size", [1, 2, 4])
def test_shards_hold_whole_groups(ep_size: int) -> None:
    shards = [expert_shard(cfg(), ep_size, r) for r in range(ep_size)]
    assert [s.offset for s in shards] == [r * 8 // ep_size for r in range(ep_size)]
    assert all(s.n_experts * ep_size == 8 and s.groups_per_rank == 4 // ep_size for s in shards)
