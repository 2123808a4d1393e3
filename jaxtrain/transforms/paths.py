"""Parameter paths as `/`-joined strings, and glob / regex selection on them.

A pattern is a shell glob (`fnmatch`; `*` also crosses `/`, so `backbone/*` selects
everything under `backbone`), or a regular expression when written as `re:<regex>`
(matched against the whole path).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

import jax


def key_str(key) -> str:
    """One path element (dict key, attribute, sequence index) as a string."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(keypath) -> str:
    """A JAX key path as `a/b/c`."""
    return "/".join(key_str(k) for k in keypath)


def tree_paths(tree):
    """A tree of the same structure whose leaves are their own `/`-joined paths."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: path_str(kp), tree)


def path_list(tree) -> list[str]:
    """The `/`-joined paths of the leaves, in flattening order."""
    return [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _matcher(pattern: str) -> Callable[[str], bool]:
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return lambda p: rx.fullmatch(p) is not None
    return lambda p: fnmatch.fnmatchcase(p, pattern)


def matches(path: str, patterns: str | Iterable[str]) -> bool:
    """Whether `path` matches any of `patterns` (globs, or `re:` regexes)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(_matcher(p)(path) for p in patterns)


def path_mask(patterns: str | Iterable[str]) -> Callable:
    """A mask function `params -> tree of bools`, True where the path matches `patterns`."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return lambda tree: jax.tree_util.tree_map_with_path(
        lambda kp, _: matches(path_str(kp), patterns), tree
    )
