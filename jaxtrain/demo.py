"""The demo: does pretraining pay? Pretrain a CNN on digits 0-4, then learn digits 5-9
from a few labelled examples per class, three ways, over several seeds:

- frozen fine-tune: the pretrained backbone, a fresh head; only the head learns;
- full fine-tune: the same start, every layer learns (the backbone at a tenth of the
  head's learning rate);
- scratch: the same network from a random init.

Each gets the same steps on the same small labelled set (drawn per seed) and is scored on
every 5-9 example it did not train on: accuracy and macro F1 (with a confusion matrix per
way for the first seed). With all ~700 training images of 5-9 scratch catches up (the old
demo: scratch 0.987, full fine-tune 0.982 after 300 steps), so the fine-tune stage uses
`SHOTS` = 10 images per class, the few-label regime where pretraining is expected to pay.
Measured, it does not pay here (scratch 0.940, full fine-tune 0.885, frozen 0.721;
benchmarks/RESULTS.md), and the demo says so: the table prints mean and spread over seeds
and a plain verdict. `augment` (e.g. `{'crop': 2, 'rotate': 10}`, see
`jaxtrain.data.augment`) augments the fine-tune stage's images inside its compiled steps.

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
import numpy as np
import optax
from flax import nnx

from . import sharding, transforms
from .checkpoint import Manager, check_same_model, model_signature
from .data import batch_at, digits_split
from .data.augment import active, check_augment, with_augmentation
from .errors import JaxtrainError
from .finetune import load_pretrained
from .models import CNN
from .train import (
    JsonlLogger,
    TrainState,
    classification_loss,
    classification_report,
    evaluate,
    fit,
    make_eval_step,
    make_train_step,
    plot_confusion,
    plot_curves,
)

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
SHOTS = 10  # labelled examples per class in the fine-tune stage
SEEDS = 3  # fine-tune runs per way
BATCH_MULTIPLE = 8  # fine-tune batches divide over 1, 2, 4 or 8 devices alike
FINETUNE_WAYS = ("frozen fine-tune", "full fine-tune", "scratch")


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


def check_earlier_checkpoint(ckpt_dir: Path, overwrite: bool) -> list[int]:
    """The steps of an earlier run's pretrain checkpoint in `ckpt_dir`: refused unless
    `overwrite` (nothing saved is replaced without being asked for)."""
    if not ckpt_dir.is_dir():
        return []
    mngr = Manager(ckpt_dir, max_to_keep=1)
    steps = list(mngr.steps())
    mngr.close()
    if steps and not overwrite:
        raise JaxtrainError(f"{ckpt_dir} holds the pretrain checkpoint of an earlier run "
                            f"(step {steps[-1]}): pass --overwrite to replace it, or choose "
                            "another --out")
    return steps


def new_model(seed: int) -> CNN:
    with nnx.use_eager_sharding(False):
        return CNN(num_classes=len(FINETUNE_CLASSES), rngs=nnx.Rngs(seed))


def few_shot(train: dict, test: dict, shots: int, seed: int) -> tuple[dict, dict]:
    """`shots` training examples per class drawn with `seed`; every other example (the
    rest of the training split and the test split) held out."""
    rng = np.random.default_rng(seed)
    labels = train["label"]
    chosen = np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False)
                             for c in np.unique(labels)])
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    small = {k: v[np.sort(chosen)] for k, v in train.items()}
    held_out = {k: np.concatenate([v[rest], test[k]]) for k, v in train.items()}
    return small, held_out


class Stage:
    """Train one model on one data set with a mesh, a logger and a step budget; the
    compiled step of each way is reused across seeds. `loss_fn` is the training loss
    (augmented or not); every run is scored with `classification_report`."""

    def __init__(self, mesh, logger, progress: bool, loss_fn=classification_loss):
        self.mesh, self.logger, self.progress, self.loss_fn = mesh, logger, progress, loss_fn
        self.curves: dict[str, list[tuple[int, float]]] = {}
        self.compiled: dict[str, tuple] = {}

    def run(self, name: str, state: TrainState, train: dict, test: dict, steps: int,
            seed: int, batch_size: int = BATCH_SIZE, curve: str | None = None):
        if name in self.compiled:  # the first run's static fields: its compiled step fits
            state = self.compiled[name][0].with_saved(state.saveable())
        else:
            shardings = jax.tree.map(lambda _: sharding.replicated(self.mesh), state)
            self.compiled[name] = (
                state, shardings,
                sharding.compile_step(make_train_step(self.loss_fn), self.mesh, shardings),
                sharding.compile_eval(make_eval_step(classification_report), self.mesh,
                                      shardings))
        _, shardings, step_fn, eval_fn = self.compiled[name]
        state = sharding.place(state, shardings)
        state = state.replace(step=jax.numpy.zeros((), jax.numpy.int32))
        state, history = fit(
            state, step_fn, lambda s: batch_at(train, batch_size, seed, s), steps, self.mesh,
            logger=self.logger, run=curve or name, progress=self.progress,
        )
        self.curves[curve or name] = [(s, m["loss"]) for s, m in history]
        return state, evaluate(eval_fn, state, test, self.mesh,
                               metric_fn=classification_report)


def run_demo(out: str | Path = "demo_out", seed: int = 0, steps: int = 300, devices=None,
             progress: bool = True, shots: int = SHOTS, seeds: int = SEEDS,
             finetune_steps: int | None = None, overwrite: bool = False,
             augment: dict | None = None) -> dict:
    """Pretrain, then fine-tune `seeds` times each way; return the held-out accuracies
    and macro F1s.

    `steps`: pretraining steps; `finetune_steps` (default `steps // 3`): every
    fine-tune and scratch run's; `augment`: the fine-tune stage's augmentations (a
    `data.augment` mapping). Writes `pretrain/` (Orbax checkpoint), `log.jsonl`,
    `curves.png`, `confusion-<way>.png` (first seed) and `results.json` into `out`. An
    earlier run's checkpoint in `out` is refused unless `overwrite`, and then replaced
    with a printed note.
    """
    for name, value in (("steps", steps), ("shots", shots), ("seeds", seeds),
                        ("finetune_steps", finetune_steps or 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise JaxtrainError(f"{name} must be a positive integer, got {value!r}")
    finetune_steps = finetune_steps or max(1, steps // 3)
    augment = check_augment(augment, {"flip": False}, where="augment")
    out = Path(out)
    check_output_folder(out)
    ckpt_dir = out / "pretrain"
    template = new_model(seed)
    signature = model_signature(template.config, nnx.to_pure_dict(nnx.state(template, nnx.Param)))
    for folder in (out, ckpt_dir):
        check_same_model(folder, signature)
    earlier = check_earlier_checkpoint(ckpt_dir, overwrite)

    mesh = sharding.make_mesh(data=-1, devices=devices)
    pre_train, pre_test = digits_split(PRETRAIN_CLASSES, seed=seed)
    ft_train, ft_test = digits_split(FINETUNE_CLASSES, seed=seed)
    per_class = np.bincount(ft_train["label"]).min()
    if not 2 <= shots < per_class:
        raise JaxtrainError(f"shots must be in 2..{per_class - 1} (the fewest 5-9 training "
                            f"examples of a class), got {shots}")
    logger = JsonlLogger(out / "log.jsonl")
    stage = Stage(mesh, logger, progress)
    key = jax.random.PRNGKey(seed)
    adam = transforms.adam(LEARNING_RATE)

    # 1. Pretrain on 0-4 and save the checkpoint.
    state = TrainState.create(new_model(seed), adam, jax.random.fold_in(key, 1))
    state, metrics = stage.run("pretrain", state, pre_train, pre_test, steps, seed)
    pretrain_accuracy = metrics["accuracy"]
    mngr = Manager(ckpt_dir, max_to_keep=1)
    for old in earlier:
        print(f"replacing the earlier pretrain checkpoint {ckpt_dir / str(old)} (--overwrite)",
              flush=True)
        mngr.delete(old)
    mngr.save(steps, state, signature, metrics=metrics, config={"demo": "pretrain"})
    mngr.wait()
    mngr.close()

    # 2. Each way, each seed: the same few labelled 5-9 examples, the same steps.
    frozen_tx = optax.chain(adam, transforms.freeze("backbone/*"))
    full_tx = transforms.per_group({"backbone/*": transforms.adam(LEARNING_RATE / 10)},
                                   default=adam)
    runs: dict[str, list[float]] = {way: [] for way in FINETUNE_WAYS}
    f1s: dict[str, list[float]] = {way: [] for way in FINETUNE_WAYS}
    tune = Stage(mesh, logger, progress, with_augmentation(classification_loss, augment))
    tune.curves = stage.curves
    report = None
    for i in range(seeds):
        run_seed = seed + 1 + i
        small, held_out = few_shot(ft_train, ft_test, shots, run_seed)
        batch = min(BATCH_SIZE, len(small["label"])) // BATCH_MULTIPLE * BATCH_MULTIPLE
        for way, tx in zip(FINETUNE_WAYS, (frozen_tx, full_tx, adam), strict=True):
            model = new_model(run_seed)
            if way != "scratch":
                params, report = load_pretrained(
                    nnx.to_pure_dict(nnx.state(model, nnx.Param)), ckpt_dir,
                    exclude=["head/*"])
                nnx.update(model, params)
            state = TrainState.create(model, tx, jax.random.fold_in(key, 10 * run_seed))
            _, metrics = tune.run(way, state, small, held_out, finetune_steps, run_seed,
                                  batch_size=batch,
                                  curve=way if i == 0 else f"{way} (seed {run_seed})")
            runs[way].append(metrics["accuracy"])
            f1s[way].append(metrics["f1_macro"])
            if i == 0:
                plot_confusion(metrics["confusion"], out / f"confusion-{way.replace(' ', '-')}.png",
                               title=f"{way}: digits 5-9 as 0-4, held out (seed {run_seed})")

    logger.close()
    plot_curves({k: v for k, v in stage.curves.items() if "(seed" not in k},
                out / "curves.png",
                title=f"jaxtrain demo: training loss (fine-tune: {shots} examples per class, "
                      f"first seed)")
    summary = {
        "pretrain_accuracy": pretrain_accuracy,
        "accuracy": spread(runs),
        "f1_macro": spread(f1s),
        "verdict": verdict(runs),
        "shots": shots,
        "seeds": [seed + 1 + i for i in range(seeds)],
        "steps": steps,
        "finetune_steps": finetune_steps,
        "augment": {k: v for k, v in augment.items() if active(augment) and v},
        "seed": seed,
        "devices": len(mesh.devices.flat),
        "finetune_load": report.summary() if report is not None else "",
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def spread(runs: dict[str, list[float]]) -> dict:
    """Mean, standard deviation and the runs of each way's scores."""
    return {way: {"mean": float(np.mean(v)), "std": float(np.std(v)),
                  "runs": [float(a) for a in v]} for way, v in runs.items()}


def verdict(runs: dict[str, list[float]]) -> str:
    """Whether the better fine-tune beat scratch by more than the seeds' spread."""
    scratch = np.array(runs["scratch"])
    best = max(("frozen fine-tune", "full fine-tune"), key=lambda w: np.mean(runs[w]))
    tuned = np.array(runs[best])
    gap = tuned.mean() - scratch.mean()
    spread = max(tuned.std(), scratch.std())
    if gap > 2 * spread and gap > 0:
        return (f"pretraining wins: {best} beats scratch by {100 * gap:.1f} points of "
                f"accuracy (spread over seeds {100 * spread:.1f})")
    if gap > 0:
        return (f"pretraining does not clearly win: {best} is ahead of scratch by only "
                f"{100 * gap:.1f} points, within twice the spread over seeds "
                f"({100 * spread:.1f})")
    return (f"pretraining does not win: scratch is ahead of the best fine-tune ({best}) by "
            f"{-100 * gap:.1f} points")


def format_table(summary: dict) -> str:
    """The held-out accuracies and macro F1s as a small text table, then the verdict."""
    rows, f1 = summary["accuracy"], summary["f1_macro"]
    n = len(summary["seeds"])
    head = f"way (5-9, {summary['shots']} examples per class)"
    width = max(len(head), *(len(k) for k in rows))
    augment = ", ".join(f"{k} {v}" for k, v in summary.get("augment", {}).items())
    lines = [f"pretrain (0-4): held-out accuracy {summary['pretrain_accuracy']:.4f} after "
             f"{summary['steps']} steps", "",
             f"held out, mean ± std over {n} seeds ({summary['finetune_steps']} steps each"
             f"{'; augmented: ' + augment if augment else ''})",
             f"{head:<{width}}  {'accuracy':<15}  macro F1",
             f"{'-' * width}  {'-' * 15}  {'-' * 15}"]
    lines += [f"{k:<{width}}  {v['mean']:.4f} ± {v['std']:.4f}  "
              f"{f1[k]['mean']:.4f} ± {f1[k]['std']:.4f}" for k, v in rows.items()]
    lines += ["", summary["verdict"]]
    return os.linesep.join(lines)
