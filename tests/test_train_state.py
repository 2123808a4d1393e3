"""TrainState from an NNX model, a Linen module and an apply function; BatchNorm state,
EMA against its closed form, bfloat16 params and optimizer state on request."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain import JaxtrainError, transforms
from jaxtrain.train import TrainState, make_eval_step, make_train_step


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return {"x": x, "y": (x @ np.arange(1, 5, dtype=np.float32) + 0.5).astype(np.float32)}


def mse(model, batch, rng):
    pred = model(batch["x"])
    return jnp.mean((pred.squeeze(-1) - batch["y"]) ** 2), {}


class LinenNet(linen.Module):
    @linen.compact
    def __call__(self, x, train: bool = True):
        x = linen.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return linen.Dense(1)(x)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.bn = nnx.BatchNorm(4, momentum=0.5, rngs=rngs)
        self.dense = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.bn(x))


def test_nnx_batchnorm_statistics_are_model_state():
    state = TrainState.create(NnxNet(nnx.Rngs(0)), optax.sgd(0.1), jax.random.PRNGKey(0))
    batch = _batch()
    new, _ = jax.jit(make_train_step(mse))(state, batch)
    mean = new.model_state["bn"]["mean"]
    # momentum 0.5 from zeros: half the batch mean (numpy, not flax)
    np.testing.assert_allclose(mean, 0.5 * batch["x"].mean(0), rtol=1e-5, atol=1e-6)
    assert new.params["bn"]["scale"].shape == (4,)


def test_linen_module_with_batchnorm_trains_and_evaluates():
    batch = _batch()
    state = TrainState.create(LinenNet(), optax.sgd(0.1), jax.random.PRNGKey(0),
                              sample=batch["x"])
    assert set(state.model_state) == {"batch_stats"}
    step = jax.jit(make_train_step(mse))
    new, metrics = step(state, batch)
    stats = new.model_state["batch_stats"]["BatchNorm_0"]["mean"]
    np.testing.assert_allclose(stats, 0.5 * batch["x"].mean(0), rtol=1e-5, atol=1e-6)
    # evaluation uses the running statistics, not the batch's
    sums = make_eval_step(lambda m, b: {"out": m(b["x"], train=False).squeeze(-1)})(new, batch)
    variables = {"params": new.params, **new.model_state}
    expect = LinenNet().apply(variables, batch["x"], train=False).sum()
    np.testing.assert_allclose(sums["out"], expect, rtol=1e-5)


def test_apply_function_gets_params_and_matches_hand_written_sgd():
    def apply(params, x):
        return x @ params["w"] + params["b"]

    def loss(params, batch, rng):
        return jnp.mean((apply(params, batch["x"]) - batch["y"]) ** 2), {}

    params = {"w": jnp.zeros(4), "b": jnp.zeros(())}
    state = TrainState.create(apply, optax.sgd(0.05), jax.random.PRNGKey(0), params=params)
    batch = _batch()
    new, metrics = jax.jit(make_train_step(loss))(state, batch)
    x, y = batch["x"], batch["y"]
    grad_w = 2 * x.T @ (x @ np.zeros(4) - y) / len(y)  # closed form at zero params
    np.testing.assert_allclose(new.params["w"], -0.05 * grad_w, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], np.mean(y**2), rtol=1e-6)
    assert state.apply_fn is apply


def test_ema_follows_its_closed_form():
    def loss(params, batch, rng):
        return jnp.sum((params["w"] - batch["t"]) ** 2), {}

    state = TrainState.create(lambda p, x: p, optax.sgd(0.1), jax.random.PRNGKey(0),
                              params={"w": jnp.ones(3)}, ema_decay=0.9)
    step = jax.jit(make_train_step(loss))
    ema, seen = np.ones(3), []
    for i in range(4):
        state, _ = step(state, {"t": jnp.full((3,), float(i))})
        seen.append(np.asarray(state.params["w"]))
        ema = 0.9 * ema + 0.1 * seen[-1]
    np.testing.assert_allclose(state.ema_params["w"], ema, rtol=1e-6)
    assert "ema_params" in state.saveable()


def test_bfloat16_params_and_optimizer_state_on_request():
    state = TrainState.create(NnxNet(nnx.Rngs(0)), transforms.adam(1e-3),
                              jax.random.PRNGKey(0), param_dtype=jnp.bfloat16)
    dtypes = {x.dtype for x in jax.tree.leaves(state.params)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert moments and all(x.dtype == jnp.bfloat16 for x in moments)
    new, metrics = jax.jit(make_train_step(mse, precision="bfloat16_params"))(state, _batch())
    assert {x.dtype for x in jax.tree.leaves(new.params)} == {jnp.dtype(jnp.bfloat16)}
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("wrong, message", [
    (lambda g: {**g, "w": g["w"][:3]},
     r"at 'w' the gradients have shape \(3,\), the param \(4,\)"),
    (lambda g: {"w": g["w"]},
     r"the gradients have no 'b' \(a param of shape \(\)\); they hold 'w' \(dict of 1"),
    (lambda g: {**g, "extra": g["w"]}, r"the gradients have 'extra' \(shape \(4,\)\), which "
                                       "is not a param"),
    (lambda g: [g["b"], g["w"]], r"the gradients have no 'b' .* they hold '0', '1' \(list of 2"),
    (lambda g: {"b": (g["b"],), "w": g["w"]}, "the gradients have no 'b'"),
    (lambda g: jax.tree.map(lambda x: jnp.stack([x, x]), g),  # per-example, not reduced
     r"at 'b' the updates have shape \(2,\), the param \(\) \(gradients with leading "
     "per-example axes need a transform that reduces them"),
])
def test_gradients_that_do_not_match_the_params_are_named(wrong, message):
    """A hand-written step giving `apply_gradients` another tree than the params: one
    JaxtrainError naming the first differing path and both sides, eagerly and traced
    (before: Optax's broadcasting or tree-structure error from deep inside the update)."""
    params = {"w": jnp.zeros(4), "b": jnp.zeros(())}
    state = TrainState.create(lambda p, x: x @ p["w"] + p["b"], transforms.adam(0.1),
                              jax.random.PRNGKey(0), params=params)
    grads = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(JaxtrainError, match="apply_gradients: the (gradients|optimizer's "
                                            "updates) do not match the params: " + message):
        state.apply_gradients(wrong(grads))
    with pytest.raises(JaxtrainError, match=message):
        jax.jit(lambda s: s.apply_gradients(wrong(jax.tree.map(jnp.ones_like, s.params))))(
            state)


def test_bad_models_are_refused():
    with pytest.raises(JaxtrainError, match="needs its params"):
        TrainState.create(lambda p, x: x, optax.sgd(0.1), jax.random.PRNGKey(0))
    with pytest.raises(JaxtrainError, match="sample="):
        TrainState.create(LinenNet(), optax.sgd(0.1), jax.random.PRNGKey(0))
    with pytest.raises(JaxtrainError, match="cannot train"):
        TrainState.create(3, optax.sgd(0.1), jax.random.PRNGKey(0))


def test_the_states_ema_and_the_ema_transform_are_one_rule_and_both_are_evaluated():
    """`ema_decay` (the EMA in the TrainState) and `transforms.ema` (in the optimizer
    state) give the same average bit for bit, that of the closed form; an EMA evaluation
    reads either."""
    from jaxtrain.transforms import ema, ema_params

    def loss(params, batch, rng):
        return jnp.sum((params["w"] - batch["t"]) ** 2), {}

    def make(tx, **kw):
        return TrainState.create(lambda p, x: p, tx, jax.random.PRNGKey(0),
                                 params={"w": jnp.ones(3)}, **kw)

    in_state = make(optax.sgd(0.1), ema_decay=0.75)
    in_opt = make(optax.chain(optax.sgd(0.1), ema(0.75)))
    step = jax.jit(make_train_step(loss))
    average = np.ones(3)
    for i in range(5):
        batch = {"t": jnp.full((3,), float(i))}
        in_state, _ = step(in_state, batch)
        in_opt, _ = step(in_opt, batch)
        average = 0.75 * average + 0.25 * np.asarray(in_state.params["w"], np.float64)
    np.testing.assert_array_equal(in_state.ema_params["w"], ema_params(in_opt.opt_state)["w"])
    np.testing.assert_allclose(in_state.ema_params["w"], average, rtol=1e-6)

    def metric(params, batch):  # an apply-function state's "model" is its params
        return {"out": params["w"] * batch["x"]}

    x = {"x": jnp.ones((1, 3))}
    for state in (in_state, in_opt):
        np.testing.assert_allclose(make_eval_step(metric, use_ema=True)(state, x)["out"],
                                   average, rtol=1e-6)
        np.testing.assert_array_equal(make_eval_step(metric)(state, x)["out"],
                                      state.params["w"])
