"""The frontier optimizers against code nobody here wrote, step by step on the same
gradients for 60 steps: torch.optim.Muon, optax.contrib.muon / ademamix, and
`pytorch_optimizer` (SOAP, ScalableShampoo, Kron, MARS, AdEMAMix) used only as oracles.

Tolerances (max |param difference| after each step, params of size ~1 moving ~0.1-5):
float32 rounding order only (matmul/eigh/QR/solve in another library) gives 1e-6 to 3e-5;
we allow 1e-4 (SOAP, Shampoo, Kron, MARS, AdEMAMix, optax Muon). torch.optim.Muon runs its
Newton-Schulz iterations in bfloat16 (8 bits of mantissa) where ours are float32: there the
allowance is 2% of the distance moved, per step and at the end.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from optax.contrib import MuonDimensionNumbers as Dims
from pytorch_optimizer import MARS, SOAP, AdEMAMix, Kron, ScalableShampoo
from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

from jaxtrain import transforms as T
from jaxtrain.errors import JaxtrainError
from jaxtrain.transforms import kron as kron_module
from jaxtrain.transforms.orthogonal import dimension_rule
from jaxtrain.transforms.shampoo import merge_small_dims

STEPS = 60
TOL = 1e-4


def _problem(shapes, seed=0, steps=STEPS):
    rng = np.random.default_rng(seed)
    p0 = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
             for _ in range(steps)]
    return p0, grads


def _run_jax(tx, p0, grads):
    """Params after each step."""
    params = jax.tree.map(jnp.asarray, p0)
    state, update = tx.init(params), jax.jit(tx.update)
    out = []
    for g in grads:
        u, state = update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, u)
        out.append(jax.tree.map(np.asarray, params))
    return out


def _run_torch(make, p0, grads, before_step=None, to_torch=lambda k, a: a,
               from_torch=lambda k, a: a):
    names = sorted(p0)
    tp = {k: torch.nn.Parameter(torch.tensor(to_torch(k, p0[k]))) for k in names}
    opt = make([tp[k] for k in names])
    out = []
    for t, g in enumerate(grads):
        if before_step:
            before_step(t)
        for k in names:
            tp[k].grad = torch.tensor(to_torch(k, g[k]))
        opt.step()
        out.append({k: from_torch(k, tp[k].detach().numpy().copy()) for k in names})
    return out


def _max_error(a, b):
    return max(float(np.max(np.abs(x[k] - y[k]))) for x, y in zip(a, b, strict=True) for k in x)


def _moved(run, p0):
    return max(float(np.max(np.abs(run[-1][k] - p0[k]))) for k in p0)


def _assert_close(ours, theirs, p0, tol=TOL):
    err, moved = _max_error(ours, theirs), _moved(theirs, p0)
    assert moved > 0.05, f"the reference barely moved ({moved}): the test would prove nothing"
    assert err <= tol, f"max param difference {err:.2e} > {tol:.0e} (moved {moved:.2f})"


# -- SOAP -------------------------------------------------------------------------------
# Square / cubic leaves: a rank-deficient statistic has an arbitrary basis of its null
# space (any library's eigh may pick another), which would make the runs differ legitimately.
SOAP_SHAPES = {"a": (8, 8), "c": (4, 4, 4), "b": (8,)}


@pytest.mark.parametrize("precondition_1d", [False])
def test_soap_matches_pytorch_optimizer(precondition_1d):
    p0, grads = _problem(SOAP_SHAPES)
    ours = _run_jax(T.soap(3e-3, weight_decay=0.0, precondition_frequency=10,
                           precondition_1d=precondition_1d), p0, grads)
    theirs = _run_torch(lambda ps: SOAP(ps, lr=3e-3, betas=(0.95, 0.95), weight_decay=0.0,
                                        precondition_frequency=10,
                                        precondition_1d=precondition_1d), p0, grads)
    _assert_close(ours, theirs, p0)
    assert np.array_equal(ours[0]["a"], p0["a"])  # the first step only gathers statistics


def _cut(x, merged, block):
    """numpy: `x` reshaped to `merged` and cut into blocks of `block` along each axis."""
    x = x.reshape(merged)
    edges = [list(range(0, d, block)) + [d] for d in merged]
    corners = np.array(np.meshgrid(*[range(len(e) - 1) for e in edges], indexing="ij"))
    return [x[tuple(slice(e[i], e[i + 1]) for e, i in zip(edges, idx, strict=True))]
            for idx in corners.reshape(len(merged), -1).T]


def test_blocked_soap_is_the_authors_soap_on_each_block():
    """`block_size=4`: each leaf (dims merged up to 4, as Shampoo's) is cut into 4 x 4
    blocks, each a SOAP of its own: the reference runs `pytorch_optimizer.SOAP` on the
    blocks as separate params (square blocks: full-rank statistics from the first step)."""
    shapes, merged = {"a": (8, 12), "c": (2, 2, 8), "b": (12,)}, {"a": (8, 12),
                                                                  "c": (4, 8), "b": (12,)}
    p0, grads = _problem(shapes)
    ours = _run_jax(T.soap(3e-3, weight_decay=0.0, precondition_frequency=10, block_size=4),
                    p0, grads)
    cut = lambda tree: {f"{k}{i:02d}": b for k in shapes  # noqa: E731
                        for i, b in enumerate(_cut(tree[k], merged[k], 4))}
    theirs = _run_torch(lambda ps: SOAP(ps, lr=3e-3, betas=(0.95, 0.95), weight_decay=0.0,
                                        precondition_frequency=10),
                        cut(p0), [cut(g) for g in grads])
    ours = [cut(p) for p in ours]
    _assert_close(ours, theirs, cut(p0))
    whole = _run_jax(T.soap(3e-3, weight_decay=0.0, precondition_frequency=10), p0, grads)
    assert _max_error([cut(p) for p in whole], theirs) > 100 * TOL  # blocking is not a no-op


@pytest.mark.slow
def test_soap_weight_decay_differs_only_by_its_placement():
    """Ours decays theta before the step (AdamW); the authors' after: lr^2*wd*|u| apart."""
    p0, grads = _problem(SOAP_SHAPES)
    ours = _run_jax(T.soap(3e-3, weight_decay=0.1), p0, grads)
    theirs = _run_torch(lambda ps: SOAP(ps, lr=3e-3, weight_decay=0.1), p0, grads)
    no_decay = _run_jax(T.soap(3e-3, weight_decay=0.0), p0, grads)
    assert _max_error(ours, theirs) < 2e-4 < _max_error(no_decay, theirs)


# -- Shampoo ----------------------------------------------------------------------------
GRAFTS = {"sgd": LayerWiseGrafting.SGD, "adagrad": LayerWiseGrafting.ADAGRAD,
          "rmsprop": LayerWiseGrafting.RMSPROP, "sqrt_n": LayerWiseGrafting.SQRTN,
          "none": LayerWiseGrafting.NONE}


FAST_SHAMPOO = {("rmsprop", True), ("sgd", False)}  # the other 8 cases are marked slow


@pytest.mark.parametrize("graft,merge", [
    (g, m) if (g, m) in FAST_SHAMPOO else pytest.param(g, m, marks=pytest.mark.slow)
    for g in GRAFTS for m in (True, False)])
def test_shampoo_matches_pytorch_optimizer_scalable_shampoo(graft, merge):
    # Blocks of 4: (4, 10) -> blocks 4x4, 4x4, 4x2; (3, 4, 5) merges to (12, 5) and
    # (6, 6) is cut in 4+2 without merging. pytorch_optimizer's merge_small_dims prepends
    # a 1 when a leading dim exceeds the block (a port bug; Google's code does not), so
    # (6, 6) is compared only unmerged.
    shapes = {"a": (4, 10), "c": (3, 4, 5), "b": (3,)} | ({} if merge else {"d": (6, 6)})
    p0, grads = _problem(shapes)
    average = not merge  # momentum as a moving average, or summed (the port's default)
    ours = _run_jax(T.shampoo(1e-2, b1=0.9, b2=0.99, weight_decay=0.01, block_size=4,
                              graft=graft, precondition_every=3, start_preconditioning_step=5,
                              merge_dims=merge, moving_average_for_momentum=average),
                    p0, grads)
    theirs = _run_torch(
        lambda ps: ScalableShampoo(
            ps, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, decoupled_weight_decay=True,
            start_preconditioning_step=5, preconditioning_compute_steps=3, block_size=4,
            graft_type=GRAFTS[graft], use_svd=True, shape_interpretation=merge,
            moving_average_for_momentum=average),
        p0, grads)
    _assert_close(ours, theirs, p0)


def test_shampoo_merge_small_dims_is_googles():
    assert merge_small_dims([1, 2, 512, 1, 2048, 1, 3, 4], 1024) == [1024, 2048, 12]
    assert merge_small_dims([1, 2, 768, 1, 2048], 1024) == [2, 768, 2048]
    assert merge_small_dims([8, 6], 4) == [8, 6]


# -- PSGD Kron --------------------------------------------------------------------------
@pytest.mark.parametrize("update_prob,balance_every", [
    (None, 7), pytest.param(None, 1000, marks=pytest.mark.slow),
    pytest.param(0.3, 1000, marks=pytest.mark.slow)])
def test_psgd_kron_matches_pytorch_optimizer_kron(monkeypatch, update_prob, balance_every):
    """Both fed the same noise vectors (`kron_noise`); balancing leaves P = Q^T Q unchanged,
    so ours balancing every 7 updates still equals theirs never balancing."""
    shapes = {"a": (6, 10), "b": (5,), "c": (3, 4, 5), "d": (2, 3000)}  # d: one diagonal axis
    p0, grads = _problem(shapes)
    names, key = sorted(shapes), jax.random.key(0)
    queue = []

    class NoiseFromJax:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def randn_like(t, dtype=None):
            return queue.pop(0)

    import pytorch_optimizer.optimizer.psgd as psgd

    monkeypatch.setattr(psgd, "torch", NoiseFromJax())

    def feed(t):
        queue[:] = [torch.tensor(np.asarray(kron_module.kron_noise(key, t, i, shapes[k])))
                    for i, k in enumerate(names)]

    ours = _run_jax(T.psgd_kron(3e-3, b1=0.9, weight_decay=0.1, update_prob=update_prob,
                                balance_every=balance_every, max_size_triangular=2048), p0, grads)
    theirs = _run_torch(lambda ps: Kron(ps, lr=3e-3, momentum=0.9, weight_decay=0.1,
                                        balance_prob=0.0, max_size_triangular=2048,
                                        pre_conditioner_update_probability=update_prob),
                        p0, grads, before_step=feed)
    err = _max_error(ours, theirs)
    assert _moved(theirs, p0) > 0.05 and err <= 1e-5, err


# -- MARS -------------------------------------------------------------------------------
def test_mars_matches_pytorch_optimizer_mars():
    p0, grads = _problem({"w": (6, 5), "c": (2, 3, 4), "b": (5,)})
    ours = _run_jax(T.mars(1e-2, b1=0.95, b2=0.99, gamma=0.025, weight_decay=0.05,
                           adam_b1=0.9, adam_b2=0.95, adam_learning_rate=1e-3,
                           adam_weight_decay=0.1, eps_inside_correction=True), p0, grads)
    theirs = _run_torch(lambda ps: MARS(ps, lr=1e-2, betas=(0.95, 0.99), gamma=0.025,
                                        weight_decay=0.05, lr_1d=1e-3, betas_1d=(0.9, 0.95),
                                        weight_decay_1d=0.1), p0, grads)
    _assert_close(ours, theirs, p0)


def test_mars_gradient_correction_is_not_adamw():
    """With gamma = 0 and unit-norm-clipped gradients MARS is AdamW on c = g / max(1,|g|):
    the correction term is what makes the two differ."""
    p0, grads = _problem({"w": (6, 5)})
    small = [{"w": g["w"] * 0.01} for g in grads]
    plain = _run_jax(T.mars(3e-3, gamma=0.0, eps=1e-8), p0, small)
    adam = _run_jax(optax.adam(3e-3, b1=0.95, b2=0.99, eps=1e-8), p0, small)
    assert _max_error(plain, adam) < 1e-5
    assert _max_error(_run_jax(T.mars(3e-3, gamma=0.025), p0, small), adam) > 1e-4


# -- AdEMAMix ---------------------------------------------------------------------------
def test_ademamix_matches_optax_contrib_ademamix():
    p0, grads = _problem({"w": (6, 5), "b": (5,)})
    kw = dict(b1=0.9, b2=0.999, b3=0.999, alpha=5.0, eps=1e-8, weight_decay=0.01)
    _assert_close(_run_jax(T.ademamix(1e-2, **kw), p0, grads),
                  _run_jax(optax.contrib.ademamix(1e-2, **kw), p0, grads), p0, tol=1e-5)


def test_ademamix_warmups_match_pytorch_optimizer():
    p0, grads = _problem({"w": (6, 5), "b": (5,)})
    ours = _run_jax(T.ademamix(1e-2, b3=0.999, alpha=5.0, weight_decay=0.01,
                               alpha_warmup_steps=40, b3_warmup_steps=40), p0, grads)
    theirs = _run_torch(lambda ps: AdEMAMix(ps, lr=1e-2, betas=(0.9, 0.999, 0.999), alpha=5.0,
                                            t_alpha_beta3=40, weight_decay=0.01,
                                            weight_decouple=True), p0, grads)
    _assert_close(ours, theirs, p0)


# -- Muon -------------------------------------------------------------------------------
def test_muon_matches_optax_contrib_muon_with_stacked_and_conv_leaves():
    shapes = {"w": (8, 6), "stack": (3, 5, 7), "conv": (3, 3, 8, 16), "b": (6,),
              "embed": (10, 6)}
    p0, grads = _problem(shapes)
    ours = T.muon(0.02, beta=0.95, weight_decay=0.01, adam_weight_decay=0.01,
                  stacked_paths=("stack",))
    dims = {"w": Dims(0, 1), "stack": Dims(1, 2), "conv": Dims((0, 1, 2), 3), "b": None,
            "embed": None}
    theirs = optax.contrib.muon(0.02, beta=0.95, weight_decay=0.01, adam_weight_decay=0.01,
                                muon_weight_dimension_numbers=dims)
    _assert_close(_run_jax(ours, p0, grads), _run_jax(theirs, p0, grads), p0)


def _to_torch(k, a):
    return a.T.copy() if a.ndim == 2 else a  # torch weights are (out, in)


def test_muon_matches_torch_optim_muon():
    """`bias_correction=False` is torch's (Keller Jordan's) momentum; ours runs
    Newton-Schulz in float32, torch in bfloat16: within 2% of the distance moved."""
    p0, grads = _problem({"w": (16, 8), "v": (8, 24)})
    ours = _run_jax(T.muon(0.02, beta=0.95, weight_decay=0.1, bias_correction=False,
                           eps=1e-7), p0, grads)
    theirs = _run_torch(lambda ps: torch.optim.Muon(ps, lr=0.02, momentum=0.95,
                                                    weight_decay=0.1), p0, grads,
                        to_torch=_to_torch, from_torch=_to_torch)
    _assert_close(ours, theirs, p0, tol=0.02 * _moved(theirs, p0))
    corrected = _run_jax(T.muon(0.02, beta=0.95, weight_decay=0.1), p0, grads)
    # the option matters: Optax's bias correction moves the first steps away from torch's
    assert _max_error(corrected[:3], theirs[:3]) > 3 * _max_error(ours[:3], theirs[:3])


def test_muon_orthogonalizes_each_stacked_layer_as_torch_does_each_matrix():
    """A scanned stack (L, in, out) equals L separate torch.optim.Muon matrices."""
    p0, grads = _problem({"stack": (3, 8, 12)})
    ours = _run_jax(T.muon(0.02, bias_correction=False, eps=1e-7, stacked_paths="stack"),
                    p0, grads)
    split = lambda run: [{f"l{i}": r["stack"][i] for i in range(3)} for r in run]
    per_layer = _run_torch(lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.0),
                           {f"l{i}": p0["stack"][i] for i in range(3)},
                           [{f"l{i}": g["stack"][i] for i in range(3)} for g in grads],
                           to_torch=_to_torch, from_torch=_to_torch)
    moved = _moved(per_layer, {f"l{i}": p0["stack"][i] for i in range(3)})
    assert _max_error(split(ours), per_layer) < 0.02 * moved
    flat = _run_jax(T.muon(0.02, bias_correction=False, eps=1e-7), p0, grads)  # not stacked
    assert _max_error(split(flat), per_layer) > 0.05 * moved


@pytest.mark.parametrize("path,shape,expected", [
    ("blocks/mlp/up/kernel", (64, 256), ((0,), (1,))),
    ("blocks/attn/query/kernel", (128, 4, 32), ((0,), (1, 2))),
    ("blocks/attn/out/kernel", (4, 32, 128), ((0, 1), (2,))),
    ("backbone/conv2/kernel", (3, 3, 16, 32), ((0, 1, 2), (3,))),
    ("layers/mlp/kernel", (6, 64, 256), ((1,), (2,))),  # stacked
    ("embed/embedding", (256, 64), None),
    ("head/kernel", (64, 10), None),
    ("lm_head/kernel", (64, 256), None),
    ("norm/scale", (64,), None),
])
def test_muon_dimension_rule(path, shape, expected):
    dims = dimension_rule(path, shape, stacked_paths=("layers/*",))
    assert (None if dims is None else (dims.reduction_axis, dims.output_axis)) == expected


# -- all of them ------------------------------------------------------------------------
FACTORIES = {
    "ademamix": lambda lr: T.ademamix(lr),
    "mars": lambda lr: T.mars(lr),
    "muon": lambda lr: T.muon(lr),
    "soap": lambda lr: T.soap(lr),
    "shampoo": lambda lr: T.shampoo(lr, block_size=8),
    "psgd_kron": lambda lr: T.psgd_kron(lr),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_bfloat16_params_get_bfloat16_updates_from_float32_statistics(name):
    params = {"w": jnp.ones((12, 6), jnp.bfloat16), "b": jnp.zeros((6,), jnp.bfloat16)}
    grads = jax.tree.map(lambda p: (jax.random.normal(jax.random.key(1), p.shape) * 0.1)
                         .astype(jnp.bfloat16), params)
    tx = FACTORIES[name](1e-3)
    state = tx.init(params)
    for _ in range(3):
        updates, state = jax.jit(tx.update)(grads, state, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert all(bool(jnp.all(jnp.isfinite(u.astype(jnp.float32))))
               for u in jax.tree.leaves(updates))
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert float(T.current_hyperparams(state)["learning_rate"]) == pytest.approx(1e-3)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_traced_learning_rate_under_vmap(name):
    """A learning rate traced under vmap: one update per rate, in one compiled call."""
    params = {"w": jnp.ones((8, 6)), "b": jnp.zeros((6,))}
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), params)

    def one(lr):
        tx = FACTORIES[name](lr)
        return tx.update(grads, tx.init(params), params)[0]["w"]

    rates = jnp.array([1e-3, 2e-3])
    out = jax.vmap(one)(rates)
    if name == "soap":  # the first SOAP step moves nothing
        assert float(jnp.abs(out).max()) == 0.0
    else:
        np.testing.assert_allclose(out[1], 2 * out[0], rtol=1e-5)


@pytest.mark.parametrize("bad,arg", [
    (lambda: T.soap(-1.0), "learning_rate"),
    (lambda: T.soap(1e-3, b1=1.0), "b1"),
    (lambda: T.soap(1e-3, precondition_frequency=0), "precondition_frequency"),
    (lambda: T.shampoo(1e-3, graft="adam"), "graft"),
    (lambda: T.shampoo(1e-3, block_size=0), "block_size"),
    (lambda: T.psgd_kron(1e-3, memory_save_mode="some"), "memory_save_mode"),
    (lambda: T.psgd_kron(1e-3, update_prob=0.0), "update_prob"),
    (lambda: T.mars(1e-3, gamma=-1.0), "gamma"),
    (lambda: T.ademamix(1e-3, b3=1.5), "b3"),
    (lambda: T.muon(1e-3, ns_steps=0), "ns_steps"),
])
def test_bad_arguments_are_refused_naming_them(bad, arg):
    with pytest.raises(JaxtrainError, match=arg):
        bad()
