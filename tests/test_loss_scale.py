"""Dynamic loss scaling (float16) and bfloat16 params / state (stochastic rounding,
float32 master), each against a reference computation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import transforms
from jaxtrain.errors import JaxtrainError
from jaxtrain.train import LossScale, TrainState, make_train_step


def _reference_scales(finite_flags, scale, period, factor, min_scale):
    """The rule in plain Python: the scale in force at each step."""
    scales, good = [], 0
    for finite in finite_flags:
        scales.append(scale)
        if finite:
            good += 1
            if good >= period:
                scale, good = scale * factor, 0
        else:
            scale, good = max(scale / factor, min_scale), 0
    return scales


def test_scale_adapts_and_overflow_steps_are_skipped_like_the_reference():
    rng = np.random.default_rng(0)
    flags = rng.random(40) > 0.3
    flags[:3] = False
    tx = transforms.dynamic_loss_scale(optax.adam(0.1), initial_scale=8.0, period=3,
                                       min_scale=2.0)
    ref_tx = optax.adam(0.1)
    params = {"w": jnp.asarray(rng.normal(size=5), jnp.float32)}
    ref_params, ref_state = params, ref_tx.init(params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    expected = _reference_scales(flags, 8.0, 3, 2.0, 2.0)
    for t, finite in enumerate(flags):
        true_grad = jnp.asarray(rng.normal(size=5), jnp.float32)
        scaled = true_grad * state.scale if finite else true_grad.at[2].set(jnp.inf)
        assert float(state.scale) == expected[t]
        before = state.inner_state
        updates, state = update({"w": scaled}, state, params)
        params = optax.apply_updates(params, updates)
        if finite:  # the inner optimizer saw the unscaled gradient
            ref_updates, ref_state = ref_tx.update({"w": true_grad}, ref_state, ref_params)
            ref_params = optax.apply_updates(ref_params, ref_updates)
        else:  # nothing moved
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.inner_state),
                            strict=True):
                np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(params["w"], ref_params["w"], rtol=1e-6, atol=1e-7)
    assert int(state.skipped) == int(np.sum(~flags))


def test_float16_step_recovers_from_overflow_and_trains():
    """mean((w * x)^2) in float16 with x = 100: the gradient is scale * 5000 * w, which
    overflows float16 (max 65504) for scale >= 16. From 2^15 the scale must halve 12 times
    (12 skipped steps, params untouched) to 8, then the loss falls."""

    def loss_fn(params, batch, rng):
        del rng
        return jnp.mean((params["w"] * batch["x"]) ** 2), {}

    tx = transforms.dynamic_loss_scale(optax.sgd(1e-5), initial_scale=2.0**15, period=1000)
    state = TrainState.create(_apply, tx, jax.random.PRNGKey(0),
                              params={"w": jnp.ones(4, jnp.float32)})
    step = jax.jit(make_train_step(loss_fn, precision="float16"))
    losses, scales = [], []
    for _ in range(30):
        state, metrics = step(state, {"x": jnp.full((4,), 100.0)})
        losses.append(float(metrics["loss"]))
        scales.append(float(metrics["loss_scale"]))
    assert scales[:13] == [2.0**(15 - i) for i in range(13)]
    assert int(metrics["skipped_steps"]) == 12
    assert losses[:13] == [losses[0]] * 13  # skipped: nothing moved
    assert losses[-1] == pytest.approx(losses[0] * 0.95 ** (2 * 17), rel=0.02)


def _apply(params, batch):
    return params["w"] * batch["x"]


def test_a_loss_scale_in_the_optimizer_refuses_a_second_scale_or_a_nonfinite_policy():
    loss_fn = lambda params, batch, rng: (jnp.sum(params["w"]), {})  # noqa: E731
    tx = transforms.dynamic_loss_scale(optax.sgd(0.1))
    state = TrainState.create(_apply, tx, jax.random.PRNGKey(0),
                              params={"w": jnp.ones(2, jnp.float32)})
    with pytest.raises(JaxtrainError, match="the loss would be scaled twice"):
        make_train_step(loss_fn)(state.replace(loss_scale=LossScale.create()), {})
    with pytest.raises(JaxtrainError, match="nan_policy 'raise' with a dynamic_loss_scale"):
        make_train_step(loss_fn, nan_policy="raise")(state, {})


def test_loss_scale_arguments_are_checked():
    with pytest.raises(JaxtrainError, match="period"):
        transforms.dynamic_loss_scale(optax.sgd(0.1), period=0)
    with pytest.raises(JaxtrainError, match="no dynamic_loss_scale"):
        transforms.loss_scale_value(optax.sgd(0.1).init({"w": jnp.zeros(2)}))


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    x = jnp.full((200_000,), 1.0 + 1e-3, jnp.float32)  # between bf16 1.0 and 1.0078125
    r = transforms.stochastic_round_bf16(x, jax.random.PRNGKey(0)).astype(jnp.float32)
    assert set(np.unique(np.asarray(r))) == {1.0, 1.0078125}
    assert float(jnp.mean(r)) == pytest.approx(1.0 + 1e-3, abs=5e-5)
    neg = transforms.stochastic_round_bf16(-x, jax.random.PRNGKey(1)).astype(jnp.float32)
    assert float(jnp.mean(neg)) == pytest.approx(-(1.0 + 1e-3), abs=5e-5)


def _run(tx, params, steps=200, lr_grad=1e-3):
    """`steps` SGD steps with a constant gradient -1 (so params grow by lr * steps)."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(steps):
        grads = jax.tree.map(lambda p: -jnp.ones(p.shape, jnp.float32), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_small_updates_survive_in_bfloat16_only_with_sr_or_master():
    params = {"w": jnp.ones((50_000,), jnp.bfloat16)}
    exact = 1.0 + 200 * 1e-3
    nearest, _ = _run(optax.sgd(1e-3), params)
    assert nearest["w"].dtype == jnp.bfloat16
    assert np.all(np.asarray(nearest["w"], np.float32) == 1.0)  # every update was lost
    sr, _ = _run(optax.chain(optax.sgd(1e-3), transforms.stochastic_rounding(
        jax.random.PRNGKey(0))), params)
    assert sr["w"].dtype == jnp.bfloat16
    assert float(jnp.mean(sr["w"].astype(jnp.float32))) == pytest.approx(exact, abs=2e-3)
    master, state = _run(transforms.fp32_master(optax.sgd(1e-3)), params)
    reference, _ = _run(optax.sgd(1e-3), {"w": jnp.ones((50_000,), jnp.float32)})
    np.testing.assert_array_equal(state.master["w"], reference["w"])  # float32 trajectory
    np.testing.assert_array_equal(master["w"], reference["w"].astype(jnp.bfloat16))


@pytest.mark.parametrize("adam", [optax.adam, transforms.adam], ids=["optax", "jaxtrain"])
def test_bfloat16_optimizer_state_follows_float32_adam_closely(adam):
    """Also with jaxtrain's adam, whose hyperparameters are injected scalars in the state:
    those stay float32 (b2=0.999 rounded to bfloat16 is 1.0, and every update was NaN)."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=100), jnp.float32)}
    grads = [jnp.asarray(rng.normal(size=100), jnp.float32) for _ in range(20)]
    low = transforms.low_precision_state(adam(1e-2))
    full = adam(1e-2)
    a, sa = params, low.init(params)
    b, sb = params, full.init(params)
    moments = lambda state: [x for x in jax.tree.leaves(state) if jnp.ndim(x) > 0]
    assert {x.dtype for x in moments(sa)} == {jnp.dtype(jnp.bfloat16)}
    for g in grads:
        ua, sa = low.update({"w": g}, sa, a)
        ub, sb = full.update({"w": g}, sb, b)
        a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
    assert {x.dtype for x in moments(sa)} == {jnp.dtype(jnp.bfloat16)}
    moved = np.abs(np.asarray(b["w"] - params["w"]))
    np.testing.assert_allclose(a["w"], b["w"], atol=0.02 * moved.max())
    assert not np.array_equal(a["w"], b["w"])  # the state really was rounded


def test_the_steps_loss_scale_and_the_transforms_follow_one_rule():
    """The two places a scale lives (the TrainState's `LossScale`, moved by the train step,
    and `dynamic_loss_scale` in the optimizer state) give the scale torch.amp's update
    (`GradScaler`'s op) gives on one sequence of finite and overflowing steps."""
    import torch

    flags = [True, True, False, True, True, True, False, False, True, True, True, True,
             False, True, True]
    scale, tracker, oracle = torch.tensor([16.0]), torch.zeros(1, dtype=torch.int32), []
    for finite in flags:
        oracle.append(scale.item())
        torch._amp_update_scale_(scale, tracker, torch.tensor([0.0 if finite else 1.0]),
                                 2.0, 0.5, 2)
    assert oracle == _reference_scales(flags, 16.0, 2, 2.0, 1.0)

    def loss_fn(params, batch, rng):  # x = 1e38: finite loss, overflowing once scaled
        return params["w"] * batch["x"], {}

    state = TrainState.create(lambda p, x: p, optax.sgd(0.0), jax.random.PRNGKey(0),
                              params={"w": jnp.ones(())})
    state = state.replace(loss_scale=LossScale.create(16.0, period=2))
    step = jax.jit(make_train_step(loss_fn))
    tx = transforms.dynamic_loss_scale(optax.sgd(0.0), initial_scale=16.0, period=2)
    opt_state, update = tx.init(state.params), jax.jit(tx.update)
    stepped, transformed = [], []
    for finite in flags:
        state, metrics = step(state, {"x": jnp.asarray(1.0 if finite else 1e38)})
        stepped.append(float(metrics["loss_scale"]))
        transformed.append(float(transforms.loss_scale_value(opt_state)))
        grad = opt_state.scale * (1.0 if finite else jnp.inf)
        _, opt_state = update({"w": grad}, opt_state, state.params)
    assert stepped == oracle and transformed == oracle
    assert int(transforms.loss_scale_state(opt_state).skipped) == flags.count(False)
