"""Wrappers that act on the updates of any chain: freezing and parameter groups."""

from __future__ import annotations

from collections.abc import Iterable

import optax

from .paths import path_labels, path_mask


def freeze(paths: str | Iterable[str]) -> optax.GradientTransformation:
    """Zero the updates of params whose path matches `paths` (globs or `re:` regexes).

    Put it last in a chain so that nothing after it (weight decay, say) moves them.
    """
    return optax.masked(optax.set_to_zero(), path_mask(paths))


def per_group(groups: dict, default: optax.GradientTransformation):
    """One optimizer per parameter group: `{'backbone/*': tx_a, 'head/*': tx_b}`.

    A param goes to the first group whose glob matches its path, else to `default`.
    The groups' states are kept apart (`optax.multi_transform`).
    """
    names = {pattern: f"group_{i}" for i, pattern in enumerate(groups)}
    transforms = {names[p]: tx for p, tx in groups.items()}
    transforms["default"] = default
    labels = path_labels({names[p]: p for p in groups}, "default")
    return optax.multi_transform(transforms, labels)
