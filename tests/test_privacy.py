"""DP-SGD: per-example clipping, noise scale, the step, and the accountant."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy.stats import norm

from jaxtrain import transforms
from jaxtrain.data import batch_at, digits_split
from jaxtrain.errors import JaxtrainError
from jaxtrain.models import CNN
from jaxtrain.strategies import dp_epsilon, make_dp_train_step
from jaxtrain.train import TrainState, classification_loss


def _state(tx, seed=0):
    with nnx.use_eager_sharding(False):
        model = CNN(num_classes=10, channels=4, features=16, rngs=nnx.Rngs(seed))
    return TrainState.create(model, tx, jax.random.PRNGKey(seed))


def _reference_clipped_mean(state, batch, clip):
    """Each example's gradient by its own jax.grad call, clipped in numpy, then averaged."""
    grad = jax.jit(jax.grad(lambda p, one: classification_loss(state.model(p), one, None)[0]))
    total = None
    for i in range(len(batch["label"])):
        g = grad(state.params, {k: v[i : i + 1] for k, v in batch.items()})
        flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]).astype(np.float64)
        scale = min(1.0, clip / np.linalg.norm(flat))
        g = jax.tree.map(lambda x, s=scale: np.asarray(x, np.float64) * s, g)
        total = g if total is None else jax.tree.map(np.add, total, g)
    return jax.tree.map(lambda x: x / len(batch["label"]), total)


def test_dp_step_without_noise_is_the_mean_of_clipped_per_example_grads():
    clip = 0.5
    state = _state(optax.chain(transforms.dp_aggregate(clip, 0.0), optax.sgd(1.0)))
    batch = batch_at(digits_split()[0], 16, 0, 0)
    new, metrics = jax.jit(make_dp_train_step(classification_loss))(state, batch)
    applied = jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), new.params, state.params)
    expected = _reference_clipped_mean(state, batch, clip)
    for got, want in zip(jax.tree.leaves(applied), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-6)
    assert float(metrics["per_example_grad_norm"]) > clip  # the clip was active


def test_one_example_moves_the_sum_by_at_most_the_clip_norm():
    """Sensitivity: replacing one example by anything changes the clipped sum <= 2 * clip;
    scaling its gradient up 1000x changes it by <= clip (both clipped to clip)."""
    clip, size = 1.0, 8
    agg = transforms.dp_aggregate(clip, 0.0)
    rng = np.random.default_rng(0)
    grads = {"w": jnp.asarray(rng.normal(size=(size, 30)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=(size, 3)), jnp.float32)}
    other = jax.tree.map(lambda g: g.at[3].multiply(-1000.0), grads)
    key = jax.random.PRNGKey(1)
    a, _ = agg.update(grads, agg.init(None), noise_key=key)
    b, _ = agg.update(other, agg.init(None), noise_key=key)
    diff = optax.tree.norm(jax.tree.map(lambda x, y: (x - y) * size, a, b))
    assert float(diff) <= 2 * clip + 1e-5
    assert float(diff) > 1.9 * clip  # the flipped example really moved it (by ~2 * clip)


def test_noise_has_the_stated_std_and_comes_from_the_key():
    clip, multiplier, size = 0.3, 1.7, 4
    agg = transforms.dp_aggregate(clip, multiplier)
    grads = {"w": jnp.zeros((size, 200_000)), "b": jnp.zeros((size, 50_000))}
    out, _ = agg.update(grads, agg.init(None), noise_key=jax.random.PRNGKey(7))
    noise = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)]) * size
    std = clip * multiplier
    # 250k draws: the sample std is within 0.5% of sigma with overwhelming probability
    assert abs(noise.std() / std - 1) < 0.01
    assert abs(noise.mean()) < 5 * std / np.sqrt(noise.size)
    again, _ = agg.update(grads, agg.init(None), noise_key=jax.random.PRNGKey(7))
    other, _ = agg.update(grads, agg.init(None), noise_key=jax.random.PRNGKey(8))
    np.testing.assert_array_equal(again["w"], out["w"])
    assert not np.allclose(other["w"], out["w"])


def test_dp_sgd_trains_digits_and_draws_noise_from_the_state_rng():
    tx = transforms.dp_sgd(0.2, l2_norm_clip=1.0, noise_multiplier=0.5, momentum=0.9)
    train, _ = digits_split()
    step = jax.jit(make_dp_train_step(classification_loss))
    state = _state(tx)
    losses = []
    for s in range(80):
        state, metrics = step(state, batch_at(train, 64, 0, s))
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    a, _ = step(_state(tx), batch_at(train, 64, 0, 0))
    b, _ = step(_state(tx).replace(rng=jax.random.PRNGKey(99)), batch_at(train, 64, 0, 0))
    assert not np.allclose(a.params["head"]["bias"], b.params["head"]["bias"])


def test_dp_aggregate_refuses_bad_arguments_and_a_missing_key():
    with pytest.raises(JaxtrainError, match="l2_norm_clip"):
        transforms.dp_aggregate(0.0, 1.0)
    with pytest.raises(JaxtrainError, match="noise_multiplier"):
        transforms.dp_aggregate(1.0, -1.0)
    agg = transforms.dp_aggregate(1.0, 1.0)
    with pytest.raises(JaxtrainError, match="noise_key"):
        agg.update({"w": jnp.zeros((2, 3))}, agg.init(None))


def _exact_gaussian_delta(eps, sigma):
    """Balle & Wang 2018 (Thm 8): the exact delta(eps) of a Gaussian mechanism with
    sensitivity 1 and noise std sigma."""
    return norm.cdf(0.5 / sigma - eps * sigma) - np.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma)


@pytest.mark.parametrize("multiplier,steps", [(1.0, 1), (2.0, 16), (4.0, 100)])
def test_accountant_matches_the_exact_gaussian_without_sampling(multiplier, steps):
    """With sampling rate 1, `steps` compositions are one Gaussian of std sigma/sqrt(steps)."""
    delta = 1e-5
    sigma = multiplier / np.sqrt(steps)
    eps_pld = dp_epsilon(multiplier, 1.0, steps, delta, accountant="pld")
    assert _exact_gaussian_delta(eps_pld, sigma) == pytest.approx(delta, rel=0.05)
    eps_rdp = dp_epsilon(multiplier, 1.0, steps, delta)
    assert eps_pld * 0.99 <= eps_rdp <= eps_pld * 1.5  # RDP: a valid, looser bound


def test_accountant_is_monotone_and_checks_its_arguments():
    base = dp_epsilon(1.1, 256 / 60000, 1000, 1e-5)
    assert dp_epsilon(1.1, 256 / 60000, 2000, 1e-5) > base
    assert dp_epsilon(2.0, 256 / 60000, 1000, 1e-5) < base
    assert dp_epsilon(1.1, 512 / 60000, 1000, 1e-5) > base
    with pytest.raises(JaxtrainError, match="sampling_rate"):
        dp_epsilon(1.0, 0.0, 10, 1e-5)
    with pytest.raises(JaxtrainError, match="accountant 'moments'"):
        dp_epsilon(1.0, 0.1, 10, 1e-5, accountant="moments")
