"""Knowledge distillation (Hinton et al. 2015): a student learns from a frozen teacher.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * cross_entropy(student, labels)

The T^2 keeps the soft term's gradients on the scale of the hard term's as T grows.
The teacher's params come from a checkpoint and are closed over as constants (no
gradient flows into them). `teacher_from_checkpoint` rebuilds the teacher from the model
config recorded in the checkpoint; `with_transfer_set` adds unlabelled inputs (a transfer
set, and/or the training examples whose labels are hidden) that learn from the teacher
alone.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..checkpoint import Manager, flat_by_path, saved_params
from ..errors import JaxtrainError
from ..transforms.paths import path_str


def distillation_loss(student_logits, teacher_logits, labels, temperature: float = 4.0,
                      alpha: float = 0.9, labelled=None):
    """Mean over the batch of the loss above; `labels` are integers.

    `labelled` (optional, 1 or 0 per example) marks which labels exist: the hard term is
    averaged over the labelled examples only, the soft term over all (the teacher labels
    the rest: a transfer set of unlabelled inputs, as Hinton et al. use)."""
    soft_teacher = jax.nn.softmax(teacher_logits / temperature, axis=-1)
    log_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    kl = optax.kl_divergence(log_student, soft_teacher)
    hard = optax.softmax_cross_entropy_with_integer_labels(student_logits, labels)
    if labelled is None:
        return jnp.mean(alpha * temperature**2 * kl + (1.0 - alpha) * hard)
    labelled = jnp.asarray(labelled, hard.dtype)
    hard_mean = jnp.sum(hard * labelled) / jnp.maximum(jnp.sum(labelled), 1.0)
    return alpha * temperature**2 * jnp.mean(kl) + (1.0 - alpha) * hard_mean


def load_teacher(model: nnx.Module, directory: str | Path, step: int | None = None):
    """`model` (a fresh module of the teacher's architecture) with the params saved in the
    checkpoint folder `directory`, in eval mode. Params are matched by path (an
    `nnx.List`'s integer keys come back from a checkpoint as strings)."""
    saved = saved_params(directory, step, "teacher checkpoint")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fresh = nnx.to_pure_dict(params)
    expected = {k: tuple(v.shape) for k, v in flat_by_path(fresh).items()}
    got = {k: tuple(v.shape) for k, v in saved.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[0][0]
        raise JaxtrainError(f"teacher checkpoint {directory} does not fit the teacher model: "
                            f"{diff}: saved {got.get(diff, 'absent')}, model "
                            f"{expected.get(diff, 'absent')}")
    nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(
        lambda kp, leaf: jnp.asarray(saved[path_str(kp)], leaf.dtype), fresh))
    teacher = nnx.merge(graphdef, params, rest)
    teacher.eval()
    return teacher


def make_distill_loss(teacher: nnx.Module, temperature: float = 4.0, alpha: float = 0.9):
    """A `loss_fn(student, batch, rng) -> (loss, aux)` for `make_train_step`."""
    if not temperature > 0:
        raise JaxtrainError(f"temperature must be > 0, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise JaxtrainError(f"alpha must be in [0, 1], got {alpha!r}")
    graphdef, state = nnx.split(teacher)

    def loss_fn(student, batch, rng):
        del rng
        teacher_logits = jax.lax.stop_gradient(nnx.merge(graphdef, state)(batch["image"]))
        logits = student(batch["image"])
        loss = distillation_loss(logits, teacher_logits, batch["label"], temperature, alpha,
                                 batch.get("labelled"))
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"accuracy": accuracy}

    return loss_fn


def teacher_from_checkpoint(directory: str | Path, step: int | None = None, seed: int = 0):
    """The teacher saved in the checkpoint folder `directory` by a `jaxtrain train` run:
    its model rebuilt from the model config recorded there, its params loaded."""
    from ..models import registry

    if not Path(directory).is_dir():
        raise JaxtrainError(f"config key 'distill.teacher': checkpoint folder {directory} "
                            "does not exist")
    with Manager(directory, read_only=True) as mngr:
        if not mngr.steps():
            raise JaxtrainError(f"config key 'distill.teacher': {directory} holds no "
                                "checkpoint")
        config = dict(mngr.meta(step).get("model", {}).get("config") or {})
    if "name" not in config:
        raise JaxtrainError(f"config key 'distill.teacher': {directory} records no model "
                            "config (save it with `jaxtrain train`)")
    return load_teacher(registry.build(config.pop("name"), seed, **config), directory, step)


def with_transfer_set(train: dict, transfer: dict | None = None, labelled: float = 1.0,
                      seed: int = 0) -> dict:
    """`train` (a dict of arrays with `label`) with a `labelled` column: 1 for a fraction
    `labelled` of its examples (chosen by `seed`), 0 for the rest, followed by the inputs
    of `transfer` (same keys but the label; their labels are never read) with 0."""
    if not 0.0 <= labelled <= 1.0:
        raise JaxtrainError(f"config key 'distill.labelled' must be in [0, 1], got "
                            f"{labelled!r}")
    n = len(train["label"])
    keep = np.zeros(n, np.float32)
    keep[np.random.default_rng(seed).permutation(n)[:round(labelled * n)]] = 1.0
    out = {**{k: np.asarray(v) for k, v in train.items()}, "labelled": keep}
    if transfer is None:
        return out
    inputs = set(train) - {"label"}
    if set(transfer) - {"label"} != inputs:
        raise JaxtrainError(f"config key 'distill.transfer': the transfer set has "
                            f"{sorted(transfer)}, the training data {sorted(train)}")
    m = len(next(iter(transfer.values())))
    extra = {k: np.asarray(transfer[k]) for k in inputs}
    extra["label"] = np.zeros(m, out["label"].dtype)  # never read: labelled is 0
    extra["labelled"] = np.zeros(m, np.float32)
    return {k: np.concatenate([out[k], extra[k].astype(out[k].dtype)]) for k in out}
