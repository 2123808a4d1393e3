"""Distillation: the loss against torch, the teacher from a checkpoint, a short run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxtrain import transforms
from jaxtrain.checkpoint import Manager, model_signature
from jaxtrain.data import batch_at, digits_split
from jaxtrain.errors import JaxtrainError
from jaxtrain.models import CNN
from jaxtrain.strategies import distillation_loss, load_teacher, make_distill_loss
from jaxtrain.train import TrainState, make_train_step


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (4.0, 0.9), (2.0, 0.0)])
def test_loss_matches_torch_kl_div_and_cross_entropy(temperature, alpha):
    rng = np.random.default_rng(0)
    student = rng.normal(size=(16, 10)).astype(np.float32) * 3
    teacher = rng.normal(size=(16, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, size=16)
    s, t = torch.tensor(student, requires_grad=True), torch.tensor(teacher)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / temperature, -1),
                                    torch.softmax(t / temperature, -1), reduction="batchmean")
    ce = torch.nn.functional.cross_entropy(s, torch.tensor(labels))
    want = alpha * temperature**2 * kl + (1 - alpha) * ce
    want.backward()
    fn = lambda x: distillation_loss(x, jnp.asarray(teacher), jnp.asarray(labels),
                                     temperature, alpha)
    got, grad = jax.value_and_grad(fn)(jnp.asarray(student))
    assert float(got) == pytest.approx(float(want.detach()), rel=1e-5)
    np.testing.assert_allclose(grad, s.grad.numpy(), rtol=1e-4, atol=1e-6)


def _cnn(seed, channels=4, features=16):
    with nnx.use_eager_sharding(False):
        return CNN(num_classes=10, channels=channels, features=features, rngs=nnx.Rngs(seed))


def test_teacher_loads_from_a_checkpoint_and_teaches(tmp_path):
    train, test = digits_split()
    state = TrainState.create(_cnn(1, 8, 32), transforms.adam(3e-3), jax.random.PRNGKey(1))
    mngr = Manager(tmp_path / "teacher")
    mngr.save(0, state, model_signature({"channels": 8}, state.params))
    mngr.close()
    teacher = load_teacher(_cnn(2, 8, 32), tmp_path / "teacher")  # other init, same arch
    x = test["image"][:8]
    np.testing.assert_array_equal(teacher(x), state.model()(x))
    with pytest.raises(JaxtrainError, match="does not fit the teacher model"):
        load_teacher(_cnn(2, 4, 16), tmp_path / "teacher")
    with pytest.raises(JaxtrainError, match="does not exist"):
        load_teacher(_cnn(2), tmp_path / "nowhere")

    # A student pulled toward the teacher (alpha=1: soft targets only) moves its
    # predictions toward the teacher's.
    student = TrainState.create(_cnn(3), transforms.adam(1e-2), jax.random.PRNGKey(3))
    step = jax.jit(make_train_step(make_distill_loss(teacher, temperature=2.0, alpha=1.0)))
    losses = []
    for s in range(30):
        student, metrics = step(student, batch_at(train, 32, 0, s))
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])


def test_bad_distillation_settings_are_named():
    with pytest.raises(JaxtrainError, match="temperature"):
        make_distill_loss(_cnn(0), temperature=0.0)
    with pytest.raises(JaxtrainError, match="alpha"):
        make_distill_loss(_cnn(0), alpha=1.5)


def test_unlabelled_examples_learn_from_the_teacher_only():
    import jax.numpy as jnp
    import numpy as np

    from jaxtrain.strategies.distill import distillation_loss

    rng = np.random.default_rng(0)
    student, teacher = (jnp.asarray(rng.normal(size=(6, 10)), jnp.float32) for _ in range(2))
    labels = jnp.asarray(rng.integers(0, 10, 6))
    plain = distillation_loss(student, teacher, labels, 4.0, 0.9)
    np.testing.assert_allclose(distillation_loss(student, teacher, labels, 4.0, 0.9,
                                                 jnp.ones(6)), plain, rtol=1e-6)
    soft_only = distillation_loss(student, teacher, labels, 4.0, 1.0)
    np.testing.assert_allclose(distillation_loss(student, teacher, labels, 4.0, 0.9,
                                                 jnp.zeros(6)), 0.9 * soft_only, rtol=1e-6)
    half = jnp.asarray([1, 1, 1, 0, 0, 0])
    hard_first = distillation_loss(student[:3], teacher[:3], labels[:3], 4.0, 0.0)
    expect = 0.9 * soft_only + 0.1 * hard_first
    np.testing.assert_allclose(distillation_loss(student, teacher, labels, 4.0, 0.9, half),
                               expect, rtol=1e-5)
