"""The demo: pretrain a CNN on digits 0-4, fine-tune it on 5-9, compare with scratch.

Every stage goes through the library's layers: a jaxtrain transform chain, a step
compiled by `jaxtrain.sharding` over all visible devices (data parallel), an Orbax
checkpoint, and `jaxtrain.finetune` to load the backbone into a model with a new head.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import jax
import optax
from flax import nnx

from . import sharding, transforms
from .checkpoint import Manager, check_same_model, model_signature
from .data import batch_at, digits_split
from .errors import JaxtrainError
from .finetune import load_pretrained
from .models import CNN
from .train import (
    JsonlLogger,
    TrainState,
    classification_loss,
    classification_metrics,
    evaluate,
    fit,
    make_eval_step,
    make_train_step,
    plot_curves,
)

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)
BATCH_SIZE = 64
LEARNING_RATE = 3e-3


def check_output_folder(out: Path) -> None:
    """The folder must be creatable and writable; test it before any work is done."""
    if out.exists() and not out.is_dir():
        raise JaxtrainError(f"output folder {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise JaxtrainError(f"output folder {out} cannot be written: {err.strerror}") from None


def new_model(seed: int) -> CNN:
    with nnx.use_eager_sharding(False):
        return CNN(num_classes=len(FINETUNE_CLASSES), rngs=nnx.Rngs(seed))


class Stage:
    """Train one model on one data set with a mesh, a logger and a step budget."""

    def __init__(self, mesh, logger, progress: bool):
        self.mesh, self.logger, self.progress = mesh, logger, progress
        self.curves: dict[str, list[tuple[int, float]]] = {}

    def run(self, name: str, state: TrainState, train: dict, test: dict, steps: int,
            seed: int):
        shardings = jax.tree.map(lambda _: sharding.replicated(self.mesh), state)
        state = sharding.place(state, shardings)
        step_fn = sharding.compile_step(make_train_step(classification_loss), self.mesh,
                                        shardings)
        eval_fn = sharding.compile_eval(make_eval_step(classification_metrics), self.mesh,
                                        shardings)
        state = state.replace(step=jax.numpy.zeros((), jax.numpy.int32))
        state, history = fit(
            state, step_fn, lambda s: batch_at(train, BATCH_SIZE, seed, s), steps, self.mesh,
            logger=self.logger, run=name, progress=self.progress,
        )
        self.curves[name] = [(s, m["loss"]) for s, m in history]
        return state, evaluate(eval_fn, state, test, self.mesh)


def run_demo(out: str | Path = "demo_out", seed: int = 0, steps: int = 300, devices=None,
             progress: bool = True) -> dict:
    """Run the four trainings and return held-out accuracies by stage name.

    Writes `pretrain/` (Orbax checkpoint), `log.jsonl`, `curves.png` and
    `results.json` into `out`.
    """
    if not isinstance(steps, int) or steps <= 0:
        raise JaxtrainError(f"steps must be a positive integer, got {steps!r}")
    out = Path(out)
    check_output_folder(out)
    ckpt_dir = out / "pretrain"
    template = new_model(seed)
    signature = model_signature(template.config, nnx.to_pure_dict(nnx.state(template, nnx.Param)))
    for folder in (out, ckpt_dir):
        check_same_model(folder, signature)

    mesh = sharding.make_mesh(data=-1, devices=devices)
    pre_train, pre_test = digits_split(PRETRAIN_CLASSES, seed=seed)
    ft_train, ft_test = digits_split(FINETUNE_CLASSES, seed=seed)
    logger = JsonlLogger(out / "log.jsonl")
    stage = Stage(mesh, logger, progress)
    key = jax.random.PRNGKey(seed)
    adam = transforms.adam(LEARNING_RATE)
    results = {}

    # 1. Pretrain on 0-4 and save the checkpoint.
    state = TrainState.create(new_model(seed), adam, jax.random.fold_in(key, 1))
    state, metrics = stage.run("pretrain", state, pre_train, pre_test, steps, seed)
    results["pretrain (0-4)"] = metrics["accuracy"]
    mngr = Manager(ckpt_dir, max_to_keep=1)
    if steps in mngr.steps():  # an earlier demo run of this same model: replace it
        mngr.delete(steps)
    mngr.save(steps, state, signature, metrics=metrics, config={"demo": "pretrain"})
    mngr.wait()
    mngr.close()

    # 2. Frozen fine-tune: pretrained backbone, fresh head; only the head learns.
    fresh = new_model(seed + 1)
    params, report = load_pretrained(
        nnx.to_pure_dict(nnx.state(fresh, nnx.Param)), ckpt_dir, exclude=["head/*"]
    )
    nnx.update(fresh, params)
    frozen_tx = optax.chain(adam, transforms.freeze("backbone/*"))
    state = TrainState.create(fresh, frozen_tx, jax.random.fold_in(key, 2))
    state, metrics = stage.run("frozen fine-tune", state, ft_train, ft_test, steps, seed)
    results["frozen fine-tune (5-9)"] = metrics["accuracy"]

    # 3. Full fine-tune from there: the backbone at a tenth of the head's learning rate.
    full_tx = transforms.per_group(
        {"backbone/*": transforms.adam(LEARNING_RATE / 10)}, default=adam
    )
    state = TrainState.create(state.model(), full_tx, jax.random.fold_in(key, 3))
    state, metrics = stage.run("full fine-tune", state, ft_train, ft_test, steps, seed)
    results["full fine-tune (5-9)"] = metrics["accuracy"]

    # 4. The same model from scratch with the fine-tune's whole budget (frozen + full).
    state = TrainState.create(new_model(seed + 1), adam, jax.random.fold_in(key, 4))
    state, metrics = stage.run("scratch", state, ft_train, ft_test, 2 * steps, seed)
    results["scratch (5-9)"] = metrics["accuracy"]

    logger.close()
    plot_curves(stage.curves, out / "curves.png", title="jaxtrain demo: training loss")
    summary = {
        "accuracy": results,
        "steps": steps,
        "seed": seed,
        "devices": len(mesh.devices.flat),
        "finetune_load": report.summary(),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_table(summary: dict) -> str:
    """The held-out accuracies as a small text table."""
    rows = summary["accuracy"]
    width = max(len(k) for k in rows)
    lines = [f"{'stage':<{width}}  held-out accuracy", f"{'-' * width}  -----------------"]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in rows.items()]
    return os.linesep.join(lines)
