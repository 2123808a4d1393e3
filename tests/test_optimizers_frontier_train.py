"""Each frontier optimizer trains the digits CNN and the char GPT to a stated loss.

Short runs on fixed batches (seed 0): the digits CNN, 40 steps on its first 256 training
images from a loss of 2.33 to below 0.5 (measured at step 40: ademamix 0.04, mars 0.04,
muon 0.16, psgd_kron 0.28, shampoo 0.34, soap 0.35; the whole training set gave 0.10-0.34
in 6x the time, ademamix's 11.4 against 1.9 s); the char GPT (2 layers, d_model 64, bytes
of the stdlib corpus), 60 steps of 16 x 64 bytes from 5.3 nats to below the stated loss (mean of the
last 5 steps; measured at step 60: muon 2.39, mars 2.60, ademamix 2.70, soap 3.49: SOAP's
first step only gathers statistics and its preconditioner needs more steps). Shampoo and
PSGD Kron on the GPT were not measured in the time of this change and are not asserted.
The preconditioned optimizers compile for minutes on a loaded 2-core CPU: their runs and
all GPT runs are marked slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain import transforms as T
from jaxtrain.data import digits_split
from jaxtrain.data.text import load_text
from jaxtrain.models.registry import build

STACK = ("blocks/*",)
OPTIMIZERS = {  # name -> (digits CNN optimizer, char GPT optimizer)
    "ademamix": (T.ademamix(3e-3), T.ademamix(3e-3)),
    "mars": (T.mars(3e-3, adam_learning_rate=3e-3), T.mars(3e-3, adam_learning_rate=3e-3)),
    "muon": (T.muon(0.02, adam_learning_rate=3e-3), T.muon(0.02, adam_learning_rate=3e-3)),
    "soap": (T.soap(3e-3), T.soap(3e-3)),
    "shampoo": (T.shampoo(3e-3, start_preconditioning_step=5, precondition_every=5), None),
    "psgd_kron": (T.psgd_kron(1e-2), None),
}
CNN_STEPS, CNN_IMAGES, CNN_LOSS = 40, 256, 0.5
GPT_STEPS = 60
GPT_LOSS = {"ademamix": 3.0, "mars": 3.0, "muon": 2.8, "soap": 3.7}
SLOW = ("soap", "shampoo", "psgd_kron")


def _fit(model, tx, loss_fn, batches):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(
            lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state, losses = tx.init(params), []
    for batch in batches:
        params, state, loss = step(params, state, batch)
        losses.append(float(loss))
    return losses


def _cnn_loss(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _gpt_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in OPTIMIZERS])
def test_trains_digits_cnn(name):
    train, _ = digits_split()
    batch = (jnp.asarray(train["image"][:CNN_IMAGES, ..., None]),
             jnp.asarray(train["label"][:CNN_IMAGES]))
    losses = _fit(build("cnn", seed=0), OPTIMIZERS[name][0], _cnn_loss, [batch] * CNN_STEPS)
    assert losses[0] > 2.0 and losses[-1] < CNN_LOSS, (name, losses[0], losses[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GPT_LOSS))
def test_trains_char_gpt(name):
    tokens = load_text(seq_len=64)["train"]["tokens"]
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(tokens[rng.integers(0, len(tokens), 16)]) for _ in range(GPT_STEPS)]
    model = build("gpt", seed=0, vocab_size=256, d_model=64, num_layers=2, num_heads=2,
                  max_len=64)
    losses = _fit(model, OPTIMIZERS[name][1], _gpt_loss, batches)
    assert losses[0] > 5.0 and np.mean(losses[-5:]) < GPT_LOSS[name], (name, losses[-5:])
