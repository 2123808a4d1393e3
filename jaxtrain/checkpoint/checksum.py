"""Per-array checksums, computed on the devices where the arrays live.

Orbax's storage (TensorStore, OCDBT) checks its indexes but not the array bytes: a flipped
bit in an array file restores silently. So every saved array gets two 32-bit sums of its
bits as unsigned words, plain and position-weighted (a Fletcher-style pair, modulo 2**32),
kept in the step's JSON record and compared after a restore. Any single flipped bit
changes the plain sum; the weighted sum also catches words moved or swapped. Integer sums
are exact whatever the reduction order, so the same array gives the same pair on any mesh
or device count. The sums run jitted on the arrays' own devices, one pass over memory
(cost: benchmarks/checkpoint_io.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..transforms.paths import path_str

_WORDS = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _words(x) -> jax.Array:
    """The bits of `x` as uint32 words (8-byte items become two words)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = jax.lax.bitcast_convert_type(x, _WORDS[x.dtype.itemsize])
    return bits.astype(jnp.uint32)


def _pair(x) -> jax.Array:
    u = _words(x)
    index = jnp.zeros(u.shape, jnp.uint32)  # the flat position, without a reshape
    stride = 1
    for dim in reversed(range(u.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, dim) * np.uint32(
            stride % 2**32)
        stride *= u.shape[dim]
    return jnp.stack([jnp.sum(u, dtype=jnp.uint32),
                      jnp.sum(u * (index + np.uint32(1)), dtype=jnp.uint32)])


@jax.jit
def _pairs(leaves: list) -> list:
    return [_pair(x) for x in leaves]


def checksums(tree) -> dict[str, list[int]]:
    """`{path: [sum, weighted sum]}` for every array leaf of `tree` (blocks until the
    arrays are computed; reads back 8 bytes per array)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [path_str(kp) for kp, _ in flat]
    pairs = jax.device_get(_pairs([leaf for _, leaf in flat]))
    return {p: [int(a), int(b)] for p, (a, b) in zip(paths, pairs, strict=True)}


def mismatched(saved: dict[str, list[int]], tree) -> list[str]:
    """The paths of `tree` whose checksum differs from the recorded one (paths without a
    record, from checkpoints written before checksums, are not checked)."""
    found = checksums(tree)
    return sorted(p for p, pair in found.items() if p in saved and list(saved[p]) != pair)
