"""Fine-tune flows: new head, load by path, frozen globs and group learning rates (closed
form with SGD), fresh or restored optimizer state, LoRA train -> merge -> export."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain import transforms
from jaxtrain.checkpoint import Manager, model_signature
from jaxtrain.errors import JaxtrainError
from jaxtrain.finetune import (
    apply_lora,
    finetune_optimizer,
    load_into,
    lora_optimizer,
    merge_lora,
    replace_head,
    start_from,
)
from jaxtrain.models import CNN
from jaxtrain.train import TrainState


def _cnn(seed, classes=5):
    with nnx.use_eager_sharding(False):
        return CNN(classes, channels=4, features=8, rngs=nnx.Rngs(seed))


def _pretrained(tmp_path, steps=2):
    """A CNN trained a couple of (random-gradient) Adam steps and saved."""
    model = _cnn(0)
    state = TrainState.create(model, transforms.adam(1e-2), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    apply = jax.jit(lambda state, grads: state.apply_gradients(grads))
    for _ in range(steps):
        state = apply(state, jax.tree.map(lambda p: rng.normal(size=p.shape), state.params))
    with Manager(tmp_path) as mngr:
        mngr.save(steps, state, model_signature(model.config, state.params))
    return state


def _images(n=4):
    return jax.random.uniform(jax.random.PRNGKey(9), (n, 8, 8))


def test_new_head_and_load_by_path(tmp_path):
    pre = _pretrained(tmp_path)
    model = _cnn(1, classes=3)
    fresh_head = np.asarray(model.head.kernel[...])
    report = load_into(model, tmp_path, exclude=["head/*"])
    assert report.new == ["head/bias", "head/kernel"]
    np.testing.assert_array_equal(model.backbone.dense.kernel[...],
                                  pre.params["backbone"]["dense"]["kernel"])
    np.testing.assert_array_equal(model.head.kernel[...], fresh_head)
    replace_head(model, nnx.Linear(8, 7, rngs=nnx.Rngs(2)))
    assert model(_images()).shape == (4, 7)
    with pytest.raises(JaxtrainError, match="no submodule 'neck'"):
        replace_head(model, nnx.Linear(8, 7, rngs=nnx.Rngs(2)), path="neck")


def test_freeze_and_group_learning_rates_follow_the_sgd_closed_form():
    model = _cnn(0)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = finetune_optimizer(optax.sgd, 0.1, lr_scale={"backbone/*": 0.1},
                            freeze=["backbone/conv1/*"])
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 2.0), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.1 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["backbone"]["dense"]["kernel"], -0.01 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["backbone"]["conv1"]["kernel"], 0.0)
    with pytest.raises(JaxtrainError, match="lr_scale for 'head' must be a number >= 0"):
        finetune_optimizer(optax.sgd, 0.1, lr_scale={"head": -1})


def test_optimizer_state_fresh_by_default_restored_on_request(tmp_path):
    pre = _pretrained(tmp_path)
    like = TrainState.create(_cnn(1), transforms.adam(1e-2), jax.random.PRNGKey(1))
    fresh, report = start_from(like, tmp_path)
    assert report.skipped == {}
    jax.tree.map(np.testing.assert_array_equal, fresh.params, pre.params)
    jax.tree.map(np.testing.assert_array_equal, fresh.opt_state, like.opt_state)
    assert int(fresh.opt_state.count) == 0
    restored, _ = start_from(like, tmp_path, restore_optimizer=True)
    jax.tree.map(np.testing.assert_array_equal, restored.opt_state, pre.opt_state)
    assert int(restored.step) == 0  # the fine-tune counts its own steps
    other = TrainState.create(_cnn(1), optax.sgd(0.1, momentum=0.9), jax.random.PRNGKey(1))
    with pytest.raises(JaxtrainError, match="missing opt_state/0/trace"):
        start_from(other, tmp_path, restore_optimizer=True)
    with pytest.raises(JaxtrainError, match="does not exist"):
        start_from(like, tmp_path / "nope")


def test_lora_finetune_merges_into_an_exportable_model(tmp_path):
    _pretrained(tmp_path / "pre")
    model = _cnn(1)
    load_into(model, tmp_path / "pre")
    apply_lora(model, ["backbone/dense", "head"], rank=2, alpha=4.0, rngs=nnx.Rngs(3))
    state = TrainState.create(model, lora_optimizer(optax.adam(1e-2)), jax.random.PRNGKey(0))
    x, y = _images(16), jnp.arange(16) % 5

    @jax.jit
    def step(state):
        def loss(params):
            logits = state.model(params)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return state.apply_gradients(jax.grad(loss)(state.params))

    for _ in range(5):
        state = step(state)
    adapted = state.model(train=False)
    want = adapted(_images())
    merged = merge_lora(adapted)
    np.testing.assert_allclose(merged(_images()), want, rtol=1e-5, atol=1e-5)
    params = nnx.to_pure_dict(nnx.state(merged, nnx.Param))
    export = TrainState.create(merged, transforms.adam(1e-3), jax.random.PRNGKey(0))
    with Manager(tmp_path / "export") as mngr:
        mngr.save(5, export, model_signature(merged.config, params))
    plain = _cnn(7)
    report = load_into(plain, tmp_path / "export")
    assert report.new == [] and report.skipped == {}
    np.testing.assert_allclose(plain(_images()), want, rtol=1e-5, atol=1e-5)
