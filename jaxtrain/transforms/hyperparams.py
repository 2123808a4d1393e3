"""Read the hyperparameters in force (learning rate, ...) out of any optimizer state."""

from __future__ import annotations

import jax
import optax


def current_hyperparams(opt_state) -> dict:
    """The injected hyperparameters found in `opt_state`, by name.

    Walks chains, masks and parameter groups; a name found in several places (per-group
    learning rates) is reported as `name` for the first and `group/name` for the rest.
    """
    found: dict = {}

    def visit(node, prefix: str) -> None:
        if hasattr(node, "hyperparams") and isinstance(node.hyperparams, dict):
            for name, value in node.hyperparams.items():
                key = name if name not in found else f"{prefix}{name}"
                found.setdefault(key, value)
            visit(node.inner_state, prefix)
        elif isinstance(node, optax.MultiTransformState):
            for group, inner in node.inner_states.items():
                visit(inner, f"{group}/")
        elif isinstance(node, tuple | list):
            for item in node:
                visit(item, prefix)
        elif hasattr(node, "inner_state"):
            visit(node.inner_state, prefix)

    visit(opt_state, "")
    return {k: v for k, v in found.items() if isinstance(v, jax.Array | float | int)}
