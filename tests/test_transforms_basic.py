"""The foundation transforms: Optax parity, torch parity, freeze, groups, hyperparams."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import transforms as T


def _params():
    return {"backbone": {"w": jnp.arange(6.0).reshape(2, 3) / 7}, "head": {"b": jnp.ones(3)}}


def _run(tx, params, grads_seq):
    state = tx.init(params)
    for g in grads_seq:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _grads(n, seed=0):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                         _params()) for _ in range(n)]


@pytest.mark.parametrize("ours,theirs", [
    (T.adam(0.01), optax.adam(0.01)),
    (T.sgd(0.1, momentum=0.9, nesterov=True), optax.sgd(0.1, momentum=0.9, nesterov=True)),
    (T.adamw(0.01, weight_decay=0.1), optax.adamw(0.01, weight_decay=0.1)),
])
def test_matches_optax(ours, theirs):
    grads = _grads(20)
    a, _ = _run(ours, _params(), grads)
    b, _ = _run(theirs, _params(), grads)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def test_adam_matches_torch():
    import torch
    grads = _grads(50)
    ours, _ = _run(T.adam(0.05), _params(), grads)
    w = torch.tensor(np.asarray(_params()["backbone"]["w"]), requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    for g in grads:
        w.grad = torch.tensor(np.asarray(g["backbone"]["w"]))
        opt.step()
    np.testing.assert_allclose(ours["backbone"]["w"], w.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_freeze_zeroes_only_matching_paths():
    tx = optax.chain(T.adamw(0.1, weight_decay=0.5), T.freeze("backbone/*"))
    params = _params()
    new, _ = _run(tx, params, _grads(3))
    np.testing.assert_array_equal(new["backbone"]["w"], params["backbone"]["w"])
    assert not np.allclose(new["head"]["b"], params["head"]["b"])


def test_per_group_learning_rates():
    grads = _grads(5)
    tx = T.per_group({"backbone/*": T.sgd(0.01)}, default=T.sgd(0.1))
    new, state = _run(tx, _params(), grads)
    total = jax.tree.map(lambda *g: sum(g), *grads)
    expect_w = _params()["backbone"]["w"] - 0.01 * total["backbone"]["w"]
    expect_b = _params()["head"]["b"] - 0.1 * total["head"]["b"]
    np.testing.assert_allclose(new["backbone"]["w"], expect_w, rtol=1e-6)
    np.testing.assert_allclose(new["head"]["b"], expect_b, rtol=1e-6)
    assert {"learning_rate", "default/learning_rate"} <= set(T.current_hyperparams(state))


def test_current_hyperparams_reads_learning_rate_through_chain():
    tx = optax.chain(optax.clip_by_global_norm(1.0), T.adam(0.02))
    hp = T.current_hyperparams(tx.init(_params()))
    assert float(hp["learning_rate"]) == pytest.approx(0.02)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_learning_rate_is_refused(bad):
    with pytest.raises(ValueError, match="learning_rate"):
        T.adam(bad)


# Largest float16: 65504, so a linear ramp to 1e5 over 100 steps first exceeds it at step 66.
@pytest.mark.parametrize("make, dtype, message", [
    (lambda: T.adam(1e39), jnp.float32,
     r"adam: learning_rate=1e\+39 is not finite in float32, the params' dtype \(largest 3.4e\+38"),
    (lambda: T.adam(1e39), jnp.bfloat16, "is not finite in bfloat16, the params' dtype"),
    (lambda: T.sgd(1e5), jnp.float16,
     r"sgd: learning_rate=100000.0 is not finite in float16, the params' dtype \(largest 6.55e"),
    (lambda: T.adam(optax.linear_schedule(0.0, 1e5, 100)), jnp.float16,
     r"schedule's value at step 66, 6.6e\+04, is not finite in float16"),
    (lambda: T.adam(optax.linear_schedule(0.1, -0.1, 10)), jnp.float32,
     "schedule's value at step 6, -0.02, is negative"),
    (lambda: T.adam(0.1, eps=1e-50), jnp.float32, "adam: eps=1e-50 is 0 in float32"),
])
def test_hyperparameters_meaningless_in_the_dtypes_are_refused_at_init(make, dtype, message):
    """Refused when the params are first seen, before any step (1e39 used to train NaN
    weights in float32 from the first step; eps=1e-50 divided 0 by 0)."""
    tx = make()
    with pytest.raises(ValueError, match=message):
        tx.init({"w": jnp.ones(3, dtype)})
    with pytest.raises(ValueError, match=message):  # also when traced (restore targets)
        jax.eval_shape(tx.init, {"w": jnp.ones(3, dtype)})
    T.sgd(65504.0).init({"w": jnp.ones(3, jnp.float16)})  # the largest float16 is taken


def test_bad_beta_is_refused():
    with pytest.raises(ValueError, match="b2"):
        T.adam(0.1, b2=1.0)


def test_paths_globs_and_regexes():
    assert T.matches("backbone/conv1/kernel", "backbone/*")
    assert not T.matches("head/kernel", "backbone/*")
    assert T.matches("head/kernel", "re:head/(kernel|bias)")
    assert T.path_list(_params()) == ["backbone/w", "head/b"]


def test_current_hyperparams_of_an_nnx_optimizer():
    """nnx.Optimizer holds its state's leaves in Variables: the hyperparameters are found
    there too, from the optimizer or its opt_state, and follow a schedule's steps."""
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     T.adamw(T.schedules.linear(0.1, 0.0, 10), weight_decay=0.05))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = nnx.state(model, nnx.Param)
    for _ in range(2):  # the reported rate is the one the last update used: schedule(1)
        opt.update(model, jax.tree.map(jnp.ones_like, grads))
    for where in (opt, opt.opt_state):
        hp = T.current_hyperparams(where)
        assert float(hp["learning_rate"]) == pytest.approx(0.09)
        assert float(hp["weight_decay"]) == pytest.approx(0.05)
