"""`jaxtrain finetune CONFIG.yaml --from CKPT_DIR`: a `jaxtrain train` config (see
`jaxtrain.train.config`) plus a `finetune` section (`jaxtrain.finetune.config`: which
pretrained step and params to load, renamed modules, LoRA, the optimizer state).

Freezing and per-group learning rates are keys of the `optimizer` spec (`freeze: [globs]`,
`groups: {glob: {learning_rate: ...}}`, see `jaxtrain.transforms.spec`). The pretrained
params are loaded before anything is written, so a bad `--from` leaves
the disk as it was. With LoRA the merged model is saved to `OUT/merged` at the end.
"""

from __future__ import annotations

from pathlib import Path

import jax
import optax
from flax import nnx

from .. import sharding
from ..checkpoint import Manager, model_signature
from ..config import load, read_yaml, set_key, to_dict
from ..data.records import closing
from ..errors import JaxtrainError
from ..models import registry as model_registry
from ..models.lora import apply_lora, merge_lora
from ..train import TrainState
from ..train.config import SHORTHAND
from ..train.run import (
    check_patterns,
    config_patterns,
    config_trainer,
    data_and_model,
    fit_summary,
    rerun_config,
)
from ..train.tasks import get_task
from ..transforms.paths import path_list
from ..transforms.spec import build as build_spec
from .config import FinetuneRunConfig
from .flows import load_into, lora_optimizer


def load_finetune_config(path: str | Path, overrides=(),
                         pretrained: str | Path | None = None) -> FinetuneRunConfig:
    """The fine-tune config of a YAML file, `key=value` overrides and `--from` (the
    pretrained folder, `finetune.from`)."""
    raw = read_yaml(path, overrides, SHORTHAND)
    if pretrained is not None:
        set_key(raw, "finetune.from", str(pretrained))
    cfg = load(FinetuneRunConfig, raw)
    lora = cfg.finetune.lora
    if lora is not None and not lora.targets:
        raise JaxtrainError("config key 'finetune.lora.targets' is missing (globs of "
                            "the Linear layers to adapt)")
    return cfg


def _list(value) -> list:
    return [value] if isinstance(value, str) else list(value or [])


def _optimizer(cfg: FinetuneRunConfig):
    """The optimizer spec's chain (freezing and per-group learning rates are spec keys:
    `freeze`, `groups`); with LoRA, applied to the adapters (and `train_also`) only.
    Shampoo's and SOAP's per-block state is padded to split evenly over the mesh."""
    devices = sharding.make_mesh(**to_dict(cfg.sharding.mesh)).size
    tx = build_spec(cfg.optimizer, "config key 'optimizer': ", num_devices=devices)
    lora = cfg.finetune.lora
    return tx if lora is None else lora_optimizer(tx, lora.train_also)


def run_finetune(cfg: FinetuneRunConfig, resume: bool = False) -> dict:
    """Fine-tune as `cfg` says from the checkpoint folder `finetune.from`; returns
    the train summary plus the load report (and the merged export's folder with LoRA).
    An `out` that holds a fine-tune already is resumed only with the same settings and
    `--from`, or with `resume` (then as saved; see `jaxtrain.train.run.rerun_config`)."""
    cfg = rerun_config(cfg, resume)
    ft = cfg.finetune
    pretrained = ft.from_
    if pretrained is None:
        raise JaxtrainError("config key 'finetune.from' is missing (the pretrained "
                            "checkpoint folder: --from)")
    for key in ("privacy", "distill", "local_sgd"):  # strategies of `jaxtrain train` only
        if getattr(cfg, key) is not None:
            raise JaxtrainError(f"config key {key!r} is not supported by jaxtrain finetune "
                                "(train with it: jaxtrain train)")
    task = get_task(cfg.task)
    data, name, kwargs = data_and_model(cfg)
    with closing(data):  # the records' worker processes end with the run, however it ends
        return _finetune(cfg, task, data, name, kwargs)


def _finetune(cfg: FinetuneRunConfig, task, data: dict, name: str, kwargs: dict) -> dict:
    """`run_finetune` once its data and model are known."""
    ft, pretrained = cfg.finetune, cfg.finetune.from_
    seed, train, out = cfg.seed, cfg.train, Path(cfg.out)
    model = model_registry.build(name, seed, **kwargs)
    paths = path_list(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    modules = sorted({p.rsplit("/", 1)[0] for p in paths if "/" in p})
    check_patterns({"finetune.exclude": _list(ft.exclude)}, paths)
    if ft.lora is not None:
        check_patterns({"finetune.lora.targets": _list(ft.lora.targets)}, modules)
        check_patterns({"finetune.lora.train_also": _list(ft.lora.train_also)}, paths)
    report = load_into(model, pretrained, ft.step, ft.include, ft.exclude, ft.mapping)
    unaccounted = {p: why for p, why in report.skipped.items() if why != "not selected"}
    if unaccounted:
        first = ", ".join(f"{p} ({why})" for p, why in list(unaccounted.items())[:3])
        raise JaxtrainError(
            f"--from {pretrained}: {report.summary()}; {len(unaccounted)} saved param(s) fit "
            f"no param of the new model: {first}; exclude them (finetune.exclude) or rename "
            "them (finetune.mapping)")
    adapted = []
    if ft.lora is not None:
        lora = ft.lora
        adapted = apply_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout,
                             rngs=nnx.Rngs(seed + 1))
    check_patterns(config_patterns(cfg), path_list(nnx.to_pure_dict(nnx.state(model,
                                                                            nnx.Param))))
    state = TrainState.create(model, _optimizer(cfg), jax.random.PRNGKey(seed),
                              ema_decay=train.ema_decay)
    if ft.restore_optimizer:
        with Manager(pretrained, read_only=True) as mngr:
            state = mngr.restore(state, None, ft.step, items=["opt_state"])
    lora_config = None if ft.lora is None else to_dict(ft.lora)
    trainer = config_trainer(cfg, state, model, task,
                             {"name": name, **kwargs, "lora": lora_config}, run="finetune")
    state = trainer.fit(data["train"], train.steps, eval_data=data.get("valid"),
                        eval_every=train.eval_every)
    summary = {**fit_summary(trainer, state, out), "loaded": report.summary(),
               "lora": adapted}
    if adapted and trainer.interrupted is None:
        summary["merged"] = str(_export_merged(state, name, kwargs, out / "merged"))
    return summary


def _export_merged(state, name: str, kwargs: dict, directory: Path) -> Path:
    """Save the LoRA-merged model as a checkpoint of the plain model (loadable by
    `--from` or `load_pretrained`)."""
    merged = merge_lora(state.model(train=False))
    export = TrainState.create(merged, optax.set_to_zero(), state.rng)
    with Manager(directory, max_to_keep=1) as mngr:
        step = int(state.step)
        if step not in mngr.steps():
            mngr.save(step, export, model_signature({"name": name, **kwargs}, export.params))
    return directory
