"""Nested inputs (tuples, lists, dicts) as a flat list of leaves and back, in the order torch's exporter reads
them: dicts by insertion order, ``None`` a leaf like any other value. Our own, so export uses no private torch module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

_LEAF = object()  # where a leaf stood, in the structure flatten returns


def flatten(tree: Any, is_leaf: Callable[[Any], bool] = lambda x: False) -> tuple[list[Any], Any]:
    """(leaves in order, the structure): anything that is not a tuple, list or dict is a leaf, and so is whatever
    ``is_leaf`` says is one."""
    leaves: list[Any] = []

    def walk(node: Any) -> Any:
        if is_leaf(node):
            leaves.append(node)
            return _LEAF
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, tuple | list):
            items = [walk(v) for v in node]
            return type(node)(*items) if hasattr(node, "_fields") else type(node)(items)
        leaves.append(node)
        return _LEAF

    return leaves, walk(tree)


def unflatten(leaves: list[Any], structure: Any) -> Any:
    """The tree :func:`flatten` took apart, with ``leaves`` in its leaves' places."""
    it: Iterator[Any] = iter(leaves)

    def build(node: Any) -> Any:
        if node is _LEAF:
            return next(it)
        if isinstance(node, dict):
            return {k: build(v) for k, v in node.items()}
        if isinstance(node, tuple | list):
            items = [build(v) for v in node]
            return type(node)(*items) if hasattr(node, "_fields") else type(node)(items)
        return node

    return build(structure)


__all__ = ["flatten", "unflatten"]
