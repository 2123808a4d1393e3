"""Converting saved states between the unrolled and the scanned (stacked) GPT layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain.checkpoint import Manager, model_signature
from jaxtrain.checkpoint.layout import stack_layers, unstack_layers
from jaxtrain.errors import JaxtrainError
from jaxtrain.models.registry import build
from jaxtrain.train.language_model import lm_loss
from jaxtrain.train.state import TrainState

CFG = dict(vocab_size=64, d_model=32, num_layers=3, num_heads=4, max_len=16)


def _state(scan_layers, seed):
    model = build("gpt", seed=seed, **CFG, scan_layers=scan_layers)
    return model, TrainState.create(model, optax.adam(1e-2), jax.random.key(0))


def _step(model, state, tokens):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, opt_state):
        loss = lambda p: lm_loss(nnx.merge(graphdef, nnx.State(p), rest),
                                 {"tokens": tokens}, None)[0]
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = state.tx.update(grads, opt_state, params)
        return value, optax.apply_updates(params, updates), opt_state

    return step(state.params, state.opt_state)


def test_an_unrolled_checkpoint_resumes_as_the_scanned_model_and_converts_back(tmp_path):
    """Save an unrolled GPT's trained state with Orbax, restore it, stack it into a
    scanned GPT's state (different seed, so nothing matches by accident), and the next
    step gives the unrolled run's loss, params and Adam moments."""
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)
    model_u, state_u = _state(False, seed=0)
    _, params, opt = _step(model_u, state_u, tokens)
    state_u = state_u.replace(params=params, opt_state=opt)
    with Manager(tmp_path) as mngr:
        mngr.save(1, state_u, model_signature(model_u.config, state_u.params))
    with Manager(tmp_path, read_only=True) as mngr:
        restored = mngr.restore(_state(False, seed=3)[1])
    model_s, like = _state(True, seed=7)
    state_s = like.with_saved(stack_layers(restored.saveable()))
    assert state_s.params["blocks"]["mlp"]["up"]["kernel"].shape == (3, 32, 128)
    loss_u, params_u, opt_u = _step(model_u, state_u, tokens)
    loss_s, params_s, opt_s = _step(model_s, state_s, tokens)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6)
    jax.tree.map(close, params_s, stack_layers(params_u))
    jax.tree.map(close, opt_s, stack_layers(opt_u))
    back = unstack_layers(state_s.saveable())
    jax.tree.map(np.testing.assert_array_equal, back["params"], restored.params)
    assert jax.tree.structure(back["opt_state"]) == jax.tree.structure(state_u.opt_state)


def test_orbax_string_layer_keys_stack_in_numeric_order():
    tree = {"blocks": {str(i): {"w": np.full((2,), i)} for i in (10, 2, 0, 1, 3, 4, 5, 6, 7,
                                                                  8, 9)}}
    np.testing.assert_array_equal(stack_layers(tree)["blocks"]["w"][:, 0], np.arange(11))
    assert stack_layers(stack_layers(tree))["blocks"]["w"].shape == (11, 2)
    assert list(unstack_layers(stack_layers(tree))["blocks"]) == list(range(11))


@pytest.mark.parametrize("tree, convert, message", [
    ({"layers": {0: 1}}, stack_layers, "no subtree named 'blocks'"),
    ({"blocks": {0: {"w": jnp.ones(2)}, 2: {"w": jnp.ones(2)}}}, stack_layers,
     "not 0..1"),
    ({"blocks": {0: {"w": jnp.ones(2)}, 1: {"w": jnp.ones(3)}}}, stack_layers,
     "different shapes"),
    ({"blocks": {0: {"w": jnp.ones(2)}, 1: {"v": jnp.ones(2)}}}, stack_layers,
     "differ in structure"),
    ({"blocks": {"w": jnp.ones((3, 2)), "b": jnp.ones((4,))}}, unstack_layers,
     "leading layer dimension"),
])
def test_bad_layouts_are_refused_with_one_line(tree, convert, message):
    with pytest.raises(JaxtrainError, match=message):
        convert(tree)
