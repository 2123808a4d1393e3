"""Optimizers torch.optim lacks, against numpy formulas written from their papers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import transforms as T

STEPS = 30
SHAPES = {"w": (4, 3), "v": (6, 5), "b": (3,)}


def _init():
    rng = np.random.default_rng(3)
    return {k: rng.normal(size=s) for k, s in SHAPES.items()}


def _grads():
    rng = np.random.default_rng(4)
    return {k: rng.normal(size=(STEPS, *s)) for k, s in SHAPES.items()}


def _ours(tx):
    def step(carry, g):
        params, state = carry
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), params

    f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)  # noqa: E731
    params = f32(_init())
    run = jax.jit(lambda p, gs: jax.lax.scan(step, (p, tx.init(p)), gs)[1])
    return jax.tree.map(np.asarray, run(params, f32(_grads())))


def _reference(leaf_step):
    """Trajectory of a per-leaf numpy rule `leaf_step(theta, g, state, t) -> (theta, state)`
    (t counts from 1), in float64."""
    params, grads = _init(), _grads()
    traj = {k: [] for k in SHAPES}
    for k in SHAPES:
        theta, state = params[k], {}
        for t in range(1, STEPS + 1):
            theta, state = leaf_step(theta, grads[k][t - 1], state, t)
            traj[k].append(theta)
    return {k: np.stack(v) for k, v in traj.items()}


def _assert_close(ours, ref, rtol=1e-5):
    for k in SHAPES:
        err = np.max(np.abs(ours[k] - ref[k])) / np.max(np.abs(ref[k]))
        assert err < rtol, f"leaf {k}: max relative deviation {err:.2e}"


def _rms(x):
    return np.sqrt(np.mean(x * x))


# --- Lion (Chen et al., 2023, Algorithm 2) -------------------------------------------------
def lion_ref(lr, b1, b2, wd):
    def step(theta, g, s, t):
        m = s.get("m", np.zeros_like(g))
        c = b1 * m + (1 - b1) * g
        theta = theta - lr * (np.sign(c) + wd * theta)
        return theta, {"m": b2 * m + (1 - b2) * g}

    return step


# --- LAMB (You et al., 2020, Algorithm 2; phi = identity) ----------------------------------
def lamb_ref(lr, b1, b2, eps, wd):
    def step(theta, g, s, t):
        m = b1 * s.get("m", 0.0) + (1 - b1) * g
        v = b2 * s.get("v", 0.0) + (1 - b2) * g * g
        r = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        u = r + wd * theta
        ratio = np.linalg.norm(theta) / np.linalg.norm(u)
        return theta - lr * ratio * u, {"m": m, "v": v}

    return step


# --- LARS (You et al., 2017, Algorithm 1, weight decay 0) ----------------------------------
def lars_ref(lr, eta, momentum):
    def step(theta, g, s, t):
        local_lr = eta * np.linalg.norm(theta) / np.linalg.norm(g)
        v = momentum * s.get("v", 0.0) + lr * local_lr * g
        return theta - v, {"v": v}

    return step


# --- Adafactor (Shazeer & Stern, 2018, Algorithms 4/5 with update clipping and
# relative step size; beta2_t = 1 - t^-0.8, eps1 = 1e-30, eps2 = 1e-3, d = 1) -------------
def adafactor_ref(lr, min_dim, d=1.0, eps1=1e-30, eps2=1e-3, decay=0.8):
    def step(theta, g, s, t):
        beta2 = 1 - t ** (-decay)
        g2 = g * g + eps1
        if g.ndim == 2 and min(g.shape) >= min_dim:
            r = beta2 * s.get("r", 0.0) + (1 - beta2) * g2.sum(axis=1)
            c = beta2 * s.get("c", 0.0) + (1 - beta2) * g2.sum(axis=0)
            v_hat = np.outer(r, c) / r.sum()
            s = {"r": r, "c": c}
        else:
            v_hat = beta2 * s.get("v", 0.0) + (1 - beta2) * g2
            s = {"v": v_hat}
        u = g / np.sqrt(v_hat)
        u = u / max(1.0, _rms(u) / d)
        alpha = lr * max(eps2, _rms(theta))
        return theta - alpha * u, s

    return step


# --- Muon (Jordan et al., 2024: momentum, Nesterov, 5 quintic Newton-Schulz steps on the
# Frobenius-normalized matrix, width scaling sqrt(max(1, fan_out/fan_in))), with the
# Adam-style bias correction of the momentum that Optax applies; non-matrix leaves take
# Nesterov Adam (Dozat, 2016) ---------------------------------------------------------------
def _newton_schulz(g, steps=5, coeffs=(3.4445, -4.775, 2.0315), eps=1e-8):
    a, b, c = coeffs
    x = g / (np.linalg.norm(g) + eps)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for _ in range(steps):
        aa = x @ x.T
        x = a * x + (b * aa + c * aa @ aa) @ x
    return x.T if transposed else x


def muon_ref(lr, beta, adam_b1, adam_b2, eps):
    def step(theta, g, s, t):
        if g.ndim == 2:
            m = beta * s.get("m", 0.0) + (1 - beta) * g
            m_hat = beta * m / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta**t)
            o = _newton_schulz(m_hat, eps=eps) * np.sqrt(max(1.0, g.shape[1] / g.shape[0]))
            return theta - lr * o, {"m": m}
        m = adam_b1 * s.get("m", 0.0) + (1 - adam_b1) * g
        v = adam_b2 * s.get("v", 0.0) + (1 - adam_b2) * g * g
        m_hat = adam_b1 * m / (1 - adam_b1 ** (t + 1)) + (1 - adam_b1) * g / (1 - adam_b1**t)
        return theta - lr * m_hat / (np.sqrt(v / (1 - adam_b2**t)) + eps), {"m": m, "v": v}

    return step


# --- the 'adaptive learning rate' rule and EMA momentum (as stated in issue 10) ----------
def normalized_sgd_ref(lr, beta, eps):
    def step(theta, g, s, t):
        scale = 1 / np.sqrt(1 + beta * (t - 1)) * eps / np.maximum(np.abs(g) + eps, eps)
        return theta - lr * scale * g, s

    return step


def ema_momentum_ref(lr, beta):
    def step(theta, g, s, t):
        v = beta * s.get("v", 0.0) + (1 - beta) * g
        return theta - lr * v, {"v": v}

    return step


CASES = {
    "lion": (T.lion(0.01, b1=0.9, b2=0.99, weight_decay=0.1), lion_ref(0.01, 0.9, 0.99, 0.1)),
    "lamb": (
        T.lamb(0.05, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01),
        lamb_ref(0.05, 0.9, 0.999, 1e-6, 0.01),
    ),
    "lars": (T.lars(0.5, trust_coefficient=0.01, momentum=0.9), lars_ref(0.5, 0.01, 0.9)),
    "adafactor": (T.adafactor(0.05, min_dim_size_to_factor=3), adafactor_ref(0.05, 3)),
    "muon": (T.muon(0.02, beta=0.95), muon_ref(0.02, 0.95, 0.9, 0.999, 1e-8)),
    "normalized_sgd": (
        T.normalized_sgd(beta=0.5, eps=0.3, learning_rate=0.1),
        normalized_sgd_ref(0.1, 0.5, 0.3),
    ),
    "ema_momentum": (T.ema_momentum(0.1, beta=0.8), ema_momentum_ref(0.1, 0.8)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_paper_formula(name):
    ours, ref = CASES[name]
    _assert_close(_ours(ours), _reference(ref))


def test_adafactor_reference_is_factored():
    """The (4, 3) and (6, 5) leaves take the factored branch in both implementations."""
    state = T.adafactor(0.05, min_dim_size_to_factor=3).init(
        jax.tree.map(jnp.asarray, _init())
    )
    inner = state.inner_state[0]
    assert inner.v_row["w"].shape == (3,) and inner.v_col["w"].shape == (4,)
    assert inner.v["b"].shape == (3,)


def test_schedule_free_eval_params_through_injection():
    tx = T.schedule_free_adamw(0.01, warmup_steps=2)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for _ in range(5):
        updates, state = tx.update({"w": jnp.ones(3)}, state, params)
        params = optax.apply_updates(params, updates)
    ours = T.schedule_free_eval_params(state, params)
    inner = state.inner_state
    expected = optax.contrib.schedule_free_eval_params(inner, params)
    np.testing.assert_array_equal(ours["w"], expected["w"])
    assert not np.allclose(ours["w"], params["w"])
