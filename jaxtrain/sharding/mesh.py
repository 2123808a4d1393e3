"""Device meshes with the fixed axis names `pipe`, `data`, `fsdp`, `tensor`.

`pipe`: pipeline stages, each holding a slice of a model's stacked layers
(`jaxtrain.sharding.pipeline`); outermost, as its traffic (one activation per microbatch
between neighbours) is the lightest.

`data`: replicas that see different batch slices (data parallel).
`fsdp`: params, gradients and optimizer state sharded ZeRO-3 style; also splits the batch.
`tensor`: Megatron-style split of matmuls inside a layer.
Axes are `AxisType.Auto` (GSPMD propagation), so model code needs no sharding annotations
on its intermediate values.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh

from ..errors import JaxtrainError

AXES = ("pipe", "data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, pipe: int = 1,
              devices=None) -> Mesh:
    """A mesh over `devices` (default: all visible devices); one size may be -1 (the rest).

    Built with `jax.make_mesh`, which orders devices by the physical topology so that
    neighbours on a TPU/GPU interconnect stay neighbours on the mesh.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"pipe": pipe, "data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or size == 0 or size < -1:
            raise JaxtrainError(f"mesh axis {name}={size!r} must be a positive integer or -1")
    fill = [n for n, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise JaxtrainError(f"only one mesh axis may be -1, got {', '.join(fill)}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if len(devices) % known:
            raise JaxtrainError(
                f"mesh sizes {describe_sizes(sizes)} cannot fill {len(devices)} devices: "
                f"{len(devices)} is not divisible by {known}"
            )
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise JaxtrainError(
            f"mesh sizes {describe_sizes(sizes)} multiply to {math.prod(sizes.values())}, "
            f"but there are {len(devices)} devices"
        )
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_parallelism(mesh: Mesh) -> int:
    """How many slices a global batch is split into (data x fsdp)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def describe_sizes(sizes) -> str:
    """`data=4 x fsdp=2 x tensor=1`: the axis sizes, `pipe` only where it pipelines (a
    mesh without pipeline stages reads as it did before the axis existed)."""
    return " x ".join(f"{k}={v}" for k, v in dict(sizes).items() if k != "pipe" or v != 1)
