"""The step builder: microbatches == the big batch, k steps per call == k calls, the
precision policy, the non-finite policies, and the multi-device placement."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain import JaxtrainError, sharding, transforms
from jaxtrain.models import registry
from jaxtrain.train import (
    LossScale,
    TrainState,
    classification_loss,
    get_policy,
    make_multi_step,
    make_train_step,
)
from jaxtrain.train.step import all_finite, default_unroll, has_convolution


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.tanh(self.l1(x)))


def _state(tx=None):
    return TrainState.create(MLP(nnx.Rngs(0)), tx or transforms.adam(1e-2),
                             jax.random.PRNGKey(0))


def _batch(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, 8)).astype(np.float32),
            "label": rng.integers(0, 3, size=n).astype(np.int32)}


def _close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


def test_microbatches_equal_the_big_batch():
    state, batch = _state(optax.sgd(0.5)), _batch()
    big, m_big = jax.jit(make_train_step(classification_loss))(state, batch)
    for micro in (2, 8):
        acc, m_acc = jax.jit(make_train_step(classification_loss, microbatches=micro))(
            state, batch)
        _close(acc.params, big.params, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m_acc["loss"], m_big["loss"], rtol=1e-6)
        np.testing.assert_allclose(m_acc["accuracy"], m_big["accuracy"], rtol=1e-6)
    with pytest.raises(JaxtrainError, match="not divisible by microbatches=5"):
        jax.jit(make_train_step(classification_loss, microbatches=5))(state, batch)


def test_microbatches_on_eight_devices_match_one(devices):
    state, batch = _state(), _batch(64)
    one, _ = jax.jit(make_train_step(classification_loss))(state, batch)
    mesh = sharding.make_mesh(data=-1, devices=devices)
    shardings = sharding.state_shardings(state, mesh)
    step = sharding.compile_step(make_train_step(classification_loss, microbatches=4), mesh,
                                 shardings)
    eight, _ = step(sharding.place(state, shardings), sharding.shard_batch(batch, mesh))
    _close(eight.params, one.params, rtol=1e-5, atol=1e-6)


def test_steps_per_call_equals_single_calls():
    state = _state()
    batches = [_batch(seed=i) for i in range(4)]
    single = jax.jit(make_train_step(classification_loss))
    s1 = state
    losses = []
    for b in batches:
        s1, m = single(s1, b)
        losses.append(float(m["loss"]))
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
    multi = jax.jit(make_multi_step(make_train_step(classification_loss), 4))
    s4, m4 = multi(state, stacked)
    _close(s4.params, s1.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m4["loss"], losses, rtol=1e-5)
    assert int(s4.step) == 4 and int(s4.data_position) == 4
    last = jax.jit(make_multi_step(make_train_step(classification_loss), 4, metrics="last"))
    s_last, m_last = last(_state(), stacked)
    _close(s_last.params, s1.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m_last["loss"], losses[-1], rtol=1e-5)
    np.testing.assert_allclose(m_last["grad_norm"], m["grad_norm"], rtol=1e-5)


def test_precision_policy_casts_compute_not_storage():
    seen = {}

    def loss(model, batch, rng):
        seen["kernel"] = model.l1.kernel[...].dtype
        seen["x"] = batch["image"].dtype
        return classification_loss(model, batch, rng)

    state = _state()
    new, metrics = jax.jit(make_train_step(loss, precision="bfloat16"))(state, _batch())
    assert seen == {"kernel": jnp.bfloat16, "x": jnp.bfloat16}
    assert {x.dtype for x in jax.tree.leaves(new.params)} == {jnp.dtype(jnp.float32)}
    assert metrics["loss"].dtype == jnp.float32
    assert get_policy("auto", "cpu").compute_dtype == jnp.float32
    assert get_policy("auto", "gpu").compute_dtype == jnp.bfloat16
    assert get_policy("auto", "tpu").param_dtype == jnp.float32
    with pytest.raises(JaxtrainError, match="unknown precision 'fp8'"):
        get_policy("fp8")


def _sqrt_loss(params, batch, rng):
    """Finite loss; the gradient of `b` is 0 * inf = nan where `b` is 0."""
    loss = jnp.mean((batch["x"] @ params["a"]) ** 2) + 0.0 * jnp.sum(jnp.sqrt(params["b"]))
    return loss, {}


def _sqrt_state(b):
    return TrainState.create(lambda p, x: x, optax.sgd(0.1), jax.random.PRNGKey(0),
                             params={"a": jnp.ones(3), "b": jnp.asarray(b)})


def test_skip_policy_keeps_params_and_advances_the_step():
    step = jax.jit(make_train_step(_sqrt_loss, nan_policy="skip"))
    state = _sqrt_state([1.0, 0.0])
    new, _ = step(state, {"x": np.ones((4, 3), np.float32)})
    _close(new.params, state.params)
    assert int(new.step) == 1 and int(new.data_position) == 1
    assert new.nonfinite.tolist() == [0, 2, 1]  # step 0, leaf 2 = gradient of b (after loss, a)
    good = _sqrt_state([1.0, 2.0])
    new, _ = step(good, {"x": np.ones((4, 3), np.float32)})
    assert not np.allclose(new.params["a"], 1.0) and new.nonfinite.tolist() == [-1, -1, 0]


def test_raise_policy_records_the_first_bad_step_and_leaf():
    step = jax.jit(make_train_step(_sqrt_loss, nan_policy="raise"))
    state = _sqrt_state([1.0, 2.0])
    x = {"x": np.ones((4, 3), np.float32)}
    state, m = step(state, x)
    assert state.nonfinite.tolist() == [-1, -1, 0] and np.isfinite(m["grad_norm"])
    bad = state.replace(params={**state.params, "b": jnp.asarray([0.0, 1.0])})
    state, m = step(bad, x)  # step 1: the gradient of b (leaf 2, after loss and a) is nan
    assert int(state.step) == 2 and state.nonfinite.tolist() == [1, 2, 1]
    assert m["nonfinite"].tolist() == [1, 2, 1]
    state, _ = step(state, x)  # b is now nan: the record keeps the first step, counts on
    assert state.nonfinite.tolist() == [1, 2, 2]


def test_all_finite_agrees_with_numpy():
    """inf, -inf or nan in any float leaf (float32, bfloat16; an int32 leaf beside them)
    is found, the largest finite values are not, as numpy's isfinite says."""
    base = {"a": jnp.full((3, 4), jnp.finfo(jnp.float32).max),
            "b": jnp.full((5,), -jnp.finfo(jnp.bfloat16).max, jnp.bfloat16),
            "c": jnp.arange(6, dtype=jnp.int32)}
    check = jax.jit(all_finite)
    assert bool(check(base)) and all(np.isfinite(np.asarray(v, np.float32)).all()
                                     for v in base.values())
    for leaf in ("a", "b"):
        for bad in (np.inf, -np.inf, np.nan):
            x = base[leaf]
            tree = {**base, leaf: x.ravel().at[-1].set(bad).reshape(x.shape)}
            assert not np.isfinite(np.asarray(tree[leaf], np.float32)).all()
            assert not bool(check(tree)), (leaf, bad)


def test_raise_checks_the_updated_params_in_few_cpu_kernels():
    """`raise` checks the updated params every step: on CPU over the concatenated leaves.
    One check per leaf added 20 kernels to the digits MLP's compiled step of 59 (XLA:CPU
    runs each reduction as its own kernels; ~7% of an 8-step call's time)."""
    if jax.default_backend() != "cpu":
        pytest.skip("a count of XLA:CPU kernels")
    model = registry.build("mlp", 0, in_features=64, out_features=10, hidden=(128, 128))
    state = TrainState.create(model, transforms.adam(1e-3), jax.random.PRNGKey(0))
    batch = {"image": np.zeros((64, 64), np.float32), "label": np.zeros(64, np.int32)}

    def kernels(policy):
        text = jax.jit(make_train_step(classification_loss, nan_policy=policy)).lower(
            state, batch).compile().as_text()
        entry = text[text.index("\nENTRY"):]
        return len(re.findall(r"\b(fusion|reduce|dot|custom-call)\(",
                              entry[:entry.index("\n}\n")]))

    assert kernels("raise") - kernels("none") <= 10, (kernels("none"), kernels("raise"))


def test_grad_norm_is_the_global_norm():
    """The CPU path concatenates the leaves; the value is optax's global norm."""
    step = jax.jit(make_train_step(_sqrt_loss))
    state = _sqrt_state([1.0, 2.0])
    batch = {"x": np.arange(12, dtype=np.float32).reshape(4, 3)}
    _, m = step(state, batch)
    grads = jax.grad(lambda p: _sqrt_loss(p, batch, None)[0])(state.params)
    np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(grads), rtol=1e-6)


def test_loss_scale_halves_on_overflow_and_skips():
    state = _sqrt_state([1.0, 0.0]).replace(loss_scale=LossScale.create(2.0**4, period=2))
    step = jax.jit(make_train_step(_sqrt_loss))
    new, m = step(state, {"x": np.ones((4, 3), np.float32)})
    assert float(new.loss_scale.scale) == 8.0 and int(new.step) == 1
    _close(new.params, state.params)
    good = _sqrt_state([1.0, 1.0]).replace(loss_scale=LossScale.create(2.0**4, period=2))
    ref, _ = jax.jit(make_train_step(_sqrt_loss))(_sqrt_state([1.0, 1.0]),
                                                     {"x": np.ones((4, 3), np.float32)})
    for _ in range(2):
        good, _ = step(good, {"x": np.ones((4, 3), np.float32)})
    assert float(good.loss_scale.scale) == 32.0  # doubled after `period` finite steps
    once, _ = step(_sqrt_state([1.0, 1.0]).replace(loss_scale=LossScale.create(2.0**4)),
                   {"x": np.ones((4, 3), np.float32)})
    _close(once.params, ref.params, rtol=1e-6)  # the scale does not change the update


def _keyed_loss(model, batch, rng):
    loss, aux = classification_loss(model, batch, rng)
    return loss, {**aux, "draw": jax.random.uniform(rng)}


def test_each_step_draws_from_its_own_key():
    """The key a step passes to the loss is fold_in(state.rng, step); state.rng stays."""
    step = jax.jit(make_train_step(_keyed_loss))
    state = _state()
    draws = []
    for _ in range(3):
        before = state
        state, m = step(state, _batch())
        assert float(m["draw"]) == float(jax.random.uniform(
            jax.random.fold_in(before.rng, before.step)))
        draws.append(float(m["draw"]))
    assert len(set(draws)) == 3
    np.testing.assert_array_equal(jax.random.key_data(state.rng),
                                  jax.random.key_data(_state().rng))


class ConvNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.out = nnx.Linear(4 * 8 * 8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.conv(x.reshape(-1, 8, 8, 1)).reshape(x.shape[0], -1))


def test_scans_roll_on_cpu_unless_the_step_convolves():
    """XLA:CPU runs convolutions 24-40x slower in a loop, other steps faster rolled."""
    step = make_train_step(classification_loss)
    dense = (_state(), _batch())
    conv = (TrainState.create(ConvNet(nnx.Rngs(0)), transforms.adam(1e-2),
                              jax.random.PRNGKey(0)),
            {"image": np.zeros((4, 64), np.float32), "label": np.zeros(4, np.int32)})
    assert not has_convolution(step, *dense) and has_convolution(step, *conv)
    assert jax.default_backend() == "cpu"
    assert default_unroll(None, step, *conv) is True  # fully unrolled
    assert default_unroll(None, step, *dense) is not True and default_unroll(
        None, step, *dense) == 1  # rolled
    assert default_unroll(4, step, *conv) == 4
