"""MLP, CNN and ResNet: shapes, param counts, annotations, FLOPs against XLA, and the
ResNet's BatchNorm statistics carried by the TrainState."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain.errors import JaxtrainError
from jaxtrain.models import logical_axes, param_count
from jaxtrain.models.registry import MODELS, build
from jaxtrain.train import TrainState, classification_loss, make_train_step


def _check_annotations(model):
    params = nnx.state(model, nnx.Param)
    axes = jax.tree.leaves(logical_axes(params), is_leaf=lambda x: isinstance(x, tuple))
    shapes = [x.shape for x in jax.tree.leaves(params)]
    assert len(axes) == len(shapes)
    for a, s in zip(axes, shapes, strict=True):
        assert len(a) == len(s) and all(a), (a, s)
        assert len(set(a)) == len(a), f"axis named twice in {a}"


def _forward_flops(model, x):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    f = lambda p, x: nnx.merge(graphdef, p, rest)(x)
    return jax.jit(f).lower(params, x).compile().cost_analysis()["flops"] / x.shape[0]


def test_registry_has_the_models():
    assert {"cnn", "mlp", "resnet", "gpt"} <= set(MODELS)
    with pytest.raises(JaxtrainError, match="unknown model 'vit'"):
        build("vit")
    with pytest.raises(JaxtrainError, match="activation"):
        build("mlp", activation="swish2")


def test_mlp_shapes_params_flops():
    model = build("mlp", in_features=64, out_features=10, hidden=[128, 64, 32])
    x = jnp.ones((8, 8, 8))
    assert model(x).shape == (8, 10)
    assert param_count(model) == (64 * 128 + 128) + (128 * 64 + 64) + (64 * 32 + 32) + (
        32 * 10 + 10)
    _check_annotations(model)
    assert _forward_flops(model, x) == pytest.approx(model.flops_per_example(False), rel=0.1)
    assert model.flops_per_example() == 3 * model.flops_per_example(False)


def test_cnn_flops_keep_param_paths():
    model = build("cnn", num_classes=5)
    paths = set(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert paths == {"backbone", "head"}
    x = jnp.ones((4, 8, 8))
    assert _forward_flops(model, x) == pytest.approx(model.flops_per_example(False), rel=0.1)


def test_resnet_shapes_params_flops():
    model = build("resnet", num_classes=10, width=8, stage_sizes=[1, 1])
    x = jnp.ones((4, 8, 8))
    assert model(x).shape == (4, 10)
    conv = lambda k, a, b: k * k * a * b
    bn = lambda c: 2 * c
    expected = (conv(3, 1, 8) + bn(8)
                + 2 * (conv(3, 8, 8) + bn(8))
                + conv(3, 8, 16) + conv(3, 16, 16) + 2 * bn(16) + conv(1, 8, 16) + bn(16)
                + 16 * 10 + 10)
    assert param_count(model) == expected
    _check_annotations(model)
    model.eval()
    assert _forward_flops(model, x) == pytest.approx(model.flops_per_example((8, 8), False),
                                                     rel=0.1)


def test_resnet_batch_statistics_are_carried_and_updated_by_the_train_step():
    model = build("resnet", num_classes=3, width=4, stage_sizes=[1])
    images = jax.random.normal(jax.random.key(0), (16, 8, 8))
    stem_out = model.stem(images[..., None])
    state = TrainState.create(model, optax.sgd(0.0), jax.random.key(1))
    assert set(state.model_state["stem_bn"]) == {"mean", "var"}
    assert set(state.params["stem_bn"]) == {"scale", "bias"}
    step = jax.jit(make_train_step(classification_loss))
    new, _ = step(state, {"image": images, "label": jnp.zeros(16, jnp.int32)})
    # running mean after one step from zero: (1 - momentum) * batch mean, momentum 0.9
    np.testing.assert_allclose(new.model_state["stem_bn"]["mean"],
                               0.1 * stem_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new.model_state["stem_bn"]["var"],
                               0.9 + 0.1 * stem_out.var(axis=(0, 1, 2)), rtol=1e-4)
    trained, evaluated = new.model(), new.model()
    evaluated.eval()
    assert not np.allclose(trained(images), evaluated(images))


def test_model_sizes_come_from_the_data_or_must_agree():
    """A 3-class data set gives the MLP a 3-way head (it was silently 10-way) and
    synthetic features its input width; a config size the data contradicts is refused."""
    from jaxtrain.config import load
    from jaxtrain.train.config import RunConfig
    from jaxtrain.train.run import data_and_model, model_kwargs

    def sizes(model, data):
        cfg = load(RunConfig, {"model": model, "data": data, "task": "classification",
                               "optimizer": "adam"})
        name, kwargs = data_and_model(cfg)[1:]
        net = build(name, 0, **kwargs)
        return net.layers[0].kernel.shape[0], net.head.kernel.shape[1]

    assert sizes({"name": "mlp"}, {"name": "digits", "classes": [0, 1, 2]}) == (64, 3)
    assert sizes({"name": "mlp", "in_features": [8, 8], "out_features": 3},
                 {"name": "digits", "classes": [3, 4, 5]}) == (64, 3)
    assert sizes({"name": "mlp"}, {"name": "synthetic_classification", "features": 5,
                                   "num_classes": 2, "n_train": 8, "n_valid": 4}) == (5, 2)
    assert model_kwargs("mlp", {}, {"targets": 2, "features": 3}) == {
        "out_features": 2, "in_features": 3}
    for name, kwargs, info, message in [
        ("mlp", {"out_features": 10}, {"num_classes": 3},
         "'model.out_features' is 10 but the data has 3 classes"),
        ("cnn", {"num_classes": 10}, {"num_classes": 3},
         "'model.num_classes' is 10 but the data has 3 classes"),
        ("mlp", {"in_features": [4, 4]}, {"features": 5},
         r"'model.in_features' is \[4, 4\] but the data has 5 features"),
        ("gpt", {"vocab_size": 100}, {"vocab_size": 256},
         "'model.vocab_size' is 100 .* at least 256"),
    ]:
        with pytest.raises(JaxtrainError, match=message):
            model_kwargs(name, kwargs, info)
    assert model_kwargs("gpt", {"vocab_size": 384}, {"vocab_size": 256}) == {
        "vocab_size": 384}
