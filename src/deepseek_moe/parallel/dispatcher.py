"""The all-to-all token dispatcher: the expert-parallel twin of ``moe.dispatch.LocalDispatcher``.

Per call: (1) each token is sent at most once to each rank that holds any of its chosen experts, as one row of
x with the gates (and, for dropping, affinities and a protected flag) of its experts there; (2) the row counts
go first (all_to_all_single of split sizes), then the rows (autograd all_to_all_single); (3) the receiver drops
over-budget assignments per expert group against the global budget, runs its experts as one grouped
matmul and sums each row's gated outputs into one row; (4) the rows go back the same way and are summed into
their tokens. Shared experts stay local (the layer runs them).

Legend as in ``deepseek_moe.moe``, plus: W ranks in the group, P (token, rank) rows sent, R rows received,
k slots per row (the most experts one token can have on one rank: min(K, E/W)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single

from deepseek_moe.moe.dispatch import BatchSpan, Dispatched, DropPlan, combine
from deepseek_moe.moe.dropping import capacity_keep_mask, group_budget
from deepseek_moe.moe.experts import RoutedExperts
from deepseek_moe.moe.router import Routing


@dataclass
class CommStats:
    """Traffic of the calls since the last reset, from this rank's point of view. Bytes exclude self-sends.

    dispatch_bytes: rows (x, gates, metadata) this rank sent to other ranks; combine_bytes: result rows it sent
    back to other ranks. rows_sent: (token, rank) rows including those to itself. max_ranks_per_token: the most
    ranks one token of this rank reached (device-limited routing bounds it by M).
    """

    calls: int = 0
    tokens: int = 0
    rows_sent: int = 0
    rows_sent_remote: int = 0
    rows_received: int = 0
    assignments_remote: int = 0  # (token, expert) pairs on other ranks: the rows a per-expert dispatch would send
    dispatch_bytes: int = 0
    combine_bytes: int = 0
    dropped: int = 0
    max_ranks_per_token: int = 0
    ranks_per_token_hist: list[int] = field(default_factory=list)  # [n tokens reaching 0, 1, ..., W ranks]

    @property
    def bytes_per_token(self) -> float:
        return (self.dispatch_bytes + self.combine_bytes) / max(self.tokens, 1)


class AllToAllDispatcher:
    """Dispatch over an expert-parallel process group; installed by :func:`parallelize_experts`.

    ``n_expert_groups`` is the layer's G: the dropping budget is per expert group, as in one process, so results
    do not depend on how many ranks the groups are spread over. ``batch_group`` (default ``group``): the ranks
    whose batches, concatenated in rank order, make the batch of the batch-wide decisions (all ranks in
    training). ``replica_group``: the ranks holding the same experts as this one (the other expert-parallel
    groups' members at this position); when given, dropping ranks each expert group's assignments over all of
    them, as one process would over the whole batch.
    """

    def __init__(self, group: dist.ProcessGroup, n_expert_groups: int, *,
                 batch_group: dist.ProcessGroup | None = None,
                 replica_group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.n_expert_groups = n_expert_groups
        self.batch_group = group if batch_group is None else batch_group
        self.replica_group = replica_group
        # Where small control tensors live: NCCL moves only CUDA tensors, gloo CPU ones.
        self.control_device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
                               else torch.device("cpu"))
        self.stats = CommStats(ranks_per_token_hist=[0] * (self.size + 1))
        self.batch_sum: Callable[[torch.Tensor], torch.Tensor] | None = self._sum_over_group

    def reset_stats(self) -> None:
        self.stats = CommStats(ranks_per_token_hist=[0] * (self.size + 1))

    # ---- the batch the layer's batch-wide decisions cover: every rank's, concatenated in rank order ----
    def batch_span(self, n_sequences: int, n_tokens: int) -> BatchSpan:
        local = torch.tensor([n_sequences, n_tokens], dtype=torch.int64, device=self.control_device)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(self.batch_group))]
        dist.all_gather(gathered, local, group=self.batch_group)
        sizes = torch.stack(gathered).cpu()
        me = dist.get_rank(self.batch_group)
        before, total = sizes[:me].sum(dim=0), sizes.sum(dim=0)
        return BatchSpan(int(before[0]), int(total[0]), int(before[1]), int(total[1]))

    def _sum_over_group(self, counts: torch.Tensor) -> torch.Tensor:
        total = counts.detach().clone()
        dist.all_reduce(total, group=self.batch_group)
        return total

    def _keep(self, affinity_A: torch.Tensor, group_A: torch.Tensor, protected_A: torch.Tensor, budget: int,
              n_groups: int) -> torch.Tensor:
        """capacity_keep_mask over the assignments of this rank's experts on every replica, concatenated in
        replica order: the single-process token-major order (replica d's expert-parallel group holds the batch
        slices before replica d+1's), so the budget and its ties fall exactly as in one process."""
        if self.replica_group is None:
            return capacity_keep_mask(affinity_A, group_A, protected_A, budget, n_groups)
        n_rep, me = dist.get_world_size(self.replica_group), dist.get_rank(self.replica_group)
        cols_A3 = torch.stack([affinity_A.float(), group_A.float(), protected_A.float()], dim=1)
        size = torch.tensor([cols_A3.shape[0]], dtype=torch.int64, device=cols_A3.device)
        sizes = [torch.empty_like(size) for _ in range(n_rep)]
        dist.all_gather(sizes, size, group=self.replica_group)
        counts = [int(n) for n in torch.cat(sizes).tolist()]
        padded = cols_A3.new_zeros(max(*counts, 1), 3)
        padded[:cols_A3.shape[0]] = cols_A3
        parts = [torch.empty_like(padded) for _ in range(n_rep)]
        dist.all_gather(parts, padded, group=self.replica_group)
        all_A3 = torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])
        keep = capacity_keep_mask(all_A3[:, 0], all_A3[:, 1].to(torch.int64), all_A3[:, 2].bool(), budget, n_groups)
        start = sum(counts[:me])
        return keep[start:start + counts[me]]

    # ---- dispatch ----
    def __call__(self, x_TD: torch.Tensor, routing: Routing, experts: RoutedExperts,
                 drop: DropPlan | None) -> Dispatched:
        W, me = self.size, self.rank
        T, K = routing.indices_TK.shape
        D = x_TD.shape[1]
        E_local = experts.n_experts
        if experts.offset != me * E_local:
            raise RuntimeError(f"rank {me} holds experts from {experts.offset}, expected {me * E_local}: "
                               "install the experts with parallelize_experts over this same group")
        k = min(K, E_local)
        device = x_TD.device

        # Slots of each token sorted by destination rank (k order kept inside a rank), then packed per
        # (token, rank) into k slots: local expert id (-1 empty), gate, affinity.
        expert_TK = routing.indices_TK
        rank_TK = expert_TK // E_local
        order_TK = (rank_TK * K + torch.arange(K, device=device)).argsort(dim=1)
        rank_s = rank_TK.gather(1, order_TK)
        local_s = expert_TK.gather(1, order_TK) - rank_s * E_local
        pos_TK = torch.arange(K, device=device).expand(T, K)
        new_run = torch.ones_like(rank_s, dtype=torch.bool)
        new_run[:, 1:] = rank_s[:, 1:] != rank_s[:, :-1]
        slot_s = pos_TK - torch.where(new_run, pos_TK, 0).cummax(dim=1).values
        token_s = torch.arange(T, device=device).unsqueeze(1).expand(T, K)
        where = (token_s.reshape(-1), rank_s.reshape(-1), slot_s.reshape(-1))
        ids_TWk = torch.full((T, W, k), -1, dtype=torch.int64, device=device).index_put(where, local_s.reshape(-1))
        gate_s = routing.weights_TK.gather(1, order_TK).to(x_TD.dtype)
        gates_TWk = x_TD.new_zeros(T, W, k).index_put(where, gate_s.reshape(-1))

        reach_TW = ids_TWk[:, :, 0] >= 0
        dest_P, token_P = reach_TW.t().nonzero(as_tuple=True)  # rows grouped by destination, tokens ascending
        send_W = torch.bincount(dest_P, minlength=W)

        meta = [ids_TWk[token_P, dest_P].to(torch.float32)]  # ids < 2**24: exact in fp32
        if drop is not None:
            aff_s = routing.affinity_TK.gather(1, order_TK).float()
            aff_TWk = torch.zeros(T, W, k, device=device).index_put(where, aff_s.reshape(-1))
            meta += [aff_TWk[token_P, dest_P], drop.protected_T[token_P].to(torch.float32).unsqueeze(1)]
        meta_P = torch.cat(meta, dim=1)
        payload_P = torch.cat([x_TD[token_P], gates_TWk[token_P, dest_P]], dim=1)  # (P, D + k)
        if torch.is_grad_enabled() and not payload_P.requires_grad:
            # Every rank must run the backward all-to-all, including one whose inputs need no gradient.
            payload_P.requires_grad_()

        recv_W = torch.empty_like(send_W)
        dist.all_to_all_single(recv_W, send_W, group=self.group)
        send, recv = send_W.tolist(), recv_W.tolist()
        payload_R = all_to_all_single(payload_P.new_empty(sum(recv), payload_P.shape[1]), payload_P.contiguous(),
                                      recv, send, group=self.group)  # differentiable: the backward sends back
        meta_R = torch.empty(sum(recv), meta_P.shape[1], dtype=meta_P.dtype, device=device)
        dist.all_to_all_single(meta_R, meta_P, recv, send, group=self.group)

        # Receiver: one assignment per filled slot, in (source rank, token, k) order: the single-process
        # token-major order restricted to the experts here, so dropping breaks ties the same way.
        R = meta_R.shape[0]
        ids_Rk = meta_R[:, :k].to(torch.int64)
        valid_Rk = ids_Rk >= 0
        row_A = torch.arange(R, device=device).unsqueeze(1).expand(R, k)[valid_Rk]
        expert_A = ids_Rk[valid_Rk]
        gate_A = payload_R[:, D:][valid_Rk]
        dropped = torch.zeros((), dtype=torch.int64, device=device)
        if drop is not None:
            n_tokens = drop.n_tokens if drop.n_tokens is not None else self.batch_span(1, T).n_tokens
            budget = group_budget(drop.capacity_factor, K, n_tokens, drop.n_groups)
            per_group = experts.n_experts * W // drop.n_groups
            keep_A = self._keep(meta_R[:, k:2 * k][valid_Rk], expert_A // per_group,
                                meta_R[:, 2 * k].bool()[row_A], budget, E_local // per_group)
            dropped = (~keep_A).sum()
            row_A, expert_A, gate_A = row_A[keep_A], expert_A[keep_A], gate_A[keep_A]
        order_A = torch.argsort(expert_A, stable=True)
        row_A = row_A[order_A]
        counts_E = torch.bincount(expert_A, minlength=E_local)
        y_AD = experts(payload_R[:, :D].index_select(0, row_A), counts_E, gate_A[order_A])
        y_RD = combine(y_AD, row_A, R)

        y_PD = all_to_all_single(y_RD.new_empty(sum(send), y_RD.shape[1]), y_RD.contiguous(), send, recv,
                                 group=self.group)
        y_TD = combine(y_PD, token_P, T)

        self.stats.assignments_remote += int((rank_TK != me).sum())
        self._record(T, reach_TW, send, recv, payload_P, meta_P, D, x_TD.element_size(), dropped)
        return Dispatched(y_TD, dropped)

    def _record(self, T: int, reach_TW: torch.Tensor, send: list[int], recv: list[int], payload_P: torch.Tensor,
                meta_P: torch.Tensor, D: int, itemsize: int, dropped: torch.Tensor) -> None:
        s, me = self.stats, self.rank
        row_bytes = payload_P.shape[1] * payload_P.element_size() + meta_P.shape[1] * meta_P.element_size()
        s.calls += 1
        s.tokens += T
        s.rows_sent += sum(send)
        s.rows_sent_remote += sum(send) - send[me]
        s.rows_received += sum(recv)
        s.dispatch_bytes += (sum(send) - send[me]) * row_bytes
        s.combine_bytes += (sum(recv) - recv[me]) * D * itemsize
        s.dropped += int(dropped)
        hist = torch.bincount(reach_TW.sum(dim=1), minlength=self.size + 1).tolist()
        s.ranks_per_token_hist = [a + b for a, b in zip(s.ranks_per_token_hist, hist, strict=True)]
        reached = [n for n, c in enumerate(hist) if c > 0]
        s.max_ranks_per_token = max(s.max_ranks_per_token, max(reached) if reached else 0)
