"""The torch twins of benchmarks/torch_twins.py compute what jaxtrain's CNN and GPT compute
once the Flax params are mapped onto them (benchmarks/vs_torch_train.py compares training
speed on that premise): the same logits from the same params on a tiny model of each."""

import sys
from pathlib import Path

import jax
import numpy as np
import torch
from flax import nnx

from jaxtrain.models import registry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
try:
    from torch_twins import TorchCNN, TorchGPT, cnn_state_dict, gpt_state_dict, load_params
finally:
    sys.path.pop(0)


@nnx.jit
def _apply(model, x):  # one compile instead of an eager dispatch per op
    return model(x)


def _params(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_mapped_params_give_the_same_logits():
    rng = np.random.default_rng(0)
    cnn = registry.build("cnn", 0, num_classes=10, channels=4, features=8)
    images = rng.standard_normal((3, 8, 8)).astype(np.float32)
    twin = load_params(TorchCNN(10, 4, 8), cnn_state_dict(_params(cnn)))
    with torch.no_grad():
        theirs = twin(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(theirs, np.asarray(_apply(cnn, images)), atol=2e-5, rtol=1e-4)

    # He-normal projections: attention far from uniform, so a q/k/v mix-up would show
    gpt = registry.build("gpt", 0, vocab_size=32, d_model=16, num_layers=2, num_heads=2,
                         max_len=8, init="he_normal")
    tokens = rng.integers(0, 32, (2, 8)).astype(np.int32)
    twin = load_params(TorchGPT(32, 16, 2, 2), gpt_state_dict(_params(gpt)))
    with torch.no_grad():
        theirs = twin(torch.from_numpy(tokens).long()).numpy()
    ours = np.asarray(_apply(gpt, tokens))
    np.testing.assert_allclose(theirs, ours, atol=2e-5, rtol=1e-4)
    assert np.std(ours) > 1e-3  # logits that carry the weights, not a near-constant
