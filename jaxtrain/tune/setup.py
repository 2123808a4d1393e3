"""From a run config (the YAML of `jaxtrain train`) to what the tuning tools need."""

from __future__ import annotations

import dataclasses

from ..config import to_dict
from ..errors import JaxtrainError
from ..models import registry as model_registry
from ..train.config import RunConfig
from ..train.precision import get_policy
from ..train.run import data_and_model
from ..train.tasks import get_task
from ..transforms.spec import build as build_spec
from .runs import RunSpec


@dataclasses.dataclass
class Problem:
    """A task on its data: the run spec, the train and held-out sets, the config."""

    spec: RunSpec
    train: dict
    valid: dict
    config: RunConfig


def check_one_device_runs(cfg: RunConfig, command: str) -> None:
    """Refuse, in one line, a config whose sharding splits one model over devices: `sweep`,
    `compare` and `lr-find` run each training run whole on one device (many runs side by
    side on a `sweep` mesh axis), which for data parallelism gives the same numbers."""
    mesh, preset = to_dict(cfg.sharding.mesh), cfg.sharding.preset
    split = {k: v for k, v in mesh.items() if k != "data" and v != 1}
    if split or preset != "dp":
        what = ", ".join(f"sharding.mesh.{k}={v}" for k, v in split.items()) or \
            f"sharding.preset={preset!r}"
        raise JaxtrainError(f"{command} runs each training run on one device; the config asks "
                            f"for {what}: set sharding.preset=dp and only sharding.mesh.data")


def problem_from_config(cfg: RunConfig, optimizer: dict | None = None,
                        max_eval_examples: int = 1024,
                        max_train_examples: int = 65536) -> Problem:
    """The model, data, task and optimizer of a checked run config, with its step's
    precision and microbatches; `optimizer` (a transforms spec) replaces the config's.
    Held-out data is capped at `max_eval_examples` so that every evaluation of every run
    stays cheap. The runs hold their training set on the devices: prepared records
    (`data: {name: records}`) give a seeded random subset of at most
    `max_train_examples` examples."""
    for key in ("privacy", "distill", "local_sgd"):  # the runs here use the plain step
        if getattr(cfg, key) is not None:
            raise JaxtrainError(f"config key {key!r} is not supported by the tuning commands "
                                "(they run the plain train step)")
    data, name, kwargs = data_and_model(cfg)
    train = cfg.train
    spec = RunSpec(
        model_fn=lambda seed: model_registry.build(name, seed, **kwargs),
        task=get_task(cfg.task),
        tx=build_spec(optimizer or cfg.optimizer, "config key 'optimizer': "),
        batch_size=train.batch_size,
        eval_every=train.eval_every or max(1, train.steps // 10),
        precision=get_policy(train.precision),
        microbatches=train.microbatches,
    )
    valid = {k: v[:max_eval_examples] for k, v in data["valid"].items()}
    train = data["train"]
    if not isinstance(train, dict):
        train = train.arrays(max_train_examples, cfg.seed)
    return Problem(spec, train, valid, cfg)
