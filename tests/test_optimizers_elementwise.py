"""`transforms.elementwise` (Optax's updates, hyperparameters broadcast once per leaf shape)
gives Optax's own values bit for bit, under `optax.inject_hyperparams` as jaxtrain runs
them, with Optax's state; and the step it lowers has no per-leaf scalar broadcasts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain.transforms import elementwise as E

WD = {"weight_decay": 0.1}
CASES = {  # name -> (ours, Optax's, hyperparameters)
    "lion": (E.lion, optax.lion, WD),
    "adam": (E.adam, optax.adam, {"eps_root": 1e-9}),
    "adamw": (E.adamw, optax.adamw, WD),
    "adamw_masked": (E.adamw, optax.adamw, {**WD, "mask": {"w": True, "b": False,
                                                          "h": True}}),
    "ademamix": (lambda learning_rate: E.finish(E.scale_by_ademamix(b3=0.99, alpha=2.0),
                                                learning_rate, 0.1),
                 lambda learning_rate: optax.contrib.ademamix(learning_rate, b3=0.99, alpha=2.0,
                                                              weight_decay=0.1), {}),
    "ademamix_schedules": (  # b3 and alpha as functions of the count (the warm-ups)
        lambda learning_rate: E.finish(E.scale_by_ademamix(b3=lambda c: 0.9 + 0.001 * c,
                                                           alpha=lambda c: c + 1.0),
                                       learning_rate, 0.0),
        lambda learning_rate: optax.chain(
            optax.contrib.scale_by_ademamix(b3=lambda c: 0.9 + 0.001 * c,
                                            alpha=lambda c: c + 1.0),
            optax.add_decayed_weights(0.0), optax.scale_by_learning_rate(learning_rate)), {}),
}


def _params(dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    return {"w": jax.random.normal(keys[0], (5, 3), dtype),
            "b": jax.random.normal(keys[1], (3,), dtype),
            "h": jax.random.normal(keys[2], (5, 3), dtype)}  # shares w's broadcasts


def _run(factory, hyper, dtype, steps=4):
    static = ("mask",) if "mask" in hyper else ()
    tx = optax.inject_hyperparams(factory, static_args=static)(learning_rate=0.05, **hyper)
    params = _params(dtype)
    state = tx.init(params)
    for t in range(steps):
        grads = jax.tree.map(lambda p, t=t: jax.random.normal(jax.random.key(t + 1), p.shape,
                                                              p.dtype), params)
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_bit_for_bit_optax(name, dtype):
    ours, theirs, hyper = CASES[name]
    got, want = _run(ours, hyper, dtype), _run(theirs, hyper, dtype)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("name", ["lion", "adam", "adamw"])
def test_one_broadcast_per_hyperparameter_and_shape(name):
    """The lowered step broadcasts each scalar once per leaf shape, not per leaf (what
    makes Optax's code under injection compile slower, elementwise.py)."""
    ours, _, hyper = CASES[name]
    tx = optax.inject_hyperparams(ours)(learning_rate=0.05, **hyper)
    params = {f"p{i}": jnp.zeros((4, 2)) for i in range(20)}
    hlo = jax.jit(tx.update).lower(params, tx.init(params), params).as_text(dialect="hlo")
    assert hlo.count(" broadcast(") <= 12, hlo.count(" broadcast(")
