"""LoRA adapters on Linear and attention kernels: the closed form, merge == adapted
forward, only adapters trained, dropout only in training, bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain.errors import JaxtrainError
from jaxtrain.finetune import lora_optimizer
from jaxtrain.models.lora import LoRA, apply_lora, merge_lora
from jaxtrain.transforms import path_list


class Tiny(nnx.Module):
    """Self-attention then a Linear head: Linear and LinearGeneral kernels to adapt."""

    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                                           decode=False, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.attn(x).mean(axis=1))


def _randomise_b(model, seed=0):
    """Non-zero `lora_b`s, as after some training."""
    key = jax.random.PRNGKey(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LoRA):
            key, sub = jax.random.split(key)
            m.lora_b[...] = 0.3 * jax.random.normal(sub, m.lora_b.shape)


def test_linear_matches_the_closed_form():
    base = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    w, b = np.asarray(base.kernel[...]), np.asarray(base.bias[...])
    layer = LoRA(base, rank=2, alpha=8.0, rngs=nnx.Rngs(1))
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    np.testing.assert_array_equal(layer(x), base(x))  # B starts at zero
    _randomise_b(layer)
    a, bb = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    want = x @ (w + (8.0 / 2) * a @ bb) + b
    np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)


def test_attention_and_linear_merge_equals_adapted_forward():
    model = Tiny(nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 8))
    before = model(x)
    paths_before = path_list(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    wrapped = apply_lora(model, ["attn/*", "head"], rank=2, alpha=4.0, rngs=nnx.Rngs(2))
    assert wrapped == ["attn/key", "attn/out", "attn/query", "attn/value", "head"]
    assert model.attn.query.lora_a.shape == (8, 2) and model.attn.query.lora_b.shape == (2, 8)
    assert model.attn.out.lora_a.shape == (8, 2)  # (heads, head_dim) flattened
    np.testing.assert_allclose(model(x), before, atol=1e-6)
    _randomise_b(model)
    adapted = model(x)
    assert not np.allclose(adapted, before, atol=1e-3)
    merge_lora(model)
    np.testing.assert_allclose(model(x), adapted, rtol=1e-5, atol=1e-5)
    assert path_list(nnx.to_pure_dict(nnx.state(model, nnx.Param))) == paths_before


def test_only_adapters_are_trained_and_the_loss_falls():
    model = Tiny(nnx.Rngs(0))
    apply_lora(model, ["attn/query", "attn/value", "head"], rank=4, rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    tx = lora_optimizer(optax.adam(1e-2))
    opt_state = tx.init(params)
    x = jax.random.normal(jax.random.PRNGKey(3), (16, 5, 8))
    y = jax.random.normal(jax.random.PRNGKey(4), (16, 3))

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        return jnp.mean((m(x) - y) ** 2)

    @jax.jit
    def step(params, opt_state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    start = params
    losses = []
    for _ in range(30):
        params, opt_state, value = step(params, opt_state)
        losses.append(float(value))
    assert losses[-1] < 0.8 * losses[0]
    flat0 = dict(zip(path_list(start), jax.tree.leaves(start), strict=True))
    flat1 = dict(zip(path_list(params), jax.tree.leaves(params), strict=True))
    for path in flat0:
        if path.endswith(("lora_a", "lora_b")):
            assert not np.array_equal(flat0[path], flat1[path]), path
        else:
            np.testing.assert_array_equal(flat0[path], flat1[path], err_msg=path)


def test_dropout_acts_in_training_only():
    base = nnx.Linear(16, 4, rngs=nnx.Rngs(0))
    layer = LoRA(base, rank=2, dropout=0.5, rngs=nnx.Rngs(1))
    _randomise_b(layer)
    x = jnp.ones((3, 16))
    train_out = layer(x)
    layer.eval()
    eval_out = layer(x)
    assert not np.allclose(train_out, eval_out)
    merged = layer.merged()
    np.testing.assert_allclose(merged(x), eval_out, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_named():
    base = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    with pytest.raises(JaxtrainError, match="rank must be a positive integer, got 0"):
        LoRA(base, rank=0, rngs=nnx.Rngs(0))
    with pytest.raises(JaxtrainError, match="dropout must be in"):
        LoRA(base, rank=1, dropout=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(JaxtrainError, match="no Linear layer matches.*layers: attn/key"):
        apply_lora(Tiny(nnx.Rngs(0)), "decoder/*", rank=2, rngs=nnx.Rngs(0))


def test_gpt_attention_einsum_kernels_merge_equals_adapted_forward():
    from jaxtrain.models import GPT

    with nnx.use_eager_sharding(False):
        model = GPT(vocab_size=32, d_model=16, num_layers=2, num_heads=2, max_len=8,
                    rngs=nnx.Rngs(0))
    tokens = jnp.arange(16).reshape(2, 8) % 32
    before = model(tokens)
    wrapped = apply_lora(model, ["*attn/*", "*mlp/up"], rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    assert wrapped[:5] == ["blocks/0/attn/key", "blocks/0/attn/out", "blocks/0/attn/query",
                           "blocks/0/attn/value", "blocks/0/mlp/up"]
    assert model.blocks[0].attn.query.lora_a.shape == (16, 2)   # d -> (heads, head_dim)
    assert model.blocks[0].attn.out.lora_a.shape == (16, 2)     # (heads, head_dim) -> d
    np.testing.assert_allclose(model(tokens), before, atol=1e-6)
    _randomise_b(model)
    adapted = model(tokens)
    assert not np.allclose(adapted, before, atol=1e-3)
    merge_lora(model)
    np.testing.assert_allclose(model(tokens), adapted, rtol=1e-5, atol=1e-5)


def test_einsum_of_another_form_is_refused():
    odd = nnx.Einsum("btd,hd->bth", (4, 8), rngs=nnx.Rngs(0))
    with pytest.raises(JaxtrainError, match="contracts the input's last axes"):
        LoRA(odd, rank=2, rngs=nnx.Rngs(0))


def test_stacked_gpt_adapters_equal_the_unrolled_ones_and_merge():
    """On a scanned GPT (`scan_layers`) each stacked kernel gets one adapter per layer:
    with the adapters copied across layouts (`unstack_layers`), the stacked model's
    output and adapter gradients equal the unrolled model's (itself checked against the
    closed form above); merged equals adapted; dropout draws new keys in each layer in
    training and nothing in eval mode (no state mutated: a closed-over model traces)."""
    from jaxtrain.checkpoint.layout import unstack_layers
    from jaxtrain.models.registry import build

    kw = dict(vocab_size=32, d_model=16, num_layers=2, num_heads=2, max_len=8)
    stacked, unrolled = build("gpt", 0, scan_layers=True, **kw), build("gpt", 0, **kw)
    tokens = jnp.arange(16).reshape(2, 8) % 32
    paths_before = path_list(nnx.to_pure_dict(nnx.state(stacked, nnx.Param)))
    wrapped = apply_lora(stacked, ["blocks/attn/*", "blocks/mlp/up"], rank=2, alpha=4.0,
                         dropout=0.5, rngs=nnx.Rngs(1))
    assert wrapped == ["blocks/attn/key", "blocks/attn/out", "blocks/attn/query",
                       "blocks/attn/value", "blocks/mlp/up"]
    apply_lora(unrolled, ["blocks/*/attn/*", "blocks/*/mlp/up"], rank=2, alpha=4.0,
               dropout=0.5, rngs=nnx.Rngs(1))
    assert stacked.blocks.attn.query.lora_a.shape == (2, 16, 2)  # (layers, d, rank)
    assert stacked.blocks.attn.out.lora_b.shape == (2, 2, 16)    # (layers, rank, d)
    _randomise_b(stacked)
    params = nnx.to_pure_dict(nnx.state(stacked, nnx.Param))
    state = nnx.state(unrolled, nnx.Param)
    nnx.replace_by_pure_dict(state, unstack_layers(params))
    nnx.update(unrolled, state)
    stacked.eval()
    unrolled.eval()

    def loss_and_grads(model):
        graphdef, p, rest = nnx.split(model, nnx.Param, ...)
        def f(p):
            logits = nnx.merge(graphdef, p, rest)(tokens)
            return logits.astype(jnp.float32).std(), logits

        return jax.jit(jax.value_and_grad(f, has_aux=True))(nnx.to_pure_dict(p))

    (_, adapted), grads = loss_and_grads(stacked)
    (_, want_logits), want_grads = loss_and_grads(unrolled)
    np.testing.assert_allclose(adapted, want_logits, rtol=1e-5, atol=1e-5)
    lora_grads = lambda g: {p: x for p, x in zip(path_list(g), jax.tree.leaves(g),
                                                 strict=True) if "lora" in p}
    got, want = lora_grads(unstack_layers(grads)), lora_grads(want_grads)
    assert len(got) == 20 and got.keys() == want.keys()  # 5 adapters x 2 layers x (a, b)
    for path in got:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-4, atol=1e-6,
                                   err_msg=path)
    stacked.train()
    first, second = stacked(tokens), stacked(tokens)
    assert int(stacked.blocks.mlp.up.dropout.rngs.count[...]) == 4  # 2 calls x 2 layers
    assert not np.allclose(first, second) and not np.allclose(first, adapted)
    stacked.eval()
    merge_lora(stacked)
    np.testing.assert_allclose(stacked(tokens), adapted, rtol=1e-5, atol=1e-5)
    assert path_list(nnx.to_pure_dict(nnx.state(stacked, nnx.Param))) == paths_before
