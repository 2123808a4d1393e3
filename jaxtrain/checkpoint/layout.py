"""Convert saved states between the unrolled and the scanned (stacked) layer layouts.

A GPT built with `scan_layers=False` keeps its blocks as `blocks/0/...`, `blocks/1/...`;
with `scan_layers=True` it keeps one `blocks/...` subtree whose leaves carry a leading
layer dimension. Both hold the same numbers, so a checkpoint of one layout serves the
other after `stack_layers` / `unstack_layers`: restore the state with the layout it was
saved in, convert its `saveable()` dict, and hand it to a state of the other layout
(`like.with_saved(...)`). Params, optimizer moments and EMA copies (any dict subtree
named `key`) convert alike; everything else passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import JaxtrainError


def stack_layers(tree, key: str = "blocks"):
    """`tree` with every `key: {0: t0, 1: t1, ...}` replaced by `key: stack(t0, t1, ...)`
    (leaf by leaf on a new leading axis). Layer keys may be ints or digit strings (as
    Orbax restores them); a `key` subtree already stacked is left as it is."""
    return _convert(tree, key, _stack)


def unstack_layers(tree, key: str = "blocks"):
    """The inverse of `stack_layers`: every stacked `key` subtree becomes
    `{0: t[0], 1: t[1], ...}` (int keys, as `nnx.to_pure_dict` of an unrolled GPT gives)."""
    return _convert(tree, key, _unstack)


def _convert(tree, key, convert):
    found = []

    def walk(node):
        if isinstance(node, Mapping):
            out = {k: (convert(v, key, found) if k == key else walk(v)) for k, v in node.items()}
            return out if type(node) is dict else type(node)(out)
        if isinstance(node, tuple) and hasattr(node, "_fields"):  # optax's namedtuples
            return type(node)(*(walk(v) for v in node))
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        return node

    result = walk(tree)
    if not found:
        raise JaxtrainError(f"no subtree named {key!r} to convert (the layer blocks of a "
                            "GPT are under 'blocks')")
    return result


def _layer_keys(node) -> list | None:
    """The layer keys of an unrolled subtree in layer order, or None when not unrolled."""
    if not isinstance(node, Mapping) or not node:
        return None
    keys = list(node)
    if not all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in keys):
        return None
    keys.sort(key=int)
    if [int(k) for k in keys] != list(range(len(keys))):
        raise JaxtrainError(f"layer keys {keys} are not 0..{len(keys) - 1}")
    return keys


def _stack(node, key, found):
    keys = _layer_keys(node)
    found.append(key)
    if keys is None:
        return node
    layers = [node[k] for k in keys]
    try:
        return jax.tree.map(_stack_leaves, *layers)
    except ValueError as err:
        raise JaxtrainError(f"the layers under {key!r} differ in structure: {err}") from None


def _stack_leaves(*xs):
    shapes = {np.shape(x) for x in xs}
    if len(shapes) > 1:
        raise JaxtrainError(f"cannot stack layers of different shapes {sorted(shapes)}")
    if all(isinstance(x, np.ndarray) for x in xs):
        return np.stack(xs)
    return jnp.stack(xs)


def _unstack(node, key, found):
    found.append(key)
    if _layer_keys(node) is not None:
        return node
    leaves = jax.tree.leaves(node)
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise JaxtrainError(f"the leaves under {key!r} do not share a leading layer "
                            f"dimension (leading sizes {sorted(map(str, sizes))})")
    (n,) = sizes
    return {i: jax.tree.map(lambda x, i=i: x[i], node) for i in range(n)}
