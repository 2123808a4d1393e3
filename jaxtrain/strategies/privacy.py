"""The DP-SGD train step (per-example gradients by `vmap`), Poisson-subsampled batches and
the privacy accountant.

The accountant's epsilon (`dp_epsilon`) is that of the Poisson-subsampled Gaussian
mechanism: it holds for batches in which each example is included independently with
probability q. `PoissonBatches` draws exactly those batches (a pure function of the seed
and the data position, so a resumed run draws the same ones) and pads them to a fixed
capacity with a `mask`, so the compiled step keeps one shape; the capacity is set so that
a larger draw has probability below 1e-12 per step, and such a draw is refused rather
than truncated.

The step hands per-example gradients to the state's optimizer, whose chain must start
with `jaxtrain.transforms.dp_aggregate` (or be `dp_sgd`), with a fresh `noise_key` split
from the TrainState's RNG each step. Model state (BatchNorm statistics...) is not
updated: statistics pooled over a batch would leak past the per-example clipping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..errors import JaxtrainError
from ..train.precision import POLICIES, get_policy
from ..train.step import apply_nan_policy, check_nan_policy, squared_norm
from ..transforms import current_hyperparams
from ..transforms.privacy import dp_aggregate


def per_example_grads(loss_fn, state, batch, rng):
    """`(losses, aux, grads)`, each with a leading batch axis: `loss_fn` on batches of one."""
    size = jax.tree.leaves(batch)[0].shape[0]

    def objective(params, example, key):
        one = jax.tree.map(lambda x: x[None], example)
        return loss_fn(state.model(params), one, key)

    grad_fn = jax.vmap(jax.value_and_grad(objective, has_aux=True), in_axes=(None, 0, 0))
    (losses, aux), grads = grad_fn(state.params, batch, jax.random.split(rng, size))
    return losses, aux, grads


def make_dp_train_step(loss_fn, nan_policy: str = "none"):
    """A `(state, batch) -> (state, metrics)` step for a state whose `tx` starts with
    `dp_aggregate`; metrics: loss, aux means, mean per-example gradient norm, lr. A batch
    with a `mask` (1 = an example, 0 = padding; `PoissonBatches`) gives padding rows zero
    gradients, leaves them out of the means and reports the examples drawn as
    `batch_examples`. `nan_policy` as `make_train_step`'s, on the mean loss and the
    per-example gradients (leaf i of the record: param leaf i). It computes in the params'
    dtype (no mixed-precision policy)."""
    check_nan_policy(nan_policy)

    def train_step(state, batch):
        step_rng, noise_key = jax.random.split(state.step_rng())
        batch = dict(batch)
        mask = batch.pop("mask", None)
        losses, aux, grads = per_example_grads(loss_fn, state, batch, step_rng)
        if mask is None:
            mask = jnp.ones(losses.shape, jnp.float32)
        mask = jnp.asarray(mask, jnp.float32)
        grads = jax.tree.map(lambda g: g * mask.reshape(-1, *[1] * (g.ndim - 1)).astype(
            g.dtype), grads)
        norms = jax.vmap(optax.tree.norm)(grads)
        count = jnp.sum(mask)
        mean = lambda v: jnp.sum(jnp.asarray(v, jnp.float32).reshape(mask.shape[0], -1)
                                 .mean(-1) * mask) / jnp.maximum(count, 1.0)
        new_state = state.apply_gradients(grads, noise_key=noise_key).replace(
            data_position=state.data_position + 1)
        metrics = {"loss": mean(losses), "per_example_grad_norm": mean(norms),
                   "batch_examples": count, **{k: mean(v) for k, v in aux.items()}}
        hyper = current_hyperparams(new_state.opt_state)
        if "learning_rate" in hyper:
            metrics["learning_rate"] = jnp.asarray(hyper["learning_rate"])
        return apply_nan_policy(nan_policy, state, new_state, metrics["loss"], grads,
                                squared_norm(grads), metrics)

    return train_step


def dp_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
               accountant: str = "rdp") -> float:
    """Epsilon of DP-SGD with Poisson sampling at `sampling_rate` for `steps` steps.

    Google's `dp_accounting`: `accountant='rdp'` (Renyi DP, Mironov 2017; what TF Privacy
    and Opacus report) or `'pld'` (privacy loss distributions; tighter).
    """
    import dp_accounting
    from dp_accounting import pld, rdp

    if not 0.0 < sampling_rate <= 1.0:
        raise JaxtrainError(f"dp_epsilon: sampling_rate must be in (0, 1], got {sampling_rate!r}")
    if not 0.0 < delta < 1.0:
        raise JaxtrainError(f"dp_epsilon: delta must be in (0, 1), got {delta!r}")
    if not (isinstance(steps, int) and steps > 0):
        raise JaxtrainError(f"dp_epsilon: steps must be a positive integer, got {steps!r}")
    if not noise_multiplier > 0:
        raise JaxtrainError(f"dp_epsilon: noise_multiplier must be > 0, got {noise_multiplier!r}")
    makers = {"rdp": rdp.RdpAccountant, "pld": pld.PLDAccountant}
    if accountant not in makers:
        raise JaxtrainError(f"dp_epsilon: unknown accountant {accountant!r} (valid: pld, rdp)")
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        steps,
    )
    acc = makers[accountant]()
    acc.compose(event)
    return float(acc.get_epsilon(delta))


# A draw larger than the capacity has at most this probability per step.
OVERFLOW_PROBABILITY = 1e-12


def poisson_capacity(n: int, rate: float, multiple_of: int = 1) -> int:
    """The smallest batch capacity c with P(Binomial(n, rate) > c) <= 1e-12 (scipy's
    binomial tail), rounded up to a multiple of `multiple_of` (the devices the batch is
    split over)."""
    from scipy.stats import binom

    capacity = int(binom.isf(OVERFLOW_PROBABILITY, n, rate))
    while binom.sf(capacity, n, rate) > OVERFLOW_PROBABILITY:  # isf may round down
        capacity += 1
    capacity = min(max(capacity, 1), n)
    return -(-capacity // multiple_of) * multiple_of


class PoissonBatches:
    """`position -> batch` of a dict data set in which each of the n examples is included
    independently with probability `rate` (drawn from `(seed, position)`), padded with
    zero rows to `capacity` and marked by `mask` (1.0 for an example, 0.0 for padding)."""

    def __init__(self, data: dict, rate: float, seed: int, capacity: int):
        sizes = {len(v) for v in data.values()}
        if len(sizes) != 1:
            raise JaxtrainError("Poisson sampling needs a dict of equal-length arrays")
        self.n = sizes.pop()
        if not 0.0 < rate <= 1.0:
            raise JaxtrainError(f"Poisson sampling rate must be in (0, 1], got {rate!r}")
        self.data = {k: np.asarray(v) for k, v in data.items()}
        self.rate, self.seed, self.capacity = rate, seed, capacity

    def included(self, position: int) -> np.ndarray:
        """The indices of the examples drawn at `position`, in data order."""
        draws = np.random.default_rng([self.seed, position, 0x5D5]).random(self.n)
        return np.flatnonzero(draws < self.rate)

    def __call__(self, position: int) -> dict:
        idx = self.included(position)
        if len(idx) > self.capacity:  # probability <= 1e-12 per step (poisson_capacity)
            raise JaxtrainError(f"Poisson sampling drew {len(idx)} examples at data position "
                                f"{position}, more than the batch capacity {self.capacity}")
        batch = {}
        for key, value in self.data.items():
            padded = np.zeros((self.capacity, *value.shape[1:]), value.dtype)
            padded[:len(idx)] = value[idx]
            batch[key] = padded
        batch["mask"] = (np.arange(self.capacity) < len(idx)).astype(np.float32)
        return batch


def dp_from_config(section, tx, train_data, train, seed: int, multiple_of: int):
    """DP-SGD as the config's `privacy` section (a `PrivacyConfig`) asks, with the `train`
    section: `(tx, batches, rate)`, the optimizer `tx` with `dp_aggregate` in front
    (dividing by the expected batch size), Poisson batches of expected size
    `train.batch_size` (rate q = batch_size / n) and q itself."""
    if not isinstance(train_data, dict):
        raise JaxtrainError("config key 'privacy': Poisson sampling needs a data set held in "
                            "memory (a dict of arrays), not streamed records")
    if train.microbatches != 1:
        raise JaxtrainError("config key 'train.microbatches' must be 1 with privacy (the "
                            "DP step takes per-example gradients of the whole batch)")
    if get_policy(train.precision) != POLICIES["float32"]:
        raise JaxtrainError(f"config key 'train.precision' must be float32 with privacy (the "
                            f"DP step computes in the params' dtype), got {train.precision!r}")
    n = len(next(iter(train_data.values())))
    if train.batch_size > n:
        raise JaxtrainError(f"config key 'train.batch_size' ({train.batch_size}) is the "
                            f"expected Poisson batch size and must be <= the {n} training "
                            "examples")
    rate = train.batch_size / n
    aggregate = dp_aggregate(section.l2_norm_clip, section.noise_multiplier,
                             expected_batch_size=train.batch_size)
    batches = PoissonBatches(train_data, rate, seed, poisson_capacity(n, rate, multiple_of))
    return optax.chain(aggregate, tx), batches, rate
