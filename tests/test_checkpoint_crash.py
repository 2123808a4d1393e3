"""Crash safety: SIGKILL a training process at random moments, mostly in the middle of an
async save (all 6 kills in one run, 8 of 10 in another), 6 times; each restart must
restore the newest complete step, bit for bit the state an uninterrupted run has at that
step, and the run must finish exactly."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from _multiprocess import xla_flags

KILLS = 6

CHILD = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jaxtrain import transforms
    from jaxtrain.checkpoint import Manager, model_signature
    from jaxtrain.train import TrainState, make_train_step

    directory, target, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 512))
    y = jax.random.normal(jax.random.PRNGKey(2), (64, 512))

    def loss_fn(model, batch, rng):
        return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}

    def initial():
        model = nnx.Linear(512, 512, rngs=nnx.Rngs(0))
        return TrainState.create(model, transforms.adam(1e-3), jax.random.PRNGKey(0))

    step_fn = jax.jit(make_train_step(loss_fn), donate_argnums=0)
    batch = {"x": x, "y": y}
    state = initial()
    sig = model_signature({"name": "linear"}, state.params)
    mngr = Manager(directory, max_to_keep=3)
    if mngr.steps():
        state = mngr.restore(state, sig)
        ref = initial()
        for _ in range(int(state.step)):
            ref, _ = step_fn(ref, batch)
        same = all(np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(state.saveable()), jax.tree.leaves(ref.saveable())))
        print("RESTORED", int(state.step), "OK" if same else "DIFFERENT", flush=True)
    print("READY", flush=True)
    while int(state.step) < target:
        state, metrics = step_fn(state, batch)
        if int(state.step) % every == 0:
            mngr.save(int(state.step), state, sig, metrics=metrics)
            print("SAVING", int(state.step), flush=True)
    mngr.close()
    print("DONE", int(state.step), float(metrics["loss"]), flush=True)
""")


def _complete_steps(directory):
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _start(script, directory, target, every):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
    return subprocess.Popen([sys.executable, str(script), str(directory), str(target),
                             str(every)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)


def _lines_until_ready(proc):
    lines = []
    for line in proc.stdout:
        lines.append(line.split())
        if line.startswith("READY"):
            return lines
    raise AssertionError(f"child exited early with {proc.wait()}: {lines}")


@pytest.mark.slow
def test_sigkill_at_random_moments_always_resumes_from_last_complete_step(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    directory = tmp_path / "ck"
    rng = random.Random(0)
    target, every = 100_000, 5
    expected_restore = None
    restored_steps, kills_during_save = [], 0
    for _ in range(KILLS):
        proc = _start(script, directory, target, every)
        lines = _lines_until_ready(proc)
        if expected_restore is None:
            assert not [w for w in lines if w[0] == "RESTORED"], lines
        else:
            assert ["RESTORED", str(expected_restore), "OK"] in lines, lines
            restored_steps.append(expected_restore)
        for _ in range(rng.randint(0, 3)):  # let a few saves start, then kill at random
            assert proc.stdout.readline().startswith("SAVING")
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills_during_save += any(".orbax-checkpoint-tmp" in p.name for p in directory.iterdir())
        complete = _complete_steps(directory) if directory.exists() else []
        expected_restore = complete[-1] if complete else None
    assert kills_during_save >= 3, "too few kills landed during a save to mean anything"
    assert restored_steps == sorted(restored_steps) and restored_steps[-1] > restored_steps[0]
    # finish the run: it resumes once more and ends at exactly the uninterrupted state
    final = expected_restore + 3 * every
    proc = _start(script, directory, final, every)
    lines = _lines_until_ready(proc) + [line.split() for line in proc.stdout]
    assert proc.wait() == 0
    assert ["RESTORED", str(expected_restore), "OK"] in lines
    assert lines[-1][:2] == ["DONE", str(final)]
    assert _complete_steps(directory)[-1] == final
    proc = _start(script, directory, final, every)  # the end state is itself restorable
    assert ["RESTORED", str(final), "OK"] in _lines_until_ready(proc)
    proc.kill()
    proc.wait()
