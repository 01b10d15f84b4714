"""Memory per rank of training on the (dp_mod_ep, ep) mesh: pure arithmetic on the model's parameter shapes.

The layout (``deepseek_moe.parallel``): N ranks in an (N/ep, ep) mesh, rank r = dp_mod_ep_index * ep + ep_index.
Non-expert parameters are FSDP-sharded (``fully_shard``) on dim 0 over all N ranks. Each MoE layer's routed experts
are split on the expert dim over ``ep`` (E/ep consecutive experts per ep rank, ``ep`` dividing n_expert_groups)
and FSDP-sharded on that dim over the N/ep ranks that hold the same experts. FSDP splits dim 0 as torch.chunk
does: ceil(rows / n) rows per rank, the last ranks fewer or none, so rank 0 holds the most (and FSDP2 pads
every rank's parameter storage to that many rows).

What one rank holds while training, each figure in the dtypes of a :class:`Precision`:

* sharded state: parameters (the master copy the optimizer updates), gradients, and AdamW's exp_avg and
  exp_avg_sq plus one 0-dim fp32 ``step`` per parameter tensor (:func:`sharded_state`);
* transient: FSDP unshards one unit at a time (:func:`fsdp_units`: the embedding, each block with its experts,
  the head, the root's final norm). At the peak of backward a rank holds the running unit's gathered parameters,
  the next unit's (prefetched), and the running unit's unsharded gradients in the compute dtype plus their
  reduce-scatter copy in the reduce dtype: unit * (3 * compute + reduce) bytes (:func:`transient_bytes`; less
  where a unit is sharded over one rank only, which FSDP uses in place);
* activations: what autograd saves for the backward (:mod:`deepseek_moe.model.activations`).

Not counted: buffers (routing bias and counts, E fp32 each per MoE layer), the CUDA context, NCCL's buffers and
allocator fragmentation; the scaling doc reserves headroom for those.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepseek_moe.config import ModelConfig
from deepseek_moe.model.activations import activation_bytes
from deepseek_moe.model.counting import ParameterShape, parameter_shapes

STEP_BYTES = 4  # AdamW's per-tensor step counter: a 0-dim fp32 tensor (fused and capturable keep it a tensor)


@dataclass(frozen=True, kw_only=True)
class Precision:
    """Bytes per element of each kind of training memory."""

    name: str
    master: int  # the sharded parameters the optimizer updates
    grad: int  # the sharded gradients
    moment: int  # each of AdamW's exp_avg and exp_avg_sq
    compute: int  # gathered parameters, activations, all-to-all payloads
    reduce: int  # unsharded gradients as they are reduce-scattered
    description: str = ""

    def __post_init__(self) -> None:
        for field in ("master", "grad", "moment", "compute", "reduce"):
            value = getattr(self, field)
            if value not in (1, 2, 4, 8):
                raise ValueError(f"Precision.{field} ({value!r}) must be a dtype size in bytes: 1, 2, 4 or 8")


FP32 = Precision(name="fp32", master=4, grad=4, moment=4, compute=4, reduce=4,
                 description="everything fp32 (the CPU tests and benchmarks)")
BF16_MIXED = Precision(name="bf16-mixed", master=4, grad=4, moment=4, compute=2, reduce=4,
                       description="FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), torchtitan's "
                       "default: fp32 master weights, gradients and AdamW moments; bf16 gathered weights and activations")
V3_RECIPE = Precision(name="v3-recipe", master=4, grad=4, moment=2, compute=2, reduce=4,
                      description="DeepSeek-V3 §3.3.3: fp32 master weights and gradients, bf16 AdamW moments; bf16 "
                      "gathered weights and activations (V3's FP8 GEMM inputs and FP8-cached activations not counted)")
PRECISIONS = {p.name: p for p in (FP32, BF16_MIXED, V3_RECIPE)}


@dataclass(frozen=True, kw_only=True)
class MeshLayout:
    """N ranks as an (N/ep, ep) mesh: ``world`` ranks, experts split over ``ep`` of them.

    ``expert_fsdp_dim``: the dim FSDP shards an ep rank's experts on over the N/ep ranks holding them: 0 (the
    expert dim, what ``parallel.shard_model`` does) gives each rank whole experts, ceil(E/ep / (N/ep)) of them
    on rank 0; 1 (torchtitan's ``shard_placement_fn`` choice when experts are fewer than ranks) splits every
    expert's rows evenly whatever E/ep is."""

    world: int
    ep: int
    expert_fsdp_dim: int = 0

    def __post_init__(self) -> None:
        for field in ("world", "ep"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MeshLayout.{field} ({value!r}) must be a positive integer")
        if self.world % self.ep:
            raise ValueError(f"MeshLayout.ep ({self.ep}) must divide world ({self.world})")
        if self.expert_fsdp_dim not in (0, 1):
            raise ValueError(f"MeshLayout.expert_fsdp_dim ({self.expert_fsdp_dim!r}) must be 0 or 1")

    @property
    def dp_mod_ep(self) -> int:
        return self.world // self.ep

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp_mod_ep index, ep index) of ``rank``."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank ({rank}) must be in [0, {self.world})")
        return divmod(rank, self.ep)

    def check(self, cfg: ModelConfig) -> None:
        """Raise ValueError unless ``cfg`` fits the layout as ``parallel.check_expert_parallel`` requires: each
        rank of an ep group holds whole expert groups, and the device limit M does not exceed ep."""
        moe = cfg.moe
        if not cfg.n_moe_layers:
            return
        if moe.n_expert_groups % self.ep:
            raise ValueError(f"moe.n_expert_groups ({moe.n_expert_groups}) must be a multiple of MeshLayout.ep "
                             f"({self.ep}): each rank of an expert-parallel group holds whole expert groups")
        if self.ep > 1 and moe.group_limited and moe.n_limited_groups > self.ep:
            raise ValueError(f"moe.n_limited_groups ({moe.n_limited_groups}) must be <= MeshLayout.ep ({self.ep}): "
                             "M bounds the expert-parallel ranks a token is sent to")


def default_ep(cfg: ModelConfig, world: int) -> int:
    """The automatic ep (``parallel.auto_ep``'s rule): the largest divisor of ``world`` the layout accepts
    (:meth:`MeshLayout.check`); ``world`` when it fits, 1 for a model without MoE layers."""
    for ep in sorted((d for d in range(1, world + 1) if world % d == 0), reverse=True):
        try:
            MeshLayout(world=world, ep=ep).check(cfg)
        except ValueError:
            continue
        return ep
    return 1


def chunk_rows(rows: int, parts: int, index: int) -> int:
    """Rows of part ``index`` when ``rows`` are split as torch.chunk (and FSDP2) split them into ``parts``."""
    size = -(-rows // parts)
    return max(0, min(size, rows - index * size))


def local_numel(p: ParameterShape, mesh: MeshLayout, rank: int) -> int:
    """Elements of ``p`` that ``rank`` holds."""
    rows, rest = p.shape[0], p.numel // p.shape[0]
    if not p.routed_expert:
        return chunk_rows(rows, mesh.world, rank) * rest
    dp_index, _ = mesh.coords(rank)
    if mesh.expert_fsdp_dim == 0:
        return chunk_rows(rows // mesh.ep, mesh.dp_mod_ep, dp_index) * rest
    return rows // mesh.ep * chunk_rows(p.shape[1], mesh.dp_mod_ep, dp_index) * (rest // p.shape[1])


@dataclass(frozen=True)
class ShardedState:
    """A rank's share of the training state: ``elements`` parameter elements in ``tensors`` tensors."""

    elements: int
    tensors: int
    precision: Precision

    @property
    def param_bytes(self) -> int:
        return self.elements * self.precision.master

    @property
    def grad_bytes(self) -> int:
        return self.elements * self.precision.grad

    @property
    def optimizer_bytes(self) -> int:
        return self.elements * 2 * self.precision.moment + self.tensors * STEP_BYTES

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def sharded_state(cfg: ModelConfig, mesh: MeshLayout, precision: Precision, rank: int = 0) -> ShardedState:
    """What ``rank`` keeps between steps (rank 0 holds the most). Every rank keeps a step counter for every
    parameter tensor, its local shard empty or not."""
    mesh.check(cfg)
    shapes = parameter_shapes(cfg)
    return ShardedState(sum(local_numel(p, mesh, rank) for p in shapes), len(shapes), precision)


@dataclass(frozen=True)
class Unit:
    """One FSDP unit: ``elements`` parameter elements a rank holds once the unit is gathered (its ep rank's
    slice of routed experts, all of everything else), ``expert_elements`` of them routed experts."""

    name: str
    elements: int
    expert_elements: int = 0


def _unit_name(param_name: str, tied: bool) -> str:
    head, _, rest = param_name.partition(".")
    if head == "layers":
        return f"layers.{rest.partition('.')[0]}"
    return head if head in ("embed", "head") and not tied else "root"


def fsdp_units(cfg: ModelConfig, mesh: MeshLayout) -> list[Unit]:
    """The units FSDP gathers one at a time, in forward order: the embedding, each block, the head (each its own
    unit unless tied) and the root (the final norm; a tied embedding and head). A block's experts are a unit of
    their own (sharded over N/ep ranks, not N) but are gathered while the block runs, so they count with it."""
    mesh.check(cfg)
    sizes: dict[str, tuple[int, int]] = {}
    for p in parameter_shapes(cfg):
        name = _unit_name(p.name, cfg.tie_word_embeddings)
        total, experts = sizes.get(name, (0, 0))
        n = p.numel // mesh.ep if p.routed_expert else p.numel
        sizes[name] = (total + n, experts + (n if p.routed_expert else 0))
    return [Unit(name, n, e) for name, (n, e) in sizes.items()]


def largest_unit(cfg: ModelConfig, mesh: MeshLayout) -> Unit:
    return max(fsdp_units(cfg, mesh), key=lambda u: u.elements)


def transient_bytes(cfg: ModelConfig, mesh: MeshLayout, precision: Precision) -> int:
    """Peak FSDP working memory, the largest unit's: the running unit's and the prefetched unit's gathered
    parameters (compute dtype), and the running unit's unsharded gradients (compute dtype, then their
    reduce-scatter copy in the reduce dtype). Parameters sharded over a single rank are used in place, not
    gathered (measured: one process holds no gathered copy), but their gradients are still produced whole and
    copied into the shard."""
    def working_set(u: Unit) -> int:
        gathered = (u.elements - u.expert_elements) * (mesh.world > 1) + u.expert_elements * (mesh.dp_mod_ep > 1)
        return gathered * 2 * precision.compute + u.elements * (precision.compute + precision.reduce)
    return max(working_set(u) for u in fsdp_units(cfg, mesh))


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak training memory of rank 0 (the rank holding the most) for one micro-batch."""

    state: ShardedState
    unit: Unit
    transient_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.state.total_bytes + self.transient_bytes + self.activation_bytes


def estimate_memory(cfg: ModelConfig, mesh: MeshLayout, precision: Precision, *, batch: int, seq_len: int,
                    checkpointing: bool) -> MemoryEstimate:
    """Rank 0's peak for a micro-batch of ``batch`` sequences of ``seq_len`` tokens per rank, with or without
    activation checkpointing per block."""
    acts = activation_bytes(cfg, tokens=batch * seq_len, compute=precision.compute, checkpointing=checkpointing)
    return MemoryEstimate(sharded_state(cfg, mesh, precision), largest_unit(cfg, mesh),
                          transient_bytes(cfg, mesh, precision), acts)


__all__ = ["BF16_MIXED", "FP32", "PRECISIONS", "V3_RECIPE", "MemoryEstimate", "MeshLayout", "Precision",
           "ShardedState", "Unit", "chunk_rows", "default_ep", "estimate_memory", "fsdp_units", "largest_unit",
           "local_numel", "sharded_state", "transient_bytes"]
