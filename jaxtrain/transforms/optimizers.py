"""First-order optimizers as Optax `GradientTransformation`s.

Each is built on Optax where Optax is exact, wrapped in `optax.inject_hyperparams`
so that the learning rate in force is visible in the state (see
`current_hyperparams`). Hyperparameter names follow Optax. Where Optax's formula
differs from torch.optim, an argument selects torch's (docs/transforms.md says which).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..errors import JaxtrainError
from . import elementwise
from .compact_state import check_format, scale_by_adam_compact
from .find import find_states
from .inject import hyperparam_dtype, injected
from .validate import (
    check_learning_rate,
    check_nonnegative,
    check_positive,
    check_unit_interval,
    with_mask_check,
)

# Arguments that are never hyperparameters to inject: masks and dtypes (callables would
# be taken for schedules), integers that shape the computation, formula selectors.
_STATIC = {
    "dtype_momentum",
    "mu_dtype",
    "nu_dtype",
    "block_size",
    "min_8bit_size",
    "num_devices",
    "mask",
    "weight_decay_mask",
    "trust_ratio_mask",
    "min_dim_size_to_factor",
    "ns_steps",
    "ns_coeffs",
    "warmup_steps",
    "max_of",
    "eps_of",
    "momentum_decay",
}


class _TorchAdamState(NamedTuple):
    """Moments of the torch-formula Adam variants; `extra` is nu_max (AMSGrad) or the
    running product of the momentum schedule (NAdam)."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    extra: optax.Updates


def _scale_by_rss_torch(initial_accumulator_value, eps):
    """torch.optim.Adagrad's scaling: g / (sqrt(sum of g^2) + eps)."""

    def init(params):
        return jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator_value), params)

    def update(updates, state, params=None):
        del params
        state = jax.tree.map(lambda s, g: s + g * g, state, updates)
        return jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps), updates, state), state

    return optax.GradientTransformation(init, update)


def _adam_moments(updates, state, b1, b2):
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    return mu, nu, optax.safe_increment(state.count)


def _scale_by_amsgrad_torch(b1, b2, eps):
    """torch.optim.Adam(amsgrad=True): max of the raw second moment, bias-corrected after."""

    def init(params):
        zeros = [optax.tree.zeros_like(params) for _ in range(3)]
        return _TorchAdamState(jnp.zeros([], jnp.int32), *zeros)

    def update(updates, state, params=None):
        del params
        mu, nu, count = _adam_moments(updates, state, b1, b2)
        nu_max = jax.tree.map(jnp.maximum, state.extra, nu)
        t = count.astype(jnp.result_type(b2, jnp.float32))
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        out = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v / bc2) + eps), mu, nu_max)
        return out, _TorchAdamState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init, update)


def _scale_by_nadam_torch(b1, b2, eps, momentum_decay):
    """torch.optim.NAdam: momentum schedule mu_t = b1*(1 - 0.5*0.96^(t*momentum_decay))."""

    def init(params):
        mu, nu = optax.tree.zeros_like(params), optax.tree.zeros_like(params)
        product = jnp.ones([], hyperparam_dtype(params))
        return _TorchAdamState(jnp.zeros([], jnp.int32), mu, nu, product)

    def update(updates, state, params=None):
        del params
        mu, nu, count = _adam_moments(updates, state, b1, b2)
        t = count.astype(state.extra.dtype)
        mu_t = b1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))
        mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1.0) * momentum_decay))
        product = state.extra * mu_t
        bc2 = 1 - b2**t
        out = jax.tree.map(
            lambda g, m, v: (
                ((1.0 - mu_t) / (1.0 - product) * g + mu_next / (1.0 - product * mu_next) * m)
                / (jnp.sqrt(v / bc2) + eps)
            ),
            updates,
            mu,
            nu,
        )
        return out, _TorchAdamState(count, mu, nu, product)

    return optax.GradientTransformation(init, update)


def _scale_by_radam_torch(b1, b2, eps, threshold):
    """torch.optim.RAdam: eps added to the square root of the raw second moment, the
    bias correction sqrt(1 - b2^t) applied after; rectified while rho_t > threshold."""

    def init(params):
        mu, nu = optax.tree.zeros_like(params), optax.tree.zeros_like(params)
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), mu, nu)

    def update(updates, state, params=None):
        del params
        mu, nu, count = _adam_moments(updates, state, b1, b2)
        t = count.astype(jnp.result_type(b2, jnp.float32))
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        rho_inf = 2 / (1 - b2) - 1
        rho = rho_inf - 2 * t * b2**t / bc2
        rect = jnp.sqrt(jnp.maximum(
            (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho), 0.0))
        out = jax.tree.map(
            lambda m, v: jnp.where(rho > threshold,
                                   m / bc1 * rect * jnp.sqrt(bc2) / (jnp.sqrt(v) + eps),
                                   m / bc1),
            mu, nu)
        return out, optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def _none_if_zero(value):
    """None for a momentum of None or a concrete 0 (no momentum buffer in the state); a
    traced value (under jit, vmap or an outer inject_hyperparams) is kept as it is."""
    if value is None or isinstance(value, jax.core.Tracer):
        return value
    return None if float(value) == 0.0 else value


def _betas(name, **betas):
    check_unit_interval(name, **{k: v for k, v in betas.items() if v is not None})


def sgd(learning_rate, momentum: float = 0.0, nesterov: bool = False):
    """SGD, optionally with heavy-ball or Nesterov momentum (torch.optim.SGD semantics).

    Full-batch gradient descent is this fed the gradient of the whole data set.
    """
    check_learning_rate(learning_rate)
    check_nonnegative("sgd", momentum=momentum)
    return injected(optax.sgd, _STATIC, learning_rate=learning_rate,
                    momentum=_none_if_zero(momentum), nesterov=nesterov)


def _ema_momentum(learning_rate, beta):
    return optax.chain(optax.ema(beta, debias=False), optax.scale_by_learning_rate(learning_rate))


def ema_momentum(learning_rate, beta: float = 0.9):
    """EMA-form momentum: v <- beta*v + (1-beta)*g, theta <- theta - lr*v (no debiasing)."""
    check_learning_rate(learning_rate)
    _betas("ema_momentum", beta=beta)
    return injected(_ema_momentum, _STATIC, learning_rate=learning_rate, beta=beta)


def _adagrad(learning_rate, initial_accumulator_value, eps, eps_in_sqrt):
    if eps_in_sqrt:
        return optax.adagrad(learning_rate, initial_accumulator_value, eps)
    return optax.chain(
        _scale_by_rss_torch(initial_accumulator_value, eps),
        optax.scale_by_learning_rate(learning_rate),
    )


def adagrad(learning_rate, initial_accumulator_value: float = 0.1, eps: float = 1e-7,
            eps_in_sqrt: bool = True):
    """Adagrad: g / sqrt(sum g^2 + eps) (Optax); `eps_in_sqrt=False` gives torch's
    g / (sqrt(sum g^2) + eps)."""
    check_learning_rate(learning_rate)
    check_nonnegative("adagrad", initial_accumulator_value=initial_accumulator_value, eps=eps)
    return injected(_adagrad, _STATIC, learning_rate=learning_rate,
                    initial_accumulator_value=initial_accumulator_value, eps=eps,
                    eps_in_sqrt=eps_in_sqrt)


def adadelta(learning_rate=1.0, rho: float = 0.9, eps: float = 1e-6):
    """Adadelta (Zeiler, 2012), as torch.optim.Adadelta (whose default lr, 1.0, we share)."""
    check_learning_rate(learning_rate)
    _betas("adadelta", rho=rho)
    check_positive("adadelta", eps=eps)
    return injected(optax.adadelta, _STATIC, only=("learning_rate",), learning_rate=learning_rate,
                    rho=rho, eps=eps)


def rmsprop(learning_rate, decay: float = 0.9, eps: float = 1e-8, eps_in_sqrt: bool = True,
            centered: bool = False, momentum: float | None = None, nesterov: bool = False):
    """RMSprop (Tieleman & Hinton), Optax's. torch.optim.RMSprop is `decay=alpha` (0.99
    there) with `eps_in_sqrt=False`."""
    check_learning_rate(learning_rate)
    _betas("rmsprop", decay=decay)
    check_positive("rmsprop", eps=eps)
    check_nonnegative("rmsprop", momentum=momentum)
    return injected(optax.rmsprop, _STATIC, learning_rate=learning_rate, decay=decay, eps=eps,
                    eps_in_sqrt=eps_in_sqrt, centered=centered, momentum=_none_if_zero(momentum),
                    nesterov=nesterov)


def _adam_compact(learning_rate, b1, b2, eps, weight_decay, mask, mu_dtype, nu_dtype,
                  block_size, min_8bit_size, num_devices):
    """Adam's step with its moments stored as `mu_dtype` / `nu_dtype` (compact_state.py),
    then decoupled decay where `weight_decay` is not None (AdamW), then -learning_rate."""
    return optax.chain(
        scale_by_adam_compact(b1, b2, eps, mu=mu_dtype, nu=nu_dtype, block_size=block_size,
                              min_8bit_size=min_8bit_size, num_devices=num_devices),
        *(() if weight_decay is None else (optax.add_decayed_weights(weight_decay, mask),)),
        optax.scale_by_learning_rate(learning_rate),
    )


def _adam_family(name, learning_rate, b1, b2, eps, weight_decay, mask, mu_dtype, nu_dtype,
                 block_size=256, min_8bit_size=4096, num_devices=1):
    """The factory to inject and its arguments, checked, for Adam (`weight_decay=None`) or
    AdamW: Optax's own adam/adamw when both moments are float32, else `_adam_compact`.
    The callers inject it themselves (one call fewer between a config's learning rate and
    Optax)."""
    check_learning_rate(learning_rate)
    _betas(name, b1=b1, b2=b2)
    check_positive(name, eps=eps)
    check_nonnegative(name, weight_decay=weight_decay)
    if mu_dtype == nu_dtype == "8bit":
        check_positive(name, block_size=block_size)
        check_nonnegative(name, min_8bit_size=min_8bit_size)
        check_positive(name, num_devices=num_devices)
    else:
        mu_dtype = check_format(name, "mu_dtype", mu_dtype)
        nu_dtype = check_format(name, "nu_dtype", nu_dtype)
    hyper = dict(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps)
    decayed = {} if weight_decay is None else dict(weight_decay=weight_decay, mask=mask)
    if mu_dtype == nu_dtype == "float32":
        return (elementwise.adam if weight_decay is None else elementwise.adamw), {**hyper,
                                                                              **decayed}
    return _adam_compact, dict(**hyper, weight_decay=weight_decay, mask=mask,
                               mu_dtype=mu_dtype, nu_dtype=nu_dtype, block_size=block_size,
                               min_8bit_size=min_8bit_size, num_devices=num_devices)


def adam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         mu_dtype=None, nu_dtype=None):
    """Adam (Kingma & Ba, 2015); the same update as torch.optim.Adam. `mu_dtype` /
    `nu_dtype` (float32, the default, or bfloat16) store the first / second moment in that
    dtype, written with stochastic rounding, computed in float32 (compact_state.py)."""
    factory, args = _adam_family("adam", learning_rate, b1, b2, eps, None, None, mu_dtype,
                                 nu_dtype)
    return injected(factory, _STATIC, **args)


def adam_8bit(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
              block_size: int = 256, min_8bit_size: int = 4096, num_devices: int = 1):
    """Adam with both moments blockwise quantized to 8 bits (bitsandbytes' `Adam8bit`):
    blocks of `block_size` values scaled by their absmax, dynamic maps (signed for the
    first moment, unsigned for the second); leaves under `min_8bit_size` values float32.
    `num_devices` (a config run: the mesh's) keeps the blocks within each device's share
    of a param sharded on any axis (`compact_state.pieces_for`)."""
    factory, args = _adam_family("adam_8bit", learning_rate, b1, b2, eps, None, None, "8bit",
                                 "8bit", block_size, min_8bit_size, num_devices)
    return injected(factory, _STATIC, **args)


def _adam_decoupled(name, factory, learning_rate, b1, b2, eps, weight_decay, mask):
    """`factory` (optax.lamb: Adam moments and decoupled weight decay where `mask` says)
    with its arguments checked, injected, and `mask` checked at init."""
    check_learning_rate(learning_rate)
    _betas(name, b1=b1, b2=b2)
    check_positive(name, eps=eps)
    check_nonnegative(name, weight_decay=weight_decay)
    tx = injected(factory, _STATIC, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                  weight_decay=weight_decay, mask=mask)
    return with_mask_check(tx, mask, f"{name}: mask")


def adamw(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-2, mask=None, mu_dtype=None, nu_dtype=None):
    """AdamW (Loshchilov & Hutter): decay decoupled from the gradient and scaled by the
    learning rate, as torch.optim.AdamW (whose default weight_decay, 1e-2, we share).
    `mu_dtype` / `nu_dtype` as in `adam`."""
    factory, args = _adam_family("adamw", learning_rate, b1, b2, eps, weight_decay, mask,
                                 mu_dtype, nu_dtype)
    return with_mask_check(injected(factory, _STATIC, **args), mask, "adamw: mask")


def adamw_8bit(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 1e-2, mask=None, block_size: int = 256,
               min_8bit_size: int = 4096, num_devices: int = 1):
    """AdamW with both moments blockwise quantized to 8 bits (bitsandbytes' `AdamW8bit`;
    see `adam_8bit`)."""
    factory, args = _adam_family("adamw_8bit", learning_rate, b1, b2, eps, weight_decay,
                                 mask, "8bit", "8bit", block_size, min_8bit_size, num_devices)
    return with_mask_check(injected(factory, _STATIC, **args), mask, "adamw_8bit: mask")


def adamax(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """Adamax (Adam with the infinity norm), as torch.optim.Adamax."""
    check_learning_rate(learning_rate)
    _betas("adamax", b1=b1, b2=b2)
    check_positive("adamax", eps=eps)
    return injected(optax.adamax, _STATIC, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps)


def _amsgrad(learning_rate, b1, b2, eps, max_of):
    if max_of == "corrected":
        return optax.amsgrad(learning_rate, b1, b2, eps)
    return optax.chain(
        _scale_by_amsgrad_torch(b1, b2, eps), optax.scale_by_learning_rate(learning_rate)
    )


def amsgrad(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
            max_of: str = "corrected"):
    """AMSGrad: Adam dividing by the running max of the second moment. `max_of="corrected"`
    (Optax) takes the max of the bias-corrected moment; `"raw"` takes it of the raw moment
    and corrects afterwards, as torch.optim.Adam(amsgrad=True)."""
    check_learning_rate(learning_rate)
    _betas("amsgrad", b1=b1, b2=b2)
    check_positive("amsgrad", eps=eps)
    if max_of not in ("corrected", "raw"):
        raise ValueError(f"amsgrad: max_of must be 'corrected' or 'raw', got {max_of!r}")
    return injected(_amsgrad, _STATIC, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                    max_of=max_of)


def _nadamw(learning_rate, b1, b2, eps, weight_decay, mask, momentum_decay):
    if momentum_decay is None:
        return optax.nadamw(learning_rate, b1, b2, eps, weight_decay=weight_decay, mask=mask)
    return optax.chain(
        _scale_by_nadam_torch(b1, b2, eps, momentum_decay),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def _check_nadam(name, learning_rate, b1, b2, eps, momentum_decay):
    check_learning_rate(learning_rate)
    _betas(name, b1=b1, b2=b2)
    check_positive(name, eps=eps)
    check_nonnegative(name, momentum_decay=momentum_decay)


def nadam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          momentum_decay: float | None = None):
    """NAdam (Dozat, 2016). `momentum_decay=None`: Optax's form (constant b1);
    `momentum_decay=4e-3` is torch.optim.NAdam's schedule b1*(1 - 0.5*0.96^(t*psi))."""
    _check_nadam("nadam", learning_rate, b1, b2, eps, momentum_decay)
    return injected(_nadamw, _STATIC, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                    weight_decay=0.0, mask=None, momentum_decay=momentum_decay)


def nadamw(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
           weight_decay: float = 1e-2, mask=None, momentum_decay: float | None = None):
    """NAdam with decoupled weight decay scaled by the learning rate (torch.optim.NAdam
    with `decoupled_weight_decay=True` when `momentum_decay=4e-3`)."""
    _check_nadam("nadamw", learning_rate, b1, b2, eps, momentum_decay)
    check_nonnegative("nadamw", weight_decay=weight_decay)
    tx = injected(_nadamw, _STATIC, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                  weight_decay=weight_decay, mask=mask, momentum_decay=momentum_decay)
    return with_mask_check(tx, mask, "nadamw: mask")


def _radam(learning_rate, b1, b2, eps, threshold, eps_of):
    if eps_of == "corrected":
        return optax.radam(learning_rate, b1, b2, eps, threshold=threshold)
    return optax.chain(
        _scale_by_radam_torch(b1, b2, eps, threshold), optax.scale_by_learning_rate(learning_rate)
    )


def radam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          threshold: float = 5.0, eps_of: str = "corrected"):
    """RAdam (Liu et al., 2020): Adam with the variance rectification term, plain momentum
    SGD while the approximated SMA length is below `threshold`. `eps_of="corrected"`
    (Optax) adds eps to sqrt of the bias-corrected second moment (rectified while
    rho_t >= threshold); `"raw"` adds it to sqrt of the raw moment and bias-corrects
    after (rectified while rho_t > threshold), as torch.optim.RAdam."""
    check_learning_rate(learning_rate)
    _betas("radam", b1=b1, b2=b2)
    check_positive("radam", eps=eps)
    check_nonnegative("radam", threshold=threshold)
    if eps_of not in ("corrected", "raw"):
        raise ValueError(f"radam: eps_of must be 'corrected' or 'raw', got {eps_of!r}")
    return injected(_radam, _STATIC, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                    threshold=threshold, eps_of=eps_of)


def _normalized_sgd(learning_rate, beta, eps):
    def step_size(count):
        return 1.0 / jnp.sqrt(1.0 + beta * count)

    def normalize(updates, params=None):
        del params
        return jax.tree.map(lambda g: g * (eps / jnp.maximum(jnp.abs(g) + eps, eps)), updates)

    return optax.chain(
        optax.stateless(normalize),
        optax.scale_by_schedule(step_size),
        optax.scale_by_learning_rate(learning_rate),
    )


def normalized_sgd(beta: float, eps: float, learning_rate=1.0):
    """The 'adaptive learning rate' rule: theta <- theta - lr * g * 1/sqrt(1 + beta*t) *
    eps / max(|g| + eps, eps), elementwise; t counts previous steps (0 at the first)."""
    check_learning_rate(learning_rate)
    check_nonnegative("normalized_sgd", beta=beta)
    check_positive("normalized_sgd", eps=eps)
    return injected(_normalized_sgd, _STATIC, learning_rate=learning_rate, beta=beta, eps=eps)


def lion(learning_rate, b1: float = 0.9, b2: float = 0.99, weight_decay: float = 1e-3, mask=None):
    """Lion (Chen et al., 2023): sign of an interpolated momentum, decoupled weight decay."""
    check_learning_rate(learning_rate)
    _betas("lion", b1=b1, b2=b2)
    check_nonnegative("lion", weight_decay=weight_decay)
    tx = injected(elementwise.lion, _STATIC, learning_rate=learning_rate, b1=b1, b2=b2,
                  weight_decay=weight_decay, mask=mask)
    return with_mask_check(tx, mask, "lion: mask")


def lamb(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
         weight_decay: float = 0.0, mask=None):
    """LAMB (You et al., 2020): the Adam step plus decay, scaled per leaf by the trust
    ratio ||theta|| / ||step||."""
    return _adam_decoupled("lamb", optax.lamb, learning_rate, b1, b2, eps, weight_decay, mask)


def lars(learning_rate, weight_decay: float = 0.0, trust_coefficient: float = 1e-3,
         eps: float = 0.0, momentum: float = 0.9, nesterov: bool = False, mask=None):
    """LARS (You et al., 2017): per-leaf trust ratio eta*||theta|| / (||g + wd*theta|| + eps)
    on the decayed gradient, then heavy-ball momentum. `mask` selects the leaves that get
    decay and trust ratio (all by default)."""
    check_learning_rate(learning_rate)
    check_nonnegative(
        "lars",
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        eps=eps,
        momentum=momentum,
    )
    tx = injected(optax.lars, _STATIC, only=("learning_rate",), learning_rate=learning_rate,
                  weight_decay=weight_decay, weight_decay_mask=True if mask is None else mask,
                  trust_coefficient=trust_coefficient, eps=eps,
                  trust_ratio_mask=True if mask is None else mask, momentum=momentum,
                  nesterov=nesterov)
    return with_mask_check(tx, mask, "lars: mask")


def adafactor(learning_rate, min_dim_size_to_factor: int = 128, decay_rate: float = 0.8,
              clipping_threshold: float | None = 1.0, multiply_by_parameter_scale: bool = True,
              momentum: float | None = None, eps: float = 1e-30):
    """Adafactor (Shazeer & Stern, 2018), Optax's: factored second moment for leaves with two
    dims >= `min_dim_size_to_factor`, beta2_t = 1 - t^-decay_rate, update clipping, relative
    step scaled by max(1e-3, RMS(theta))."""
    check_learning_rate(learning_rate)
    check_nonnegative(
        "adafactor", decay_rate=decay_rate, eps=eps, clipping_threshold=clipping_threshold
    )
    if momentum is not None:
        _betas("adafactor", momentum=momentum)
    return injected(optax.adafactor, _STATIC, learning_rate=learning_rate,
                    min_dim_size_to_factor=min_dim_size_to_factor, decay_rate=decay_rate,
                    clipping_threshold=clipping_threshold,
                    multiply_by_parameter_scale=multiply_by_parameter_scale, momentum=momentum,
                    eps=eps)


def schedule_free_adamw(learning_rate=2.5e-3, warmup_steps: int | None = None, b1: float = 0.9,
                        b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0):
    """Schedule-free AdamW (Defazio et al., 2024), Optax's. The params it trains are the
    'y' sequence; evaluate with `schedule_free_eval_params(opt_state, params)`."""
    check_learning_rate(learning_rate)
    _betas("schedule_free_adamw", b1=b1, b2=b2)
    check_positive("schedule_free_adamw", eps=eps)
    check_nonnegative("schedule_free_adamw", weight_decay=weight_decay)
    tx = injected(optax.contrib.schedule_free_adamw, _STATIC, learning_rate=learning_rate,
                  warmup_steps=warmup_steps, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

    def init(params):
        # Optax's state holds `params` itself as z: copy it, so that a step donating both
        # params and state does not donate one buffer twice.
        return jax.tree.map(jnp.copy, tx.init(params))

    return optax.GradientTransformationExtraArgs(init, tx.update)


def schedule_free_eval_params(opt_state, params):
    """The params to evaluate (the 'x' sequence) of a schedule-free run, found anywhere in
    `opt_state` (through chains and `inject_hyperparams`)."""
    found = find_states(opt_state, optax.contrib.ScheduleFreeState)
    if len(found) != 1:
        raise JaxtrainError(f"schedule_free_eval_params: expected one schedule-free state in "
                            f"opt_state, found {len(found)}")
    return optax.contrib.schedule_free_eval_params(found[0], params)
