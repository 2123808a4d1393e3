"""`vmappable_cond`: a `lax.cond` whose branch is still skipped under `jax.vmap`.

Under `vmap` a `lax.cond` on a batched predicate becomes a select: both branches run for
every member at every call. A vmapped sweep batches each run's step counter (equal across
runs), so Shampoo's, SOAP's and PSGD Kron's refresh every k steps ran at every step:
Shampoo's sweep took 3x AdamW's (benchmarks/RESULTS.md, "Six optimizers on the char GPT").
Here the branch runs when any member's predicate holds, and each member keeps the result
of its own branch, so every member gets what `lax.cond` gives it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_batching.custom_vmap
def _any_member(pred):
    return pred


@_any_member.def_vmap
def _any_member_batched(axis_size, in_batched, pred):
    del axis_size
    return (jnp.any(pred) if in_batched[0] else pred), False


def vmappable_cond(pred, true_fn, false_fn, *operands):
    """`lax.cond(pred, true_fn, false_fn, *operands)`; under `vmap` `true_fn` runs (for
    the whole batch, then a select per member) only at calls where some member's `pred`
    holds. `false_fn` also runs inside the taken branch: it should be cheap (keeping the
    old value), or the branch rarely taken (SOAP's first step)."""

    def chosen(*ops):
        return jax.tree.map(lambda t, f: jnp.where(pred, t, f), true_fn(*ops), false_fn(*ops))

    return jax.lax.cond(_any_member(pred), chosen, false_fn, *operands)
