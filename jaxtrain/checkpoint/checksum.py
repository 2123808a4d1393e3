"""A CRC-32C checksum per saved array (per region of arrays split across processes),
verified after each restore.

Orbax's storage (TensorStore, OCDBT) checks its indexes but not the array bytes: a flipped
bit in an array file restores silently. So the Manager records the CRC-32C (the
`crc32c` package, hardware-accelerated where the CPU has the instruction) of every array's
bytes, in C order, in the step's JSON record, and compares after a restore. The bytes of
an array are the same whatever its sharding, so a checkpoint restored onto another mesh
verifies too. The CRC is taken on the host: free of copies for arrays on a CPU device, a
device-to-host copy otherwise (cost: benchmarks/checkpoint_io.py).

An array split across processes (no process sees it whole) is checksummed per region:
each shard's first replica by the process holding it, recorded as `path[0:4,0:8]` and
gathered to every process, so the record holds them all. A restore checks each region
wherever one process sees it whole (all of them when restored onto one process), and on
several processes all agree on the outcome. A whole-array checksum (saved by one process)
cannot be checked against an array restored split across processes: that one is skipped.
"""

from __future__ import annotations

import json

import crc32c
import jax
import numpy as np
from jax.experimental import multihost_utils

from ..transforms.paths import path_str


def _host(x) -> np.ndarray:
    """The bytes of an array this process sees whole, as a C-ordered host array."""
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if not x.is_fully_addressable:  # replicated across processes: any copy is whole
            x = x.addressable_data(0)
    return np.asarray(x)


def _crc(host: np.ndarray) -> int:
    return crc32c.crc32c(np.ascontiguousarray(host).reshape(-1).view(np.uint8))


def _split(x) -> bool:
    """Whether no process sees all of `x` (split across processes)."""
    return (isinstance(x, jax.Array) and not x.is_fully_addressable
            and not x.is_fully_replicated)


def _region(index: tuple, shape: tuple) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


def _region_key(path: str, region: tuple[slice, ...]) -> str:
    return f"{path}[{','.join(f'{s.start}:{s.stop}' for s in region)}]"


def _parse_region(text: str) -> tuple[slice, ...]:
    if not text:
        return ()
    return tuple(slice(*map(int, part.split(":"))) for part in text.split(","))


def _gathered(found: dict, leaves: list) -> dict:
    """`found` of every process, merged, where some of `leaves` is split across processes
    (then collective: every process calls it, as they all save and restore such arrays);
    else `found` (arrays seen whole, e.g. restored onto one process's device)."""
    if not any(_split(x) for x in leaves):
        return found
    raw = np.frombuffer(json.dumps(found).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size], np.int32)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    every = multihost_utils.process_allgather(padded)
    merged = {}
    for row, size in zip(np.asarray(every).reshape(len(sizes), -1), sizes, strict=True):
        merged.update(json.loads(bytes(row[:size]).decode()))
    return merged


def checksums(tree) -> dict[str, int]:
    """`{path: CRC-32C}` for every array leaf of `tree`, `{path[region]: CRC-32C}` per
    shard of those split across processes (blocks until they are computed; collective
    on several processes)."""
    whole, regions = {}, {}
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for kp, leaf in flat:
        path = path_str(kp)
        if not _split(leaf):
            whole[path] = _crc(_host(leaf))
            continue
        for shard in leaf.addressable_shards:
            if shard.replica_id == 0:
                region = _region(shard.index, leaf.shape)
                regions[_region_key(path, region)] = _crc(_host(shard.data))
    return {**whole, **_gathered(regions, [leaf for _, leaf in flat])}


def _contains(outer: tuple[slice, ...], inner: tuple[slice, ...]) -> bool:
    return all(o.start <= i.start and i.stop <= o.stop for o, i in zip(outer, inner,
                                                                         strict=True))


def _region_crc(leaf, region: tuple[slice, ...]) -> int | None:
    """The CRC of `leaf[region]` if this process holds it within one shard, else None."""
    if not _split(leaf):
        return _crc(_host(leaf)[region])
    for shard in leaf.addressable_shards:
        held = _region(shard.index, leaf.shape)
        if _contains(held, region):
            local = tuple(slice(r.start - h.start, r.stop - h.start)
                          for r, h in zip(region, held, strict=True))
            return _crc(_host(shard.data)[local])
    return None


def mismatched(saved: dict[str, int], tree) -> list[str]:
    """The paths (and regions) of `tree` whose checksum differs from the recorded one;
    what has no record, or what no process sees whole, is not checked. Collective on
    several processes: each checks what it holds, and all return the same list."""
    regions: dict[str, list[str]] = {}
    for key in saved:
        if key.endswith("]"):
            regions.setdefault(key.rpartition("[")[0], []).append(key)
    bad = {}
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for kp, leaf in flat:
        path = path_str(kp)
        if path in saved and not _split(leaf) and _crc(_host(leaf)) != saved[path]:
            bad[path] = 1
        for key in regions.get(path, ()):
            crc = _region_crc(leaf, _parse_region(key[len(path) + 1:-1]))
            if crc is not None and crc != saved[key]:
                bad[key] = 1
    return sorted(_gathered(bad, [leaf for _, leaf in flat]))
