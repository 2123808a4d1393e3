"""A CRC-32C checksum per saved array, verified after each restore.

Orbax's storage (TensorStore, OCDBT) checks its indexes but not the array bytes: a flipped
bit in an array file restores silently. So the Manager records the CRC-32C (the
`crc32c` package, hardware-accelerated where the CPU has the instruction) of every array's
bytes, in C order, in the step's JSON record, and compares after a restore. The bytes of
an array are the same whatever its sharding, so a checkpoint restored onto another mesh
verifies too. The CRC is taken on the host: free of copies for arrays on a CPU device, a
device-to-host copy otherwise (cost: benchmarks/checkpoint_io.py). Arrays this process
cannot see whole (multi-host shardings) are not checksummed.
"""

from __future__ import annotations

import crc32c
import jax
import numpy as np

from ..transforms.paths import path_str


def _crc(x) -> int | None:
    if isinstance(x, jax.Array):
        if not x.is_fully_addressable:
            return None
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
    host = np.ascontiguousarray(np.asarray(x)).reshape(-1)
    return crc32c.crc32c(host.view(np.uint8))


def checksums(tree) -> dict[str, int]:
    """`{path: CRC-32C}` for every array leaf of `tree` (blocks until they are computed)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = {path_str(kp): _crc(leaf) for kp, leaf in flat}
    return {p: c for p, c in sums.items() if c is not None}


def mismatched(saved: dict[str, int], tree) -> list[str]:
    """The paths of `tree` whose checksum differs from the recorded one (paths without a
    record are not checked)."""
    found = checksums(tree)
    return sorted(p for p, crc in found.items() if p in saved and saved[p] != crc)
