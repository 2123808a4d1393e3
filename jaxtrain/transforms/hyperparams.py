"""Read and change the hyperparameters in force (learning rate, ...) in any optimizer state.

Hyperparameters are visible where a transform was built with `optax.inject_hyperparams`
(every jaxtrain optimizer is). `current_hyperparams` walks the whole state (chains,
masks, `accumulate`, `skip_nonfinite`, `lookahead`, parameter groups) and also reports
the scale in force of a `reduce_on_plateau` as `plateau_scale`.

Names: a hyperparameter outside any parameter group is reported by its bare name
(`learning_rate`). Inside `per_group`, each group's is `<group>/<name>`
(`backbone/learning_rate`, `default/learning_rate`), and the bare name, if not taken by
a transform outside the groups, means the `default` group's (the rest of the params: in
a fine-tune, typically the head at the full rate).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ..errors import JaxtrainError
from .plateau import PlateauState


def _is_injected(node) -> bool:
    return hasattr(node, "hyperparams") and isinstance(node.hyperparams, dict)


def _children(node):
    if isinstance(node, tuple | list):  # NamedTuple states included
        return list(node)
    if isinstance(node, dict):
        return list(node.values())
    return []


def _walk(node, group: str | None, visit) -> None:
    """Call `visit(node, group)` on every injected-hyperparams state below `node`."""
    if _is_injected(node):
        visit(node, group)
        _walk(node.inner_state, group, visit)
    elif isinstance(node, PlateauState):
        visit(node, group)
    elif isinstance(node, optax.MultiTransformState):
        default_first = sorted(node.inner_states, key=lambda g: g != "default")
        for name in default_first:
            _walk(node.inner_states[name], name if group is None else f"{group}/{name}",
                  visit)
    else:
        for child in _children(node):
            _walk(child, group, visit)


def _number(value):
    """`value` as a number or array; a Flax NNX Variable (how `nnx.Optimizer` holds its
    state's leaves) gives its value; None for anything else."""
    if isinstance(value, jax.Array | float | int):
        return value
    get_value = getattr(value, "get_value", None)
    return _number(get_value()) if callable(get_value) else None


def current_hyperparams(opt_state) -> dict:
    """The hyperparameters in force, by name (see the module docstring for the names).
    `opt_state` is an optimizer state, or a Flax `nnx.Optimizer` (or its `opt_state`)."""
    found: dict = {}
    opt_state = getattr(opt_state, "opt_state", opt_state)  # an nnx.Optimizer

    def visit(node, group):
        values = ({"plateau_scale": node.scale} if isinstance(node, PlateauState)
                  else node.hyperparams)
        for name, value in values.items():
            value = _number(value)
            if value is None:
                continue
            if group is not None:
                found.setdefault(f"{group}/{name}", value)
            if group is None or group.split("/")[-1] == "default":
                found.setdefault(name, value)

    _walk(opt_state, None, visit)
    # a bare name only seen inside non-default groups: the first group's
    for key, value in list(found.items()):
        found.setdefault(key.split("/")[-1], value)
    return found


def set_hyperparams(opt_state, **values):
    """`opt_state` with injected hyperparameters changed, e.g.
    `set_hyperparams(state, learning_rate=1e-4)` (every group's) or
    `set_hyperparams(state, **{'backbone/learning_rate': 1e-5})` (one group's).

    Only hyperparameters given as numbers at construction can change; one driven by a
    schedule is recomputed from the schedule at every step.
    """
    changed: set = set()

    def replace(node, group):
        if isinstance(node, PlateauState) or not _is_injected(node):
            return node
        new = dict(node.hyperparams)
        for key, value in values.items():
            name = key.split("/")[-1]
            wanted_group = key.rsplit("/", 1)[0] if "/" in key else None
            if name in new and (wanted_group is None or wanted_group == group):
                new[name] = jnp.asarray(value, jnp.asarray(new[name]).dtype)
                changed.add(key)
        return node._replace(hyperparams=new)

    def rebuild(node, group):
        if _is_injected(node):
            node = replace(node, group)
            return node._replace(inner_state=rebuild(node.inner_state, group))
        if isinstance(node, optax.MultiTransformState):
            return node._replace(inner_states={
                name: rebuild(inner, name if group is None else f"{group}/{name}")
                for name, inner in node.inner_states.items()})
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(rebuild(c, group) for c in node))
        if isinstance(node, tuple | list):
            return type(node)(rebuild(c, group) for c in node)
        if isinstance(node, dict):
            return {k: rebuild(v, group) for k, v in node.items()}
        return node

    new_state = rebuild(opt_state, None)
    missing = sorted(set(values) - changed)
    if missing:
        raise JaxtrainError(f"set_hyperparams: no injected hyperparameter {missing} in this "
                            f"state; it has {sorted(current_hyperparams(opt_state))}")
    return new_state
