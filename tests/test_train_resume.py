"""Exact resume across processes: 60 steps straight == 30 steps checkpointed, SIGKILL
during the next step, then `fit` on the same folder for the rest; final params bitwise
equal."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

CHILD = textwrap.dedent("""
    import os, signal, sys
    import jax, numpy as np, optax
    from flax import nnx
    from jaxtrain import transforms
    from jaxtrain.checkpoint import CheckpointConfig
    from jaxtrain.train import (Callback, LoggingConfig, TrainConfig, Trainer, TrainerConfig,
                                TrainState, classification_loss)

    folder, kill_at, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(8, 16, rngs=rngs)
            self.l2 = nnx.Linear(16, 3, rngs=rngs)
        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    class KillAfterCheckpoint(Callback):
        # the checkpointer is the last callback: the step after kill_at's is the first at
        # which kill_at's checkpoint has been saved
        def on_step_end(self, trainer, before, step, state):
            if before == kill_at:
                trainer.checkpointer.manager.wait()  # the checkpoint of kill_at is on disk
                os.kill(os.getpid(), signal.SIGKILL)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    data = {"image": x, "label": x[:, :3].argmax(1).astype(np.int32)}
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.02, 10, 60)
    state = TrainState.create(Net(nnx.Rngs(0)), transforms.adam(schedule),
                              jax.random.PRNGKey(0), ema_decay=0.9)
    config = TrainerConfig(train=TrainConfig(batch_size=32), seed=5,
                           logging=LoggingConfig(progress=False),
                           checkpoint=CheckpointConfig(dir=folder, every=10))
    trainer = Trainer(state, classification_loss, config, callbacks=[KillAfterCheckpoint()])
    final = trainer.fit(data, 60)
    print("started at", trainer.start_step)
    np.savez(out, *[np.asarray(p) for p in jax.tree.leaves((final.params, final.ema_params,
                                                            final.opt_state))])
""")


def _run(tmp_path, folder, kill_at, out):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.run([sys.executable, str(script), str(folder), str(kill_at), str(out)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_is_bitwise_equal(tmp_path):
    straight = _run(tmp_path, tmp_path / "a", -1, tmp_path / "a.npz")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _run(tmp_path, tmp_path / "b", 30, tmp_path / "unused.npz")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "unused.npz").exists()
    assert sorted(int(p.name) for p in (tmp_path / "b").iterdir() if p.name.isdigit()) == [
        10, 20, 30]
    resumed = _run(tmp_path, tmp_path / "b", -1, tmp_path / "b.npz")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "started at 30" in resumed.stdout and "started at 0" in straight.stdout
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert len(a.files) == len(b.files) > 4
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
