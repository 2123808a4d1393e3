"""Masks: which params a rule (weight decay, freezing, a group) applies to.

A mask is a function `params -> tree of bools` (what `optax.masked` takes). Build one
from `/`-joined paths (`include('*/kernel')`, `exclude('*/bias', '*/scale')`; globs, or
regexes written `re:<regex>`, see `paths.py`) or from a predicate on the leaf
(`ndim_at_least(2)`), and combine them with `&`, `|` and `~`.

Paths are those of the param tree with Flax NNX `Variable` wrappers looked through: the
`value` attribute a Variable flattens to is not part of the path, so `*/bias` selects
`norm/bias` in an `nnx.State` just as in the plain dict of `nnx.to_pure_dict`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax

from ..errors import JaxtrainError
from .paths import key_str, matches


def _path(keypath) -> str:
    keys = list(keypath)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]  # an NNX Variable's value: the Variable's own path names the param
    return "/".join(key_str(k) for k in keys)


def param_paths(tree):
    """A tree like `tree` whose leaves are their param paths (`backbone/conv1/kernel`)."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: _path(kp), tree)


class Mask:
    """`params -> tree of bools` from `test(path, leaf) -> bool`; `&`, `|`, `~` combine."""

    def __init__(self, test: Callable[[str, object], bool], description: str):
        self.test = test
        self.description = description

    def __call__(self, params):
        return jax.tree_util.tree_map_with_path(
            lambda kp, leaf: bool(self.test(_path(kp), leaf)), params
        )

    def __and__(self, other: Mask) -> Mask:
        return Mask(lambda p, x: self.test(p, x) and other.test(p, x),
                    f"({self.description} & {other.description})")

    def __or__(self, other: Mask) -> Mask:
        return Mask(lambda p, x: self.test(p, x) or other.test(p, x),
                    f"({self.description} | {other.description})")

    def __invert__(self) -> Mask:
        return Mask(lambda p, x: not self.test(p, x), f"~{self.description}")

    def __repr__(self) -> str:
        return f"Mask({self.description})"


def _patterns(patterns) -> list[str]:
    flat = []
    for p in patterns:
        flat.extend([p] if isinstance(p, str) else list(p) if isinstance(p, Iterable) else [p])
    if not flat or not all(isinstance(p, str) for p in flat):
        raise JaxtrainError(f"a mask needs path patterns (strings), got {patterns!r}")
    return flat


def include(*patterns) -> Mask:
    """True where the param path matches any of `patterns`."""
    pats = _patterns(patterns)
    return Mask(lambda path, _: matches(path, pats), f"include{tuple(pats)}")


def exclude(*patterns) -> Mask:
    """True where the param path matches none of `patterns` (`exclude('*/bias')`)."""
    pats = _patterns(patterns)
    return Mask(lambda path, _: not matches(path, pats), f"exclude{tuple(pats)}")


def ndim_at_least(n: int) -> Mask:
    """True for leaves with at least `n` dimensions (`2`: matrices and kernels, not biases
    or norm scales)."""
    return Mask(lambda _, leaf: leaf.ndim >= n, f"ndim_at_least({n})")


def where(predicate: Callable[[str, object], bool]) -> Mask:
    """True where `predicate(path, leaf)` holds."""
    return Mask(predicate, getattr(predicate, "__name__", "predicate"))


def everything() -> Mask:
    """True for every param."""
    return Mask(lambda _p, _x: True, "everything")
