"""spec.build: dict or YAML -> the chain a user would write by hand with plain Optax; every
name reachable; mistakes named with the closest valid choice."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import transforms as T
from jaxtrain.errors import JaxtrainError
from jaxtrain.transforms import spec

EXAMPLE = {
    "optimizer": "adamw",
    "learning_rate": {"schedule": "warmup_cosine", "peak_value": 3e-4, "warmup_steps": 3,
                      "total_steps": 20},
    "weight_decay": {"rate": 0.1, "exclude": ["*/bias", "*/scale"]},
    "clip_global_norm": 1.0,
    "accumulate": 2,
}
EXAMPLE_YAML = """
optimizer: adamw
learning_rate: {schedule: warmup_cosine, peak_value: 3e-4, warmup_steps: 3, total_steps: 20}
weight_decay:
  rate: 0.1
  exclude: ['*/bias', '*/scale']
clip_global_norm: 1.0
accumulate: 2
"""


def _params():
    rng = np.random.default_rng(0)
    return {"layer": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=3), jnp.float32)},
            "norm": {"scale": jnp.ones(3)}}


def _grads(n):
    return [jax.tree.map(lambda p, i=i: jnp.asarray(
        np.random.default_rng(i).normal(size=p.shape), jnp.float32), _params())
        for i in range(n)]


def _run(tx, n=12, jit=True, **extra):
    params = _params()
    state = tx.init(params)
    step = lambda g, s, p: tx.update(g, s, p, **extra)
    step = jax.jit(step) if jit else step
    for g in _grads(n):
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def _assert_same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)


@pytest.mark.parametrize("config", [EXAMPLE, EXAMPLE_YAML])
def test_issue_example_is_the_plain_optax_chain(config):
    decay_mask = lambda p: jax.tree_util.tree_map_with_path(
        lambda kp, _: kp[-1].key not in ("bias", "scale"), p)
    reference = optax.MultiSteps(optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-4, 3, 20), weight_decay=0.1,
                    mask=decay_mask)), every_k_schedule=2).gradient_transformation()
    ours, state = _run(spec.build(config))
    theirs, _ = _run(reference)
    _assert_same(ours, theirs)
    assert not np.allclose(ours["layer"]["kernel"], _params()["layer"]["kernel"])
    hp = T.current_hyperparams(state)
    assert float(hp["learning_rate"]) == pytest.approx(
        float(optax.warmup_cosine_decay_schedule(0.0, 3e-4, 3, 20)(5)), rel=1e-5)


@pytest.mark.parametrize("kind,rule", [("l2", T.add_l2), ("l1", T.add_l1)])
def test_coupled_decay_goes_before_the_optimizer(kind, rule):
    ours, _ = _run(spec.build({"optimizer": {"name": "sgd", "momentum": 0.9},
                               "learning_rate": 0.05,
                               "weight_decay": {"rate": 0.01, "kind": kind, "min_ndim": 2}}))
    theirs, _ = _run(optax.chain(rule(0.01, mask=T.masks.ndim_at_least(2)),
                                 optax.sgd(0.05, momentum=0.9)))
    _assert_same(ours, theirs)


def test_decoupled_decay_for_an_optimizer_without_its_own():
    ours, _ = _run(spec.build({"optimizer": "adam", "learning_rate": 0.01,
                               "weight_decay": 0.5}))
    theirs, _ = _run(optax.adamw(0.01, weight_decay=0.5))
    _assert_same(ours, theirs)


def test_groups_override_the_base_optimizer():
    tx = spec.build({"optimizer": "adam", "learning_rate": 1e-2,
                     "groups": {"layer/*": {"learning_rate": 1e-3, "b1": 0.5},
                                "norm/*": {"optimizer": "sgd"}}})
    _, state = _run(tx, 2)
    hp = T.current_hyperparams(state)
    assert float(hp["layer/learning_rate"]) == pytest.approx(1e-3)
    assert float(hp["layer/b1"]) == pytest.approx(0.5)
    assert float(hp["norm/learning_rate"]) == pytest.approx(1e-2)  # inherited
    assert float(hp["learning_rate"]) == pytest.approx(1e-2)


def test_wrappers_are_reachable():
    tx = spec.build("""
optimizer: sgd
learning_rate: 0.1
clip: 0.5
adaptive_grad_clip: {clipping: 0.5}
reduce_on_plateau: {factor: 0.5, patience: 0}
freeze: ['norm/*']
lookahead: {sync_period: 2, alpha: 0.5}
ema: 0.9
skip_nonfinite: 3
""")
    params, state = _run(tx, 4, value=1.0)
    np.testing.assert_array_equal(params["norm"]["scale"], 1.0)
    assert float(T.current_hyperparams(state)["plateau_scale"]) == pytest.approx(0.125)
    assert T.ema_params(state)["layer"]["kernel"].shape == (4, 3)
    assert int(state.notfinite_count) == 0


SCHEDULE_ARGS = {
    "constant": {"value": 0.1},
    "linear": {"init_value": 0.1, "end_value": 0.0, "steps": 10},
    "polynomial": {"init_value": 0.1, "end_value": 0.0, "power": 2, "steps": 10},
    "exponential": {"init_value": 0.1, "decay_rate": 0.9},
    "step_decay": {"init_value": 0.1, "step_size": 2, "gamma": 0.5},
    "multistep_decay": {"init_value": 0.1, "milestones": [1, 3], "gamma": 0.5},
    "cosine": {"init_value": 0.1, "decay_steps": 10},
    "warmup_cosine": {"peak_value": 0.1, "warmup_steps": 2, "total_steps": 10},
    "wsd": {"peak_value": 0.1, "warmup_steps": 1, "stable_steps": 1, "decay_steps": 5,
            "decay_shape": "sqrt"},
    "inverse_sqrt": {"peak_value": 0.1, "warmup_steps": 2},
    "one_cycle": {"peak_value": 0.1, "total_steps": 10},
    "cyclic": {"base_value": 0.01, "max_value": 0.1, "step_size_up": 2, "mode": "exp_range",
               "gamma": 0.9},
    "cosine_restarts": {"init_value": 0.1, "first_period": 2, "period_mult": 2},
    "join": {"schedules": [{"schedule": "constant", "value": 0.1},
                           {"schedule": "cosine", "init_value": 0.1, "decay_steps": 4}],
             "boundaries": [2]},
}


def test_every_schedule_is_reachable_and_drives_the_learning_rate():
    assert set(SCHEDULE_ARGS) == set(T.schedules.SCHEDULES)
    for name, args in SCHEDULE_ARGS.items():
        tx = spec.build({"optimizer": "sgd", "learning_rate": {"schedule": name, **args}})
        _, state = _run(tx, 3, jit=False)
        direct = (T.schedules.join([T.schedules.constant(0.1), T.schedules.cosine(0.1, 4)], [2])
                  if name == "join" else T.schedules.SCHEDULES[name](**args))
        assert float(T.current_hyperparams(state)["learning_rate"]) == pytest.approx(
            float(direct(2)), rel=1e-6), name


def test_every_optimizer_takes_a_schedule_as_its_learning_rate():
    """A schedule mapping goes wherever a number does (soap, psgd_kron, adadelta,
    normalized_sgd and schedule_free_adamw refused one: their unannotated float default
    made the spec expect a number)."""
    schedule = {"schedule": "linear", "init_value": 0.1, "end_value": 0.0, "steps": 10}
    for name in spec.OPTIMIZERS:
        try:
            spec.build({"optimizer": name, "learning_rate": 0.01})
        except JaxtrainError:  # needs arguments (see test_every_optimizer_is_reachable...)
            continue
        spec.build({"optimizer": name, "learning_rate": schedule})
    _, state = _run(spec.build({"optimizer": "soap", "learning_rate": schedule}), 3, jit=False)
    assert float(T.current_hyperparams(state)["learning_rate"]) == pytest.approx(0.08)


def test_every_exported_optimizer_is_registered_by_name():
    """The registry is an explicit table: an optimizer factory of `jaxtrain.transforms` (a
    function taking a learning rate) left out of it is found here."""
    import inspect

    # taking a learning rate, yet not an optimizer a spec names
    others = {"add_decoupled_weight_decay",  # a decay rule (weight_decay: {kind: decoupled})
              "dp_sgd"}  # needs per-example gradients: jaxtrain.strategies' DP-SGD step
    exported = {name: getattr(T, name) for name in T.__all__}
    factories = {name for name, fn in exported.items() if inspect.isfunction(fn)
                 and fn.__module__.startswith("jaxtrain.transforms.")
                 and "learning_rate" in inspect.signature(fn).parameters}
    missing = factories - set(spec.OPTIMIZERS) - others
    assert not missing, f"exported optimizers missing from spec.OPTIMIZERS: {sorted(missing)}"
    assert all(exported.get(name) is fn for name, fn in spec.OPTIMIZERS.items())


def test_every_optimizer_is_reachable_and_trains():
    names = spec.OPTIMIZERS
    assert {"sgd", "adam", "adamw"} <= set(names)
    for name in names:
        try:
            tx = spec.build({"optimizer": name, "learning_rate": 0.01})
        except JaxtrainError as err:  # an optimizer with required arguments says which
            assert "needs" in str(err), (name, err)
            continue
        losses = _train(tx, 8)
        # every one descends at lr 0.01 (adadelta, whose first steps are tiny, least)
        assert np.isfinite(losses).all() and losses[-1] < 0.9995 * losses[0], (name, losses)


def _train(tx, steps):
    """The losses of `steps` full-batch steps of jaxtrain's train step (which hands
    second-order methods their value_fn) on a least-squares fit of `_params`'s model."""
    from jaxtrain.train import TrainState, make_train_step

    rng = np.random.default_rng(1)
    batch = {"x": jnp.asarray(rng.normal(size=(32, 4)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(32, 3)), jnp.float32)}

    def loss_fn(params, batch, rng):
        layer = params["layer"]
        pred = (batch["x"] @ layer["kernel"] + layer["bias"]) * params["norm"]["scale"]
        return jnp.mean((pred - batch["y"]) ** 2), {}

    state = TrainState.create(lambda p, x: x, tx, jax.random.PRNGKey(0), params=_params())
    step = jax.jit(make_train_step(loss_fn))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses)


@pytest.mark.parametrize("config,words", [
    ({"optimizer": "adamm", "learning_rate": 0.1}, ["'adamm'", "'adam'", "adamw", "sgd"]),
    ({"optimizer": "adam", "learning_rate": 0.1, "clip_global_nrom": 1.0},
     ["'clip_global_nrom'", "'clip_global_norm'", "accumulate"]),
    ({"optimizer": "adam", "learning_rate": {"schedule": "cosin", "init_value": 0.1}},
     ["learning_rate.schedule", "'cosine'", "warmup_cosine"]),
    ({"optimizer": {"name": "adam", "beta1": 0.9}, "learning_rate": 0.1},
     ["'beta1'", "'b1'", "eps"]),
    ({"optimizer": "adam", "learning_rate": 0.1, "weight_decay": {"rate": 0.1, "kind": "L2"}},
     ["weight_decay.kind", "'l2'", "decoupled"]),
    ({"optimizer": "adam", "learning_rate": 0.1, "accumulate": "4"},
     ["accumulate", "an integer", "str"]),
    ({"optimizer": {"name": "adam", "b1": "high"}, "learning_rate": 0.1},
     ["optimizer.b1", "a number"]),
    ({"optimizer": "adam", "learning_rate": "fast"}, ["learning_rate", "number or a schedule"]),
    ({"optimizer": "adam", "learning_rate": 0.1, "weight_decay": {"rate": "a lot"}},
     ["weight_decay.rate", "a number"]),
    ({"optimizer": "adam", "learning_rate": {"schedule": "cosine", "init_value": 0.1,
                                            "decay_steps": 0}},
     ["learning_rate", "decay_steps"]),
    ({"optimizer": "adam", "learning_rate": 0.1, "freeze": [1]}, ["freeze", "a string"]),
    ({"optimizer": "adam"}, ["optimizer", "needs learning_rate"]),
    ({"optimizer": "adam", "learning_rate": {"schedule": "linear", "init_value": 1.0,
                                            "end_value": -1.0, "steps": 10}},
     ["learning_rate", "-0.2 at step 6", ">= 0"]),
    ({"optimizer": "adam", "learning_rate": {
        "schedule": "join", "boundaries": [5],
        "schedules": [{"schedule": "constant", "value": 0.1},
                      {"schedule": "cosine", "init_value": -0.1, "decay_steps": 10}]}},
     ["learning_rate.schedules[1]", "at step 0", ">= 0"]),
    ({"optimizer": {"name": "adam", "eps": 0.0}, "learning_rate": 0.1}, ["eps must be > 0"]),
    ({"learning_rate": 0.1}, ["missing key 'optimizer'"]),
    ("optimizer: [adam", ["not valid YAML"]),
    ("- adam", ["spec", "expected a mapping"]),
])
def test_mistakes_are_named(config, words):
    with pytest.raises(JaxtrainError) as err:
        spec.build(config)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


# Optimizers whose eps only keeps a denominator off zero: eps=0 divides 0 by 0 on the
# first zero gradient, so it is refused (adagrad's initial accumulator already does that).
EPS_GUARDED = ("adam", "adamw", "adamax", "amsgrad", "nadam", "radam", "lamb", "rmsprop",
               "adadelta", "schedule_free_adamw", "ademamix", "mars", "muon", "soap")


@pytest.mark.parametrize("name", EPS_GUARDED)
def test_eps_zero_is_refused_where_it_would_divide_by_zero(name):
    with pytest.raises(JaxtrainError, match=f"{name}: eps must be > 0, got 0.0"):
        getattr(T, name)(learning_rate=0.1, eps=0.0)


@pytest.mark.parametrize("patterns", [5, [5], None])
def test_freeze_needs_path_patterns(patterns):
    with pytest.raises(JaxtrainError, match="path patterns"):
        T.freeze(patterns)
