"""The digits CNN and the digits data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain.data import batch_at, digits_split, eval_batches
from jaxtrain.errors import JaxtrainError
from jaxtrain.models import CNN, logical_axes


def test_cnn_shapes_and_annotations():
    with nnx.use_eager_sharding(False):
        model = CNN(num_classes=5, rngs=nnx.Rngs(0))
    assert model(jnp.zeros((3, 8, 8))).shape == (3, 5)
    params = nnx.state(model, nnx.Param)
    axes = logical_axes(params)
    shapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(params))
    for a, s in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                    jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)),
                    strict=True):
        assert len(a) == len(s) and all(a), (a, s)
    n = sum(x.size for x in jax.tree.leaves(params))
    # conv1 3*3*1*16+16, conv2 3*3*16*32+32, dense 512*64+64, head 64*5+5
    assert n == (144 + 16) + (4608 + 32) + (32768 + 64) + (320 + 5)


def test_digits_split_relabels_and_is_deterministic():
    train, test = digits_split([5, 6, 7, 8, 9], seed=3)
    again, _ = digits_split([5, 6, 7, 8, 9], seed=3)
    np.testing.assert_array_equal(train["label"], again["label"])
    assert set(np.unique(train["label"])) == {0, 1, 2, 3, 4}
    assert train["image"].shape[1:] == (8, 8) and 0 <= train["image"].min() <= 1
    assert len(train["label"]) + len(test["label"]) == 896  # digits 5-9 among the 1797


def test_digits_split_refuses_bad_classes():
    with pytest.raises(JaxtrainError, match="subset of 0-9"):
        digits_split([3, 11])


def test_batches_are_a_function_of_seed_and_step_and_cover_each_epoch():
    data = {"x": np.arange(100)}
    assert np.array_equal(batch_at(data, 10, 1, 7)["x"], batch_at(data, 10, 1, 7)["x"])
    epoch = np.concatenate([batch_at(data, 10, 1, s)["x"] for s in range(10)])
    assert sorted(epoch) == list(range(100))
    assert not np.array_equal(batch_at(data, 10, 1, 0)["x"], batch_at(data, 10, 2, 0)["x"])


def test_eval_batches_pad_and_mask():
    data = {"x": np.arange(10)}
    chunks = list(eval_batches(data, 4, multiple_of=4))
    assert [len(c["x"]) for c in chunks] == [4, 4, 4]
    assert sum(c["mask"].sum() for c in chunks) == 10
