"""newton, newton_cg and lbfgs against closed forms, under Optax's extra-args convention."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import transforms as T
from jaxtrain.errors import JaxtrainError


def _quadratic(n=6, seed=0):
    """A strictly convex quadratic over params {'a': (n-2,), 'b': (2,)}, its minimizer and
    its Hessian A (float64 closed form)."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, n))
    a = m @ m.T + n * np.eye(n)
    b = rng.normal(size=n)
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)

    def loss(params):
        x = jnp.concatenate([params["a"], params["b"]])
        return 0.5 * x @ a32 @ x - b32 @ x

    return loss, np.linalg.solve(a, b), a, b


def _flat(params):
    return np.concatenate([np.asarray(params["a"]), np.asarray(params["b"])])


def _step(tx, loss, params, state):
    value, grad = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state


def _start(n=6):
    return {"a": jnp.full((n - 2,), 0.5), "b": jnp.array([-1.0, 2.0])}


def test_newton_one_step_solves_a_convex_quadratic():
    loss, xstar, _, _ = _quadratic()
    tx = T.newton(learning_rate=1.0)
    params, _ = jax.jit(lambda p, s: _step(tx, loss, p, s))(_start(), tx.init(_start()))
    np.testing.assert_allclose(_flat(params), xstar, atol=1e-6 * max(1, np.abs(xstar).max()))


def test_newton_damping_is_levenberg_marquardt():
    loss, _, a, b = _quadratic()
    tx = T.newton(learning_rate=0.5, damping=3.0)
    x0 = _flat(_start())
    params, _ = jax.jit(lambda p, s: _step(tx, loss, p, s))(_start(), tx.init(_start()))
    expected = x0 - 0.5 * np.linalg.solve(a + 3.0 * np.eye(len(b)), a @ x0 - b)
    np.testing.assert_allclose(_flat(params), expected, rtol=1e-5, atol=1e-6)


def test_newton_cg_one_step_solves_a_convex_quadratic():
    loss, xstar, _, _ = _quadratic()
    tx = T.newton_cg(learning_rate=1.0, damping=0.0, max_cg_steps=50, tol=1e-10)
    params, _ = jax.jit(lambda p, s: _step(tx, loss, p, s))(_start(), tx.init(_start()))
    np.testing.assert_allclose(_flat(params), xstar, atol=1e-5 * max(1, np.abs(xstar).max()))


def test_newton_cg_handles_a_model_newton_refuses():
    n = 20_000
    scale = jnp.linspace(1.0, 3.0, n)
    loss = lambda p: 0.5 * jnp.sum(scale * (p["w"] - 1.0) ** 2)  # noqa: E731
    params = {"w": jnp.zeros(n)}
    with pytest.raises(JaxtrainError, match="max_params=4096"):
        T.newton().init(params)
    tx = T.newton_cg(damping=0.0, max_cg_steps=100, tol=1e-8)
    params, _ = jax.jit(lambda p, s: _step(tx, loss, p, s))(params, tx.init(params))
    np.testing.assert_allclose(params["w"], 1.0, atol=1e-5)


def test_second_order_chains_with_optax_and_reports_learning_rate():
    loss, xstar, _, _ = _quadratic()
    tx = optax.chain(optax.clip_by_global_norm(1e6), T.newton(learning_rate=1.0))
    state = tx.init(_start())
    assert float(T.current_hyperparams(state)["learning_rate"]) == 1.0
    params, _ = jax.jit(lambda p, s: _step(tx, loss, p, s))(_start(), state)
    np.testing.assert_allclose(_flat(params), xstar, atol=1e-5)


def test_newton_without_value_fn_is_refused():
    tx = T.newton()
    params = _start()
    with pytest.raises(JaxtrainError, match="value_fn"):
        tx.update(params, tx.init(params), params)


def test_lbfgs_reaches_rosenbrock_minimum():
    """In float64: float32 gradients of Rosenbrock are rounded to ~1e-5 near (1, 1), which
    bounds any method's accuracy there at a few 1e-6."""
    with jax.enable_x64(True):
        _lbfgs_on_rosenbrock()


def _lbfgs_on_rosenbrock():
    def rosenbrock(p):
        x, y = p["xy"][0], p["xy"][1]
        return (1.0 - x) ** 2 + 100.0 * (y - x * x) ** 2

    tx = T.lbfgs()
    params = {"xy": jnp.array([-1.2, 1.0], jnp.float64)}
    value_and_grad = optax.value_and_grad_from_state(rosenbrock)

    @jax.jit
    def step(params, state):
        value, grad = value_and_grad(params, state=state)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=rosenbrock)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(100):
        params, state = step(params, state)
    assert params["xy"].dtype == jnp.float64
    np.testing.assert_allclose(params["xy"], [1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize(
    "make,arg",
    [
        (lambda: T.newton(learning_rate=-1.0), "learning_rate"),
        (lambda: T.newton(damping=float("nan")), "damping"),
        (lambda: T.newton(max_params=0), "max_params"),
        (lambda: T.newton_cg(max_cg_steps=0), "max_cg_steps"),
        (lambda: T.newton_cg(tol=0.0), "tol"),
        (lambda: T.lbfgs(memory_size=0), "memory_size"),
    ],
)
def test_bad_arguments_are_refused_by_name(make, arg):
    with pytest.raises(JaxtrainError, match=arg):
        make()


def _mlp_problem(seed=0, n=128, hidden=16):
    """A small tanh MLP classifier on fixed random data: a non-convex loss."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, 10)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, n))
    params = {"w1": jnp.asarray(rng.normal(size=(10, hidden)) / np.sqrt(10), jnp.float32),
              "w2": jnp.asarray(rng.normal(size=(hidden, 3)) / np.sqrt(hidden), jnp.float32)}

    def loss(p):
        logits = jnp.tanh(x @ p["w1"]) @ p["w2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss, params


@pytest.mark.parametrize("make", [lambda: T.newton_cg(), lambda: T.newton()],
                         ids=["newton_cg", "newton"])
def test_damped_newton_descends_on_a_non_convex_loss(make):
    """Adaptive damping, the negative-curvature guard and the line search make every step a
    descent; the plain undamped step (the old default) is not."""
    loss, params = _mlp_problem()
    tx = make()
    step = jax.jit(lambda p, s: _step(tx, loss, p, s))
    values, state = [float(loss(params))], tx.init(params)
    for _ in range(10):
        params, state = step(params, state)
        values.append(float(loss(params)))
    assert all(b <= a for a, b in zip(values, values[1:], strict=False)), values
    assert values[-1] < 0.6 * values[0], values
    assert float(state.inner_state.damping) >= 0 and np.isfinite(float(state.inner_state.ratio))

    plain = T.newton_cg(damping=0.0, adaptive=False)
    loss, params = _mlp_problem()
    step = jax.jit(lambda p, s: _step(plain, loss, p, s))
    values, state = [float(loss(params))], plain.init(params)
    for _ in range(10):
        params, state = step(params, state)
        values.append(float(loss(params)))
    assert any(not b <= a for a, b in zip(values, values[1:], strict=False)), values


def test_damping_follows_the_reduction_ratio():
    """On a quadratic the model is exact (ratio 1 > 3/4): the damping shrinks by 2/3."""
    loss, _, _, _ = _quadratic()
    tx = T.newton_cg(damping=3.0)
    params, state = jax.jit(lambda p, s: _step(tx, loss, p, s))(_start(), tx.init(_start()))
    assert float(state.inner_state.ratio) == pytest.approx(1.0, abs=1e-3)
    assert float(state.inner_state.damping) == pytest.approx(2.0, rel=1e-6)
    assert float(state.inner_state.step_size) == 1.0


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("method", [
    "newton_cg",
    "newton",
    "lbfgs",
])
def test_config_trains_the_digits_mlp_full_batch(method, tmp_path):
    """`jaxtrain train configs/digits_mlp_<method>.yaml` for 4 steps: the step hands the
    method value_fn (before, the first step raised for want of it)."""
    import json

    from jaxtrain.train.config import load_config
    from jaxtrain.train.run import run_config

    cfg = load_config(CONFIGS / f"digits_mlp_{method}.yaml",
                      [f"out={tmp_path}", "train.steps=4", "train.eval_every=4",
                       "train.log_every=1", "logging.plots=false", "logging.progress=false",
                       "checkpoint.at_end=false"])
    assert cfg.train.batch_size == 1344  # the whole training set, on 8 devices
    summary = run_config(cfg)
    assert summary["step"] == 4
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "log.jsonl").open())
              if r["run"] == "train"]
    assert len(losses) == 4 and losses[0] == pytest.approx(2.31, abs=0.05)
    assert losses[-1] < 0.8 * losses[0], losses  # 4th step's loss, after 3 updates
