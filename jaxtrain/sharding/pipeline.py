"""Pipeline parallelism over the mesh's `pipe` axis: GPipe and circular schedules, for GSPMD.

A model's `L` stacked layers (params with a leading layer dimension, sharded over `pipe`
by the `layers -> pipe` rule) are cut into `S` stages of `L / S` consecutive layers, one
stage per position on `pipe`. The batch is cut into `M` microbatches that flow through the
stages: at tick `t` stage `s` applies its layers to microbatch `t - s` and hands the
result to stage `s + 1`, so the forward pass takes `M + S - 1` ticks of which each stage
idles (here: computes on filler) `S - 1`, the bubble `(S - 1) / (M + S - 1)`. `jax.grad`
of the loop is the backward pipeline: the same ticks in reverse, the hand-over reversed.

How, as MaxText does it: every tick applies one function to all stages at once, a
`jax.vmap` over a leading stage dimension with `spmd_axis_name='pipe'`, so the compiler
runs stage `s`'s slice on the devices of `pipe` position `s`; the hand-over is a roll of
that dimension by one, which XLA lowers to a collective permute between neighbours. The
other mesh axes stay `Auto` inside (data, fsdp and tensor sharding compose unchanged).
The params keep their unpipelined layout (`layers` leading, in layer order): only their
placement differs, so a checkpoint restores under any `pipe` size.

The microbatch count is the caller's (`run(..., count=M)`), else the one set by
`schedule(M)` around the trace (the Trainer sets `sharding.pipeline.microbatches`), else
`S`. `repeats` R > 1 (`sharding.pipeline.repeats`) is the circular schedule: each stage
holds R chunks of `L / (R S)` layers, a microbatch goes round the stages R times, and the
bubble shrinks to (S - 1) / (R M + S - 1) (see `run`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from ..errors import JaxtrainError
from ..transforms.paths import path_str
from .mesh import BATCH_AXES
from .rules import _logical_by_path

AXIS = "pipe"
LAYERS = "layers"  # the logical name of a stacked layer dimension (rules: layers -> pipe)
_SCHEDULE: contextvars.ContextVar = contextvars.ContextVar("jaxtrain_pipeline_schedule",
                                                           default=(None, 1))


def stages(mesh=None) -> int:
    """The pipeline's stage count: the size of `pipe` on `mesh`, else on the mesh the trace
    runs under (`jax.sharding.get_abstract_mesh`); 1 without one, or inside a `shard_map`
    that made `pipe` manual."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or AXIS not in mesh.axis_names:
        return 1
    kinds = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    return mesh.shape[AXIS] if kinds[AXIS] == AxisType.Auto else 1


@contextlib.contextmanager
def schedule(microbatches: int | None = None, repeats: int = 1):
    """The pipeline schedule of the `run` calls traced inside: `microbatches` per batch
    (None: the stages) and `repeats` rounds through the stages (1: GPipe, more: circular)."""
    token = _SCHEDULE.set((microbatches, repeats))
    try:
        yield
    finally:
        _SCHEDULE.reset(token)


def with_schedule(fn, microbatches: int | None = None, repeats: int = 1):
    """`fn` traced with `schedule(microbatches, repeats)` in force (a train or eval step)."""
    if microbatches is None and repeats == 1:
        return fn

    def traced(*args, **kwargs):
        with schedule(microbatches, repeats):
            return fn(*args, **kwargs)

    return traced


def stacked_layers(params, logical_axes) -> int | None:
    """How many layers the params stack on a leading `layers` axis (by their logical axis
    names, a tree like `params`); None if none do."""
    names = _logical_by_path(logical_axes)
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        axes = names.get(path_str(kp))
        if axes and axes[0] == LAYERS:
            return leaf.shape[0]
    return None


def check_pipeline(mesh, layers: int | None, batch_size: int, count: int | None = None,
                   what: str = "train.batch_size", repeats: int = 1) -> int:
    """The microbatch count a pipelined step on `mesh` uses, after checking that `layers`
    split into its stages and `batch_size` into microbatches x data parallelism; a
    one-line `JaxtrainError` otherwise (before anything compiles). `layers` None: the
    model has no stacked layers to pipeline."""
    s = stages(mesh)
    count = s if count is None else count
    if not isinstance(count, int) or count < 1:
        raise JaxtrainError(f"sharding.pipeline.microbatches={count!r}: must be a positive "
                            "integer")
    if s == 1:
        return count
    if layers is None:
        raise JaxtrainError(f"sharding.mesh.pipe={s} needs a model whose layers are stacked "
                            "on a leading 'layers' axis (GPT: model.scan_layers: true)")
    if layers % (s * repeats):
        rounds = "" if repeats == 1 else f" x sharding.pipeline.repeats={repeats}"
        raise JaxtrainError(f"sharding.mesh.pipe={s}: the model's {layers} layers do not "
                            f"split into {s} equal stages{rounds}")
    if repeats > 1 and count < s:
        raise JaxtrainError(f"sharding.pipeline.repeats={repeats} (circular) needs "
                            f"sharding.pipeline.microbatches >= the {s} stages, got {count}")
    ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size % (count * ways):
        raise JaxtrainError(f"{what}={batch_size} is not divisible by sharding.pipeline."
                            f"microbatches={count} x data parallelism {ways} (data x fsdp) "
                            f"= {count * ways}")
    return count


def run(stage_fn, layers, x, count: int | None = None, repeats: int | None = None):
    """`x` through every layer of `layers` in order, pipelined over `pipe`: GPipe
    (`repeats` 1) or the circular schedule (`repeats` R > 1).

    `layers`: a pytree whose leaves stack `L` layers on their leading dimension.
    `stage_fn(stage_layers, x)`: applies the consecutive layers of one stage's turn (the
    leaves' leading dimension: `L / S`, or `L / (R S)` when circular) to one microbatch
    `x` (the batch dimension leading) and returns the same shape. Without a `pipe` axis
    above 1 it is called once on all the layers and the whole batch. Equal to that call to
    float tolerance, gradients too. `count` and `repeats` default to the `schedule` in
    force (else S microbatches, GPipe).

    Circular: stage s holds the layer chunks s, s + S, s + 2S, ... of size `L / (R S)`
    and each microbatch goes round the stages R times, so the bubble shrinks to
    (S - 1) / (R M + S - 1); it needs M >= S (a microbatch's next round starts when stage
    0 is free). The stored layer order is kept, so each step first moves every layer to
    its stage (an all-to-all of the layer params, and of their gradients back).
    """
    s = stages()
    if s == 1:
        return stage_fn(layers, x)
    fixed = _SCHEDULE.get()
    count = fixed[0] if count is None else count
    count = s if count is None else count
    repeats = fixed[1] if repeats is None else repeats
    num_layers = {leaf.shape[0] for leaf in jax.tree.leaves(layers)}
    if len(num_layers) != 1:
        raise JaxtrainError(f"pipeline: the stacked layers' leading sizes differ: "
                            f"{sorted(num_layers)}")
    num_layers = num_layers.pop()
    if num_layers % (s * repeats):
        raise JaxtrainError(f"pipeline: {num_layers} layers do not split into {s} stages x "
                            f"{repeats} repeats of equal size (mesh axis pipe)")
    if repeats > 1 and count < s:
        raise JaxtrainError(f"pipeline: the circular schedule ({repeats} repeats) needs at "
                            f"least as many microbatches as stages ({s}), got {count}")
    batch = x.shape[0]
    if batch % count:
        raise JaxtrainError(f"pipeline: batch {batch} is not divisible by {count} "
                            "microbatches")
    chunk = num_layers // (s * repeats)
    # (S, R, chunk, ...): stage s's turn r is layers (r S + s) chunk ... + chunk; with
    # R = 1 a contiguous block per stage, as the layers are stored (nothing moves).
    staged = jax.tree.map(
        lambda p: _on_stages(p.reshape(repeats, s, chunk, *p.shape[1:]).swapaxes(0, 1)),
        layers)
    # Strided microbatches (examples i, i + M, ...): each device's block of the batch
    # holds its share of every microbatch, so cutting them moves no data.
    xs = x.reshape(batch // count, count, *x.shape[1:]).swapaxes(0, 1)

    if repeats == 1:  # GPipe: a stage always applies its one chunk (no per-tick slicing)
        staged = jax.tree.map(lambda p: p[:, 0], staged)

    def turn(stage_layers, r, x):
        if repeats > 1:
            stage_layers = jax.tree.map(
                lambda p: jax.lax.dynamic_index_in_dim(p, r, 0, False), stage_layers)
        return stage_fn(stage_layers, x)

    apply = jax.vmap(turn, spmd_axis_name=AXIS)
    stage_ids = jnp.arange(s)
    first = (stage_ids == 0).reshape(s, *(1,) * x.ndim)

    def tick(carry, t):
        handed, looped = carry
        # Stage s works on item t - s: microbatch (t - s) mod M in its round (t - s) // M
        # (clipped on filler ticks). Stage 0 takes a new microbatch in the first round,
        # later the last stage's output of the previous round (kept in `looped`);
        # stage s > 0 what stage s - 1 produced at tick t - 1.
        rounds = jnp.clip((t - stage_ids) // count, 0, repeats - 1)
        slot = t % count
        entering = jax.lax.dynamic_index_in_dim(xs, slot if repeats > 1 else
                                                jnp.minimum(t, count - 1), 0, False)
        if repeats > 1:
            entering = jnp.where(t < count, entering,
                                 jax.lax.dynamic_index_in_dim(looped, slot, 0, False))
        inputs = _on_stages(jnp.where(first, entering[None], handed))
        outputs = _on_stages(apply(staged, _on_stages(rounds), inputs))
        done = t - (s - 1)  # the item the last stage finished
        if repeats > 1:
            keep = jax.lax.dynamic_index_in_dim(looped, done % count, 0, False)
            looped = jax.lax.dynamic_update_index_in_dim(
                looped, jnp.where(done >= 0, outputs[-1], keep), done % count, 0)
        return (_shift(outputs), looped), outputs[-1]

    start = _on_stages(jnp.zeros((s, *xs.shape[1:]), x.dtype))
    looped = jnp.zeros(xs.shape if repeats > 1 else (0,), x.dtype)
    _, finished = jax.lax.scan(tick, (start, looped), jnp.arange(repeats * count + s - 1))
    # The last stage finishes microbatch m's last round at tick (R - 1) M + m + S - 1.
    out = finished[(repeats - 1) * count + s - 1:]
    return out.swapaxes(0, 1).reshape(batch, *out.shape[2:])


def _on_stages(a):
    """`a` with its leading (stage) dimension on `pipe`; the rest left to the compiler."""
    spec = PartitionSpec(AXIS, *(PartitionSpec.UNCONSTRAINED,) * (a.ndim - 1))
    return jax.lax.with_sharding_constraint(a, spec)


def _shift(a):
    """Stage s's slice moved to stage s + 1 (the last wraps to 0, where it is not read):
    a roll of the `pipe`-sharded dimension, one collective permute."""
    return jnp.roll(a, 1, axis=0)
