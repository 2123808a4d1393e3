"""Checkpoint I/O: `jaxtrain.checkpoint.Manager` save / restore of ~500 MB of state against
a plain write / read of the same bytes on the same disk, and how long an async save holds
the training step.

Each round, alternating: Manager save (sync, until on disk) vs writing every array's raw
bytes to a file; Manager restore (onto the same shardings) vs reading the files back onto
the device; then an async save: the time `save()` blocks the caller, the time until the
write is done, and the time of a jitted step run right after `save()` returns against the
same step with no save in flight; and the per-array checksums the Manager computes at each
save and verifies at each restore, timed alone (their share of save and restore is the
integrity check's cost). Prints one JSON line per measurement, then a table of medians and
median ratios.

    python benchmarks/checkpoint_io.py [--mb 500] [--rounds 3] [--dir FOLDER]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


class State:
    """The smallest thing `Manager` saves: `saveable()` / `with_saved()` over a dict."""

    def __init__(self, arrays):
        self.arrays = arrays

    def saveable(self):
        return self.arrays

    def with_saved(self, saved):
        return State(saved)


def make_arrays(megabytes: int, leaves: int = 8) -> dict:
    n = megabytes * 2**20 // 4 // leaves
    keys = jax.random.split(jax.random.PRNGKey(0), leaves)
    return {f"layer_{i}": {"kernel": jax.random.normal(k, (n,), jnp.float32)}
            for i, k in enumerate(keys)}


def plain_write(arrays: dict, folder: Path) -> None:
    folder.mkdir(parents=True)
    for name, leaf in arrays.items():
        np.asarray(leaf["kernel"]).tofile(folder / name)


def plain_read(like: dict, folder: Path) -> dict:
    out = {}
    for name, leaf in like.items():
        host = np.fromfile(folder / name, dtype=np.float32)
        out[name] = {"kernel": jax.device_put(host, leaf["kernel"].sharding)}
    jax.block_until_ready(out)
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def one_round(arrays: dict, root: Path, r: int, sig: dict) -> dict:
    from jaxtrain.checkpoint import Manager

    nbytes = sum(x.nbytes for x in jax.tree.leaves(arrays))
    out = {"bytes": nbytes}
    with Manager(root / f"sync{r}", async_save=False) as mngr:
        out["save_s"], _ = timed(lambda: (mngr.save(1, State(arrays), sig), mngr.wait()))
        out["restore_s"], restored = timed(
            lambda: jax.block_until_ready(mngr.restore(State(arrays), sig).arrays))
    np.testing.assert_array_equal(restored["layer_0"]["kernel"], arrays["layer_0"]["kernel"])
    from jaxtrain.checkpoint.checksum import checksums

    checksums(arrays)  # compiled
    out["checksum_s"], _ = timed(lambda: checksums(arrays))
    out["plain_write_s"], _ = timed(lambda: plain_write(arrays, root / f"plain{r}"))
    out["plain_read_s"], _ = timed(lambda: plain_read(arrays, root / f"plain{r}"))

    step = jax.jit(lambda t: jax.tree.map(lambda x: x * 1.0001 + 1e-4, t))
    jax.block_until_ready(step(arrays))  # compiled
    out["step_alone_s"], _ = timed(lambda: jax.block_until_ready(step(arrays)))
    with Manager(root / f"async{r}", async_save=True) as mngr:
        start = time.perf_counter()
        mngr.save(1, State(arrays), sig)
        out["async_blocked_s"] = mngr.last_save_seconds
        out["step_during_save_s"], _ = timed(lambda: jax.block_until_ready(step(arrays)))
        mngr.wait()
        out["async_total_s"] = time.perf_counter() - start
    for name in (f"sync{r}", f"plain{r}", f"async{r}"):
        shutil.rmtree(root / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500, help="state size in MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="folder on the disk to measure "
                        "(default: a new temporary folder)")
    args = parser.parse_args()
    from jaxtrain.checkpoint import model_signature

    arrays = make_arrays(args.mb)
    sig = model_signature({"name": "bench"}, arrays)
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="ckpt-io-"))
    rounds = []
    try:
        for r in range(args.rounds):
            result = one_round(arrays, root, r, sig)
            print(json.dumps({"round": r, **result}), flush=True)
            rounds.append(result)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def med(key):
        return statistics.median(x[key] for x in rounds)

    def ratio(a, b):
        return statistics.median(x[a] / x[b] for x in rounds)

    gb = rounds[0]["bytes"] / 1e9
    rows = [
        ("save (Manager, sync, to disk)", med("save_s"), gb / med("save_s"),
         ratio("save_s", "plain_write_s")),
        ("plain write of the same bytes", med("plain_write_s"), gb / med("plain_write_s"), 1.0),
        ("restore (Manager, onto shardings)", med("restore_s"), gb / med("restore_s"),
         ratio("restore_s", "plain_read_s")),
        ("plain read of the same bytes", med("plain_read_s"), gb / med("plain_read_s"), 1.0),
    ]
    summary = {"summary": True, "bytes": rounds[0]["bytes"],
               **{k: med(k) for k in rounds[0] if k != "bytes"},
               "save_over_plain": ratio("save_s", "plain_write_s"),
               "restore_over_plain": ratio("restore_s", "plain_read_s"),
               "checksum_share_of_save": ratio("checksum_s", "save_s"),
               "checksum_share_of_restore": ratio("checksum_s", "restore_s")}
    print(json.dumps(summary))
    print(f"\n{rounds[0]['bytes'] / 2**20:.0f} MiB, {len(rounds)} rounds, medians")
    print(f"{'':36} {'seconds':>8} {'GB/s':>6} {'vs plain':>8}")
    for name, secs, rate, rel in rows:
        print(f"{name:36} {secs:8.3f} {rate:6.2f} {rel:8.2f}")
    print(f"async save: save() blocks {med('async_blocked_s'):.3f} s, done after "
          f"{med('async_total_s'):.3f} s; a step takes {med('step_alone_s'):.3f} s alone, "
          f"{med('step_during_save_s'):.3f} s while the save is written")
    print(f"checksums: {med('checksum_s'):.3f} s, {summary['checksum_share_of_save']:.1%} of a "
          f"save, {summary['checksum_share_of_restore']:.1%} of a restore (each computes them "
          "once)")


if __name__ == "__main__":
    main()
