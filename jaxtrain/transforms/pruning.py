"""Magnitude pruning as a gradient transformation, with a sparsity schedule.

Put `magnitude_prune` last in a chain. It keeps a 0/1 mask per param in its state and
rewrites the updates so that the new params are `mask * (params + updates)`: pruned
weights become exactly zero and stay zero whatever the optimizer before it does. Every
`update_every` steps the mask is recomputed: the `sparsity(step)` fraction of the selected
weights with the smallest `|params + updates|` is pruned, ranked over all selected params
together (`scope='global'`) or within each param (`scope='per_layer'`). Pruned weights
are never revived (the mask only shrinks).

`polynomial_sparsity` is the schedule of Zhu & Gupta (2017):
`s_t = s_f + (s_i - s_f) * (1 - (t - t0) / n) ** 3` for `t0 <= t <= t0 + n`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..errors import JaxtrainError
from .paths import path_mask, path_str


class PruneState(NamedTuple):
    count: jax.Array  # steps taken
    masks: Any  # per param: 1 = kept, 0 = pruned (same dtype as the param)


def polynomial_sparsity(final: float, begin_step: int, end_step: int,
                        initial: float = 0.0) -> optax.Schedule:
    """Sparsity from `initial` at `begin_step` to `final` at `end_step`, cubic (Zhu & Gupta)."""
    for name, value in (("final", final), ("initial", initial)):
        if not 0.0 <= value < 1.0:
            raise JaxtrainError(f"polynomial_sparsity: {name} must be in [0, 1), got {value!r}")
    if not 0 <= begin_step < end_step:
        raise JaxtrainError(f"polynomial_sparsity: need 0 <= begin_step < end_step, "
                            f"got {begin_step}, {end_step}")
    return optax.polynomial_schedule(initial, final, power=3,
                                     transition_steps=end_step - begin_step,
                                     transition_begin=begin_step)


def _keep_mask(magnitudes: jax.Array, old: jax.Array, sparsity) -> jax.Array:
    """1 for all but the `floor(sparsity * n)` smallest magnitudes (already-pruned first)."""
    n = magnitudes.size
    prune = jnp.floor(sparsity * n).astype(jnp.int32)
    # pruned entries rank below every live one, so the mask only ever shrinks
    score = jnp.where(old.ravel() > 0, magnitudes.ravel(), -1.0)
    ranks = jnp.argsort(jnp.argsort(score, stable=True), stable=True)
    return ((ranks >= prune) & (old.ravel() > 0)).reshape(magnitudes.shape)


def magnitude_prune(sparsity, scope: str = "global", prune: str | Iterable[str] = "*kernel",
                    update_every: int = 1) -> optax.GradientTransformation:
    """Prune the smallest-magnitude weights of the params matching `prune` (globs).

    `sparsity`: a fraction in [0, 1) or a schedule `step -> fraction`; `scope`: 'global'
    or 'per_layer'. The masks are in the state (`PruneState.masks`), so they are saved
    and restored with it.
    """
    if scope not in ("global", "per_layer"):
        raise JaxtrainError(f"magnitude_prune: scope must be 'global' or 'per_layer', "
                            f"got {scope!r}")
    if not callable(sparsity) and not 0.0 <= sparsity < 1.0:
        raise JaxtrainError(f"magnitude_prune: sparsity must be in [0, 1) or a schedule, "
                            f"got {sparsity!r}")
    if not (isinstance(update_every, int) and update_every >= 1):
        raise JaxtrainError(f"magnitude_prune: update_every must be an integer >= 1, "
                            f"got {update_every!r}")
    schedule = sparsity if callable(sparsity) else optax.constant_schedule(sparsity)
    select = path_mask(prune)

    def init_fn(params):
        chosen = jax.tree.leaves(select(params))
        if not any(chosen):
            raise JaxtrainError(f"magnitude_prune: no param path matches {prune!r}")
        return PruneState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.ones_like, params))

    def new_masks(candidate, masks, target):
        selected = select(candidate)
        if scope == "per_layer":
            return jax.tree.map(
                lambda c, m, s: _keep_mask(jnp.abs(c), m, target).astype(m.dtype) if s else m,
                candidate, masks, selected)
        leaves, treedef = jax.tree.flatten(candidate)
        mask_leaves = treedef.flatten_up_to(masks)
        picked = [i for i, s in enumerate(treedef.flatten_up_to(selected)) if s]
        flat = jnp.concatenate([jnp.abs(leaves[i]).ravel().astype(jnp.float32) for i in picked])
        old = jnp.concatenate([mask_leaves[i].ravel() for i in picked])
        keep = _keep_mask(flat, old, target)
        out, offset = list(mask_leaves), 0
        for i in picked:
            size = leaves[i].size
            out[i] = keep[offset:offset + size].reshape(leaves[i].shape).astype(out[i].dtype)
            offset += size
        return treedef.unflatten(out)

    def update_fn(updates, state, params=None):
        if params is None:
            raise JaxtrainError("magnitude_prune needs params in update")
        candidate = optax.apply_updates(params, updates)
        due = state.count % update_every == 0
        masks = jax.lax.cond(due, lambda: new_masks(candidate, state.masks,
                                                    schedule(state.count)),
                             lambda: state.masks)
        # params + (-params) is exactly 0: pruned weights land on zero, not near it
        updates = jax.tree.map(lambda u, p, m: jnp.where(m > 0, u, -p).astype(u.dtype),
                               updates, params, masks)
        return updates, PruneState(optax.safe_increment(state.count), masks)

    return optax.GradientTransformation(init_fn, update_fn)


def sparsity_report(params) -> dict:
    """Fraction of exactly-zero entries, per param path and `'total'` (over all params)."""
    report, zeros, total = {}, 0, 0
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        z = int(jnp.sum(leaf == 0))
        report[path_str(kp)] = z / leaf.size
        zeros, total = zeros + z, total + leaf.size
    report["total"] = zeros / total
    return report
