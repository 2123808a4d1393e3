"""Run configs: a YAML file plus `key=value` overrides -> a checked dict -> a training run.

Shape (every section but `model`, `data`, `task` and `optimizer` has defaults):

    seed: 0
    out: runs/NAME                       # logs, curves.png, checkpoints/
    model: {name: cnn, ...kwargs}        # jaxtrain.models.registry.build
    data: {name: digits, augment: {...}, ...kwargs}   # jaxtrain.data.registry.load;
                                         # augment: jaxtrain.data.augment
    task: classification                 # jaxtrain.train.tasks
    optimizer: {optimizer: adam, learning_rate: 0.003, ...}   # jaxtrain.transforms.spec
    train: {steps, batch_size, microbatches, steps_per_call, precision, nan_policy,
            eval_every, eval_batch_size, log_every, ema_decay, device_data}
    sharding: {preset: dp, mesh: {data: -1, fsdp: 1, tensor: 1}}
    checkpoint: {dir, every, best, at_end, max_to_keep, async}
    early_stopping: null | {patience, min_delta, monitor, mode}
    logging: {tensorboard, plots, progress}

Model kwargs the data set knows (`num_classes`, `vocab_size`, ...) are filled in from
the data's `info` when the model takes them and the config does not set them. Counts and
intervals (`train.eval_every`, `checkpoint.every`, ...) are positive or null, `seed` >= 0.
A run's checked config is saved with its checkpoints; a rerun into the same folder must
match it but for `RERUN_FREE` keys (`config_changes`).
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import yaml

from .. import yaml_numbers
from ..data.augment import check_augment
from ..errors import JaxtrainError

ANY = object()  # a free-form section: {name, **kwargs of a registry entry}
SPEC = object()  # the transforms spec: {optimizer, learning_rate, ...}, checked by its build
INT, FLOAT, BOOL, STR = (int,), (int, float), (bool,), (str,)
OPT = (type(None),)

# key -> (accepted types, default); a nested dict is a section.
SCHEMA = {
    "seed": (INT, 0),
    "out": (STR, "runs/train"),
    "model": (ANY, None),
    "data": (ANY, None),
    "task": (STR, None),
    "optimizer": (SPEC, None),
    "train": {
        "steps": (INT, 1000),
        "batch_size": (INT, 64),
        "microbatches": (INT, 1),
        "steps_per_call": (INT, 1),
        "precision": (STR, "auto"),
        "nan_policy": (STR, "raise"),
        "eval_every": (INT + OPT, None),
        "eval_batch_size": (INT, 256),
        "log_every": (INT, 10),
        "ema_decay": (FLOAT + OPT, None),
        "device_data": (BOOL + STR, "auto"),  # Trainer(device_data=): auto, true, false
    },
    "sharding": {
        "preset": (STR + (dict,), "dp"),
        "mesh": {"data": (INT, -1), "fsdp": (INT, 1), "tensor": (INT, 1)},
    },
    "checkpoint": {
        "dir": (STR + OPT, None),
        "every": (INT + OPT, None),
        "best": (BOOL, False),
        "at_end": (BOOL, True),
        "max_to_keep": (INT + OPT, 3),
        "async": (BOOL, True),
    },
    "early_stopping": ((dict, type(None)), None),
    "logging": {"tensorboard": (BOOL, True), "plots": (BOOL, True), "progress": (BOOL, True)},
}
REQUIRED = ("model", "data", "task", "optimizer")
EARLY_STOPPING = {"patience": (INT, 5), "min_delta": (FLOAT, 0.0), "monitor": (STR + OPT, None),
                  "mode": (STR + OPT, None)}


def _yaml(text: str):
    return yaml_numbers.load(text)


def _type_names(types) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _check_value(key: str, value, types):
    if isinstance(value, bool) and bool not in types:  # YAML true is not an int
        raise JaxtrainError(f"config key {key!r} must be {_type_names(types)}, got {value!r}")
    if not isinstance(value, types):
        raise JaxtrainError(
            f"config key {key!r} must be {_type_names(types)}, got {type(value).__name__} "
            f"{value!r}"
        )
    return float(value) if types[0] is int and float in types and value is not None else value


def _checked(section: dict, schema: dict, prefix: str) -> dict:
    """`section` merged over the defaults of `schema`, every key and type checked."""
    if not isinstance(section, dict):
        raise JaxtrainError(f"config key {prefix.rstrip('.') or 'config'!r} must be a mapping, "
                            f"got {type(section).__name__}")
    unknown = sorted(set(section) - set(schema))
    if unknown:
        raise JaxtrainError(f"unknown config key {prefix + unknown[0]!r} (valid: "
                            f"{', '.join(schema)})")
    out = {}
    for key, spec in schema.items():
        full = prefix + key
        if isinstance(spec, dict):
            out[key] = _checked(section.get(key) or {}, spec, full + ".")
            continue
        types, default = spec
        if key not in section:
            out[key] = copy.deepcopy(default)
        elif types is ANY:
            out[key] = _named(full, section[key])
        elif types is SPEC:
            out[key] = _spec(full, section[key])
        else:
            out[key] = _check_value(full, section[key], types)
    return out


def _named(key: str, value) -> dict:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise JaxtrainError(f"config key {key!r} must be a mapping with a 'name' (and its "
                            f"keyword arguments), got {value!r}")
    return value


def _spec(key: str, value) -> dict:
    if isinstance(value, str):
        value = {"optimizer": value}
    if not isinstance(value, dict):
        raise JaxtrainError(f"config key {key!r} must be a transforms spec mapping (e.g. "
                            f"{{optimizer: adam, learning_rate: 0.001}}), got {value!r}")
    return value


def check_config(raw: dict) -> dict:
    """The full config: defaults filled in, unknown keys and wrong types refused."""
    cfg = _checked(raw, SCHEMA, "")
    for key in REQUIRED:
        if cfg[key] is None:
            raise JaxtrainError(f"config key {key!r} is missing")
    if "augment" in cfg["data"]:
        cfg["data"]["augment"] = check_augment(cfg["data"]["augment"])
    if cfg["early_stopping"] is not None:
        cfg["early_stopping"] = _checked(cfg["early_stopping"], EARLY_STOPPING,
                                         "early_stopping.")
    positive = [("train", k) for k in ("steps", "batch_size", "microbatches",
                                       "steps_per_call", "log_every", "eval_batch_size",
                                       "eval_every")]
    positive += [("checkpoint", "every"), ("checkpoint", "max_to_keep")]
    if cfg["early_stopping"] is not None:
        positive.append(("early_stopping", "patience"))
    for section, key in positive:
        value = cfg[section][key]
        if value is not None and value < 1:
            schema = EARLY_STOPPING if section == "early_stopping" else SCHEMA[section]
            null = " or null" if type(None) in schema[key][0] else ""
            raise JaxtrainError(f"config key '{section}.{key}' must be a positive integer"
                                f"{null}, got {value}")
    if cfg["seed"] < 0:
        raise JaxtrainError(f"config key 'seed' must be an integer >= 0, got {cfg['seed']}")
    if cfg["train"]["device_data"] not in (True, False, "auto"):
        raise JaxtrainError("config key 'train.device_data' must be auto, true or false, "
                            f"got {cfg['train']['device_data']!r}")
    return cfg


# Keys a rerun into the same folder may change and still be the same run: where it writes,
# how long it trains (a total, so more steps continue it), how it reports, how prepared
# records are read (the batches do not depend on it).
RERUN_FREE = ("out", "checkpoint.dir", "checkpoint.async", "train.steps", "logging",
              "data.workers", "data.threads", "data.prefetch", "data.verify")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _free(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RERUN_FREE)


def config_changes(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for each dotted key whose value differs between a saved
    run config and a new one (keys in `RERUN_FREE` excepted)."""
    old, new = _flat(saved), _flat(current)
    missing = object()
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if not _free(key) and a != b:
            changes.append(f"{key}: {'(none)' if a is missing else a!r} -> "
                           f"{'(none)' if b is missing else b!r}")
    return changes


def with_rerun_free(saved: dict, current: dict) -> dict:
    """The saved config with the `RERUN_FREE` keys of `current` (what `--resume` runs)."""
    merged = copy.deepcopy(saved)
    for key, value in _flat(current).items():
        if _free(key):
            _set(merged, key, copy.deepcopy(value))
    return merged


def _set(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        node = tree.get(part)
        if node is None:
            node = tree[part] = {}
        elif isinstance(node, str) and part in ("model", "data"):
            node = tree[part] = {"name": node}
        elif isinstance(node, str) and part == "optimizer":
            node = tree[part] = {"optimizer": node}
        elif not isinstance(node, dict):
            raise JaxtrainError(f"override {key}: {part!r} is not a section")
        tree = node
    tree[parts[-1]] = value


def read_config(path: str | Path, overrides=()) -> dict:
    """Read `path` (YAML) and apply `key=value` overrides (values parsed as YAML); the
    raw mapping, not yet checked (a caller may take out sections of its own first)."""
    path = Path(path)
    if not path.is_file():
        raise JaxtrainError(f"config file {path} does not exist")
    try:
        raw = _yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise JaxtrainError(f"config file {path} is not valid YAML{line}: "
                            f"{getattr(err, 'problem', None) or err}") from None
    if not isinstance(raw, dict):
        raise JaxtrainError(f"config file {path} must hold a mapping, got {type(raw).__name__}")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise JaxtrainError(f"override {item!r} must be key=value (e.g. train.steps=100)")
        try:
            value = _yaml(text)
        except yaml.YAMLError:
            value = text
        _set(raw, key.strip(), value)
    return raw


def load_config(path: str | Path, overrides=()) -> dict:
    """Read `path` (YAML), apply `key=value` overrides (values parsed as YAML), check."""
    return check_config(read_config(path, overrides))


def build_optimizer(spec: dict):
    """The transform chain of the `optimizer` section (`jaxtrain.transforms.spec.build`)."""
    from ..transforms.spec import build

    try:
        return build(spec)
    except JaxtrainError as err:
        raise JaxtrainError(f"config key 'optimizer': {err}") from None


def model_kwargs(name: str, kwargs: dict, info: dict) -> dict:
    """`kwargs` plus the data `info` entries the model's constructor takes."""
    from ..models.registry import MODELS

    cls = MODELS.get(name)
    if cls is None:
        return kwargs
    accepted = inspect.signature(cls.__init__).parameters
    filled = {k: v for k, v in info.items() if k in accepted and k not in kwargs}
    return {**filled, **kwargs}
