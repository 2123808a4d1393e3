"""One process of the 2-process x 4-CPU-device records test (test_data_records_hosts.py).

    python records_multihost_worker.py PROCESS_ID PORT RECORDS OUT_DIR

Joins the runtime through `sharding.initialize`, trains the digits CNN on the prepared
image records with the Trainer on the 8 global devices, saving checkpoints at steps 3
and 6 into OUT_DIR/checkpoints, and writes the batches this process's Grain loader reads
(`rows-PID.npz`); process 0 writes the losses (`losses.json`) and the gathered params
(`params.npz`). A failure ends the process at once (`os._exit`) so that the launcher ends
the other one too.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import jax

STEPS, BATCH = 6, 32


def train(records: str, mesh=None, checkpoints=None, data=None):
    """The run both sides make: CNN, Adam, 6 steps of 32 on the records, seed 0; with a
    checkpoint every 3 steps into `checkpoints` (resumed from its latest step) if given;
    `data` instead of the records' train split if given."""
    from jaxtrain import transforms
    from jaxtrain.checkpoint import CheckpointConfig
    from jaxtrain.data.records import load_records
    from jaxtrain.models import registry
    from jaxtrain.train import (
        LoggingConfig,
        TrainConfig,
        Trainer,
        TrainerConfig,
        TrainState,
        classification_loss,
    )

    data, train_data = load_records(records), data
    model = registry.build("cnn", 0, num_classes=10, channels=4, features=16)
    state = TrainState.create(model, transforms.adam(3e-3), jax.random.PRNGKey(0))
    config = TrainerConfig(train=TrainConfig(batch_size=BATCH, log_every=1), seed=0,
                           logging=LoggingConfig(progress=False), handle_signals=False,
                           checkpoint=CheckpointConfig(dir=checkpoints, every=3,
                                                       async_=False))
    trainer = Trainer(state, classification_loss, config, mesh=mesh)
    final = trainer.fit(train_data or data["train"], STEPS)
    return final, [values["loss"] for _, values in trainer.history], data


def main(argv: list[str]) -> None:
    process_id, port, records, out = int(argv[0]), int(argv[1]), argv[2], Path(argv[3])
    jax.config.update("jax_num_cpu_devices", 4)

    from jaxtrain import sharding

    sharding.initialize(f"127.0.0.1:{port}", 2, process_id, timeout=60)
    import numpy as np
    from jax.experimental import multihost_utils

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    state, losses, data = train(records, checkpoints=str(out / "checkpoints"))
    loader = data["train"].loader(BATCH, 0)
    rows = [loader(s)["image"] for s in range(STEPS)]
    np.savez(out / f"rows-{process_id}.npz", *rows)
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0:
        (out / "losses.json").write_text(json.dumps(losses))
        flat = {jax.tree_util.keystr(kp): np.asarray(x)
                for kp, x in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(out / "params.npz", **flat)
    jax.distributed.shutdown()
    print(f"worker {process_id} done")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
