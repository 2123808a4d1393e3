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


def _shape(leaf) -> tuple:
    return tuple(getattr(leaf, "shape", ()))


def tree_mismatch(tree, like, name: str = "tree", like_name: str = "leaf",
                  leading: bool = False) -> str | None:
    """How `tree` fails to have `like`'s structure and leaf shapes, in words naming the
    first path that differs and both sides (`name`: what `tree` holds, plural; `like_name`:
    one leaf of `like`), or None when it matches. `leading`: a leaf may also have extra
    leading axes (per-example gradients). Reads only structures and shapes, so it works
    on traced values."""
    leaves = {path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    wanted = {path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(like)[0]}
    for path, ref in wanted.items():
        if path not in leaves:
            held = ", ".join(repr(p) for p in list(leaves)[:4]) or "nothing"
            return (f"the {name} have no {path!r} (a {like_name} of shape {_shape(ref)}); "
                    f"they hold {held}{' ...' if len(leaves) > 4 else ''} "
                    f"({type(tree).__name__} of {len(leaves)} leaves)")
        shape, want = _shape(leaves[path]), _shape(ref)
        if (shape[len(shape) - len(want):] if leading else shape) != want:
            return f"at {path!r} the {name} have shape {shape}, the {like_name} {want}"
    for path, leaf in leaves.items():
        if path not in wanted:
            return f"the {name} have {path!r} (shape {_shape(leaf)}), which is not a {like_name}"
    a, b = jax.tree.structure(tree), jax.tree.structure(like)
    if a != b:
        return f"the {name} are {a}, the {like_name}s {b}"
    return None


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
