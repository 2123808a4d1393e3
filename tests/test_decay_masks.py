"""Weight decay rules against torch.optim, and masks on plain trees and Flax NNX state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from jaxtrain import transforms as T
from jaxtrain.errors import JaxtrainError
from jaxtrain.transforms import masks


def _w0():
    return np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)


def _grads(n):
    rng = np.random.default_rng(2)
    return [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(n)]


def _ours(tx, n=30):
    p = jnp.asarray(_w0())
    state = tx.init(p)
    for g in _grads(n):
        u, state = tx.update(jnp.asarray(g), state, p)
        p = optax.apply_updates(p, u)
    return np.asarray(p)


def _torch(make_opt, n=30, extra_grad=None, scheduler=None):
    w = torch.nn.Parameter(torch.tensor(_w0()))
    opt = make_opt([w])
    sched = scheduler(opt) if scheduler else None
    for g in _grads(n):
        w.grad = torch.tensor(g)
        if extra_grad:
            w.grad += extra_grad(w.detach())
        opt.step()
        if sched:
            sched.step()
    return w.detach().numpy()


def test_l2_is_torch_sgd_and_adam_weight_decay():
    ours = _ours(optax.chain(T.add_l2(0.1), T.sgd(0.05, momentum=0.9)))
    theirs = _torch(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    ours = _ours(optax.chain(T.add_l2(0.3), T.adam(0.02)))
    theirs = _torch(lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.3))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_decoupled_is_torch_adamw_with_a_schedule():
    sched = T.schedules.step_decay(0.05, 10, 0.5)
    ours = _ours(optax.chain(T.adam(sched), T.add_decoupled_weight_decay(0.2, sched)))
    theirs = _torch(lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.2),
                    scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 10, 0.5))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_l1_is_the_gradient_of_an_abs_penalty():
    ours = _ours(optax.chain(T.add_l1(0.05), T.sgd(0.1)))
    theirs = _torch(lambda p: torch.optim.SGD(p, lr=0.1),
                    extra_grad=lambda w: 0.05 * torch.sign(w))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


class Net(nnx.Module):
    def __init__(self, rngs):
        nonzero = nnx.initializers.constant(0.5)  # so that decaying a bias would show
        self.backbone = nnx.Linear(4, 8, bias_init=nonzero, rngs=rngs)
        self.norm = nnx.LayerNorm(8, bias_init=nonzero, rngs=rngs)
        self.head = nnx.Linear(8, 2, bias_init=nonzero, rngs=rngs)

    def __call__(self, x):
        return self.head(self.norm(self.backbone(x)))


DECAYED = {"backbone/kernel", "head/kernel"}


def _flat_paths(mask_tree):
    leaves = jax.tree_util.tree_flatten_with_path(masks.param_paths(mask_tree))[0]
    flags = jax.tree.leaves(mask_tree)
    return {path for (_, path), flag in zip(leaves, flags, strict=True) if flag}


@pytest.mark.parametrize("mask", [masks.exclude("*/bias", "*/scale"), masks.ndim_at_least(2),
                                  masks.include("re:.*/kernel")])
@pytest.mark.parametrize("form", ["state", "pure_dict"])
def test_masks_select_kernels_of_a_flax_nnx_model(mask, form):
    state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    tree = state if form == "state" else nnx.to_pure_dict(state)
    assert _flat_paths(mask(tree)) == DECAYED


def test_mask_combinators():
    tree = nnx.to_pure_dict(nnx.state(Net(nnx.Rngs(0)), nnx.Param))
    m = masks.ndim_at_least(2) & masks.exclude("head/*")
    assert _flat_paths(m(tree)) == {"backbone/kernel"}
    assert _flat_paths((~m)(tree)) == {"backbone/bias", "norm/bias", "norm/scale",
                                       "head/bias", "head/kernel"}
    assert _flat_paths((m | masks.include("norm/scale"))(tree)) == {"backbone/kernel",
                                                                    "norm/scale"}


@pytest.mark.parametrize("rule", [lambda m: T.add_l2(0.5, mask=m),
                                  lambda m: T.add_l1(0.5, mask=m),
                                  lambda m: T.add_decoupled_weight_decay(0.5, 0.1, mask=m)])
def test_decay_through_nnx_optimizer_moves_only_masked_params(rule):
    model = Net(nnx.Rngs(0))
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = optax.chain(rule(masks.exclude("*/bias", "*/scale")), optax.sgd(0.1))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    zero = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    opt.update(model, zero)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    changed = {p for p, a, b in zip(T.path_list(before), jax.tree.leaves(before),
                                    jax.tree.leaves(after), strict=True)
               if not np.array_equal(a, b)}
    assert changed == DECAYED


@pytest.mark.parametrize("call", [lambda: T.add_l2(-0.1), lambda: T.add_l1(float("nan")),
                                  lambda: T.add_decoupled_weight_decay("0.1")])
def test_bad_weight_decay_is_refused(call):
    with pytest.raises(JaxtrainError, match="weight_decay"):
        call()


def test_mask_needs_patterns():
    with pytest.raises(JaxtrainError, match="pattern"):
        masks.exclude()
