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


def test_dp_step_follows_the_nan_policy():
    """A linear least-squares model, one example with a NaN feature (so its loss and
    gradient are NaN): `none` trains NaN params, `raise` records step 0 and leaf 0 (the
    loss), `skip` keeps the params and advances the step; as make_train_step does."""

    def loss_fn(params, batch, rng):
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}

    tx = optax.chain(transforms.dp_aggregate(1.0, 0.0), optax.sgd(0.1))
    state = TrainState.create(lambda p, x: x @ p["w"], tx, jax.random.PRNGKey(0),
                              params={"w": jnp.ones(3)})
    x = np.ones((8, 3), np.float32)
    x[3, 1] = np.nan
    batch = {"x": x, "y": np.zeros(8, np.float32)}
    new, _ = jax.jit(make_dp_train_step(loss_fn))(state, batch)
    assert not np.any(np.isfinite(new.params["w"]))
    _, metrics = jax.jit(make_dp_train_step(loss_fn, "raise"))(state, batch)
    assert np.asarray(metrics["nonfinite"]).tolist() == [0, 0, 1]
    new, _ = jax.jit(make_dp_train_step(loss_fn, "skip"))(state, batch)
    assert int(new.step) == 1 and np.asarray(new.nonfinite).tolist() == [0, 0, 1]
    np.testing.assert_array_equal(new.params["w"], state.params["w"])
    with pytest.raises(JaxtrainError, match="unknown nan_policy 'stop'"):
        make_dp_train_step(loss_fn, "stop")


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


# -- Poisson subsampling ---------------------------------------------------------------

def test_poisson_batches_include_each_example_independently_with_rate_q():
    """Over 4000 draws of n=150 examples at q=0.08: each example's inclusion count is
    Binomial(4000, q) (chi-square over the examples), the batch size is Binomial(n, q) in
    mean and variance, and two examples are drawn together at rate q^2 (independence)."""
    from scipy.stats import chi2

    from jaxtrain.strategies.privacy import PoissonBatches

    n, q, draws = 150, 0.08, 4000
    data = {"x": np.arange(n, dtype=np.float32)[:, None], "y": np.arange(n)}
    batches = PoissonBatches(data, q, seed=3, capacity=n)
    hits = np.zeros((draws, n), bool)
    for position in range(draws):
        batch = batches(position)
        size = int(batch["mask"].sum())
        assert np.all(batch["mask"][:size] == 1) and np.all(batch["mask"][size:] == 0)
        hits[position, batch["y"][:size]] = True
        np.testing.assert_array_equal(batch["x"][:size, 0], batch["y"][:size])
        assert np.all(batch["x"][size:] == 0)  # padding rows are zeros
    counts = hits.sum(0)
    statistic = np.sum((counts - draws * q) ** 2 / (draws * q * (1 - q)))
    assert chi2.sf(statistic, n) > 1e-3, statistic
    sizes = hits.sum(1)
    assert abs(sizes.mean() - n * q) < 4 * np.sqrt(n * q * (1 - q) / draws)
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.1)
    together = (hits[:, :, None] & hits[:, None, :]).mean(0)[np.triu_indices(n, 1)]
    assert together.mean() == pytest.approx(q * q, rel=0.05)
    np.testing.assert_array_equal(batches(17)["y"], PoissonBatches(data, q, 3, n)(17)["y"])


def test_poisson_capacity_is_the_smallest_with_negligible_overflow():
    """P(Binomial(n, q) > capacity) <= 1e-12 and not for capacity - 1 (scipy's binomial
    tail); rounded up to the device multiple; a larger draw is refused, not truncated."""
    from scipy.stats import binom

    from jaxtrain.strategies.privacy import PoissonBatches, poisson_capacity

    for n, q in ((1347, 64 / 1347), (60000, 256 / 60000), (100, 0.5)):
        c = poisson_capacity(n, q)
        assert binom.sf(c, n, q) <= 1e-12 < binom.sf(c - 1, n, q)
        assert poisson_capacity(n, q, 8) == -(-c // 8) * 8
    batches = PoissonBatches({"x": np.zeros((100, 1))}, 0.5, seed=0, capacity=20)
    with pytest.raises(JaxtrainError, match="more than the batch capacity 20"):
        batches(0)


def test_dp_step_on_a_padded_poisson_batch_averages_over_the_expected_size():
    """Padding rows add nothing: the update is the clipped per-example gradients of the
    examples drawn (each by its own jax.grad call), summed and divided by q * n."""
    from jaxtrain.strategies.privacy import PoissonBatches

    clip, expected = 0.5, 6.0
    state = _state(optax.chain(transforms.dp_aggregate(clip, 0.0, expected_batch_size=expected),
                               optax.sgd(1.0)))
    train = digits_split()[0]
    n = len(train["label"])
    batch = PoissonBatches(train, expected / n, seed=0, capacity=16)(5)
    size = int(batch["mask"].sum())
    assert 0 < size < 16
    new, metrics = jax.jit(make_dp_train_step(classification_loss))(state, batch)
    applied = jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), new.params, state.params)
    drawn = {k: v[:size] for k, v in batch.items() if k != "mask"}
    reference = jax.tree.map(lambda x: x * size / expected,
                             _reference_clipped_mean(state, drawn, clip))
    for got, want in zip(jax.tree.leaves(applied), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-6)
    assert float(metrics["batch_examples"]) == size
