"""Properties every first-order optimizer of the catalogue must have, looped over the
registry (`spec.OPTIMIZERS`), so that an optimizer added there is covered
without editing this file:

- bfloat16 params: finite after several steps, close to the same run in float32, and
  the float32 run equal to the Optax twin's where there is one;
- dtypes: updates in the gradients' dtype and a state whose dtypes never change, for
  bfloat16, float16 and float32 params, and float32/float64 params under x64;
- traced hyperparameters: every numeric hyperparameter as an argument of `jit`, the
  learning rate under `vmap`, and the optimizer inside `optax.inject_hyperparams` with a
  scheduled learning rate (the schedule must take effect).

The form-selecting options (torch's formulas: `max_of='raw'`, `momentum_decay`,
`eps_of='raw'`, ...) are separate cases.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain.transforms import spec

# Second-order optimizers take `value=`/`grad=`/`value_fn=` extra args and a loss; their
# own tests cover them (tests/test_second_order.py).
SECOND_ORDER = {"lbfgs", "newton", "newton_cg"}
FACTORIES = {n: f for n, f in spec.OPTIMIZERS.items() if n not in SECOND_ORDER}
# Arguments without defaults, per optimizer.
REQUIRED = {"normalized_sgd": {"beta": 0.01, "eps": 0.01}}
# Options that select another formula (torch's) or add state: each is a case of its own.
VARIANTS = {
    "sgd": [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}],
    "adagrad": [{"eps_in_sqrt": False}],
    "rmsprop": [{"eps_in_sqrt": False, "centered": True, "momentum": 0.5}],
    "amsgrad": [{"max_of": "raw"}],
    "nadam": [{"momentum_decay": 4e-3}],
    "nadamw": [{"momentum_decay": 4e-3}],
    "radam": [{"eps_of": "raw"}],
    "adafactor": [{"momentum": 0.9}],
    "muon": [{"adam_learning_rate": 0.003}],
    "adam": [{"mu_dtype": "bfloat16", "nu_dtype": "bfloat16"}],
    "adamw_8bit": [{"min_8bit_size": 0, "block_size": 8}],  # quantized leaves here
}
LR = 0.01
TWINS = {
    "sgd": lambda: optax.sgd(LR),
    "ema_momentum": lambda: optax.chain(optax.ema(0.9, debias=False),
                                        optax.scale_by_learning_rate(LR)),
    "adagrad": lambda: optax.adagrad(LR, 0.1, 1e-7),
    "adadelta": lambda: optax.adadelta(LR, 0.9, 1e-6),
    "rmsprop": lambda: optax.rmsprop(LR, 0.9, 1e-8),
    "adam": lambda: optax.adam(LR),
    "adamw": lambda: optax.adamw(LR, weight_decay=1e-2),
    "adam_8bit": lambda: optax.adam(LR),  # leaves under min_8bit_size: float32 moments
    "adamw_8bit": lambda: optax.adamw(LR, weight_decay=1e-2),
    "adamax": lambda: optax.adamax(LR),
    "amsgrad": lambda: optax.amsgrad(LR),
    "nadam": lambda: optax.nadam(LR),
    "nadamw": lambda: optax.nadamw(LR, weight_decay=1e-2),
    "radam": lambda: optax.radam(LR),
    "lion": lambda: optax.lion(LR, weight_decay=1e-3),
    "lamb": lambda: optax.lamb(LR, eps=1e-6),
    "lars": lambda: optax.lars(LR),
    "adafactor": lambda: optax.adafactor(LR),
    "muon": lambda: optax.contrib.muon(LR),
    "schedule_free_adamw": lambda: optax.contrib.schedule_free_adamw(LR),
}
# Slow op by op (optax's muon recompiles its Newton-Schulz each call): run in CI only.
SLOW = {"muon"}
CASES = [pytest.param(name, v, id=name + "".join(f"-{k}={x}" for k, x in v.items()),
                      marks=[pytest.mark.slow] if name in SLOW else [])
         for name, v in [(n, {}) for n in FACTORIES]
         + [(n, v) for n, vs in VARIANTS.items() if n in FACTORIES for v in vs]]
STEPS = 4
SHAPES = {"w": (8, 4), "b": (4,)}


def make(name, variant=None, **overrides):
    kwargs = {"learning_rate": LR, **REQUIRED.get(name, {}), **(variant or {}), **overrides}
    return FACTORIES[name](**kwargs)


def params_and_grads(dtype):
    """Params and STEPS gradients (growing in scale), from numpy: no JAX compile."""
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in SHAPES.items()}
    grads = [{k: jnp.asarray(rng.normal(size=s) * (1 + t / 2), dtype)
              for k, s in SHAPES.items()} for t in range(STEPS)]
    return params, grads


def run(tx, params, grads):
    """params after one update per gradient, op by op: each primitive compiles once for
    the whole session, where a jitted run compiles per optimizer (seconds each here)."""
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_catalogue_is_the_registry():
    """Every registered optimizer has a case; a new one needing arguments is flagged."""
    assert {"adam", "sgd", "radam", "muon"} <= set(FACTORIES)
    for name, factory in FACTORIES.items():
        for arg, p in inspect.signature(factory).parameters.items():
            if p.default is inspect.Parameter.empty and arg != "learning_rate":
                assert arg in REQUIRED.get(name, {}), f"{name}: add {arg} to REQUIRED"


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(tree)])


def _norm(a, b):
    return float(np.linalg.norm(_flat(a) - _flat(b)))


@pytest.mark.parametrize("name,variant", CASES)
def test_bfloat16_params_stay_finite_and_close_to_float32(name, variant):
    p16, g16 = params_and_grads(jnp.bfloat16)
    ours16 = run(make(name, variant), p16, g16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ours16))
    assert np.all(np.isfinite(_flat(ours16))), f"{name}: non-finite params in bfloat16"
    # the same run in float32 from the same (bfloat16-representable) values: apart by
    # little more than bfloat16's rounding of the params at each step
    p32, g32 = jax.tree.map(lambda x: x.astype(jnp.float32), (p16, g16))
    ours32 = run(make(name, variant), p32, g32)
    rounding = _norm(ours32, jax.tree.map(lambda x: x.astype(jnp.bfloat16), ours32))
    gap = _norm(ours16, ours32)
    assert gap <= 3 * STEPS**0.5 * rounding + 0.1 * _norm(ours32, p32), (
        f"{name}: bfloat16 run {gap:.3g} from float32 (rounding {rounding:.3g})")
    if name in TWINS and not variant:
        np.testing.assert_allclose(_flat(ours32), _flat(run(TWINS[name](), p32, g32)),
                                   rtol=1e-5, atol=1e-6, err_msg=f"{name}: not its Optax twin")
        twin16 = run(TWINS[name](), p16, g16)
        if np.all(np.isfinite(_flat(twin16))):  # where Optax's copes, ours is as close
            assert gap <= 1.1 * _norm(twin16, ours32) + rounding


def _dtypes(tree):
    return jax.tree.map(lambda x: jnp.result_type(x), tree)


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
@pytest.mark.parametrize("name,variant", CASES)
def test_updates_and_state_keep_their_dtypes(name, variant, x64):
    dtypes = (jnp.float32, jnp.float64) if x64 else (jnp.bfloat16, jnp.float16, jnp.float32)
    with jax.enable_x64(x64):
        for dtype in dtypes:
            tx = make(name, variant)
            params, grads = params_and_grads(dtype)
            state = jax.eval_shape(tx.init, params)
            for g in grads[:2]:
                updates, new_state = jax.eval_shape(tx.update, g, state, params)
                assert _dtypes(updates) == _dtypes(g), (name, dtype, _dtypes(updates))
                assert _dtypes(new_state) == _dtypes(state), (
                    f"{name} {jnp.dtype(dtype).name}: state dtypes changed: "
                    f"{_dtypes(state)} -> {_dtypes(new_state)}")
                state = new_state


def numeric_hyperparams(name, variant):
    """Every float argument of the optimizer (from its signature and the case) but the
    learning rate, with its value."""
    sig = inspect.signature(FACTORIES[name]).parameters
    values = {k: p.default for k, p in sig.items()}
    values.update(REQUIRED.get(name, {}), **variant)
    return {k: v for k, v in values.items()
            if k != "learning_rate" and isinstance(v, float) and not isinstance(v, bool)}


def _close(a, b, what):
    np.testing.assert_allclose(_flat(a), _flat(b), rtol=2e-5, atol=1e-6, err_msg=what)


# Also compiled (slow on a loaded 2-core machine, so a few); the others are traced only.
JIT_CASES = {"adam", "sgd-momentum=0.9", "rmsprop-eps_in_sqrt=False-centered=True-momentum=0.5",
             "nadam-momentum_decay=0.004", "radam-eps_of=raw"}


@pytest.mark.parametrize("name,variant", CASES)
def test_traced_hyperparameters(name, variant, request):
    params, grads = params_and_grads(jnp.float32)
    grads = grads[:3]
    hps = numeric_hyperparams(name, variant)
    fixed = {k: v for k, v in variant.items() if k not in hps}
    expect = run(make(name, variant), params, grads)

    def from_args(lr, hp):
        return run(make(name, fixed, learning_rate=lr, **hp), params, grads)

    # every numeric hyperparameter an argument of jit: traced without a concrete value
    jax.make_jaxpr(from_args)(LR, hps)
    if request.node.callspec.id in JIT_CASES:
        _close(jax.jit(from_args)(LR, hps), expect, f"{name}: hyperparameters as jit args")

    # vmap over learning rates, the others traced too (batched op by op)
    batched = jax.vmap(from_args, in_axes=(0, None))(jnp.array([LR, 2 * LR]), hps)
    _close(jax.tree.map(lambda x: x[0], batched), expect, f"{name}: vmap, first rate")
    _close(jax.tree.map(lambda x: x[1], batched),
           run(make(name, variant, learning_rate=2 * LR), params, grads),
           f"{name}: vmap, second rate")

    # inside optax.inject_hyperparams: a scheduled rate and the numeric ones injected
    def schedule(count):
        return LR / (1.0 + count)

    ints = [k for k, p in inspect.signature(FACTORIES[name]).parameters.items()
            if isinstance(p.default, int) and not isinstance(p.default, bool)]  # shapes
    outer = optax.inject_hyperparams(FACTORIES[name], static_args=ints)(
        learning_rate=schedule, **fixed, **hps)
    _close(run(outer, params, grads), run(make(name, variant, learning_rate=schedule),
                                          params, grads),
           f"{name}: inside inject_hyperparams, the outer schedule")
