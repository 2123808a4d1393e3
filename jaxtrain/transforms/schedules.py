"""Learning-rate schedules: pure, jittable `step -> value` functions.

Names and arguments follow what a PyTorch recipe calls them, so a recipe ports by name.
Each is built on the Optax schedule where Optax is exact; where Optax and
`torch.optim.lr_scheduler` disagree (one-cycle phase ends, torch's cyclic and
warm-restart schedules that Optax lacks) the torch twin is followed and the difference
is documented. Every schedule with a torch twin gives the twin's value at every step
(tests/test_schedules.py). Past its last step a schedule holds its final value exactly
(never a rounding below it, never NaN), where torch's CosineAnnealingLR would climb back
up.

Steps are counted in floating point (float32; float64 when `jax_enable_x64` is on), not
in int32: steps and lengths beyond 2**31 (runs counted in tokens) work, and nothing
wraps around. Quotients are never trusted to be exact under `jit` (XLA turns `t / 5`
into `t * 0.2`), so ends are reached by clipping and floors are corrected by a multiply.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import optax

from ..errors import JaxtrainError

Schedule = Callable[[int], jnp.ndarray]
DECAY_SHAPES = ("linear", "cosine", "sqrt")
CYCLIC_MODES = ("triangular", "triangular2", "exp_range")


def _steps(step):
    """`step` as a float array in JAX's default float dtype (float64 under x64)."""
    return jnp.asarray(step, dtype=jnp.result_type(float))


def _floor_div(t, d: int):
    """floor(t / d) for whole-number floats `t`, exact where `t / d` rounds wrong."""
    d = float(d)  # a Python int beyond int32 would not convert
    q = jnp.floor(t / d)
    q = jnp.where(q * d > t, q - 1, q)
    return jnp.where((q + 1) * d <= t, q + 1, q)


def _fraction_left(step, steps: int):
    """(steps - t) / steps for t clipped to [0, steps]: exactly 0 from `steps` on."""
    steps = float(steps)  # a Python int beyond int32 would not convert
    remaining = steps - jnp.clip(_steps(step), 0.0, steps)
    return jnp.clip(remaining / steps, 0.0, 1.0)


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise JaxtrainError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise JaxtrainError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _half_cosine(remaining, total):
    """(1 + cos(pi * (1 - remaining/total))) / 2 = sin(pi/2 * remaining/total)**2.

    The sine form keeps full relative precision where the value approaches 0, which the
    textbook `1 + cos` form loses to cancellation in float32.
    """
    return jnp.sin(0.5 * jnp.pi * remaining / total) ** 2


def _power(base: float, exponent):
    """base**exponent as exp(exponent * log(base)), log taken in float64.

    float32 `jnp.power(0.993, 1000)` is off by 3e-5 relative (the base's rounding, raised
    to the 1000th power); this keeps the error at float32 rounding of the result.
    """
    if base < 0:
        raise JaxtrainError(f"a decay rate must be >= 0, got {base!r}")
    exponent = _steps(exponent)
    if base == 0:
        return jnp.where(exponent > 0, 0.0, 1.0)
    return jnp.exp(exponent * math.log(base))


def constant(value) -> Schedule:
    """The same value at every step (torch ConstantLR with factor 1)."""
    return optax.constant_schedule(_finite("value", value))


def linear(init_value, end_value, steps) -> Schedule:
    """From `init_value` to `end_value` in a straight line over `steps`, then held
    (torch LinearLR with start/end factors relative to the base rate)."""
    init_value, end_value = _finite("init_value", init_value), _finite("end_value", end_value)
    steps = _positive_int("steps", steps)
    return lambda step: end_value + (init_value - end_value) * _fraction_left(step, steps)


def polynomial(init_value, end_value, power, steps) -> Schedule:
    """(init - end) * (1 - t/steps)**power + end, then held (torch PolynomialLR, end 0)."""
    init_value, end_value = _finite("init_value", init_value), _finite("end_value", end_value)
    power, steps = _finite("power", power), _positive_int("steps", steps)
    if power < 0:
        raise JaxtrainError(f"power must be >= 0, got {power!r}")
    return lambda step: (end_value
                         + (init_value - end_value) * _fraction_left(step, steps) ** power)


def exponential(init_value, decay_rate, transition_steps=1, staircase=False) -> Schedule:
    """init * decay_rate**(t / transition_steps), floored exponent when `staircase`
    (torch ExponentialLR with transition_steps=1)."""
    init_value, decay_rate = _finite("init_value", init_value), _finite("decay_rate", decay_rate)
    transition_steps = _positive_int("transition_steps", transition_steps)

    def schedule(step):
        t = _steps(step)
        p = _floor_div(t, transition_steps) if staircase else t / float(transition_steps)
        return init_value * _power(decay_rate, p)

    return schedule


def step_decay(init_value, step_size, gamma) -> Schedule:
    """init * gamma**(t // step_size) (torch StepLR)."""
    init_value, gamma = _finite("init_value", init_value), _finite("gamma", gamma)
    step_size = _positive_int("step_size", step_size)
    return lambda step: init_value * _power(gamma, _floor_div(_steps(step), step_size))


def multistep_decay(init_value, milestones, gamma) -> Schedule:
    """init * gamma**(number of milestones <= t) (torch MultiStepLR; a repeated
    milestone counts twice, as in torch)."""
    init_value, gamma = _finite("init_value", init_value), _finite("gamma", gamma)
    if isinstance(milestones, str | bytes) or not isinstance(milestones, Sequence):
        raise JaxtrainError(f"milestones must be a list of step numbers, got {milestones!r}")
    counts = Counter(_positive_int("milestones[]", m, 0) for m in milestones)
    ends, powers = list(counts), [gamma**n for n in counts.values()]

    def schedule(step):
        t = _steps(step)
        value = jnp.asarray(init_value, t.dtype)
        for end, factor in zip(ends, powers, strict=True):
            value = jnp.where(t >= float(end), value * factor, value)
        return value

    return schedule


def cosine(init_value, decay_steps, final_value=0.0) -> Schedule:
    """Half a cosine from `init_value` to `final_value` over `decay_steps`, then held
    (torch CosineAnnealingLR with T_max=decay_steps, eta_min=final_value)."""
    init_value, final_value = _finite("init_value", init_value), _finite("final_value",
                                                                         final_value)
    decay_steps = _positive_int("decay_steps", decay_steps)

    def schedule(step):
        left = _fraction_left(step, decay_steps)
        return final_value + (init_value - final_value) * _half_cosine(left, 1.0)

    return schedule


def warmup_cosine(peak_value, warmup_steps, total_steps, init_value=0.0,
                  final_value=0.0) -> Schedule:
    """Linear warm-up from `init_value` to `peak_value` over `warmup_steps`, then cosine
    down to `final_value` at `total_steps` (which includes the warm-up), then held."""
    peak_value = _finite("peak_value", peak_value)
    warmup_steps = _positive_int("warmup_steps", warmup_steps, 0)
    total_steps = _positive_int("total_steps", total_steps)
    if total_steps <= warmup_steps:
        raise JaxtrainError(f"total_steps ({total_steps}) must exceed warmup_steps "
                            f"({warmup_steps}): it includes the warm-up")
    return join([linear(init_value, peak_value, warmup_steps) if warmup_steps else
                 constant(peak_value),
                 cosine(peak_value, total_steps - warmup_steps, final_value)], [warmup_steps])


def wsd(peak_value, warmup_steps, stable_steps, decay_steps, final_value=0.0,
        decay_shape="linear") -> Schedule:
    """Warmup-stable-decay (MiniCPM, Hu et al. 2024): linear warm-up from 0, `stable_steps`
    at `peak_value`, then down to `final_value` over `decay_steps` with `decay_shape`:
    'linear', 'cosine', or 'sqrt' (1 - sqrt(fraction done))."""
    peak_value, final_value = _finite("peak_value", peak_value), _finite("final_value",
                                                                         final_value)
    warmup_steps = _positive_int("warmup_steps", warmup_steps, 0)
    stable_steps = _positive_int("stable_steps", stable_steps, 0)
    decay_steps = _positive_int("decay_steps", decay_steps)
    if decay_shape not in DECAY_SHAPES:
        raise JaxtrainError(f"decay_shape must be one of {DECAY_SHAPES}, got {decay_shape!r}")

    def schedule(step):
        step = _steps(step)
        warm = peak_value * step / float(max(warmup_steps, 1))
        done = 1.0 - _fraction_left(step - float(warmup_steps + stable_steps), decay_steps)
        if decay_shape == "linear":
            keep = 1.0 - done
        elif decay_shape == "cosine":
            keep = _half_cosine(1.0 - done, 1.0)
        else:
            keep = 1.0 - jnp.sqrt(done)
        decayed = final_value + (peak_value - final_value) * keep
        return jnp.where(step < float(warmup_steps), warm, decayed)

    return schedule


def inverse_sqrt(peak_value, warmup_steps) -> Schedule:
    """Linear warm-up from 0 to `peak_value` at `warmup_steps`, then
    peak * sqrt(warmup_steps / t) (fairseq's inverse_sqrt; the Transformer schedule)."""
    peak_value = _finite("peak_value", peak_value)
    warmup_steps = _positive_int("warmup_steps", warmup_steps)

    def schedule(step):
        t = _steps(step)
        warm = float(warmup_steps)
        return jnp.where(t < warm, peak_value * t / warm,
                         peak_value * jnp.sqrt(warm / jnp.maximum(t, 1.0)))

    return schedule


def one_cycle(peak_value, total_steps, pct_start=0.3, div_factor=25.0,
              final_div_factor=1e4) -> Schedule:
    """torch OneCycleLR (two phases, cosine annealing): from peak/div_factor up to
    `peak_value` at step pct_start*total_steps - 1, then down to
    peak/div_factor/final_div_factor at step total_steps - 1, then held.

    `optax.cosine_onecycle_schedule` puts both phase ends one step later than torch, so
    this follows torch instead.
    """
    peak_value = _finite("peak_value", peak_value)
    total_steps = _positive_int("total_steps", total_steps, 2)
    if not 0.0 < _finite("pct_start", pct_start) < 1.0:
        raise JaxtrainError(f"pct_start must be in (0, 1), got {pct_start!r}")
    initial = peak_value / _finite("div_factor", div_factor)
    final = initial / _finite("final_div_factor", final_div_factor)
    up_end = float(pct_start * total_steps) - 1.0
    down_end = float(total_steps - 1)

    def anneal(start, end, done, length):  # torch's _annealing_cos, cancellation-free
        return end + (start - end) * _half_cosine(length - done, length)

    def schedule(step):
        t = jnp.clip(_steps(step), 0.0, down_end)
        up = anneal(initial, peak_value, t, up_end)
        down = anneal(peak_value, final, t - up_end, down_end - up_end)
        return jnp.where(t <= up_end, up, down)

    return schedule


def cyclic(base_value, max_value, step_size_up, mode="triangular", gamma=1.0) -> Schedule:
    """torch CyclicLR (step_size_down = step_size_up): triangles between `base_value` and
    `max_value`; 'triangular2' halves the amplitude each cycle, 'exp_range' scales it by
    gamma**t."""
    base_value, max_value = _finite("base_value", base_value), _finite("max_value", max_value)
    step_size_up = _positive_int("step_size_up", step_size_up)
    gamma = _finite("gamma", gamma)
    if mode not in CYCLIC_MODES:
        raise JaxtrainError(f"mode must be one of {CYCLIC_MODES}, got {mode!r}")
    total = 2 * step_size_up

    def schedule(step):
        t = _steps(step)
        done = _floor_div(t, total)  # whole cycles done
        cycle = 1.0 + done
        # the remainder (exact in float64; clipped where float32 rounds t), as a fraction
        x = jnp.clip((t - done * total) / float(total), 0.0, 1.0)
        height = (max_value - base_value) * jnp.where(x <= 0.5, x / 0.5, (x - 1.0) / -0.5)
        if mode == "triangular":
            scale = 1.0
        elif mode == "triangular2":
            scale = 1.0 / 2.0 ** (cycle - 1.0)
        else:
            scale = _power(gamma, t)
        return base_value + height * scale

    return schedule


def cosine_restarts(init_value, first_period, period_mult=1, final_value=0.0) -> Schedule:
    """SGDR (torch CosineAnnealingWarmRestarts): cosine from `init_value` to `final_value`
    over `first_period` steps, restarting each time, each period `period_mult` times the
    last (an integer >= 1, as in torch)."""
    init_value, final_value = _finite("init_value", init_value), _finite("final_value",
                                                                         final_value)
    first_period = float(_positive_int("first_period", first_period))
    period_mult = _positive_int("period_mult", period_mult)

    def start(k):  # the first step of period k (whole numbers, in floating point)
        if period_mult == 1:
            return k * first_period
        return jnp.round(first_period * (period_mult**k - 1) / (period_mult - 1))

    def schedule(step):
        t = jnp.maximum(_steps(step), 0.0)
        if period_mult == 1:
            n = _floor_div(t, first_period)
        else:  # the period holding t, from the log, then fixed up to exactness
            est = jnp.log(t / first_period * (period_mult - 1) + 1.0) / math.log(period_mult)
            n = jnp.floor(est)
            n = jnp.where(start(n) > t, n - 1, n)
            n = jnp.where(start(n + 1) <= t, n + 1, n)
        since = jnp.clip(t - start(n), 0.0, None)
        period = first_period * jnp.round(jnp.asarray(period_mult, t.dtype) ** n)
        return final_value + (init_value - final_value) * _half_cosine(period - since, period)

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """`schedules[i]` from `boundaries[i-1]` on, each restarted at 0 there
    (as `optax.join_schedules`, with float steps; torch SequentialLR)."""
    schedules, boundaries = list(schedules), list(boundaries)
    if len(boundaries) != len(schedules) - 1:
        raise JaxtrainError(f"join needs one boundary fewer than schedules: got "
                            f"{len(schedules)} schedules and {len(boundaries)} boundaries")
    for b in boundaries:
        _positive_int("boundaries[]", b, 0)
    if boundaries != sorted(boundaries):
        raise JaxtrainError(f"join boundaries must increase, got {boundaries}")

    def schedule(step):
        t = _steps(step)
        value = schedules[0](t)
        for boundary, piece in zip(boundaries, schedules[1:], strict=True):
            value = jnp.where(t < float(boundary), value, piece(t - float(boundary)))
        return value

    return schedule


SCHEDULES = {
    f.__name__: f
    for f in (constant, linear, polynomial, exponential, step_decay, multistep_decay, cosine,
              warmup_cosine, wsd, inverse_sqrt, one_cycle, cyclic, cosine_restarts, join)
}
