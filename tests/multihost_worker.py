"""One process of the 2-process x 4-CPU-device test (see test_sharding_multihost.py).

    python multihost_worker.py PROCESS_ID PORT OUT_DIR [--fail-at STEP]

Joins the runtime through `sharding.initialize`, trains the digits CNN with the `fsdp`
preset on the 8 global devices for 20 steps (each process feeding only its rows of every
batch), saves an Orbax checkpoint from both processes, and, on process 0 only, writes
`log.jsonl` (the losses) and `params.npz` (the gathered params). Then checksums across
processes (`checksummed`): a jaxtrain `Manager` checkpoint restores verified, a copy is
kept intact, and after a flipped bit in one process's array file both processes refuse
it. A failure ends the process at once (`os._exit`), so the launcher sees it and ends the other one.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import jax

STEPS = 20
MESH = dict(data=2, fsdp=4)


def main(argv: list[str]) -> None:
    process_id, port, out = int(argv[0]), int(argv[1]), Path(argv[2])
    fail_at = int(argv[argv.index("--fail-at") + 1]) if "--fail-at" in argv else None
    jax.config.update("jax_num_cpu_devices", 4)

    from jaxtrain import sharding

    sharding.initialize(f"127.0.0.1:{port}", 2, process_id, timeout=60)
    import numpy as np
    import orbax.checkpoint as ocp
    from _sharding_models import train
    from jax.experimental import multihost_utils

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    if fail_at is not None and process_id == 1:
        train("cnn", "fsdp", MESH, steps=fail_at)
        raise SystemExit(f"process 1 fails on purpose after {fail_at} steps")
    state, losses, _ = train("cnn", "fsdp", MESH, steps=STEPS)

    saved = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "ckpt", saved)
        ckptr.wait_until_finished()
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0:
        with open(out / "log.jsonl", "w") as f:
            for step, loss in enumerate(losses, 1):
                f.write(json.dumps({"step": step, "loss": loss, "process": process_id}) + "\n")
        flat = {jax.tree_util.keystr(kp): np.asarray(x)
                for kp, x in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(out / "params.npz", **flat)
    checksummed(state, out)
    jax.distributed.shutdown()
    print(f"worker {process_id} done")


class Arrays:
    """The saved part of a state, for `Manager` (which saves `saveable()`)."""

    def __init__(self, arrays):
        self.arrays = arrays

    def saveable(self):
        return self.arrays

    def with_saved(self, arrays):
        return Arrays(arrays)


def arrays_on_disk(item: Path) -> dict:
    """Every array of an Orbax item folder (OCDBT, zarr), read straight through TensorStore."""
    import tensorstore as ts

    base = f"file://{item}/"
    keys = ts.KvStore.open({"driver": "ocdbt", "base": base}).result().list().result()
    names = [k.decode().removesuffix("/.zarray") for k in keys if k.endswith(b"/.zarray")]
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base}}
    return {n: ts.open({**spec, "kvstore": {**spec["kvstore"], "path": n}}, open=True)
            .result().read().result() for n in names}


def flip_a_bit_that_decodes(file: Path, item: Path) -> None:
    """Flip bits in one byte of `file`, from its middle on, at the first byte where every
    array still decodes but one reads differently: silent damage, which only the
    checksums can catch (a flip in compressed data can also break decoding, which
    TensorStore reports itself, or land where nothing reads it)."""
    import numpy as np

    before, data = arrays_on_disk(item), file.read_bytes()
    for at in range(len(data) // 2, len(data)):
        damaged = bytearray(data)
        damaged[at] ^= 0b1001
        file.write_bytes(bytes(damaged))
        try:
            after = arrays_on_disk(item)
        except ValueError:  # no longer decodes
            continue
        if any(not np.array_equal(before[n], after[n]) for n in before):
            return
    raise AssertionError(f"no flipped byte in the second half of {file} decodes differently")


def checksummed(state, out: Path) -> None:
    """Save with `Manager` (arrays split across the processes: checksummed per region),
    restore it verified, keep an intact copy (`intact/`), flip bits in process 1's
    largest array file (silently: the arrays still decode), and record in
    `checksums-<process>.json` what each saw."""
    import shutil

    from jax.experimental import multihost_utils

    from jaxtrain.checkpoint import Manager
    from jaxtrain.errors import JaxtrainError

    arrays = Arrays({"params": state.params, "opt_state": state.opt_state})
    with Manager(out / "managed") as mngr:
        mngr.save(STEPS, arrays, {})
        mngr.wait()
        regions = [k for k in mngr.meta(STEPS)["checksums"] if k.endswith("]")]
        restored = mngr.restore(arrays, step=STEPS).arrays  # verified, or it raises
    same = all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(restored),
                                                    jax.tree.leaves(arrays.arrays),
                                                    strict=True))
    multihost_utils.sync_global_devices("restored")
    if jax.process_index() == 0:
        shutil.copytree(out / "managed", out / "intact")
        files = [p for p in (out / "managed" / str(STEPS) / "state").rglob("*")
                 if p.is_file() and "ocdbt.process_1" in str(p) and "/d/" in str(p)]
        flip_a_bit_that_decodes(max(files, key=lambda p: p.stat().st_size),
                                out / "managed" / str(STEPS) / "state")
    multihost_utils.sync_global_devices("damaged")
    try:
        with Manager(out / "managed", read_only=True) as mngr:
            mngr.restore(arrays, step=STEPS)
        damaged = None
    except JaxtrainError as err:
        damaged = str(err)
    record = {"regions": len(regions), "restored_equal": same, "damaged": damaged}
    (out / f"checksums-{jax.process_index()}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BaseException:  # fail fast: JAX's exit hooks would wait for the other process
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
