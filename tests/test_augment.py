"""Augmentation: each function against an independent reference (numpy padding and
slicing, numpy mirroring, scipy.ndimage.rotate), driven by the step's key so that two
runs with one seed, and a resumed run, are bitwise equal; config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from flax import nnx

from jaxtrain import JaxtrainError, sharding, transforms
from jaxtrain.checkpoint import CheckpointConfig
from jaxtrain.config import load
from jaxtrain.data.augment import (
    augmenter,
    check_augment,
    gaussian_noise,
    horizontal_flip,
    random_crop,
    random_rotation,
    rotate_image,
    with_augmentation,
)
from jaxtrain.train import (
    LoggingConfig,
    TrainConfig,
    Trainer,
    TrainerConfig,
    TrainState,
    classification_loss,
)
from jaxtrain.train.config import RunConfig

IMAGES = np.random.default_rng(0).random((16, 8, 8)).astype(np.float32)


def test_random_crop_is_a_window_of_the_zero_padded_image():
    out = np.asarray(random_crop(jax.random.key(1), IMAGES, 2))
    padded = np.pad(IMAGES, ((0, 0), (2, 2), (2, 2)))
    offsets = set()
    for image, crop in zip(padded, out, strict=True):
        found = [(i, j) for i in range(5) for j in range(5)
                 if np.array_equal(image[i:i + 8, j:j + 8], crop)]
        assert found, "no window of the padded image equals the crop"
        offsets.add(found[0])
    assert len(offsets) > 3  # independent offsets per example


def test_flip_mirrors_about_half_of_the_images_left_right():
    images = np.random.default_rng(1).random((200, 4, 5, 3)).astype(np.float32)
    out = np.asarray(horizontal_flip(jax.random.key(2), images))
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)]
    kept = [np.array_equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 70 < sum(flipped) < 130


@pytest.mark.parametrize("shape", [(9, 9), (8, 11), (8, 8, 3)])
@pytest.mark.parametrize("degrees", [17.0, -40.0, 90.0])
def test_rotation_matches_scipy(shape, degrees):
    image = np.random.default_rng(3).random(shape).astype(np.float32)
    expected = ndi.rotate(image, degrees, axes=(1, 0), reshape=False, order=1,
                          mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(rotate_image(image, degrees), expected, atol=1e-5)


def test_random_rotation_stays_within_the_bound():
    """Small angles move an image little; the same key gives the same angles."""
    out = random_rotation(jax.random.key(4), IMAGES, 5.0)
    np.testing.assert_array_equal(out, random_rotation(jax.random.key(4), IMAGES, 5.0))
    far = rotate_image(IMAGES[0], 30.0)
    near = out[0]
    assert np.abs(near - IMAGES[0]).mean() < np.abs(far - IMAGES[0]).mean()


def test_noise_has_the_configured_spread():
    zeros = jnp.zeros((64, 32, 32))
    out = np.asarray(gaussian_noise(jax.random.key(5), zeros, 0.1))
    assert out.std() == pytest.approx(0.1, rel=0.02) and abs(out.mean()) < 2e-3


def test_augmentation_changes_the_batch_and_is_a_function_of_the_key():
    apply = jax.jit(augmenter(check_augment({"crop": 1, "rotate": 10, "noise": 0.05})))
    a = apply(jax.random.key(0), IMAGES)
    assert not np.array_equal(a, IMAGES)
    np.testing.assert_array_equal(a, apply(jax.random.key(0), IMAGES))
    assert not np.array_equal(a, apply(jax.random.key(1), IMAGES))


def test_loss_sees_the_augmented_batch_and_nothing_changes_without_augmentation():
    seen = []

    def loss(model, batch, rng):
        seen.append(batch["image"])
        return 0.0, {}

    assert with_augmentation(loss, check_augment({})) is loss
    assert with_augmentation(loss, None) is loss
    with_augmentation(loss, check_augment({"noise": 0.1}))(None, {"image": IMAGES},
                                                          jax.random.PRNGKey(0))
    assert not np.array_equal(seen[-1], IMAGES)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.l = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.l(x.reshape(x.shape[0], -1))


def _data():
    rng = np.random.default_rng(0)
    return {"image": rng.random((64, 8, 8)).astype(np.float32),
            "label": rng.integers(0, 10, 64).astype(np.int32)}


def _trainer(directory):
    state = TrainState.create(Net(nnx.Rngs(0)), transforms.adam(1e-2), jax.random.PRNGKey(7))
    loss = with_augmentation(classification_loss,
                             check_augment({"crop": 1, "rotate": 10, "noise": 0.05}))
    config = TrainerConfig(train=TrainConfig(batch_size=16),
                           logging=LoggingConfig(progress=False, plots=False, tensorboard=False),
                           checkpoint=CheckpointConfig(dir=directory, async_=False))
    return Trainer(state, loss, config,
                   mesh=sharding.make_mesh(data=1, devices=jax.devices()[:1]))


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


@pytest.mark.slow  # four short Trainer runs (~20 s on an idle 2-core CPU)
def test_same_seed_runs_and_a_resumed_run_are_bitwise_equal(tmp_path):
    data = _data()
    straight = _params(_trainer(None).fit(data, 8))
    again = _params(_trainer(None).fit(data, 8))
    _trainer(tmp_path / "ckpt").fit(data, 4)  # checkpoint at step 4, then a new process'
    resumed = _params(_trainer(tmp_path / "ckpt").fit(data, 8))  # Trainer resumes it
    plain = Trainer(TrainState.create(Net(nnx.Rngs(0)), transforms.adam(1e-2),
                                      jax.random.PRNGKey(7)), classification_loss,
                    TrainerConfig(train=TrainConfig(batch_size=16),
                                  logging=LoggingConfig(progress=False)),
                    mesh=sharding.make_mesh(data=1, devices=jax.devices()[:1])).fit(data, 8)
    for a, b, c, d in zip(straight, again, resumed, _params(plain), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
        assert not np.array_equal(a, d)  # the augmentation did change training


@pytest.mark.parametrize("augment, message", [
    ({"crop": -1}, "data.augment.crop"),
    ({"crop": 1.5}, "data.augment.crop"),
    ({"rotate": 200}, "data.augment.rotate"),
    ({"noise": "a"}, "data.augment.noise"),
    ({"flip": 1}, "data.augment.flip"),
    ({"shear": 3}, "data.augment.shear"),
    ([1], "data.augment"),
])
def test_bad_augment_config_names_the_key(augment, message):
    with pytest.raises(JaxtrainError, match=message):
        load(RunConfig, {"model": "mlp", "data": {"name": "digits", "augment": augment},
                      "task": "classification", "optimizer": "adam"})


def test_flip_is_refused_for_digits(tmp_path):
    from jaxtrain.train.run import run_config

    cfg = load(RunConfig, {"model": "mlp", "data": {"name": "digits", "augment": {"flip": True}},
                        "task": "classification", "optimizer": "adam",
                        "out": str(tmp_path)})
    with pytest.raises(JaxtrainError, match="flip.*digits"):
        run_config(cfg)
