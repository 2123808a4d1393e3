"""Schedules against their torch.optim.lr_scheduler twins, step by step, and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxtrain.errors import JaxtrainError
from jaxtrain.transforms import schedules as S

STEPS = 1000
BASE = 0.1


def _torch_values(make, steps=STEPS, base=BASE):
    """The lr torch uses at steps 0..steps-1 (after t scheduler.step() calls)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = make(opt)
    values = []
    for _ in range(steps):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(values)


def _ours(schedule, steps=STEPS):
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(steps)), np.float64)


def _close(ours, theirs):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-9)


L = torch.optim.lr_scheduler
TWINS = {
    "step_decay": (S.step_decay(BASE, 30, 0.7), lambda o: L.StepLR(o, 30, 0.7)),
    "multistep": (S.multistep_decay(BASE, [100, 250, 250, 700], 0.5),
                  lambda o: L.MultiStepLR(o, [100, 250, 250, 700], 0.5)),
    "exponential": (S.exponential(BASE, 0.993), lambda o: L.ExponentialLR(o, 0.993)),
    "cosine": (S.cosine(BASE, STEPS), lambda o: L.CosineAnnealingLR(o, STEPS)),
    "cosine_floor": (S.cosine(BASE, STEPS, final_value=0.01),
                     lambda o: L.CosineAnnealingLR(o, STEPS, eta_min=0.01)),
    "linear": (S.linear(BASE / 3, BASE, 400),
               lambda o: L.LinearLR(o, start_factor=1 / 3, end_factor=1.0, total_iters=400)),
    "linear_down": (S.linear(BASE, 0.02 * BASE, 900),
                    lambda o: L.LinearLR(o, start_factor=1.0, end_factor=0.02,
                                         total_iters=900)),
    "polynomial": (S.polynomial(BASE, 0.0, 2.0, 800),
                   lambda o: L.PolynomialLR(o, total_iters=800, power=2.0)),
    "one_cycle": (S.one_cycle(1.0, STEPS, pct_start=0.25, div_factor=10.0,
                              final_div_factor=100.0),
                  lambda o: L.OneCycleLR(o, max_lr=1.0, total_steps=STEPS, pct_start=0.25,
                                         div_factor=10.0, final_div_factor=100.0,
                                         anneal_strategy="cos", cycle_momentum=False)),
    "one_cycle_defaults": (S.one_cycle(0.5, STEPS),
                           lambda o: L.OneCycleLR(o, max_lr=0.5, total_steps=STEPS,
                                                  cycle_momentum=False)),
    "cyclic": (S.cyclic(0.01, 0.1, 75),
               lambda o: L.CyclicLR(o, 0.01, 0.1, step_size_up=75, cycle_momentum=False)),
    "cyclic2": (S.cyclic(0.01, 0.1, 60, mode="triangular2"),
                lambda o: L.CyclicLR(o, 0.01, 0.1, step_size_up=60, mode="triangular2",
                                     cycle_momentum=False)),
    "cyclic_exp": (S.cyclic(0.01, 0.1, 50, mode="exp_range", gamma=0.998),
                   lambda o: L.CyclicLR(o, 0.01, 0.1, step_size_up=50, mode="exp_range",
                                        gamma=0.998, cycle_momentum=False)),
    "restarts": (S.cosine_restarts(BASE, 100),
                 lambda o: L.CosineAnnealingWarmRestarts(o, T_0=100)),
    "restarts_mult": (S.cosine_restarts(BASE, 7, period_mult=2, final_value=1e-3),
                      lambda o: L.CosineAnnealingWarmRestarts(o, T_0=7, T_mult=2,
                                                              eta_min=1e-3)),
    "restarts_mult3": (S.cosine_restarts(BASE, 5, period_mult=3),
                       lambda o: L.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=3)),
    "constant": (S.constant(BASE), lambda o: L.ConstantLR(o, factor=1.0, total_iters=0)),
}


@pytest.mark.parametrize("name", sorted(TWINS))
def test_matches_torch_twin_for_1000_steps(name):
    ours, make = TWINS[name]
    _close(_ours(ours), _torch_values(make))


def test_warmup_cosine_matches_torch_sequential_and_optax():
    ours = S.warmup_cosine(BASE, 100, STEPS, init_value=BASE / 10, final_value=1e-3)

    def make(o):
        warm = L.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=100)
        cos = L.CosineAnnealingLR(o, T_max=STEPS - 100, eta_min=1e-3)
        return L.SequentialLR(o, [warm, cos], milestones=[100])

    _close(_ours(ours), _torch_values(make))
    ref = optax.warmup_cosine_decay_schedule(0.0, 1.0, 50, 600, end_value=0.0)
    np.testing.assert_allclose(_ours(S.warmup_cosine(1.0, 50, 600)), _ours(ref),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_closed_form(shape):
    peak, warm, stable, decay, final = 0.3, 50, 400, 300, 0.01
    ours = _ours(S.wsd(peak, warm, stable, decay, final_value=final, decay_shape=shape))
    shapes = {"linear": lambda f: 1 - f, "cosine": lambda f: 0.5 * (1 + math.cos(math.pi * f)),
              "sqrt": lambda f: 1 - math.sqrt(f)}
    expect = []
    for t in range(STEPS):
        if t < warm:
            expect.append(peak * t / warm)
        else:
            f = min(max(t - warm - stable, 0), decay) / decay
            expect.append(final + (peak - final) * shapes[shape](f))
    _close(ours, np.array(expect))


def test_inverse_sqrt_matches_fairseq_formula_via_torch_lambda():
    peak, warm = 5e-4, 40
    fairseq = lambda t: t / warm if t < warm else math.sqrt(warm / t)
    _close(_ours(S.inverse_sqrt(peak, warm)),
           _torch_values(lambda o: L.LambdaLR(o, fairseq), base=peak))


def test_join_restarts_each_piece():
    ours = S.join([S.constant(1.0), S.linear(1.0, 0.0, 10), S.constant(0.5)], [5, 15])
    expect = [1.0] * 5 + [1.0 - i / 10 for i in range(10)] + [0.5] * 5
    _close(_ours(ours, 20), np.array(expect))


def test_schedules_hold_after_their_end():
    assert float(S.cosine(1.0, 10, final_value=0.2)(50)) == pytest.approx(0.2)
    assert float(S.one_cycle(1.0, 100)(500)) == pytest.approx(1.0 / 25 / 1e4)


def test_usable_as_learning_rate_in_an_optimizer():
    sched = S.step_decay(0.5, 2, 0.1)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=sched)
    state = tx.init(jnp.zeros(()))
    lrs = []
    for _ in range(5):
        _, state = tx.update(jnp.ones(()), state)
        lrs.append(float(state.hyperparams["learning_rate"]))
    np.testing.assert_allclose(lrs, [0.5, 0.5, 0.05, 0.05, 0.005], rtol=1e-6)


@pytest.mark.parametrize("call,word", [
    (lambda: S.cosine(0.1, 0), "decay_steps"),
    (lambda: S.step_decay(0.1, 2.5, 0.1), "step_size"),
    (lambda: S.wsd(1.0, 1, 1, 1, decay_shape="cubic"), "decay_shape"),
    (lambda: S.cyclic(0.1, 1.0, 10, mode="sine"), "mode"),
    (lambda: S.join([S.constant(1.0)], [3]), "boundar"),
    (lambda: S.warmup_cosine(1.0, 100, 50), "total_steps"),
    (lambda: S.exponential(float("nan"), 0.9), "init_value"),
])
def test_bad_arguments_name_themselves(call, word):
    with pytest.raises(JaxtrainError, match=word):
        call()
