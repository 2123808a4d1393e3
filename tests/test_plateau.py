"""reduce_on_plateau takes torch ReduceLROnPlateau's decisions on the same values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxtrain import transforms as T
from jaxtrain.errors import JaxtrainError


def _sequences():
    rng = np.random.default_rng(0)
    t = np.arange(300)
    noisy = np.exp(-t / 60) + 0.05 * rng.normal(size=t.size)
    plateaus = np.concatenate([np.linspace(1, 0.5, 40), np.full(30, 0.5), np.linspace(0.5, 0.2, 20),
                               0.2 + 1e-6 * rng.normal(size=60), np.full(50, 0.3)])
    near_threshold = 1.0 * (1 - 1.5e-4) ** np.arange(200)  # just beats rtol=1e-4 each step
    stalls = np.repeat(rng.uniform(0.1, 1.0, size=40), rng.integers(1, 9, size=40))
    return {"noisy": noisy, "plateaus": plateaus, "near_threshold": near_threshold,
            "stalls": stalls}


def _torch_scales(values, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", eps=0.0, **kw)
    out = []
    for v in values:
        sched.step(float(v))
        out.append(opt.param_groups[0]["lr"])
    return np.array(out)


def _our_scales(values, **kw):
    tx = T.reduce_on_plateau(**kw)
    state = tx.init(jnp.zeros(()))

    def body(state, v):
        u, state = tx.update(jnp.ones(()), state, value=v)
        return state, u

    _, applied = jax.lax.scan(body, state, jnp.asarray(values, jnp.float32))
    return np.asarray(applied)


CASES = [
    dict(ours=dict(factor=0.5, patience=3), torch=dict(factor=0.5, patience=3)),
    dict(ours=dict(factor=0.9, patience=0), torch=dict(factor=0.9, patience=0)),
    dict(ours=dict(factor=0.3, patience=2, cooldown=4), torch=dict(factor=0.3, patience=2,
                                                                    cooldown=4)),
    dict(ours=dict(factor=0.5, patience=5, rtol=0.05, cooldown=2, min_scale=0.01),
         torch=dict(factor=0.5, patience=5, threshold=0.05, cooldown=2, min_lr=0.01)),
    dict(ours=dict(factor=0.5, patience=2, rtol=0.0, atol=0.01),
         torch=dict(factor=0.5, patience=2, threshold=0.01, threshold_mode="abs")),
]


@pytest.mark.parametrize("seq", sorted(_sequences()))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_same_decisions_as_torch(seq, case):
    values = _sequences()[seq]
    kw = CASES[case]
    expected = _torch_scales(values, **kw["torch"])
    ours = _our_scales(values, **kw["ours"])
    np.testing.assert_array_equal(np.diff(ours) != 0, np.diff(expected) != 0)  # same steps
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    assert expected.min() < 1.0 or seq == "near_threshold"  # the case really reduces


def test_nan_counts_as_a_bad_value_like_torch():
    values = [1.0, float("nan"), float("nan"), 0.9, float("nan"), float("nan"), float("nan")]
    np.testing.assert_allclose(_our_scales(values, factor=0.5, patience=1),
                               _torch_scales(values, factor=0.5, patience=1))


def test_in_a_chain_with_an_optimizer_and_jit():
    tx = optax.chain(T.sgd(1.0), T.reduce_on_plateau(factor=0.5, patience=0))
    params = jnp.ones(3)
    state = tx.init(params)
    step = jax.jit(lambda g, s, m: tx.update(g, s, params, value=m))
    u, state = step(jnp.ones(3), state, 1.0)
    np.testing.assert_allclose(u, -1.0)
    u, state = step(jnp.ones(3), state, 2.0)
    np.testing.assert_allclose(u, -0.5)


def test_missing_value_and_bad_arguments():
    tx = T.reduce_on_plateau()
    with pytest.raises(JaxtrainError, match="value="):
        tx.update(jnp.ones(()), tx.init(jnp.zeros(())))
    with pytest.raises(JaxtrainError, match="factor"):
        T.reduce_on_plateau(factor=1.5)
    with pytest.raises(JaxtrainError, match="patience"):
        T.reduce_on_plateau(patience=-1)


def test_optax_contrib_version_decides_differently():
    """The documented difference: optax reduces after `patience` bad values, torch after
    patience + 1."""
    from optax import contrib

    values = _sequences()["plateaus"]
    tx = contrib.reduce_on_plateau(factor=0.5, patience=3, rtol=1e-4)

    def body(state, v):
        _, state = tx.update(jnp.ones(()), state, value=v)
        return state, state.scale

    _, scales = jax.lax.scan(body, tx.init(jnp.zeros(())), jnp.asarray(values, jnp.float32))
    torch_scales = _torch_scales(values, factor=0.5, patience=3)
    assert not np.allclose(scales, torch_scales)
    np.testing.assert_allclose(_our_scales(values, factor=0.5, patience=3), torch_scales,
                               rtol=1e-5)
