"""Find a transform's state node (a loss scale, an EMA, a schedule-free state...) anywhere
in an optimizer state: through chains, masks, `inject_hyperparams`, parameter groups and
wrappers. The one place the package searches an optimizer state for a node by its type.
"""

from __future__ import annotations

import optax

from ..errors import JaxtrainError


def find_states(opt_state, state_type: type) -> list:
    """Every node of `state_type` (a NamedTuple state class) in `opt_state`, outermost
    first, then in tree order. Matched by type, not by name: Optax's own `EmaState` is not
    jaxtrain's."""
    found = optax.tree_utils.tree_get_all_with_path(
        opt_state, state_type.__name__, lambda _, node: isinstance(node, state_type))
    return [node for _, node in found]


def find_state(opt_state, state_type: type, missing: str | None = None):
    """The first `state_type` node of `opt_state` (see `find_states`). None where there is
    none, or, with `missing`, a `JaxtrainError` saying `missing`."""
    found = find_states(opt_state, state_type)
    if found:
        return found[0]
    if missing is not None:
        raise JaxtrainError(missing)
    return None
