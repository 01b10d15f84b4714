"""What a fused call read from a module tree, kept so that the next step can tell cheaply whether it still holds.

A decoder block's one C++ call (kernels/block_one_token.py) first asks a dozen modules whether they may be fused
(types, hooks, adapters, modes) and gathers ~30 tensors' addresses: ~0.35 ms a block of the mid-size model inside
a decode step, where the kernels between leave Python's code and data cold, against ~0.05 ms for the step's own
tensors. A :class:`Snapshot` records, for every module of the tree, its identity under its parent, its training
flag, its hooks, and its parameters' and buffers' identities and storage addresses, plus named plain attributes
the call depends on (a norm's eps, a layer's config); :meth:`Snapshot.holds` compares them all again, which is
what replacing a module, registering a hook, switching mode, assigning a weight (``module.w = ...``,
``param.data = ...``: the snapshot keeps the old storage, so the new one has another address) or changing such an
attribute changes; it also asks that no module's forward is replaced on the instance and no hook is registered for
every module. Then the call's arguments are reused; otherwise they are built again through the full checks. What it
does not see: a tensor's shape or dtype changed in place under the same object and address (``resize_``, ``set_``
onto the same storage), which nothing in this project does to weights.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Iterable
from itertools import chain
from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import nn
from torch.nn.modules import module as _module

from deepseek_moe.kernels.quant_matmul import activations
from deepseek_moe.model.mla import MLA
from deepseek_moe.moe.layer import MoE

if TYPE_CHECKING:
    from deepseek_moe.kernels.block_one_token import BlockCall


class Block(Protocol):
    """What a plan reads of model/block.py's Block (named here, not imported: the block imports this module)."""

    @property
    def attn_norm(self) -> nn.Module: ...
    @property
    def attn(self) -> nn.Module: ...
    @property
    def ffn_norm(self) -> nn.Module: ...
    @property
    def ffn(self) -> nn.Module: ...


class Snapshot:
    """The state of ``root`` and the modules under it (and of ``attributes``: (object, name) pairs) that a fused
    call's arguments were built from. It keeps references to everything it records under the root (and their
    storage), so the identities and addresses it compares cannot be taken by new objects while it lives; the root
    itself it does not keep (a plan stored against its module must not keep that module alive), so
    :meth:`holds` is given it. Checked as flat tuples (C-level comparisons): ~20 modules in a few microseconds."""

    def __init__(self, root: nn.Module, attributes: Iterable[tuple[object, str]] = ()) -> None:
        self.modules = tuple(root.modules())[1:]  # below the root
        everything = (root, *self.modules)
        # Live views of every module's children, parameters and buffers (the dicts are the modules' own for life).
        self.slots = tuple(d.values() for m in everything for d in (m._modules, m._parameters, m._buffers))
        self.hooks = tuple(d for m in everything for d in (m._forward_hooks, m._forward_pre_hooks))
        self.entries = tuple(chain.from_iterable(self.slots))
        self.tensors = tuple(t for t in self.entries if isinstance(t, torch.Tensor))
        self.storage = tuple(t.detach() for t in self.tensors)  # a swapped .data cannot free an address compared
        self.addresses = tuple(map(_address, self.tensors))
        self.hook_counts = tuple(map(len, self.hooks))
        self.training = tuple(map(_training, everything))
        self.attributes = tuple((obj, name, getattr(obj, name)) for obj, name in attributes)

    def holds(self, root: nn.Module) -> bool:
        """Whether ``root`` (the module recorded) and everything recorded under it is as it was, and no forward is
        replaced on an instance or hooked for every module (those run only through the modules' own calls)."""
        entries = tuple(chain.from_iterable(self.slots))
        return (len(entries) == len(self.entries) and all(map(operator.is_, entries, self.entries))
                and tuple(map(_address, self.tensors)) == self.addresses
                and tuple(map(len, self.hooks)) == self.hook_counts
                and (root.training, *map(_training, self.modules)) == self.training
                and all(getattr(obj, name) is value for obj, name, value in self.attributes)
                and not any(map(_own_forward, (root, *self.modules))) and not global_hooks())


def global_hooks() -> bool:
    """Whether forward hooks are registered for every module (``register_module_forward_hook`` and its pre twin):
    a fused call, which skips the modules' own calls, would skip them."""
    return bool(getattr(_module, "_global_forward_hooks", None) or getattr(_module, "_global_forward_pre_hooks", None))


def _own_forward(m: nn.Module) -> bool:
    return "forward" in m.__dict__  # a forward set on the instance (a wrapper's patch), which a fused call would skip


_address = torch.Tensor.data_ptr
_training = operator.attrgetter("training")


class BlockPlan:
    """A block's call (kernels/block_one_token.py BlockCall) with what it was built from: valid while the block's
    modules, weights, modes, hooks and the attributes the call reads are as they were (:class:`Snapshot`), the
    kernel's activation format is, and the attention's absorbed matrices (fp32 copies of wkv_b, remade when it
    changes or the layer switches mode) are the ones it holds."""

    def __init__(self, block: Block, call: BlockCall) -> None:
        attn, ffn = block.attn, block.ffn
        assert isinstance(attn, MLA)
        self.attn, self.call, self.activations = attn, call, activations()
        watched: list[tuple[object, str]] = [(block.attn_norm, "eps"), (block.ffn_norm, "eps")]
        watched += [(attn, n) for n in ("attn_impl", "rope_interleave", "softmax_scale")]
        watched += [(n, "eps") for n in (attn.kv_norm, getattr(attn, "q_norm", None)) if n is not None]
        if isinstance(ffn, MoE):
            watched += [(ffn, n) for n in ("cfg", "uniform_routing", "dispatcher")] + [(ffn.gate, "cfg")]
            watched += [(ffn.experts, n) for n in ("adapter", "offset", "group_size")]
        watched += [(m, "group_size") for m in ffn.modules() if hasattr(m, "plain_codes")]
        self.snapshot = Snapshot(cast(nn.Module, block), watched)

    def holds(self, block: Block) -> bool:
        if activations() != self.activations or not self.snapshot.holds(cast(nn.Module, block)):
            return False
        w_uk, w_uv_t = self.attn._absorbed_matrices(torch.float32)
        return w_uk is self.call.mla.w_uk and w_uv_t is self.call.mla.w_uv_t


# Each block's plan, kept beside the module (not in it: nothing of it is saved, copied or moved with the model).
PLANS: weakref.WeakKeyDictionary[Block, BlockPlan] = weakref.WeakKeyDictionary()


__all__ = ["PLANS", "BlockPlan", "Snapshot", "global_hooks"]
