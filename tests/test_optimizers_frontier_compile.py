"""Changing a frontier optimizer's hyperparameters between steps compiles nothing new:
they live in the state (`inject_hyperparams`), so `set_hyperparams` changes array values,
never the traced program. Counted on the jitted step's cache (one entry before, one after)
and with `jax.log_compiles`."""

import logging

import jax
import jax.numpy as jnp
import optax
import pytest

from jaxtrain import transforms as T

CASES = {  # name -> (optimizer, hyperparameters changed mid-run)
    "ademamix": (T.ademamix(1e-3, weight_decay=0.01),
                 {"learning_rate": 5e-4, "b1": 0.8, "b3": 0.99, "alpha": 3.0,
                  "weight_decay": 0.02}),
    "mars": (T.mars(1e-3), {"learning_rate": 5e-4, "b1": 0.9, "gamma": 0.01,
                            "weight_decay": 0.1}),
    "muon": (T.muon(0.02), {"learning_rate": 0.01, "beta": 0.9, "weight_decay": 0.1,
                            "adam_b2": 0.99}),
    "soap": (T.soap(3e-3), {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.99, "eps": 1e-7,
                            "weight_decay": 0.0}),
    "shampoo": (T.shampoo(3e-3, block_size=8), {"learning_rate": 1e-3, "b1": 0.95,
                                                "b2": 0.99, "weight_decay": 0.1}),
    "psgd_kron": (T.psgd_kron(1e-3), {"learning_rate": 5e-4, "b1": 0.95, "precond_lr": 0.05,
                                      "weight_decay": 0.1}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_changing_hyperparameters_compiles_nothing(name, caplog):
    tx, changes = CASES[name]
    params = {"w": jnp.ones((12, 8)), "b": jnp.zeros((8,))}
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(0), p.shape), params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    params, state = step(params, state)
    before = T.current_hyperparams(state)
    state = T.set_hyperparams(state, **changes)
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        caplog.clear()
        for _ in range(3):
            params, state = step(params, state)
        jax.block_until_ready(params)
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()
                and "step" in r.getMessage()]
    assert step._cache_size() == 1 and not compiled, compiled
    after = T.current_hyperparams(state)
    for key, value in changes.items():
        assert float(after[key]) == pytest.approx(value) != float(before[key])


def test_the_count_sees_a_compilation(caplog):
    """Control: a learning rate baked in as a constant does recompile, and is counted."""

    def make(lr):
        tx = T.muon(lr)
        return jax.jit(lambda p, s, g: tx.update(g, s, p)), tx

    params = {"w": jnp.ones((12, 8))}
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        for lr in (0.02, 0.01):
            step, tx = make(lr)
            step(params, tx.init(params), params)
    compiled = [r for r in caplog.records if "Compiling" in r.getMessage()
                and "<lambda>" in r.getMessage()]
    assert len(compiled) == 2
