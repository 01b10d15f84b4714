"""What a fused call read from a module tree, kept so that the next step can tell cheaply whether it still holds.

A decoder block's one C++ call (kernels/block_one_token.py) first asks a dozen modules whether they may be fused
(types, hooks, adapters, modes) and gathers ~30 tensors' addresses: ~0.35 ms a block of the mid-size model inside
a decode step, where the kernels between leave Python's code and data cold, against ~0.05 ms for the step's own
tensors. A :class:`Snapshot` records, for every module of the tree, its identity under its parent, its training
flag, its hooks, and its parameters' and buffers' identities and storage addresses, plus named plain attributes
the call depends on (a norm's eps, a layer's config); :meth:`Snapshot.holds` compares them all again, which is
what replacing a module, registering a hook, switching mode, assigning a weight (``module.w = ...``,
``param.data = ...``) or changing such an attribute changes. Anything it holds is then as it was when the call's
arguments were built, and the arguments are reused; otherwise they are built again through the full checks.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from itertools import chain

import torch
from torch import nn


class Snapshot:
    """The state of the modules under ``root`` (and of ``attributes``: (object, name) pairs) that a fused call's
    arguments were built from. It keeps references to everything it records, so the identities it compares cannot
    be taken by new objects while it lives. Checked as flat tuples (C-level comparisons): ~20 modules in a few
    microseconds."""

    def __init__(self, root: nn.Module, attributes: Iterable[tuple[object, str]] = ()) -> None:
        self.modules = tuple(root.modules())
        # Live views of every module's children, parameters and buffers (the dicts are the modules' own for life).
        self.slots = tuple(d.values() for m in self.modules for d in (m._modules, m._parameters, m._buffers))
        self.hooks = tuple(d for m in self.modules for d in (m._forward_hooks, m._forward_pre_hooks))
        self.entries = tuple(chain.from_iterable(self.slots))
        self.tensors = tuple(t for t in self.entries if isinstance(t, torch.Tensor))
        self.addresses = tuple(map(_address, self.tensors))
        self.hook_counts = tuple(map(len, self.hooks))
        self.training = tuple(map(_training, self.modules))
        self.attributes = tuple((obj, name, getattr(obj, name)) for obj, name in attributes)

    def holds(self) -> bool:
        """Whether every recorded module, tensor, hook count, mode and attribute is as it was."""
        entries = tuple(chain.from_iterable(self.slots))
        return (len(entries) == len(self.entries) and all(map(operator.is_, entries, self.entries))
                and tuple(map(_address, self.tensors)) == self.addresses
                and tuple(map(len, self.hooks)) == self.hook_counts
                and tuple(map(_training, self.modules)) == self.training
                and all(getattr(obj, name) is value for obj, name, value in self.attributes))


_address = torch.Tensor.data_ptr
_training = operator.attrgetter("training")


__all__ = ["Snapshot"]
