"""Magnitude pruning: masks against numpy, the schedule, zeros kept through Adam and
checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain import transforms
from jaxtrain.checkpoint import Manager, model_signature
from jaxtrain.errors import JaxtrainError
from jaxtrain.models import CNN
from jaxtrain.train import TrainState


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"a": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
            "b": {"kernel": jnp.asarray(3 * rng.normal(size=(5, 4)), jnp.float32)}}


def _zero_updates(params):
    return jax.tree.map(jnp.zeros_like, params)


def test_per_layer_masks_keep_each_layers_largest_weights():
    params = _params()
    tx = transforms.magnitude_prune(0.5, scope="per_layer")
    updates, state = tx.update(_zero_updates(params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for name in ("a", "b"):
        w = np.asarray(params[name]["kernel"]).ravel()
        keep = np.zeros(w.size, bool)
        keep[np.argsort(np.abs(w))[w.size // 2:]] = True
        np.testing.assert_array_equal(np.asarray(new[name]["kernel"]).ravel(),
                                      np.where(keep, w, 0.0))
    np.testing.assert_array_equal(new["a"]["bias"], params["a"]["bias"])  # not selected


def test_global_masks_rank_all_selected_weights_together():
    params = _params()
    tx = transforms.magnitude_prune(0.8, scope="global")
    updates, _ = tx.update(_zero_updates(params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    every = np.concatenate([np.abs(np.asarray(params[n]["kernel"])).ravel() for n in "ab"])
    threshold = np.sort(every)[int(0.8 * every.size) - 1]
    for n in "ab":
        w = np.asarray(params[n]["kernel"])
        np.testing.assert_array_equal(np.asarray(new[n]["kernel"]),
                                      np.where(np.abs(w) > threshold, w, 0.0))
    # b's weights are 3x larger: global ranking prunes a harder than b
    report = transforms.sparsity_report(new)
    assert report["a/kernel"] > report["b/kernel"]
    assert report["a/bias"] == 0.0


def test_schedule_is_zhu_gupta_and_pruned_weights_stay_zero_under_adam():
    params = _params()
    schedule = transforms.polynomial_sparsity(0.9, begin_step=2, end_step=12)
    tx = optax.chain(optax.adam(0.1), transforms.magnitude_prune(schedule, update_every=2))
    state = tx.init(params)
    grad = jax.jit(jax.grad(lambda p: sum(jnp.sum(jnp.sin(3 * x)) for x in jax.tree.leaves(p))))
    step = jax.jit(tx.update)
    ever_pruned = jax.tree.map(lambda x: np.zeros(x.shape, bool), params)
    for t in range(16):
        updates, state = step(grad(params), state, params)
        params = optax.apply_updates(params, updates)
        kernels = np.concatenate([np.asarray(params[n]["kernel"]).ravel() for n in "ab"])
        mask_t = t - t % 2  # masks are recomputed on even steps
        frac = np.clip((mask_t - 2) / 10, 0, 1)
        expected = 0.9 * (1 - (1 - frac) ** 3)  # Zhu & Gupta with s_i = 0, s_f = 0.9
        assert np.mean(kernels == 0) == pytest.approx(np.floor(expected * 50) / 50)
        # once pruned, always exactly zero (Adam's momentum would move them otherwise)
        for n in "ab":
            w = np.asarray(params[n]["kernel"])
            assert np.all(w[ever_pruned[n]["kernel"]] == 0.0)
            ever_pruned[n]["kernel"] |= w == 0.0
    masks = state[1].masks
    np.testing.assert_array_equal(np.asarray(masks["b"]["kernel"]) == 0,
                                  np.asarray(params["b"]["kernel"]) == 0)


def test_masks_and_zeros_survive_a_checkpoint(tmp_path):
    with nnx.use_eager_sharding(False):
        model = CNN(num_classes=10, channels=4, features=16, rngs=nnx.Rngs(0))
    tx = optax.chain(optax.adam(1e-2), transforms.magnitude_prune(0.7))
    state = TrainState.create(model, tx, jax.random.PRNGKey(0))
    grads = jax.tree.map(jnp.ones_like, state.params)
    state = jax.jit(lambda s: s.apply_gradients(grads))(state)
    signature = model_signature(model.config, state.params)
    mngr = Manager(tmp_path / "ckpt")
    mngr.save(1, state, signature)
    mngr.wait()
    fresh = TrainState.create(model, tx, jax.random.PRNGKey(1))
    restored = mngr.restore(fresh, signature)
    mngr.close()
    for a, b in zip(jax.tree.leaves(state.saveable()), jax.tree.leaves(restored.saveable()),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    zeros = jax.tree.map(lambda p: np.asarray(p) == 0, restored.params)
    after = jax.jit(lambda s: s.apply_gradients(grads))(restored)
    for z, p in zip(jax.tree.leaves(zeros), jax.tree.leaves(after.params), strict=True):
        assert np.all(np.asarray(p)[z] == 0.0)
    report = transforms.sparsity_report({k: v for k, v in after.params["backbone"].items()})
    assert report["dense/kernel"] > 0.6


def test_bad_arguments_are_named():
    with pytest.raises(JaxtrainError, match="scope"):
        transforms.magnitude_prune(0.5, scope="layer")
    with pytest.raises(JaxtrainError, match="sparsity"):
        transforms.magnitude_prune(1.0)
    with pytest.raises(JaxtrainError, match="no param path matches 'conv/\\*'"):
        transforms.magnitude_prune(0.5, prune="conv/*").init(_params())
    with pytest.raises(JaxtrainError, match="begin_step"):
        transforms.polynomial_sparsity(0.5, 10, 5)
