"""Compile a pure `(state, batch) -> (state, metrics)` step for a mesh."""

from __future__ import annotations

import jax

from .place import batch_sharding
from .rules import replicated


def compile_step(step_fn, mesh, state_shardings, donate: bool = True):
    """`jax.jit` with explicit shardings: state in and out as `state_shardings`, the batch
    split over the batch axes, metrics replicated. With `donate`, the input state's
    buffers are reused for the output (the caller must not touch the old state)."""
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )


def compile_eval(eval_fn, mesh, state_shardings):
    """`jax.jit` of a `(state, batch) -> metrics` function with the same placement."""
    return jax.jit(
        eval_fn,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )
