"""Clipping against torch, accumulate == a bigger batch, skip_nonfinite on an injected NaN,
ema against torch's AveragedModel, lookahead against optax.lookahead, groups and
hyperparameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from jaxtrain import transforms as T
from jaxtrain.errors import JaxtrainError
from jaxtrain.transforms import wrappers as W


def _tree(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"conv": {"kernel": jnp.asarray(scale * rng.normal(size=(3, 3, 2, 4)), jnp.float32),
                     "bias": jnp.asarray(scale * rng.normal(size=(4,)), jnp.float32)},
            "dense": {"kernel": jnp.asarray(scale * rng.normal(size=(5, 3)), jnp.float32)}}


def _torch_grads(tree):
    leaves = [torch.nn.Parameter(torch.tensor(np.asarray(x))) for x in jax.tree.leaves(tree)]
    for p, g in zip(leaves, jax.tree.leaves(tree), strict=True):
        p.grad = torch.tensor(np.asarray(g))
    return leaves


def test_clip_by_global_norm_is_torch_clip_grad_norm():
    g = _tree(1, scale=3.0)
    ours, _ = W.clip_by_global_norm(2.0).update(g, optax.EmptyState())
    leaves = _torch_grads(g)
    torch.nn.utils.clip_grad_norm_(leaves, 2.0)
    for a, b in zip(jax.tree.leaves(ours), leaves, strict=True):
        np.testing.assert_allclose(a, b.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_clip_is_torch_clip_grad_value():
    g = _tree(2, scale=3.0)
    ours, _ = W.clip(1.5).update(g, optax.EmptyState())
    leaves = _torch_grads(g)
    torch.nn.utils.clip_grad_value_(leaves, 1.5)
    for a, b in zip(jax.tree.leaves(ours), leaves, strict=True):
        np.testing.assert_array_equal(a, b.grad.numpy())


def _unitwise_norm(x):
    """NFNets (Brock et al. 2021): per output unit; vectors and scalars as a whole."""
    if x.ndim <= 1:
        return np.full_like(x, np.sqrt(np.sum(x * x)))
    axes = (0,) if x.ndim in (2, 3) else tuple(range(x.ndim - 1))
    return np.broadcast_to(np.sqrt(np.sum(x * x, axis=axes, keepdims=True)), x.shape)


def test_adaptive_grad_clip_is_the_nfnets_formula():
    params, grads = _tree(3), _tree(4, scale=2.0)
    ours, _ = W.adaptive_grad_clip(0.1).update(grads, optax.EmptyState(), params)
    for g, p, o in zip(jax.tree.leaves(grads), jax.tree.leaves(params), jax.tree.leaves(ours),
                       strict=True):
        g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
        max_norm = 0.1 * np.maximum(_unitwise_norm(p), 1e-3)
        gn = _unitwise_norm(g)
        expect = np.where(gn > max_norm, g * max_norm / np.maximum(gn, 1e-6), g)
        np.testing.assert_allclose(o, expect, rtol=1e-5, atol=1e-7)
        assert not np.allclose(o, g)  # the test really clips


def test_accumulate_equals_one_step_on_a_k_times_larger_batch():
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(32, 5)), jnp.float32), jnp.asarray(rng.normal(size=32))
    loss = lambda w, xb, yb: jnp.mean((jnp.tanh(xb @ w["a"]) @ w["b"] - yb) ** 2)
    w0 = {"a": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32), "b": jnp.ones(4)}
    k = 4
    big_tx = optax.chain(W.clip_by_global_norm(0.5), T.adam(0.01))
    small_tx = W.accumulate(k, optax.chain(W.clip_by_global_norm(0.5), T.adam(0.01)))
    def step(tx):
        def run(w, s, xb, yb):
            u, s = tx.update(jax.grad(loss)(w, xb, yb), s, w)
            return optax.apply_updates(w, u), s
        return jax.jit(run)

    big, small = step(big_tx), step(small_tx)
    wa, sa = w0, big_tx.init(w0)
    wb, sb = w0, small_tx.init(w0)
    for _ in range(3):
        wa, sa = big(wa, sa, x, y)
        for i in range(k):
            wb, sb = small(wb, sb, x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), wa, wb)
    assert not np.allclose(wa["a"], w0["a"])
    assert W.accumulate(k)(T.sgd(0.1)).init(w0) is not None  # the curried form


def test_skip_nonfinite_skips_counts_and_raises():
    params = {"w": jnp.ones(3)}
    tx = W.skip_nonfinite(2, T.adam(0.1))
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    state = tx.init(params)
    good = {"w": jnp.ones(3)}
    bad = {"w": jnp.array([1.0, jnp.nan, 1.0])}
    u, state = step(good, state, params)
    params = optax.apply_updates(params, u)
    inner_before = state.inner_state
    for count in (1, 2):
        u, state = step(bad, state, params)
        np.testing.assert_array_equal(u["w"], 0.0)  # nothing changes
        assert int(state.notfinite_count) == count and int(state.total_notfinite) == count
        jax.tree.map(np.testing.assert_array_equal, state.inner_state, inner_before)
    u, state = step(good, state, params)  # a good step resets the run of bad ones
    assert int(state.notfinite_count) == 0 and np.all(np.isfinite(u["w"]))
    with pytest.raises((JaxtrainError, jax.errors.JaxRuntimeError), match="skip_nonfinite"):
        for _ in range(3):
            u, state = step(bad, state, params)
        jax.block_until_ready(u)


def test_ema_matches_torch_averaged_model():
    decay, lr = 0.9, 0.1
    grads = [np.random.default_rng(i).normal(size=(4,)).astype(np.float32) for i in range(20)]
    tx = optax.chain(T.sgd(lr), W.ema(decay))
    p = jnp.zeros(4)
    state = tx.init(p)
    for g in grads:
        u, state = tx.update(jnp.asarray(g), state, p)
        p = optax.apply_updates(p, u)
    model = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    avg = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay))
    avg.update_parameters(model)  # the first call copies: the average starts at the init
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for g in grads:
        model.weight.grad = torch.tensor(g)[None]
        opt.step()
        avg.update_parameters(model)
    np.testing.assert_allclose(W.ema_params(state), avg.module.weight.detach().numpy()[0],
                               rtol=1e-5, atol=1e-6)


def test_lookahead_follows_optax_lookahead():
    grads = [_tree(10 + i) for i in range(13)]
    ours_tx = W.lookahead(T.adam(0.05), sync_period=4, alpha=0.3)
    ref_tx = optax.lookahead(optax.adam(0.05), sync_period=4, slow_step_size=0.3)
    p = _tree(0)
    ref = optax.LookaheadParams.init_synced(_tree(0))
    s, rs = ours_tx.init(p), ref_tx.init(ref)
    for g in grads:
        u, s = ours_tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        ru, rs = ref_tx.update(g, rs, ref)
        ref = optax.apply_updates(ref, ru)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     p, ref.fast)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 s.slow, ref.slow)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.backbone = nnx.Linear(3, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)


@pytest.mark.parametrize("form", ["state", "pure_dict"])
def test_per_group_and_freeze_on_nnx_params(form):
    state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    params = state if form == "state" else nnx.to_pure_dict(state)
    grads = jax.tree.map(jnp.ones_like, params)
    tx = T.per_group({"backbone/*": T.sgd(0.01)}, default=T.sgd(0.1))
    u, opt_state = tx.update(grads, tx.init(params), params)
    flat = dict(zip(T.path_list(nnx.to_pure_dict(state)), jax.tree.leaves(u), strict=True))
    np.testing.assert_allclose(flat["backbone/kernel"], -0.01)
    np.testing.assert_allclose(flat["head/bias"], -0.1)
    hp = T.current_hyperparams(opt_state)
    assert float(hp["backbone/learning_rate"]) == pytest.approx(0.01)
    assert float(hp["default/learning_rate"]) == pytest.approx(0.1)
    assert float(hp["learning_rate"]) == pytest.approx(0.1)  # the default group's
    frozen = optax.chain(T.sgd(0.1), T.freeze("head/*"))
    u, _ = frozen.update(grads, frozen.init(params), params)
    flat = dict(zip(T.path_list(nnx.to_pure_dict(state)), jax.tree.leaves(u), strict=True))
    np.testing.assert_array_equal(flat["head/kernel"], 0.0)
    np.testing.assert_allclose(flat["backbone/kernel"], -0.1)


def test_hyperparams_through_every_wrapper_and_set_hyperparams():
    params = _tree(0)
    tx = W.skip_nonfinite(3, W.accumulate(2, W.lookahead(optax.chain(
        W.clip_by_global_norm(1.0),
        T.per_group({"conv/*": T.adam(1e-3)}, default=T.adamw(1e-2, weight_decay=0.1)),
        T.reduce_on_plateau(patience=0, factor=0.5), W.ema(0.99)))))
    state = tx.init(params)
    hp = T.current_hyperparams(state)
    assert float(hp["learning_rate"]) == pytest.approx(1e-2)
    assert float(hp["conv/learning_rate"]) == pytest.approx(1e-3)
    assert float(hp["weight_decay"]) == pytest.approx(0.1)
    assert float(hp["plateau_scale"]) == 1.0
    state = T.set_hyperparams(state, **{"conv/learning_rate": 5e-4})
    hp = T.current_hyperparams(state)
    assert float(hp["conv/learning_rate"]) == pytest.approx(5e-4)
    assert float(hp["learning_rate"]) == pytest.approx(1e-2)
    state = T.set_hyperparams(state, learning_rate=0.0)
    step = jax.jit(lambda g, s: tx.update(g, s, params, value=1.0))
    u, state = step(_tree(5), state)
    u, state = step(_tree(6), state)  # the accumulated step
    jax.tree.map(lambda x: np.testing.assert_array_equal(x, 0.0), u)  # lr 0 everywhere
    with pytest.raises(JaxtrainError, match="momentum"):
        T.set_hyperparams(state, momentum=0.9)


@pytest.mark.parametrize("call,word", [
    (lambda: W.accumulate(0), "accumulate"),
    (lambda: W.clip_by_global_norm(-1.0), "max_norm"),
    (lambda: W.ema(1.0), "decay"),
    (lambda: W.lookahead(T.sgd(0.1), alpha=2.0), "alpha"),
    (lambda: W.skip_nonfinite(2.5), "max_consecutive"),
    (lambda: W.accumulate(2, "adam"), "GradientTransformation"),
])
def test_bad_arguments(call, word):
    with pytest.raises(JaxtrainError, match=word):
        call()


def test_accumulate_adam_on_bfloat16_params_stays_finite():
    """Accumulated Adam on bfloat16 params: finite, params and hyperparameters in the
    dtypes asked for (b2 in bfloat16 would be 1.0 and the bias correction divide by 0)."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.bfloat16)}
    tx = W.accumulate(2, T.adam(0.01))
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(6):
        grads = {"w": jnp.asarray(np.random.default_rng(t).normal(size=(8, 4)), jnp.bfloat16)}
        params, state = step(params, state, grads)
    assert params["w"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(params["w"], np.float32)))
    assert T.current_hyperparams(state)["b2"].dtype == jnp.float32


def test_one_finder_reaches_a_state_node_anywhere_and_every_reader_uses_it():
    """`find_state` finds a node by its type through chains, `inject_hyperparams`, masks,
    `accumulate` and parameter groups (a dict); Optax's `EmaState` is not ours. The readers
    of the loss scale, the EMA and the schedule-free params reach a node inside a group,
    where the schedule-free reader (which walked tuples only) once found none."""
    params = _tree()
    tx = optax.chain(optax.ema(0.5), T.accumulate(2, T.per_group(
        {"conv/*": T.dynamic_loss_scale(T.sgd(0.1), initial_scale=4.0)},
        default=optax.chain(T.schedule_free_adamw(0.1), W.ema(0.9)))))
    state = tx.init(params)
    ours = T.find_states(state, W.EmaState)
    assert len(ours) == 1  # the default group's (the conv params are masked out there)
    np.testing.assert_array_equal(ours[0].ema["dense"]["kernel"], params["dense"]["kernel"])
    assert len(T.find_states(state, optax.EmaState)) == 1
    assert T.find_state(state, optax.contrib.ScheduleFreeState) is not None
    assert T.find_state(state, W.LookaheadState) is None
    with pytest.raises(JaxtrainError, match="no lookahead here"):
        T.find_state(state, W.LookaheadState, "no lookahead here")
    assert float(T.loss_scale_value(state)) == 4.0
    assert W.ema_params(state) is ours[0].ema
    grouped = T.per_group({}, default=T.schedule_free_adamw(0.1)).init(params)
    evaluated = T.schedule_free_eval_params(grouped, params)
    np.testing.assert_allclose(evaluated["dense"]["kernel"], params["dense"]["kernel"],
                               rtol=1e-6)  # x = params at the start
