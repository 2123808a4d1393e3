"""The largest batch whose compiled train step fits the device memory.

Each candidate is compiled, not run: XLA's memory analysis of the compiled step gives its
peak (arguments + outputs + temporaries, less what donation aliases), so no trial can
run out of memory. Keep a larger effective batch with `transforms.accumulate(k)` or the
step's `microbatches=k`: k steps (or micro-steps) of the found batch, one update.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ..errors import JaxtrainError


@dataclasses.dataclass
class BatchSizeResult:
    batch_size: int
    peak_bytes: int  # of the chosen batch
    limit_bytes: int
    tried: dict[int, int]  # batch size -> peak bytes (compiled), in the order tried
    limited: bool = True  # False: every size up to the search cap fit (no limit found)

    def table(self) -> str:
        lines = ["batch size  peak memory   fits"]
        for b, peak in sorted(self.tried.items()):
            fits = "yes" if peak <= self.limit_bytes else "no"
            lines.append(f"{b:>10}  {peak / 2**20:>8.1f} MiB  {fits}")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: the largest batch that fits, or that no limit was found."""
        of = f"{self.peak_bytes / 2**20:.1f} MiB per device of {self.limit_bytes / 2**20:.0f} MiB"
        if not self.limited:
            return (f"no memory limit found up to batch size {self.batch_size} ({of}): memory "
                    "does not bound the batch here")
        return (f"largest batch that fits: {self.batch_size} ({of}); keep a larger effective "
                "batch with optimizer accumulate: k")


def device_memory_limit(device=None) -> int:
    """Bytes the device may use: the allocator's limit on GPU/TPU, the free RAM on CPU."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    import psutil

    return int(psutil.virtual_memory().available)


def _abstract(tree, sharding=None):
    """ShapeDtypeStructs of `tree`'s leaves, placed by `sharding` (a tree of shardings like
    `tree`, or one sharding for every leaf, or None)."""
    struct = lambda x, s=None: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x),
                                                    sharding=s)
    if sharding is None:
        return jax.tree.map(struct, tree)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: struct(x, sharding), tree)
    return jax.tree.map(struct, tree, sharding)


def compiled_peak_bytes(step_fn, state, batch_for, batch_size: int, donate: bool = True,
                        shardings=None) -> int:
    """Peak bytes per device of `step_fn(state, batch_for(batch_size))`, compiled, not run;
    `shardings`: (state shardings, batch sharding) to compile it as placed on a mesh."""
    state_sh, batch_sh = shardings or (None, None)
    jitted = jax.jit(step_fn, donate_argnums=(0,) if donate else ())
    lowered = jitted.lower(_abstract(state, state_sh), _abstract(batch_for(batch_size),
                                                                  batch_sh))
    analysis = lowered.compile().memory_analysis()
    if analysis is None:
        raise JaxtrainError("this backend gives no memory analysis of compiled code")
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
               + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def find_batch_size(step_fn, state, batch_for, limit_bytes: int | None = None,
                    start: int = 1, max_batch: int = 2**20, multiple_of: int = 1,
                    headroom: float = 0.9, shardings=None) -> BatchSizeResult:
    """The largest multiple of `multiple_of` (the data-parallel ways) up to `max_batch`
    whose compiled step fits in `headroom` x the limit. Peak memory grows nearly linearly
    with the batch, so after compiling `start` and twice it each next size is read off the
    line through the two nearest sizes tried (growing 2-8x until a size fails, then
    regula falsi with the Illinois rule): about 5 compiles where doubling then bisecting
    took 10-20. When even
    `max_batch` fits, the result says so (`limited=False`): its batch size is the search
    cap, not a limit.

    `batch_for(n)` gives a batch of `n` examples (arrays or ShapeDtypeStructs);
    `shardings` as `compiled_peak_bytes`.
    """
    if multiple_of < 1 or start < 1 or max_batch < start:
        raise JaxtrainError(f"need 1 <= start <= max_batch and multiple_of >= 1, got start="
                            f"{start}, max_batch={max_batch}, multiple_of={multiple_of}")
    limit = int(headroom * (limit_bytes or device_memory_limit()))
    tried: dict[int, int] = {}

    def fits(b: int) -> bool:
        if b not in tried:
            tried[b] = compiled_peak_bytes(step_fn, state, batch_for, b,
                                           shardings=shardings)
        return tried[b] <= limit

    m = multiple_of
    cap = max_batch // m * m
    first = -(-start // m) * m
    if first > cap:
        raise JaxtrainError(f"no multiple of {m} lies between start={start} and "
                            f"max_batch={max_batch}")
    if not fits(first):
        raise JaxtrainError(f"even batch size {first} needs {tried[first]} bytes, over the "
                            f"limit of {limit} bytes")
    good, bad, prev = first, None, None
    over = {}  # bytes over the limit at `good` and `bad`, for the line between them
    last = None  # which end moved last (the Illinois rule halves an end left twice)
    while (high := cap + m if bad is None else bad) - good > m:
        if bad is None:  # extrapolate the line through the last two fitting sizes, 2-8 x
            b = 2 * good
            if prev is not None:
                slope = (tried[good] - tried[prev]) / (good - prev)
                b = 8 * good if slope <= 0 else good + (limit - tried[good]) / slope
                b = min(max(b, 2 * good), 8 * good)
        else:  # interpolate between the fitting `good` and the failing `bad`
            g, h = over.get(good, tried[good] - limit), over.get(bad, tried[bad] - limit)
            b = good + (bad - good) * -g / (h - g)
        b = min(max(int(b) // m * m, good + m), high - m)
        moved = "good" if fits(b) else "bad"
        if moved == last:  # the other end stayed twice: halve its weight (Illinois)
            stay = bad if moved == "good" else good
            if stay is not None:
                over[stay] = over.get(stay, tried[stay] - limit) / 2
        if moved == "good":
            prev, good = good, b
        else:
            bad = b
        last = moved
    return BatchSizeResult(good, tried[good], limit, tried, limited=bad is not None)
