"""Every schedule of `schedules.SCHEDULES`, past its end and at huge steps: it holds its
final value exactly (with its sign, never NaN), eagerly and under jit, with float32
(default) and float64 (x64) steps, for steps and lengths beyond int32."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.transforms import schedules as S

BIG = 10**10
# name -> list of (schedule, last step, final value); last step None: an endless schedule,
# checked against its closed form (a Python function of the step) instead.
ENDED = {
    "linear": [(S.linear(1.0, 0.0, 1000), 1000, 0.0), (S.linear(0.05, 0.2, 3), 3, 0.2)],
    "polynomial": [(S.polynomial(0.05, 0.0, 0.9, 5), 5, 0.0),
                   (S.polynomial(1.0, 0.01, 2.0, 7), 7, 0.01)],
    "multistep_decay": [(S.multistep_decay(0.1, [10, 20, 20], 0.5), 20, 0.1 * 0.125)],
    "cosine": [(S.cosine(1.0, BIG), BIG, 0.0), (S.cosine(0.1, 7, 0.01), 7, 0.01)],
    "warmup_cosine": [(S.warmup_cosine(1.0, 3, 17), 17, 0.0),
                      (S.warmup_cosine(1.0, 10**6, 3 * BIG, final_value=0.1), 3 * BIG, 0.1)],
    "wsd": [(S.wsd(1.0, 3, 5, 7, decay_shape=shape), 15, 0.0)
            for shape in S.DECAY_SHAPES] + [(S.wsd(1.0, 3, 5, BIG, 0.05), 8 + BIG, 0.05)],
    "one_cycle": [(S.one_cycle(1.0, 10), 9, 1.0 / 25 / 1e4)],
    "join": [(S.join([S.linear(1.0, 0.5, 5), S.polynomial(0.5, 0.0, 0.9, 3)], [5]), 8, 0.0)],
}
ENDLESS = {
    "constant": (S.constant(0.1), lambda t: 0.1),
    "exponential": (S.exponential(0.1, 0.99), lambda t: 0.1 * 0.99**t),
    "step_decay": (S.step_decay(0.1, 3, 0.5), lambda t: 0.1 * 0.5 ** (t // 3)),
    "inverse_sqrt": (S.inverse_sqrt(1.0, 4), lambda t: t / 4 if t < 4 else math.sqrt(4 / t)),
    "cyclic": (S.cyclic(0.01, 0.1, 5), None),
    "cosine_restarts": (S.cosine_restarts(1.0, 7, 2), None),
}
# beyond int32, beyond float32's whole numbers, and far out
PAST = (0, 1, 2, 17, 2**31 - 1, 2**31, 2**31 + 7, 2**40 + 3, 10**12)


def test_every_schedule_is_covered():
    assert set(ENDED) | set(ENDLESS) == set(S.SCHEDULES)


def _values(schedule, steps, x64):
    """schedule(t) for each t: eagerly from Python ints, and jitted from arrays of the
    default int (or float, for steps beyond int32 without x64) dtype."""
    eager = [np.asarray(schedule(t)) for t in steps]
    step_dtype = jnp.int64 if x64 else jnp.float32
    jitted = [np.asarray(jax.jit(schedule)(jnp.asarray(t, step_dtype))) for t in steps]
    small = [t for t in steps if t < 2**31]
    if small:
        batched = jax.jit(jax.vmap(schedule))(jnp.asarray(small, jnp.int32))
        jitted[: len(small)] = list(np.asarray(batched))
    return eager, jitted


CASES = [(name, i) for name, cases in ENDED.items() for i in range(len(cases))]


@pytest.mark.parametrize("x64", [False, True], ids=["f32", "f64"])
@pytest.mark.parametrize("name,i", CASES)
def test_holds_final_value_exactly_past_its_end(name, i, x64):
    schedule, last, final = ENDED[name][i]
    with jax.enable_x64(x64):
        steps = [last + k for k in PAST]
        for values in _values(schedule, steps, x64):
            for t, v in zip(steps, values, strict=True):
                dtype = jnp.float64 if x64 else jnp.float32
                assert v.dtype == dtype and v == np.asarray(final, dtype), (
                    f"{name} at step {t}: {v!r}, expected {final!r}")
                assert np.signbit(v) == np.signbit(final), f"{name} at {t}: sign of {v!r}"


@pytest.mark.parametrize("x64", [False, True], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(ENDLESS))
def test_endless_schedules_stay_finite_and_right_at_huge_steps(name, x64):
    schedule, closed = ENDLESS[name]
    with jax.enable_x64(x64):
        steps = [3, 250, *PAST[4:]]
        for values in _values(schedule, steps, x64):
            for t, v in zip(steps, values, strict=True):
                assert np.isfinite(v) and v >= 0, f"{name} at step {t}: {v!r}"
                if closed is not None:
                    np.testing.assert_allclose(v, closed(t), rtol=2e-5, atol=1e-30,
                                               err_msg=f"{name} at step {t}")


def test_periodic_schedules_at_huge_steps_match_their_closed_form_in_float64():
    """cyclic and cosine_restarts: the value at steps beyond int32 is the one the
    closed form gives (float64 steps; float32 cannot tell 2**40 + 3 from 2**40)."""
    with jax.enable_x64(True):
        for t in (2**31 + 7, 2**40 + 3, 10**12 + 1):
            x = (t % 10) / 10
            tri = 0.01 + 0.09 * (x / 0.5 if x <= 0.5 else (x - 1) / -0.5)
            np.testing.assert_allclose(jax.jit(S.cyclic(0.01, 0.1, 5))(t), tri, rtol=1e-9)
            n = math.floor(math.log(t / 7 + 1, 2))
            n += (7 * (2 ** (n + 1) - 1) <= t) - (7 * (2**n - 1) > t)
            since, period = t - 7 * (2**n - 1), 7 * 2**n
            cos = (1 + math.cos(math.pi * since / period)) / 2
            np.testing.assert_allclose(jax.jit(S.cosine_restarts(1.0, 7, 2))(t), cos,
                                       rtol=1e-9, atol=1e-12)


def test_cosine_over_ten_billion_steps_is_half_way_at_half():
    schedule = S.cosine(1.0, BIG)
    assert float(schedule(BIG // 2)) == pytest.approx(0.5, rel=1e-6)
    assert float(jax.jit(schedule)(jnp.int32(2**31 - 1))) == pytest.approx(
        (1 + math.cos(math.pi * (2**31 - 1) / BIG)) / 2, rel=1e-6)
