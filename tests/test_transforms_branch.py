"""`vmappable_cond`: lax.cond's result for every member, and under vmap the branch runs only
when some member takes it (a vmapped lax.cond runs both branches every time)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import transforms as T
from jaxtrain.transforms.branch import vmappable_cond


def _counted(calls):
    def true_fn(x):
        jax.debug.callback(lambda: calls.append(1))
        return x * 2.0 + 1.0

    return true_fn


def test_each_member_gets_its_own_branch():
    calls = []
    x = jnp.arange(6.0).reshape(3, 2)
    pred = jnp.array([True, False, True])
    out = jax.jit(jax.vmap(lambda p, v: vmappable_cond(p, _counted(calls), lambda v: v, v)))(
        pred, x)
    expected = [jax.lax.cond(p, lambda v: v * 2.0 + 1.0, lambda v: v, v) for p, v in zip(
        pred, x, strict=True)]
    np.testing.assert_array_equal(out, np.stack(expected))
    # outside vmap, and differentiated, it is lax.cond
    np.testing.assert_array_equal(vmappable_cond(False, _counted([]), lambda v: -v, x), -x)
    grad = jax.vmap(jax.grad(lambda v: vmappable_cond(v.sum() > 2, _counted([]), lambda v: v,
                                                      v).sum()))(x)
    np.testing.assert_array_equal(grad, [[1, 1], [2, 2], [2, 2]])


def test_under_vmap_the_branch_no_member_takes_does_not_run():
    x = jnp.ones((4, 3))
    none = jnp.zeros(4, bool)
    ours, plain = [], []
    jax.block_until_ready(jax.jit(jax.vmap(
        lambda p, v: vmappable_cond(p, _counted(ours), lambda v: v, v)))(none, x))
    jax.block_until_ready(jax.jit(jax.vmap(
        lambda p, v: jax.lax.cond(p, _counted(plain), lambda v: v, v)))(none, x))
    assert (len(ours), len(plain)) == (0, 1)  # lax.cond became a select and ran it


@pytest.mark.parametrize("make", [
    lambda lr: T.shampoo(lr, precondition_every=3, start_preconditioning_step=1),
    lambda lr: T.soap(lr, precondition_frequency=3),
    lambda lr: T.psgd_kron(lr, update_prob=0.5),
], ids=["shampoo", "soap", "psgd_kron"])
def test_a_vmapped_sweep_keeps_the_refresh_a_branch_and_equals_each_run(make):
    """Over learning rates (each run's step counter batched, as in `jaxtrain sweep`): the
    preconditioner refresh stays a `cond` in the vmapped update, and 4 steps of the
    vmapped runs equal each run on its own."""
    params = {"w": jnp.ones((32, 16)), "b": jnp.zeros((16,))}  # Shampoo skips small leaves
    keys = jax.random.split(jax.random.key(0), 4)
    grads = [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape), params) for k in keys]

    def run(lr):
        tx = make(lr)
        state, p = tx.init(params), params
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = jax.tree.map(jnp.add, p, updates)
        return p

    def update(lr, state):
        return make(lr).update(grads[0], state, params)

    rates = jnp.array([1e-3, 3e-3])
    states = jax.vmap(lambda lr: make(lr).init(params))(rates)
    text = str(jax.make_jaxpr(jax.vmap(update))(rates, states))
    assert " cond[" in text
    swept = jax.jit(jax.vmap(run))(rates)
    for i, lr in enumerate(rates):
        alone = jax.jit(run)(lr)
        jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5,
                                                                  atol=1e-7), swept, alone)


def _eigh_batches(jaxpr) -> list:
    """The batch size of every eigh in `jaxpr` and the jaxprs nested in it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "eigh":
            found.append(int(np.prod(eqn.invars[0].aval.shape[:-2])))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _eigh_batches(sub)
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the loop is XLA:CPU's workaround")
@pytest.mark.parametrize("make", [
    lambda lr: T.shampoo(lr, precondition_every=3, start_preconditioning_step=1),
    lambda lr: T.soap(lr, precondition_frequency=3),
], ids=["shampoo", "soap"])
def test_on_cpu_no_eigh_is_batched_even_under_vmap(make):
    """A batched eigh on XLA:CPU waits on the thread pool for its pieces, and two at once
    hung a 2-core machine (blocks.per_block): vmapped over learning rates, every eigh of
    Shampoo's and SOAP's update takes one matrix."""
    params = {"w": jnp.ones((32, 16)), "b": jnp.zeros((16,))}
    rates = jnp.array([1e-3, 3e-3, 1e-2])
    states = jax.vmap(lambda lr: make(lr).init(params))(rates)
    jaxpr = jax.make_jaxpr(jax.vmap(lambda lr, s: make(lr).update(params, s, params)))(
        rates, states).jaxpr
    batches = _eigh_batches(jaxpr)
    assert batches and set(batches) == {1}, batches
