"""Compile a pure `(state, batch) -> (state, metrics)` step for a mesh, and keep compiled
programs across starts (JAX's persistent compilation cache)."""

from __future__ import annotations

import functools
from collections import deque
from pathlib import Path

import jax
from jax.sharding import Sharding

from .place import batch_sharding
from .rules import replicated, state_shardings


def compile_step(step_fn, mesh, state_shardings, donate: bool = True, *, logical_axes=None):
    """`jax.jit` with explicit shardings: state in and out as `state_shardings`, the batch
    split over the batch axes, metrics replicated. The output state has exactly the
    input's shardings, so feeding it back never reshards. With `donate`, the input
    state's buffers are reused for the output (the caller must not touch the old state).

    `state_shardings` is a tree of shardings like the state, or rules (a preset name or
    a rules table): then the shardings are worked out by `state_shardings(state, mesh,
    rules, logical_axes)` from the first state the step sees.
    """
    if _is_shardings(state_shardings):
        return _jit(step_fn, mesh, state_shardings, donate)
    return _LazyStep(step_fn, mesh, state_shardings, logical_axes, donate)


def use_compilation_cache(folder) -> None:
    """Keep every compiled program in `folder` (JAX's persistent compilation cache), so that
    the next start that compiles the same step on the same devices and versions loads it
    from disk instead of compiling again. Every program is kept, however quickly it
    compiled (JAX keeps only those over 1 s by default: on a CPU most steps compile
    faster, and the step with its many small programs is what a start waits for). A
    later call with another folder moves the cache there. The folder is trusted: whoever
    can write to it can make this process run their code (JAX's warning)."""
    from jax.experimental.compilation_cache import compilation_cache

    folder = str(Path(folder).expanduser().resolve())
    if jax.config.jax_compilation_cache_dir != folder:
        compilation_cache.reset_cache()  # a cache already opened elsewhere is let go
        jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def compile_eval(eval_fn, mesh, state_shardings):
    """`jax.jit` of a `(state, batch) -> metrics` function with the same placement."""
    return jax.jit(
        under_mesh(eval_fn, mesh),
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )


def under_mesh(fn, mesh):
    """`fn` traced with `mesh`'s axes visible (`jax.sharding.use_abstract_mesh`), so that a
    model can pin its activations to the batch split (`models.gpt.batch_sharded`) and
    pipeline its layers over `pipe` (`sharding.pipeline`)."""

    @functools.wraps(fn)  # the compiled program keeps fn's name (jit_<name>)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


def _jit(step_fn, mesh, shardings, donate):
    return jax.jit(
        under_mesh(step_fn, mesh),
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )


def _is_shardings(tree) -> bool:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Sharding))
    return bool(leaves) and all(isinstance(x, Sharding) for x in leaves)


class _LazyStep:
    """A step compiled on first call, with shardings from the rules and that state."""

    def __init__(self, step_fn, mesh, rules, logical_axes, donate):
        self.step_fn, self.mesh, self.rules = step_fn, mesh, rules
        self.logical_axes, self.donate = logical_axes, donate
        self.shardings = None
        self._jitted = None

    def _ready(self, state):
        if self._jitted is None:
            self.shardings = state_shardings(state, self.mesh, self.rules, self.logical_axes)
            self._jitted = _jit(self.step_fn, self.mesh, self.shardings, self.donate)
        return self._jitted

    def __call__(self, state, batch):
        return self._ready(state)(state, batch)

    def lower(self, state, batch):
        return self._ready(state).lower(state, batch)


class InFlight:
    """Bounds the compiled calls in flight where XLA needs it. On CPU with several local
    devices, ~32 queued calls with collectives deadlock XLA's rendezvous and abort the
    process (digits CNN on 8 simulated devices: 24 in flight ran, 32 hung); elsewhere
    there is no bound, as waiting costs throughput (~5% on a small CPU model at 16)."""

    def __init__(self, mesh, limit: int = 16):
        several = len(mesh.local_devices) > 1 and jax.default_backend() == "cpu"
        self.limit = limit if several else None
        self.outputs: deque = deque()

    def add(self, outputs) -> None:
        """Record a call by (some of) its outputs; wait on the oldest beyond the bound."""
        if self.limit is not None:
            self.outputs.append(outputs)
            if len(self.outputs) > self.limit:
                jax.block_until_ready(self.outputs.popleft())
