"""`mu_dtype` of the frontier optimizers (issue 20, point 4): bfloat16 moments.

- The per-param moments (`_frontier.MOMENTS`) are stored in the requested dtype, before
  and after updates; statistics, roots, bases and factors stay float32; the updates keep
  each param's dtype (float32 or bfloat16).
- A moving average stored in bfloat16 moves: it is written with a stochastic rounding.
  Rounded to nearest, AdEMAMix's slow average (b3 = 0.9999) stalled at 0.031 after 2,000
  steps of a constant gradient 1 where float32 holds 1 - b3^2000 = 0.181 (measured), and
  its nu at 0.25 for 0.865.
- 50 full-batch steps of a small MLP regression with bfloat16 moments give float32's loss
  curve to 0.5% at every step (SOAP: 3%). Why that much and no more: stochastic rounding
  moves each stored moment by up to one bfloat16 unit (2^-8 relative), zero-mean, and a
  moving average of factor b carries these to about 2^-8 / sqrt(1 - b^2) (3x at b =
  0.95), ~1% of a moment; the step is a ratio of moments, the loss a smooth function of
  the params. Measured: 0.008% (Shampoo) to 0.08% (Muon); SOAP 1.6%: it amplifies small
  perturbations (a float32 run with 2^-9 relative noise on its gradients moves its curve
  by 0.4%; see also tests/test_optimizers_sharded.py's docstring).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import JaxtrainError, transforms
from jaxtrain.transforms._frontier import MOMENTS

LR = {"ademamix": 3e-3, "mars": 3e-3, "muon": 2e-2, "soap": 3e-3, "shampoo": 3e-3,
      "psgd_kron": 3e-3}
TOLERANCE = {"soap": 0.03}  # relative, on the loss at every step; 0.005 for the others

rng = np.random.default_rng(0)
X = rng.normal(size=(128, 16)).astype(np.float32)
Y = (np.tanh(X @ rng.normal(size=(16, 4))) + 0.1 * rng.normal(size=(128, 4))).astype(np.float32)


def _params(dtype=jnp.float32):
    r = np.random.default_rng(1)
    return {"w1": jnp.asarray(r.normal(size=(16, 32)) / 4, dtype), "b1": jnp.zeros((32,), dtype),
            "w2": jnp.asarray(r.normal(size=(32, 4)) / 6, dtype)}


def _loss(p):
    h = jnp.tanh(X @ p["w1"].astype(jnp.float32) + p["b1"].astype(jnp.float32))
    return jnp.mean((h @ p["w2"].astype(jnp.float32) - Y) ** 2)


def _is_moment(path):
    return any(isinstance(k, jax.tree_util.GetAttrKey) and k.name in MOMENTS for k in path)


def _floats(state):
    """(is a moment, dtype) of every floating leaf of `state` with a param's rank."""
    return [(_is_moment(path), x.dtype)
            for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
            if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 1]


def _run(tx, steps, params):
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(_loss)(p)
        u, s = tx.update(g, s, p)
        return jax.tree.map(lambda a, b: a + b, p, u), s, loss, u

    losses = []
    for _ in range(steps):
        params, state, loss, updates = step(params, state)
        losses.append(float(loss))
    return losses, state, updates


@pytest.mark.parametrize("name", sorted(LR))
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_moments_are_stored_in_mu_dtype_and_updates_keep_the_params_dtype(name, param_dtype):
    tx = getattr(transforms, name)(LR[name], mu_dtype="bfloat16")
    _, after, updates = _run(tx, 2, _params(param_dtype))
    for state in (tx.init(_params(param_dtype)), after):
        floats = _floats(state)
        assert any(moment for moment, _ in floats), f"{name}: no moment in the state"
        for moment, dtype in floats:
            assert dtype == (jnp.bfloat16 if moment else jnp.float32), (name, moment, dtype)
    assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(param_dtype)}
    plain = _floats(getattr(transforms, name)(LR[name]).init(_params(param_dtype)))
    assert {dtype for _, dtype in plain} == {jnp.dtype(jnp.float32)}


def test_a_slow_average_stored_in_bfloat16_does_not_stall():
    params, grads = {"w": jnp.zeros((8, 8))}, {"w": jnp.ones((8, 8))}
    tx = transforms.ademamix(1e-3, mu_dtype=jnp.bfloat16)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(2000):
        _, state = update(grads, state, params)
    found = {jax.tree_util.keystr(path).rsplit(".", 1)[-1]: float(jnp.mean(x.astype(jnp.float32)))
             for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
             if _is_moment(path)}
    np.testing.assert_allclose(found["m2['w']"], 1 - 0.9999 ** 2000, rtol=0.01)
    np.testing.assert_allclose(found["nu['w']"], 1 - 0.999 ** 2000, rtol=0.01)


@pytest.mark.parametrize("name", sorted(LR))
def test_a_short_run_with_bfloat16_moments_follows_float32(name):
    f32, _, _ = _run(getattr(transforms, name)(LR[name]), 50, _params())
    bf16, _, _ = _run(getattr(transforms, name)(LR[name], mu_dtype=jnp.bfloat16), 50, _params())
    assert f32[-1] < 0.6 * f32[0], f"{name} does not train here: {f32[0]} -> {f32[-1]}"
    np.testing.assert_allclose(bf16, f32, rtol=TOLERANCE.get(name, 0.005))


@pytest.mark.parametrize("name", sorted(LR))
def test_an_unsupported_mu_dtype_is_refused_in_one_line(name):
    with pytest.raises(JaxtrainError, match=f"{name}: mu_dtype must be one of float32, "
                                            "bfloat16 .or None: float32., got 'int8'"):
        getattr(transforms, name)(LR[name], mu_dtype="int8")
