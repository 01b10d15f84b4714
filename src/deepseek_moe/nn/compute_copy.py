"""Compute copies: a weight's bf16 copy, kept beside its fp32 master from one optimizer step to the next.

Under bf16 autocast every matrix product casts its fp32 weight to bf16 afresh: each training step allocates a new
copy of every weight (770 MB at the mid size of the benchmarks) and reads every master to fill it, right after
the optimizer step has read and written that same master. A compute copy is allocated once and rewritten in
place: by the optimizer, in the same pass that updates the master (:class:`deepseek_moe.train.optim.AdamWCopies`),
or, after any other change to the master, at its next use. In-place torch ops (loading a checkpoint, ``copy_``,
``index_put_``) bump the master's version counter and a new tensor (``p.data = t``, a deep copy) has another
storage address, which the copy compares. torch's fused and foreach optimizers write without bumping the version,
so after any other optimizer's step a global step hook marks its weights' copies stale. Writes through
``p.data.<op>_()`` are invisible: make them under ``torch.no_grad()`` on ``p`` itself.

The gradient still reaches the fp32 master (cast to fp32 as autocast's own cast does), so clipping, gradient
accumulation and the optimizer see exactly what they see without copies. Only the forward's cast goes.

``Linear`` (nn/linear.py) and :class:`deepseek_moe.moe.experts.RoutedExperts` ask :func:`compute_weight` for
their weights and name them in ``compute_copy_weights``; :func:`attach` gives a model's weights their copies (the
trainer does under bf16 autocast on one process). This module knows neither: it sits below the MoE layer and the
model, which both use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from deepseek_moe._torch_compat import tensor_version


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products on ``x`` run in: autocast's where it is on for x's device (autocast casts the
    operands of F.linear and matmul, but not of F.grouped_mm, so the routed experts cast for themselves),
    else x's own."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


@dataclass
class ComputeCopy:
    """A master's copy in ``tensor.dtype``, and the master's (version, storage address) it was made from.

    ``grad_buffer``: last step's fp32 gradient of the master, parked by the optimizer's ``zero_grad``
    (:meth:`park_grad`) so that the next backward writes the new gradient into memory already mapped instead of
    allocating 4 bytes a weight afresh (:class:`_FromCopy`)."""

    tensor: torch.Tensor
    version: int
    address: int
    grad_buffer: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not _hook:  # from the first copy on, every optimizer step is watched (_after_optimizer_step)
            _hook.append(register_optimizer_step_post_hook(_after_optimizer_step))

    def matches(self, master: torch.Tensor) -> bool:
        return self.version == tensor_version(master) and self.address == master.data_ptr()

    def mark_synced(self, master: torch.Tensor) -> None:
        self.version, self.address = tensor_version(master), master.data_ptr()

    def mark_stale(self) -> None:
        """The master changed in a way its version counter does not show: copy it again at the next use."""
        self.version = -1

    def park_grad(self, master: torch.Tensor) -> None:
        """Take ``master.grad`` away (as ``zero_grad(set_to_none=True)`` does), keeping its memory for the next
        backward."""
        grad = master.grad
        master.grad = None
        if grad is not None and grad.shape == master.shape and grad.dtype == master.dtype and grad.is_contiguous():
            self.grad_buffer = grad

    def take_grad_buffer(self, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``grad`` in ``dtype``, written into the parked buffer where there is one (which is then given away:
        autograd makes the returned tensor the master's .grad without copying only if nobody else holds it)."""
        buffer, self.grad_buffer = self.grad_buffer, None
        if buffer is None or buffer.shape != grad.shape or buffer.dtype != dtype:
            return grad.to(dtype)
        return buffer.copy_(grad)


_ATTR = "_compute_copy"


def copy_of(master: torch.Tensor) -> ComputeCopy | None:
    return getattr(master, _ATTR, None)


class _FromCopy(torch.autograd.Function):
    """Forward: the master's (up-to-date) copy. Backward: the gradient cast to the master's dtype, as the
    backward of ``master.to(copy.dtype)`` would give, written into last step's gradient memory when the
    optimizer parked it there."""

    @staticmethod
    def forward(ctx, master: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        ctx.master = master  # not save_for_backward: only its ComputeCopy is needed, not its value
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        master = ctx.master
        copy = copy_of(master)
        return (copy.take_grad_buffer(grad, master.dtype) if copy is not None else grad.to(master.dtype)), None


def compute_weight(master: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``master`` in ``dtype`` for a matrix product: its compute copy where it has one in that dtype (brought
    up to date first if the master changed since), else ``master.to(dtype)``."""
    copy = copy_of(master)
    if copy is None or copy.tensor.dtype != dtype or master.dtype == dtype:
        return master.to(dtype)
    if not copy.matches(master):
        with torch.no_grad():
            copy.tensor.copy_(master)
        copy.mark_synced(master)
    if torch.is_grad_enabled() and master.requires_grad:
        return _FromCopy.apply(master, copy.tensor)
    return copy.tensor


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global post-step hook: an optimizer that does not keep compute copies itself changed its weights without
    a version bump (torch's fused/foreach kernels), so their copies are stale."""
    if getattr(optimizer, "writes_compute_copies", False):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            copy = copy_of(p)
            if copy is not None:
                copy.mark_stale()


_hook: list[Any] = []  # the global hook's handle, registered once


COPIED_WEIGHTS = "compute_copy_weights"
"""The class attribute by which a module names its weights that ask :func:`compute_weight` for themselves
(``Linear``: ``("weight",)``; the routed experts: ``("w1", "w2", "w3")``), so that :func:`attach` finds them
without knowing the modules."""


def attach(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Give every weight that asks :func:`compute_weight` for itself (those its module names in
    ``compute_copy_weights``) a compute copy in ``dtype``; the number of weights given one. Sharded (DTensor)
    and non-fp32 weights are left alone: under FSDP the all-gather makes a fresh full weight every step anyway."""
    n = 0
    for module in model.modules():
        names: tuple[str, ...] = getattr(module, COPIED_WEIGHTS, ())
        for name in names:
            w = getattr(module, name)
            if w.dtype != torch.float32 or hasattr(w, "to_local") or copy_of(w) is not None:
                continue
            with torch.no_grad():
                tensor = w.detach().to(dtype)
            setattr(w, _ATTR, ComputeCopy(tensor, tensor_version(w), w.data_ptr()))
            n += 1
    return n


def park_grads(params: Iterable[torch.Tensor]) -> None:
    """``zero_grad(set_to_none=True)`` for the weights with compute copies among ``params``, keeping their
    gradients' memory for the next backward to write into (:meth:`ComputeCopy.park_grad`)."""
    for p in params:
        copy = copy_of(p)
        if copy is not None:
            copy.park_grad(p)


def detach_all(model: nn.Module) -> None:
    """Drop every compute copy of ``model``'s parameters (the memory goes back)."""
    for p in model.parameters():
        if copy_of(p) is not None:
            delattr(p, _ATTR)


__all__ = ["COPIED_WEIGHTS", "ComputeCopy", "attach", "compute_dtype", "compute_weight", "copy_of", "detach_all",
           "park_grads"]
