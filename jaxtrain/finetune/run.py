"""`jaxtrain finetune CONFIG.yaml --from CKPT_DIR`: a `jaxtrain train` config (see
`jaxtrain.train.config`) plus a `finetune` section:

    finetune:
      step: null               # pretrained step: null (latest), best, or a number
      include: ["*"]           # pretrained params to load (globs / re: regexes) ...
      exclude: ["head/*"]      # ... and not to load (a new head stays fresh)
      mapping: {}              # renamed modules: {old/prefix/: new/prefix/}
      lora: null               # {targets: [globs], rank, alpha, dropout, train_also:
                               #  [globs]}: train adapters (and train_also) only
      restore_optimizer: false # take the pretrained optimizer state instead of a fresh one

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

from ..checkpoint import Manager, model_signature
from ..errors import JaxtrainError
from ..models import registry as model_registry
from ..models.lora import apply_lora, merge_lora
from ..train import TrainState
from ..train.config import build_optimizer, check_config, read_config
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
from .flows import load_into, lora_optimizer

DEFAULTS = {"step": None, "include": ["*"], "exclude": [], "mapping": {}, "lora": None,
            "restore_optimizer": False}
LORA_DEFAULTS = {"targets": None, "rank": 8, "alpha": None, "dropout": 0.0, "train_also": []}


def _section(raw, defaults: dict, name: str) -> dict:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise JaxtrainError(f"config key {name!r} must be a mapping, got {raw!r}")
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise JaxtrainError(f"unknown config key '{name}.{unknown[0]}' (valid: "
                            f"{', '.join(defaults)})")
    return {**defaults, **raw}


def load_finetune_config(path: str | Path, overrides=()) -> tuple[dict, dict]:
    """`(train config, finetune section)` from a YAML file and `key=value` overrides."""
    raw = read_config(path, overrides)
    ft = _section(raw.pop("finetune", None), DEFAULTS, "finetune")
    if ft["lora"] is not None:
        ft["lora"] = _section(ft["lora"], LORA_DEFAULTS, "finetune.lora")
        if not ft["lora"]["targets"]:
            raise JaxtrainError("config key 'finetune.lora.targets' is missing (globs of "
                                "the Linear layers to adapt)")
    return check_config(raw), ft


def _list(value) -> list:
    return [value] if isinstance(value, str) else list(value or [])


def _optimizer(cfg: dict, ft: dict):
    """The optimizer spec's chain (freezing and per-group learning rates are spec keys:
    `freeze`, `groups`); with LoRA, applied to the adapters (and `train_also`) only."""
    tx = build_optimizer(cfg["optimizer"])
    return tx if ft["lora"] is None else lora_optimizer(tx, ft["lora"]["train_also"])


def run_finetune(cfg: dict, ft: dict, pretrained: str | Path, resume: bool = False) -> dict:
    """Fine-tune as `cfg` and `ft` say from the checkpoint folder `pretrained`; returns
    the train summary plus the load report (and the merged export's folder with LoRA).
    An `out` that holds a fine-tune already is resumed only with the same settings and
    `--from`, or with `resume` (then as saved; see `jaxtrain.train.run.rerun_config`)."""
    run = rerun_config({**cfg, "finetune": {**ft, "from": str(pretrained)}}, resume)
    ft = dict(run.pop("finetune"))
    cfg, pretrained = run, ft.pop("from")
    seed, train, out = cfg["seed"], cfg["train"], Path(cfg["out"])
    task = get_task(cfg["task"])
    data, name, kwargs = data_and_model(cfg)
    model = model_registry.build(name, seed, **kwargs)
    paths = path_list(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    modules = sorted({p.rsplit("/", 1)[0] for p in paths if "/" in p})
    check_patterns({"finetune.exclude": _list(ft["exclude"])}, paths)
    if ft["lora"] is not None:
        check_patterns({"finetune.lora.targets": _list(ft["lora"]["targets"])}, modules)
        check_patterns({"finetune.lora.train_also": _list(ft["lora"]["train_also"])}, paths)
    report = load_into(model, pretrained, ft["step"], ft["include"], ft["exclude"],
                       ft["mapping"])
    unaccounted = {p: why for p, why in report.skipped.items() if why != "not selected"}
    if unaccounted:
        first = ", ".join(f"{p} ({why})" for p, why in list(unaccounted.items())[:3])
        raise JaxtrainError(
            f"--from {pretrained}: {report.summary()}; {len(unaccounted)} saved param(s) fit "
            f"no param of the new model: {first}; exclude them (finetune.exclude) or rename "
            "them (finetune.mapping)")
    adapted = []
    if ft["lora"] is not None:
        lora = ft["lora"]
        adapted = apply_lora(model, lora["targets"], lora["rank"], lora["alpha"],
                             lora["dropout"], rngs=nnx.Rngs(seed + 1))
    check_patterns(config_patterns(cfg), path_list(nnx.to_pure_dict(nnx.state(model,
                                                                            nnx.Param))))
    state = TrainState.create(model, _optimizer(cfg, ft), jax.random.PRNGKey(seed),
                              ema_decay=train["ema_decay"])
    if ft["restore_optimizer"]:
        with Manager(pretrained, read_only=True) as mngr:
            state = mngr.restore(state, None, ft["step"], items=["opt_state"])
    trainer = config_trainer(
        cfg, state, model, task, {"name": name, **kwargs, "lora": ft["lora"]}, run="finetune",
        run_config={**cfg, "finetune": {**ft, "from": str(pretrained)}})
    state = trainer.fit(data["train"], train["steps"], eval_data=data.get("valid"),
                        eval_every=train["eval_every"])
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
