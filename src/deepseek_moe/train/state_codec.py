"""Nested Python state as safetensors + JSON, so a checkpoint holds optimizer and RNG state without pickle.

``encode(tree)`` returns (tensors, skeleton): every tensor is moved into ``tensors`` under its path and replaced
by ``{"$tensor": path}``; the skeleton is plain JSON. ``decode(skeleton, tensors)`` rebuilds the tree. What it
holds: dicts (keys str or int), lists, tuples, tensors, numpy arrays (numpy's RNG state), str, int, float, bool
and None. Decoding builds only those types, so a tampered file can give wrong numbers but never run code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_TENSOR, _DICT, _TUPLE, _NDARRAY = "$tensor", "$dict", "$tuple", "$ndarray"


def encode(tree: Any) -> tuple[dict[str, torch.Tensor], Any]:
    tensors: dict[str, torch.Tensor] = {}
    return tensors, _encode(tree, "", tensors)


def _encode(node: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        if path in tensors:
            raise ValueError(f"two tensors at state path {path!r}")
        # safetensors refuses shared or strided storage: a contiguous CPU copy of each
        tensors[path] = node.detach().cpu().clone().contiguous()
        return {_TENSOR: path}
    if isinstance(node, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in node):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in node.items()}
        return {_DICT: [[_encode(k, path, {}), _encode(v, f"{path}/{k}", tensors)] for k, v in node.items()]}
    if isinstance(node, tuple):
        return {_TUPLE: [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(node)]}
    if isinstance(node, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(node)]
    if isinstance(node, np.ndarray):
        return {_NDARRAY: node.tolist(), "dtype": str(node.dtype)}
    if isinstance(node, np.generic):
        return node.item()
    if node is None or isinstance(node, str | bool | int | float):
        return node
    raise TypeError(f"cannot store {type(node).__name__} at state path {path!r} (tensors, numbers, strings, "
                    "lists, tuples and dicts only)")


def decode(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The tree ``encode`` was given; ValueError when the skeleton names a tensor that is not there or holds
    something ``encode`` never writes."""
    if isinstance(skeleton, list):
        return [decode(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        if skeleton is None or isinstance(skeleton, str | bool | int | float):
            return skeleton
        raise ValueError(f"unexpected {type(skeleton).__name__} in stored state")
    if _TENSOR in skeleton:
        name = skeleton[_TENSOR]
        if name not in tensors:
            raise ValueError(f"stored state names tensor {name!r}, which the tensor file does not hold")
        return tensors[name]
    if _DICT in skeleton:
        return {_key(decode(k, tensors)): decode(v, tensors) for k, v in skeleton[_DICT]}
    if _TUPLE in skeleton:
        return tuple(decode(v, tensors) for v in skeleton[_TUPLE])
    if _NDARRAY in skeleton:
        dtype = np.dtype(str(skeleton["dtype"]))
        if dtype.kind not in "biuf":
            raise ValueError(f"unexpected array dtype {dtype} in stored state")
        return np.asarray(skeleton[_NDARRAY], dtype=dtype)
    return {k: decode(v, tensors) for k, v in skeleton.items()}


def _key(key: Any) -> Any:
    if not isinstance(key, str | int | float | bool | tuple) and key is not None:
        raise ValueError(f"unexpected dict key {key!r} in stored state")
    return key


__all__ = ["decode", "encode"]
