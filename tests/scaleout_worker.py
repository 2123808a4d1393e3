"""One process of the multi-process `jaxtrain train` tests (see test_scaleout.py).

    python scaleout_worker.py train ROWS_DIR CONFIG [key=value ...]   # launched N times
    python scaleout_worker.py restore CKPT_DIR OUT_NPZ                # launched N times

`train` runs `jaxtrain.cli.main(["train", ...])` unchanged, with the launcher's variables
as the test set them, and records in ROWS_DIR/rows-<process>.jsonl which rows of which
global batch every `Batches.share` call read and how many it got. With
SCALEOUT_SIGNALS=PROCESS:POSITION:SIGNAL[,...] (e.g. `1:6:SIGKILL,0:2:SIGTERM`) that process
sends itself that signal when it reads that position's batch (a process lost, or a
scheduler's stop, at a known point of the run). `restore` joins the
processes (explicit flags from the environment: SCALEOUT_COORDINATOR, ..._NUM, ..._ID),
restores the latest checkpoint's arrays sharded over all devices and, on process 0, writes
them gathered to OUT_NPZ. The device count per process comes from XLA_FLAGS.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback


def train(rows_dir: str, argv: list[str]) -> int:
    import jax

    from jaxtrain import cli
    from jaxtrain.train import feeds

    share = feeds.Batches.share
    plan = {}
    for item in filter(None, os.environ.get("SCALEOUT_SIGNALS", "").split(",")):
        process, position, name = item.split(":")
        plan[int(process), int(position)] = signal.Signals[name]

    def recorded(self, position, rows=slice(None)):
        if (jax.process_index(), position) in plan:
            os.kill(os.getpid(), plan[jax.process_index(), position])
        out = share(self, position, rows)
        size = len(next(iter(out.values())))
        with open(os.path.join(rows_dir, f"rows-{jax.process_index()}.jsonl"), "a") as f:
            f.write(json.dumps({"position": position, "start": rows.start, "stop": rows.stop,
                                "size": size}) + "\n")
        return out

    feeds.Batches.share = recorded
    return cli.main(["train", *argv])


def restore(ckpt_dir: str, out: str) -> int:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxtrain import sharding
    from jaxtrain.checkpoint import Manager

    env = os.environ
    sharding.start_from_env(env["SCALEOUT_COORDINATOR"], int(env["SCALEOUT_NUM"]),
                            int(env["SCALEOUT_ID"]), timeout=120)
    mesh = sharding.make_mesh(data=-1)
    n = mesh.shape["data"]

    def target(m):  # split the leading axis over all devices where it divides
        spec = PartitionSpec("data") if m.shape and m.shape[0] % n == 0 else PartitionSpec()
        return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=NamedSharding(mesh, spec))

    with Manager(ckpt_dir, read_only=True) as mngr:
        step = mngr.latest_step()
        tree = jax.tree.map(target, mngr._mngr.item_metadata(step)["state"].tree)
        restored = mngr._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree))))
    params = multihost_utils.process_allgather(restored["state"]["params"], tiled=True)
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(kp): np.asarray(x)
                for kp, x in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(out, **flat)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    try:
        mode, *rest = sys.argv[1:]
        code = train(rest[0], rest[1:]) if mode == "train" else restore(*rest)
    except BaseException:  # fail fast: JAX's exit hook would wait for the other processes
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.exit(code)
