"""Initialisers from the config: each gives the variance its closed form states
(scale / fan_in, or 2 / (fan_in + fan_out) for Xavier), with the stated distribution,
in the MLP's dense kernels, the CNN's and ResNet's convolution kernels and the GPT's
attention and MLP projections (fans counted per projection); GPT-2's scaled init."""

import numpy as np
import pytest

from jaxtrain import JaxtrainError
from jaxtrain.config import load
from jaxtrain.models.init import DEFAULT, INITIALIZERS, gpt2_stds, variance
from jaxtrain.models.registry import build
from jaxtrain.train.config import RunConfig
from jaxtrain.train.run import model_kwargs

CLOSED_FORM = {  # written out here, not read from the module's table
    "lecun_normal": lambda i, o: 1 / i, "lecun_uniform": lambda i, o: 1 / i,
    "he_normal": lambda i, o: 2 / i, "he_uniform": lambda i, o: 2 / i,
    "xavier_normal": lambda i, o: 2 / (i + o), "xavier_uniform": lambda i, o: 2 / (i + o),
}


def _check(kernel: np.ndarray, name: str, fan_in: int, fan_out: int):
    expected = CLOSED_FORM[name](fan_in, fan_out)
    assert variance(name, fan_in, fan_out) == pytest.approx(expected)
    # >= 100k draws: the sample variance's relative standard error is <= 0.45%
    assert kernel.size >= 100_000
    assert kernel.var() == pytest.approx(expected, rel=0.02)
    assert abs(kernel.mean()) < 0.01 * expected ** 0.5
    bound = np.abs(kernel).max() / expected ** 0.5
    if name.endswith("uniform"):  # U(-a, a), a = sqrt(3 var)
        assert 3 ** 0.5 * 0.99 < bound <= 3 ** 0.5
    else:  # truncated at 2 sigma of the normal before rescaling (sigma = sd / 0.8796)
        assert 2 * 0.99 < bound * 0.87962566 <= 2 + 1e-6


@pytest.mark.parametrize("name", sorted(CLOSED_FORM))
def test_mlp_kernels_have_the_documented_variance(name):
    model = build("mlp", 0, in_features=512, hidden=[1024], out_features=1024, init=name)
    _check(np.asarray(model.layers[0].kernel[...]), name, 512, 1024)
    _check(np.asarray(model.head.kernel[...]), name, 1024, 1024)
    assert not np.asarray(model.layers[0].bias[...]).any()


@pytest.mark.parametrize("name", ["he_uniform", "xavier_normal"])
def test_cnn_conv_kernels_count_the_receptive_field(name):
    model = build("cnn", 0, channels=128, features=16, init=name)
    kernel = np.asarray(model.backbone.conv2.kernel[...])  # (3, 3, 128, 256)
    _check(kernel, name, 9 * 128, 9 * 256)


@pytest.mark.parametrize("name", ["he_normal", "xavier_uniform"])
def test_gpt_projections_count_their_own_fans(name):
    """q/k/v (embed, heads, kv): fan-in embed, fan-out heads x kv; out (heads, kv, embed)
    the reverse (JAX's default counting would take heads as a receptive field)."""
    d, heads, hidden, vocab = 256, 4, 1024, 512
    model = build("gpt", 0, vocab_size=vocab, d_model=d, num_layers=2, num_heads=heads,
                  max_len=8, tie_embeddings=False, init=name)
    blocks = list(model.blocks)
    kernel = lambda *ks: np.concatenate([np.asarray(k[...]).ravel() for k in ks])
    _check(kernel(*[k for b in blocks for k in (b.attn.query.kernel, b.attn.key.kernel,
                                                b.attn.value.kernel)]), name, d, d)
    _check(kernel(*[b.attn.out.kernel for b in blocks]), name, d, d)
    _check(kernel(blocks[0].mlp.up.kernel), name, d, hidden)
    _check(kernel(blocks[0].mlp.down.kernel), name, hidden, d)
    _check(kernel(model.lm_head.kernel), name, d, vocab)
    assert np.asarray(model.embed.embedding[...]).std() == pytest.approx(0.02, rel=0.02)
    with pytest.raises(JaxtrainError, match="GPT init='kaiming': valid are gpt2, lecun"):
        build("gpt", 0, vocab_size=8, d_model=8, num_layers=1, num_heads=2, init="kaiming")


def test_resnet_init_names_every_kernel():
    model = build("resnet", 0, width=64, stage_sizes=[1, 1], init="he_uniform")
    _check(np.asarray(model.stages[1][0].conv2.kernel[...]), "he_uniform", 9 * 128,
           9 * 128)  # (3, 3, 128, 128)
    head = np.abs(np.asarray(model.head.kernel[...]))  # (128, 10): U(-a, a), a^2 = 6/128
    assert 0.9 * (6 / 128) ** 0.5 < head.max() <= (6 / 128) ** 0.5
    with pytest.raises(JaxtrainError, match="unknown init 'kaiming'"):
        build("resnet", 0, width=4, stage_sizes=[1], init="kaiming")


def test_default_is_lecun_normal_and_unchanged():
    """Default models draw exactly what Flax's lecun_normal drew before this option."""
    from flax import nnx

    assert DEFAULT == "lecun_normal" and set(INITIALIZERS) == set(CLOSED_FORM)
    model = build("mlp", 3, in_features=8, hidden=[4], out_features=2)
    reference = nnx.Linear(8, 4, rngs=nnx.Rngs(3))  # Flax's own default init
    np.testing.assert_array_equal(model.layers[0].kernel[...], reference.kernel[...])


def test_gpt2_residual_init():
    """Residual projections N(0, (0.02 / sqrt(2 L))^2), the others N(0, 0.02^2)."""
    std, residual = gpt2_stds(12)
    assert std == 0.02 and residual == pytest.approx(0.02 / np.sqrt(24))
    model = build("gpt", 0, vocab_size=64, d_model=256, num_layers=8, num_heads=4,
                  max_len=16)
    flat = lambda kernels: np.concatenate([np.asarray(k[...]).ravel() for k in kernels])
    blocks = list(model.blocks)
    into_residual = flat([b.mlp.down.kernel for b in blocks] + [b.attn.out.kernel
                                                                for b in blocks])
    others = flat([b.mlp.up.kernel for b in blocks] + [b.attn.query.kernel for b in blocks])
    assert into_residual.std() == pytest.approx(0.02 / np.sqrt(16), rel=0.02)
    assert others.std() == pytest.approx(0.02, rel=0.02)


def test_init_from_the_config_and_bad_names():
    cfg = load(RunConfig, {"model": {"name": "mlp", "init": "he_uniform"}, "data": "digits",
                        "task": "classification", "optimizer": "adam"})
    assert model_kwargs("mlp", {"init": "he_uniform"}, {})["init"] == "he_uniform"
    assert cfg.model["init"] == "he_uniform"
    with pytest.raises(JaxtrainError, match="unknown init 'kaiming'.*he_normal"):
        build("mlp", 0, init="kaiming")
