"""A declarative description of a chain (a dict, or YAML text) -> the chain.

    build({'optimizer': 'adamw',
           'learning_rate': {'schedule': 'warmup_cosine', 'peak_value': 3e-4,
                             'warmup_steps': 100, 'total_steps': 10000},
           'weight_decay': {'rate': 0.1, 'exclude': ['*/bias', '*/scale']},
           'clip_global_norm': 1.0, 'accumulate': 4})

Keys (all but `optimizer` optional):
  optimizer          a name, or {name: ..., <its keyword arguments>}: any optimizer of
                     `jaxtrain.transforms` (looked up when `build` runs)
  learning_rate      a number, or {schedule: <name in schedules.py>, <its arguments>};
                     `join` takes {schedules: [<schedule>, ...], boundaries: [...]}
  weight_decay       a number, or {rate, kind: decoupled | l2 | l1, exclude: [globs],
                     include: [globs], min_ndim: int}; decoupled (the default) uses the
                     optimizer's own `weight_decay`/`mask` when it has them
  groups             {<glob>: {<optimizer arguments, learning_rate, optimizer>}}:
                     parameter groups overriding the base optimizer (`per_group`)
  clip_global_norm, clip, adaptive_grad_clip (a number or {clipping, eps}),
  reduce_on_plateau ({factor, patience, rtol, atol, cooldown, min_scale}),
  freeze ([globs]), ema (decay), lookahead ({sync_period, alpha}),
  stale_gradients (delay: apply the gradient of `delay` steps ago, see staleness.py),
  accumulate (k), skip_nonfinite (max_consecutive),
  prune ({sparsity: a fraction or {final, begin_step, end_step, initial} (Zhu & Gupta's
  polynomial schedule), scope, prune: [globs], update_every}; see pruning.py),
  state_dtype (bfloat16 or float16: the optimizer's state stored in it, computed in
  float32; low_precision.py), stochastic_rounding (true or {seed}: bfloat16 params move
  to an unbiased stochastic rounding of params + update; low_precision.py).

The chain, inside out: clipping, coupled decay (l2/l1), the optimizer (per group, each
with its decoupled decay), reduce_on_plateau, freeze; then lookahead around that, ema
after it, stale_gradients around those, accumulate around all of it and skip_nonfinite
outermost. The optimizer's state is stored in `state_dtype`; `prune` and then
`stochastic_rounding` come last in the inner chain (after freeze). Mistakes raise a
`JaxtrainError` naming the key: an unknown key or name with the closest valid one and
the valid set, a wrong type with the type expected.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from .. import yaml_numbers
from ..errors import JaxtrainError
from . import (
    ademamix,
    decay,
    kron,
    low_precision,
    mars,
    masks,
    optimizers,
    orthogonal,
    plateau,
    pruning,
    schedules,
    second_order,
    shampoo,
    soap,
    staleness,
    wrappers,
)

# Every optimizer a spec may name (`optimizer: adamw`), registered by name here: a new
# optimizer of jaxtrain.transforms is added to this table (tests/test_spec.py checks that
# every exported factory taking a learning rate is in it).
OPTIMIZERS = {f.__name__: f for f in (
    optimizers.sgd, optimizers.ema_momentum, optimizers.adagrad, optimizers.adadelta,
    optimizers.rmsprop, optimizers.adam, optimizers.adam_8bit, optimizers.adamw,
    optimizers.adamw_8bit, optimizers.adamax,
    optimizers.amsgrad, optimizers.nadam, optimizers.nadamw, optimizers.radam,
    optimizers.normalized_sgd, optimizers.lion, optimizers.lamb, optimizers.lars,
    optimizers.adafactor, optimizers.schedule_free_adamw, second_order.newton,
    second_order.newton_cg, second_order.lbfgs, ademamix.ademamix, mars.mars,
    orthogonal.muon, soap.soap, shampoo.shampoo, kron.psgd_kron)}
TOP_KEYS = ("optimizer", "learning_rate", "weight_decay", "groups", "clip_global_norm",
            "clip", "adaptive_grad_clip", "reduce_on_plateau", "freeze", "ema", "lookahead",
            "stale_gradients", "accumulate", "skip_nonfinite", "prune", "state_dtype",
            "stochastic_rounding")
PRUNE_SCHEDULE_KEYS = ("final", "begin_step", "end_step", "initial")
STATE_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
DECAY_KEYS = ("rate", "kind", "exclude", "include", "min_ndim")
DECAY_KINDS = ("decoupled", "l2", "l1")


def _fail(where: str, message: str):
    raise JaxtrainError(f"{where}: {message}")


def _unknown(where: str, what: str, name, valid) -> None:
    valid = sorted(valid)
    folded = {v.lower(): v for v in valid}
    close = difflib.get_close_matches(str(name).lower(), folded, n=1, cutoff=0.5)
    hint = f" (did you mean '{folded[close[0]]}'?)" if close else ""
    _fail(where, f"unknown {what} {name!r}{hint}; valid: {', '.join(valid)}")


def _mapping(where: str, value) -> dict:
    if not isinstance(value, dict):
        _fail(where, f"expected a mapping, got {value!r} ({type(value).__name__})")
    for key in value:
        if not isinstance(key, str):
            _fail(where, f"keys must be strings, got {key!r}")
    return value


def _check_keys(where: str, value: dict, valid, what: str = "key") -> None:
    for key in value:
        if key not in valid:
            _unknown(where, what, key, valid)


# -- types ------------------------------------------------------------------------------

def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_TYPES = {
    "number": (_is_number, "a number"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list": (lambda v: isinstance(v, list | tuple), "a list"),
}


def _expect(where: str, value, kind: str, optional: bool = False):
    test, words = _TYPES[kind]
    if (value is None and optional) or test(value):
        return value
    _fail(where, f"expected {words}{' or null' if optional else ''}, got {value!r} "
                 f"({type(value).__name__})")


def _positive(where: str, value, kind: str = "number"):
    _expect(where, value, kind)
    if not (math.isfinite(value) and value > 0):
        _fail(where, f"expected a positive {'integer' if kind == 'int' else 'number'}, "
                     f"got {value!r}")
    return value


def _param_kind(param: inspect.Parameter):
    """(kind, optional) of a factory argument, from its annotation or default. A learning
    rate is a number or a schedule whatever its default says (`_learning_rate` checks it)."""
    ann = param.annotation if isinstance(param.annotation, str) else ""
    optional = "None" in ann or param.default is None
    if param.name == "learning_rate":
        return None, optional
    simple = re.fullmatch(r"(bool|int|float|str)( \| None)?", ann)
    if simple:
        return {"float": "number"}.get(simple[1], simple[1]), optional
    default = param.default
    for test, kind in ((lambda d: isinstance(d, bool), "bool"),
                       (lambda d: isinstance(d, int), "int"),
                       (lambda d: isinstance(d, float), "number"),
                       (lambda d: isinstance(d, str), "str")):
        if default is not inspect.Parameter.empty and test(default):
            return kind, optional
    return None, optional


def _check_args(where: str, factory, kwargs: dict, passthrough=()) -> None:
    """Refuse an argument `factory` does not take, one of a type its signature does not
    allow (but those in `passthrough`), or a missing required one."""
    params = inspect.signature(factory).parameters
    for key, value in kwargs.items():
        if key not in params:
            _unknown(where, f"argument of {factory.__name__}", key, params)
        if key in passthrough:
            continue
        kind, optional = _param_kind(params[key])
        if kind is not None:
            _expect(f"{where}.{key}", value, kind, optional)
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty
               and p.kind is p.POSITIONAL_OR_KEYWORD and n not in kwargs]
    if missing:
        _fail(where, f"{factory.__name__} needs {', '.join(missing)}")


@contextlib.contextmanager
def _refusals_named(where: str):
    """A factory's ValueError or TypeError as a `JaxtrainError` naming `where`."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise JaxtrainError(f"{where}: {err}") from err


def _call(where: str, factory, kwargs: dict, passthrough=()):
    """`factory(**kwargs)`, each argument checked against the factory's signature."""
    _check_args(where, factory, kwargs, passthrough)
    with _refusals_named(where):
        return factory(**kwargs)


# -- names ------------------------------------------------------------------------------

def _learning_rate(where: str, value):
    if _is_number(value):
        return value
    if not isinstance(value, dict):
        _fail(where, f"expected a number or a schedule mapping, got {value!r} "
                     f"({type(value).__name__})")
    spec = dict(_mapping(where, value))
    if "schedule" not in spec:
        _fail(where, f"expected a number or a mapping with 'schedule' (one of "
                     f"{', '.join(sorted(schedules.SCHEDULES))}), got {value!r}")
    name = _expect(f"{where}.schedule", spec.pop("schedule"), "str")
    if name not in schedules.SCHEDULES:
        _unknown(f"{where}.schedule", "schedule", name, schedules.SCHEDULES)
    if name == "join":
        _check_keys(where, spec, ("schedules", "boundaries"))
        parts = _expect(f"{where}.schedules", spec.get("schedules"), "list")
        spec["schedules"] = [_learning_rate(f"{where}.schedules[{i}]", p) if isinstance(p, dict)
                             else _fail(f"{where}.schedules[{i}]", "expected a schedule "
                                        f"mapping, got {p!r}") for i, p in enumerate(parts)]
        return _nonnegative(where, _call(where, schedules.join, spec,
                                         passthrough=("schedules",)))
    return _nonnegative(where, _call(where, schedules.SCHEDULES[name], spec))


# Steps at which a configured schedule is checked: every step of a short run, then
# log-spaced up to 1e12 (schedules hold their final value past their end).
_CHECK_STEPS = np.unique(np.concatenate([np.arange(1024.0), np.geomspace(1024, 1e12, 256)]))


def _nonnegative(where: str, schedule):
    """`schedule`, refused when it is negative or not finite at some step (a negative
    learning rate trains by gradient ascent)."""
    computed = schedule(jnp.asarray(_CHECK_STEPS))
    values = np.asarray(computed, np.float64)
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
    if bad.size:
        i = bad[0]
        _fail(where, f"the schedule is {values[i]:.3g} at step {int(_CHECK_STEPS[i])} (in "
                     f"{computed.dtype}): a learning rate must stay finite and >= 0 (check "
                     "its end or peak values)")
    return schedule


def _devices(where: str, factory, kwargs: dict, num_devices: int | None) -> dict:
    """`{'num_devices': n}` for an optimizer that pads its per-block stacks to a multiple
    of its `num_devices` (shampoo, soap) or keeps its 8-bit blocks within that many pieces
    of each axis (adam_8bit, adamw_8bit): the mesh's device count when the entry does not
    set it; an entry's own must be a multiple of the device count, or the stacks do not
    split evenly over the devices (and stay whole on each)."""
    if num_devices is None or "num_devices" not in inspect.signature(factory).parameters:
        return {}
    given = kwargs.get("num_devices")
    if given is None:
        return {"num_devices": num_devices}
    if _TYPES["int"][0](given) and given >= 1 and given % num_devices:
        _fail(f"{where}.num_devices", f"{given} does not split evenly over the mesh's "
                                      f"{num_devices} devices: give a multiple of "
                                      f"{num_devices}, or leave it out (the mesh's device "
                                      f"count is taken)")
    return {}


def _optimizer(where: str, value, learning_rate, decay_rule, group=None, override=None,
               num_devices=None):
    """The transform of an `optimizer` entry (a name or {name, <its arguments>}) and the
    arguments it was built with. Its learning rate is the entry's own, else
    `learning_rate`; a group's `override` (errors then name `group`) goes over both. The
    decoupled weight decay of `decay_rule` goes to the optimizer's own `weight_decay`/`mask`
    where it has them, else after it. `num_devices`: the mesh's device count (`_devices`)."""
    if isinstance(value, str):
        name, kwargs = value, {}
    else:
        kwargs = dict(_mapping(where, value))
        if "name" not in kwargs:
            _fail(where, f"expected an optimizer name or a mapping with 'name', got {value!r}")
        name = _expect(f"{where}.name", kwargs.pop("name"), "str")
    if name not in OPTIMIZERS:
        _unknown(where, "optimizer", name, OPTIMIZERS)
    factory = OPTIMIZERS[name]
    if "learning_rate" in kwargs:
        kwargs["learning_rate"] = _learning_rate(f"{where}.learning_rate",
                                                 kwargs["learning_rate"])
    elif learning_rate is not None:
        kwargs["learning_rate"] = learning_rate
    where = group or where
    if override:
        if "learning_rate" in override:
            override["learning_rate"] = _learning_rate(f"{where}.learning_rate",
                                                       override["learning_rate"])
        kwargs.update(override)
    decoupled = decay_rule is not None and decay_rule[1] == "decoupled"
    rate, _, mask = decay_rule if decoupled else (None, None, None)
    params = inspect.signature(factory).parameters
    own_decay = decoupled and "weight_decay" in params and (mask is None or "mask" in params)
    call = {**kwargs, **_devices(where, factory, kwargs, num_devices)}
    if own_decay:
        call = {**call, "weight_decay": rate, **({"mask": mask} if mask is not None else {})}
    _check_args(where, factory, call, passthrough=("mask",) if own_decay else ())
    with _refusals_named(where):
        tx = factory(**call)
    if decoupled and not own_decay:
        tx = optax.chain(tx, decay.add_decoupled_weight_decay(
            rate, kwargs.get("learning_rate", 1.0), mask))
    return tx, kwargs


def _decay_mask(where: str, spec: dict):
    parts = []
    if "exclude" in spec:
        parts.append(masks.exclude(_patterns(f"{where}.exclude", spec["exclude"])))
    if "include" in spec:
        parts.append(masks.include(_patterns(f"{where}.include", spec["include"])))
    if "min_ndim" in spec:
        parts.append(masks.ndim_at_least(_expect(f"{where}.min_ndim", spec["min_ndim"], "int")))
    if not parts:
        return None
    mask = parts[0]
    for part in parts[1:]:
        mask = mask & part
    return mask


def _patterns(where: str, value) -> list[str]:
    value = [value] if isinstance(value, str) else _expect(where, value, "list")
    for item in value:
        _expect(where, item, "str")
    return list(value)


def _weight_decay(value):
    if value is None:
        return None
    where = "weight_decay"
    spec = {"rate": value} if _is_number(value) else dict(_mapping(where, value))
    _check_keys(where, spec, DECAY_KEYS)
    if "rate" not in spec:
        _fail(where, "needs 'rate'")
    rate = _expect(f"{where}.rate", spec["rate"], "number")
    kind = _expect(f"{where}.kind", spec.get("kind", "decoupled"), "str")
    if kind not in DECAY_KINDS:
        _unknown(f"{where}.kind", "kind", kind, DECAY_KINDS)
    return rate, kind, _decay_mask(where, spec)


def _prune(value) -> optax.GradientTransformation:
    """`magnitude_prune` from the `prune` entry (its sparsity a fraction or a schedule)."""
    spec = dict(_mapping("prune", value))
    if "sparsity" not in spec:
        _fail("prune", "needs 'sparsity' (a fraction in [0, 1), or {final, begin_step, "
                       "end_step, initial} for Zhu & Gupta's schedule)")
    sparsity = spec["sparsity"]
    if isinstance(sparsity, dict):
        where = "prune.sparsity"
        _check_keys(where, _mapping(where, sparsity), PRUNE_SCHEDULE_KEYS)
        sparsity = _call(where, pruning.polynomial_sparsity, sparsity)
    elif not _is_number(sparsity):
        _fail("prune.sparsity", f"expected a fraction or a schedule mapping, got {sparsity!r}")
    if "prune" in spec:
        spec["prune"] = _patterns("prune.prune", spec["prune"])
    return _call("prune", pruning.magnitude_prune, {**spec, "sparsity": sparsity},
                 passthrough=("sparsity", "prune"))


def _stochastic_rounding(value) -> optax.GradientTransformation:
    """`stochastic_rounding` keyed by `seed` (`true`: seed 0)."""
    if value is True:
        value = {}
    if not isinstance(value, dict):
        _fail("stochastic_rounding", f"expected true or {{seed: int}}, got {value!r}")
    _check_keys("stochastic_rounding", value, ("seed",))
    seed = _expect("stochastic_rounding.seed", value.get("seed", 0), "int")
    return low_precision.stochastic_rounding(jax.random.PRNGKey(seed))


def build(config, prefix: str = "", num_devices: int | None = None
          ) -> optax.GradientTransformationExtraArgs:
    """The chain described by `config`: a dict, or YAML text (see the module docstring).
    Each error's line, also those of the returned transform's `init`, starts with `prefix`
    (e.g. "config key 'optimizer': "). `num_devices`, the device count of the mesh the
    chain will run on, is given to the optimizers that pad per-block state to split it
    over the devices (shampoo, soap) where the spec does not set theirs; one they set must
    be a multiple of it."""
    try:
        if isinstance(config, str):
            try:
                config = yaml_numbers.load(config)
            except yaml.YAMLError as err:
                raise JaxtrainError(f"spec: not valid YAML: {err}") from err
        cfg = _mapping("spec", config)
        _check_keys("spec", cfg, TOP_KEYS)
        if "optimizer" not in cfg:
            _fail("spec", "missing key 'optimizer' (e.g. optimizer: adamw)")
        lr = (_learning_rate("learning_rate", cfg["learning_rate"])
              if "learning_rate" in cfg else None)
        decay_rule = _weight_decay(cfg.get("weight_decay"))
        core, kwargs = _optimizer("optimizer", cfg["optimizer"], lr, decay_rule,
                                  num_devices=num_devices)
        if "groups" in cfg:
            groups = {}
            for pattern, override in _mapping("groups", cfg["groups"]).items():
                where = f"groups.{pattern}"
                override = dict(_mapping(where, override))
                value = override.pop("optimizer", cfg["optimizer"])
                groups[pattern], _ = _optimizer(f"{where}.optimizer", value,
                                                kwargs.get("learning_rate"), decay_rule,
                                                where, override, num_devices)
            core = wrappers.per_group(groups, default=core)
        if "state_dtype" in cfg:
            name = _expect("state_dtype", cfg["state_dtype"], "str")
            if name not in STATE_DTYPES:
                _unknown("state_dtype", "dtype", name, STATE_DTYPES)
            core = low_precision.low_precision_state(core, STATE_DTYPES[name])
        tx = _around(cfg, core, decay_rule)
    except JaxtrainError as err:
        if not prefix:
            raise
        raise JaxtrainError(f"{prefix}{err}") from None
    return _prefixed_init(tx, prefix) if prefix else tx


def _prefixed_init(tx, prefix: str) -> optax.GradientTransformationExtraArgs:
    """`tx` whose `init` errors (the checks against the params: a learning rate not
    finite in their dtype, a mask of another structure) also start with `prefix`."""

    def init(params):
        try:
            return tx.init(params)
        except JaxtrainError as err:
            raise JaxtrainError(f"{prefix}{err}") from None

    return optax.GradientTransformationExtraArgs(init, tx.update)


def _around(cfg: dict, core, decay_rule) -> optax.GradientTransformationExtraArgs:
    """`core` (the optimizer, per group) inside the chain of every other key of `cfg`."""
    chain = []
    if "clip_global_norm" in cfg:
        chain.append(wrappers.clip_by_global_norm(
            _positive("clip_global_norm", cfg["clip_global_norm"])))
    if "clip" in cfg:
        chain.append(wrappers.clip(_positive("clip", cfg["clip"])))
    if "adaptive_grad_clip" in cfg:
        agc = cfg["adaptive_grad_clip"]
        agc = {"clipping": agc} if _is_number(agc) else _mapping("adaptive_grad_clip", agc)
        chain.append(_call("adaptive_grad_clip", wrappers.adaptive_grad_clip, agc))
    if decay_rule is not None and decay_rule[1] != "decoupled":
        rule = decay.add_l2 if decay_rule[1] == "l2" else decay.add_l1
        chain.append(rule(decay_rule[0], mask=decay_rule[2]))
    chain.append(core)
    if "reduce_on_plateau" in cfg:
        chain.append(_call("reduce_on_plateau", plateau.reduce_on_plateau,
                           _mapping("reduce_on_plateau", cfg["reduce_on_plateau"])))
    if "freeze" in cfg:
        chain.append(wrappers.freeze(_patterns("freeze", cfg["freeze"])))
    if "prune" in cfg:
        chain.append(_prune(cfg["prune"]))
    if "stochastic_rounding" in cfg:
        chain.append(_stochastic_rounding(cfg["stochastic_rounding"]))
    tx = optax.chain(*chain)
    if "lookahead" in cfg:
        def lookahead(sync_period: int = 5, alpha: float = 0.5):
            return wrappers.lookahead(tx, sync_period, alpha)

        tx = _call("lookahead", lookahead, _mapping("lookahead", cfg["lookahead"]))
    if "ema" in cfg:
        tx = optax.chain(tx, _call("ema", wrappers.ema, {"decay": cfg["ema"]}))
    if "stale_gradients" in cfg:
        delay = _expect("stale_gradients", cfg["stale_gradients"], "int")
        tx = staleness.stale_gradients(tx, delay)
    if "accumulate" in cfg:
        tx = wrappers.accumulate(_positive("accumulate", cfg["accumulate"], "int"), tx)
    if "skip_nonfinite" in cfg:
        tx = wrappers.skip_nonfinite(_positive("skip_nonfinite", cfg["skip_nonfinite"], "int"),
                                     tx)
    return optax.with_extra_args_support(tx)
