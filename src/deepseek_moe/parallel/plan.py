"""How routed experts are laid out over an expert-parallel group, checked before any process-group work.

Expert groups are devices: the layer's ``n_expert_groups`` groups of contiguous experts are split evenly over
the ``ep_size`` ranks of the group, so rank r holds groups [r*G/N, (r+1)*G/N) and experts [r*E/N, (r+1)*E/N).
Device-limited routing keeps a token inside ``n_limited_groups`` (M) groups, so it reaches at most M ranks
(fewer when a rank holds several of its groups). One group per rank (G == N) makes M exactly the rank bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepseek_moe.config import MoEConfig


@dataclass(frozen=True)
class ExpertShard:
    """The slice of one MoE layer's routed experts that one rank holds."""

    ep_size: int
    ep_rank: int
    n_experts: int  # held here
    offset: int  # global index of the first expert held here
    groups_per_rank: int


def check_expert_parallel(cfg: MoEConfig, ep_size: int, *, where: str = "moe") -> None:
    """Raise ValueError if ``cfg`` cannot be split over ``ep_size`` ranks (call before init_process_group)."""
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"expert-parallel size ({ep_size!r}) must be a positive integer")
    if cfg.n_expert_groups % ep_size != 0:
        fits = [n for n in range(1, cfg.n_expert_groups + 1) if cfg.n_expert_groups % n == 0]
        raise ValueError(
            f"{where}.n_expert_groups ({cfg.n_expert_groups}) must be a multiple of the expert-parallel size "
            f"({ep_size} processes): each rank holds whole expert groups. Use an expert-parallel size (ep) in {fits} "
            f"(ep 0, the default, picks the largest that also divides the process count), or set n_expert_groups to "
            f"a multiple of {ep_size} (one group per expert-parallel rank is the usual choice)")
    if ep_size > 1 and cfg.group_limited and cfg.n_limited_groups > ep_size:  # one process: no traffic
        raise ValueError(
            f"{where}.n_limited_groups ({cfg.n_limited_groups}) must be <= the number of expert-parallel devices "
            f"({ep_size}): M bounds the devices a token is sent to (or set it to n_expert_groups "
            f"({cfg.n_expert_groups}) for no device limit)")


def expert_shard(cfg: MoEConfig, ep_size: int, ep_rank: int) -> ExpertShard:
    check_expert_parallel(cfg, ep_size)
    n_local = cfg.n_routed_experts // ep_size
    return ExpertShard(ep_size, ep_rank, n_local, ep_rank * n_local, cfg.n_expert_groups // ep_size)
