"""Knowledge distillation on digits: a small CNN student learns from a larger teacher
loaded from a checkpoint, and is compared with the same student trained alone.

Both students have the same 300 labelled examples. The distilled one also sees the rest
of the training images without their labels: the teacher's soft targets are its only
signal there (Hinton et al.'s transfer set). `--no-transfer` distils on the 300 only.

    python examples/distill_digits.py [--out distill_out] [--seeds 3]

Prints one JSON line per run and a table of held-out accuracies.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxtrain import transforms
from jaxtrain.checkpoint import Manager, model_signature
from jaxtrain.data import batch_at, digits_split
from jaxtrain.models import CNN
from jaxtrain.strategies import load_teacher, make_distill_loss
from jaxtrain.train import TrainState, classification_loss, make_train_step

TEACHER = {"channels": 16, "features": 64}
STUDENT = {"channels": 4, "features": 16}
STEPS, BATCH, LR = 800, 32, 3e-3
TRAIN_EXAMPLES = 300  # a small labelled set: where a teacher's soft labels help most


def cnn(seed: int, **size) -> CNN:
    with nnx.use_eager_sharding(False):
        return CNN(num_classes=10, rngs=nnx.Rngs(seed), **size)


def train(model, loss_fn, data, seed: int) -> TrainState:
    state = TrainState.create(model, transforms.adam(LR), jax.random.PRNGKey(seed))
    step = jax.jit(make_train_step(loss_fn))
    for s in range(STEPS):
        state, _ = step(state, batch_at(data, BATCH, seed, s))
    return state


def accuracy(state: TrainState, data: dict) -> float:
    model = state.model()
    model.eval()
    logits = jax.jit(lambda m, x: m(x))(model, data["image"])
    return float(np.mean(np.argmax(logits, -1) == data["label"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for the teacher checkpoint")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--no-transfer", action="store_true",
                        help="distil on the labelled examples only")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="distill_"))
    full_train, test = digits_split()
    small = {k: v[:TRAIN_EXAMPLES] for k, v in full_train.items()}
    # the transfer set: every training image, labels kept for the first 300 only
    labelled = (np.arange(len(full_train["label"])) < TRAIN_EXAMPLES).astype(np.float32)
    transfer = small if args.no_transfer else {**full_train, "labelled": labelled}

    # The teacher sees the full training split, is saved, then reloaded from disk.
    teacher_state = train(cnn(100, **TEACHER), classification_loss, full_train, 100)
    mngr = Manager(out / "teacher")
    mngr.save(STEPS, teacher_state, model_signature(TEACHER, teacher_state.params))
    mngr.close()
    teacher = load_teacher(cnn(0, **TEACHER), out / "teacher")
    rows = [{"run": "teacher", "seed": 100, "accuracy": accuracy(teacher_state, test)}]
    print(json.dumps(rows[-1]))
    distill = make_distill_loss(teacher, args.temperature, args.alpha)
    for seed in range(args.seeds):
        for run, loss_fn, data in (("student alone", classification_loss, small),
                                   ("student distilled", distill, transfer)):
            state = train(cnn(seed, **STUDENT), loss_fn, data, seed)
            rows.append({"run": run, "seed": seed, "accuracy": accuracy(state, test)})
            print(json.dumps(rows[-1]))
    print(f"\n{'run':<20}{'mean accuracy':>15}{'runs':>6}")
    for run in ("teacher", "student alone", "student distilled"):
        accs = [r["accuracy"] for r in rows if r["run"] == run]
        print(f"{run:<20}{np.mean(accs):>15.4f}{len(accs):>6}")


if __name__ == "__main__":
    main()
