"""The bfloat16 compute policy reaches every matmul and convolution of the built-in models.

Flax modules keep the dtype they were built with in places (nnx.Embed computes in its
construction dtype, BatchNorm's float32 statistics promote its output), and a model that
casts its input to float32 turns the whole network float32: the step would then run at
float32 speed while claiming bfloat16. Read off the traced train step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from jaxtrain.models import CNN, GPT, MLP, ResNet
from jaxtrain.train import TrainState, make_train_step
from jaxtrain.train.language_model import lm_loss
from jaxtrain.train.step import classification_loss

HEAVY = ("dot_general", "conv_general_dilated")


def weight_operand_dtypes(jaxpr, weight_shapes) -> set[str]:
    """Operand dtypes of every matmul and convolution that reads or produces a weight-shaped
    array (the model's layers and their weight gradients), sub-jaxprs included. Attention's
    score and value products are left out: `jax.nn.dot_product_attention` takes them in
    float32 on purpose."""
    found = set()
    for eqn in jaxpr.eqns:
        shapes = {v.aval.shape for v in (*eqn.invars, *eqn.outvars)}
        if eqn.primitive.name in HEAVY and shapes & weight_shapes:
            found |= {str(v.aval.dtype) for v in eqn.invars}
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", None)
            if inner is not None:
                found |= weight_operand_dtypes(getattr(inner, "jaxpr", inner), weight_shapes)
    return found


def _image_batch():
    return {"image": jnp.ones((4, 8, 8)), "label": jnp.zeros((4,), jnp.int32)}


CASES = {
    "mlp": (lambda: MLP(64, 10, hidden=(32,), rngs=nnx.Rngs(0)), classification_loss, _image_batch),
    "cnn": (lambda: CNN(rngs=nnx.Rngs(0)), classification_loss, _image_batch),
    "resnet": (lambda: ResNet(width=8, rngs=nnx.Rngs(0)), classification_loss, _image_batch),
    "gpt": (lambda: GPT(vocab_size=64, d_model=32, num_layers=2, num_heads=2, max_len=16,
                        rngs=nnx.Rngs(0)),
            lm_loss, lambda: {"tokens": jnp.zeros((2, 17), jnp.int32)}),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_compute_dtype_reaches_every_matmul(name, precision):
    make, loss, batch = CASES[name]
    with nnx.use_eager_sharding(False):
        model = make()
    state = TrainState.create(model, optax.sgd(0.1), jax.random.key(0))
    step = make_train_step(loss, precision=precision)
    jaxpr = jax.make_jaxpr(step)(state, batch()).jaxpr
    weights = {x.shape for x in jax.tree.leaves(state.params) if x.ndim >= 2}
    assert weight_operand_dtypes(jaxpr, weights) == {precision}


def test_trainer_bfloat16_params_casts_every_float_param(devices):
    """`x in floats` compared arrays: any model with 2+ float params raised 'truth value of
    an array is ambiguous'."""
    from jaxtrain import sharding
    from jaxtrain.train import LoggingConfig, TrainConfig, Trainer, TrainerConfig

    with nnx.use_eager_sharding(False):
        model = MLP(64, 10, hidden=(8,), rngs=nnx.Rngs(0))
    state = TrainState.create(model, optax.adam(1e-3), jax.random.PRNGKey(0))
    config = TrainerConfig(train=TrainConfig(precision="bfloat16_params", batch_size=4),
                           logging=LoggingConfig(progress=False, plots=False, tensorboard=False),
                           handle_signals=False)
    trainer = Trainer(state, classification_loss, config,
                      mesh=sharding.make_mesh(devices=devices[:1]))
    leaves = jax.tree.leaves(trainer.state.params)
    assert len(leaves) == 4 and {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    mu = trainer.state.opt_state[0].mu  # Adam's moments follow the params' dtype
    assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}
    state = trainer.fit({"image": jnp.ones((8, 8, 8)), "label": jnp.zeros((8,), jnp.int32)}, 2)
    assert int(state.step) == 2
