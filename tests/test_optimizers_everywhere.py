"""Every optimizer (first-order, and the preconditioned SOAP, Shampoo, PSGD-Kron) works
everywhere the library goes: it trains the digits classifier under jit, runs under vmap over
an array of learning rates, keeps its state sharded like params over 8 devices, and its
state round-trips through Orbax. Bad input is
refused at construction or init, naming the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtrain import transforms as T
from jaxtrain.data import digits_split
from jaxtrain.errors import JaxtrainError

# name -> (factory of the learning rate, learning rate that trains the MLP in STEPS steps)
OPTIMIZERS = {
    "sgd": (lambda lr: T.sgd(lr, momentum=0.9), 0.3),
    "sgd_nesterov": (lambda lr: T.sgd(lr, momentum=0.9, nesterov=True), 0.3),
    "ema_momentum": (lambda lr: T.ema_momentum(lr, beta=0.9), 1.5),
    "adagrad": (lambda lr: T.adagrad(lr), 0.15),
    "adadelta": (lambda lr: T.adadelta(lr), 10.0),
    "rmsprop": (lambda lr: T.rmsprop(lr, centered=True, momentum=0.5), 0.003),
    "adam": (lambda lr: T.adam(lr), 0.03),
    "adamw": (lambda lr: T.adamw(lr, weight_decay=0.01), 0.03),
    "adamax": (lambda lr: T.adamax(lr), 0.02),
    "amsgrad": (lambda lr: T.amsgrad(lr, max_of="raw"), 0.03),
    "nadam": (lambda lr: T.nadam(lr, momentum_decay=4e-3), 0.01),
    "nadamw": (lambda lr: T.nadamw(lr), 0.01),
    "radam": (lambda lr: T.radam(lr), 0.05),
    "normalized_sgd": (lambda lr: T.normalized_sgd(beta=0.01, eps=0.01, learning_rate=lr), 1.0),
    "lion": (lambda lr: T.lion(lr), 0.005),
    "lamb": (lambda lr: T.lamb(lr), 0.06),
    "lars": (lambda lr: T.lars(lr, trust_coefficient=0.02), 0.3),
    "adafactor": (lambda lr: T.adafactor(lr, min_dim_size_to_factor=8), 0.05),
    "muon": (lambda lr: T.muon(lr), 0.06),
    "schedule_free_adamw": (lambda lr: T.schedule_free_adamw(lr), 0.03),
    "soap": (lambda lr: T.soap(lr), 0.03),
    "shampoo": (lambda lr: T.shampoo(lr), 0.03),
    "psgd_kron": (lambda lr: T.psgd_kron(lr), 0.03),
    "ademamix": (lambda lr: T.ademamix(lr), 0.03),
    "mars": (lambda lr: T.mars(lr), 0.03),
}
STEPS = 60
ACCURACY = 0.85
# Run by default; the rest are marked slow (they still run in CI) to keep the suite short.
FAST = ("sgd", "adam", "adamw", "muon", "adafactor", "schedule_free_adamw", "lion")
# Optimizer state leaves shaped like a param, over the 4 params of `_mlp_init`: moments
# per param (sgd/lion/lars: 1, adam family: 2, amsgrad and centered rmsprop with momentum:
# 3); adafactor factors the 2 kernels (rows and columns, not param-shaped) and keeps the 2
# biases whole; muon: a momentum for each kernel, Adam's 2 moments for each bias;
# normalized_sgd keeps no per-param state; soap: 2 moments (in the rotated basis, param-shaped);
# shampoo: momentum and the grafting moments (3); psgd_kron: a momentum (its Kronecker factors
# are not param-shaped); ademamix: fast and slow EMAs and the second moment; mars: 3 for each
# kernel (moments and the previous gradient), Adam's 2 for each bias.
PARAM_SLOTS = {"sgd": 4, "sgd_nesterov": 4, "ema_momentum": 4, "adagrad": 4, "adadelta": 8,
               "rmsprop": 12, "adam": 8, "adamw": 8, "adamax": 8, "amsgrad": 12, "nadam": 8,
               "nadamw": 8, "radam": 8, "normalized_sgd": 0, "lion": 4, "lamb": 8, "lars": 4,
               "adafactor": 2, "muon": 6, "schedule_free_adamw": 8, "soap": 8, "shampoo": 12,
               "psgd_kron": 4, "ademamix": 12, "mars": 10}
NAMES = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in OPTIMIZERS]


@pytest.fixture(scope="module")
def digits():
    train, test = digits_split()
    flat = lambda d: (jnp.asarray(d["image"].reshape(len(d["label"]), -1)), d["label"])  # noqa: E731
    return flat(train), flat(test)


def _mlp_init(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "hidden": {"kernel": jax.random.normal(k1, (64, 32)) / 8.0, "bias": jnp.zeros(32)},
        "out": {"kernel": jax.random.normal(k2, (32, 10)) / jnp.sqrt(32.0), "bias": jnp.zeros(10)},
    }


def _logits(params, x):
    h = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return h @ params["out"]["kernel"] + params["out"]["bias"]


def _loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(_logits(params, x), y).mean()


def _train(tx, params, x, y, steps):
    """Full-batch training for `steps` steps in one jitted scan."""

    def step(carry, _):
        params, state = carry
        grads = jax.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(step, (params, tx.init(params)), length=steps)
    return params, state


@pytest.mark.parametrize("name", NAMES)
def test_trains_digits_classifier(name, digits):
    make, lr = OPTIMIZERS[name]
    tx = make(lr)
    (x, y), (xt, yt) = digits
    params, state = jax.jit(lambda p: _train(tx, p, x, y, STEPS))(_mlp_init())
    if name == "schedule_free_adamw":
        params = T.schedule_free_eval_params(state, params)
    accuracy = float(jnp.mean(jnp.argmax(_logits(params, xt), -1) == yt))
    assert accuracy >= ACCURACY, f"{name}: held-out accuracy {accuracy:.3f} < {ACCURACY}"
    assert float(T.current_hyperparams(state)["learning_rate"]) == pytest.approx(lr)


def _grads(seed):
    keys = iter(jax.random.split(jax.random.key(seed), 4))
    return jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), _mlp_init())


@pytest.fixture(scope="module")
def mesh(devices):
    return Mesh(np.array(devices), ("fsdp",), axis_types=(AxisType.Auto,))


def _shard(tree, mesh):
    spec = lambda p: P("fsdp") if p.shape[0] % 8 == 0 else P()  # noqa: E731
    return jax.tree.map(lambda p: jax.device_put(p, NamedSharding(mesh, spec(p))), tree)


def _assert_state_sharded_like_params(state, params) -> int:
    """Every state leaf that mirrors a param (same path suffix and shape) has its sharding."""
    by_path = {T.path_str(kp): p for kp, p in jax.tree_util.tree_flatten_with_path(params)[0]}
    checked = 0
    for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        path = T.path_str(kp)
        for ppath, p in by_path.items():
            if path.endswith(ppath) and leaf.shape == p.shape:
                assert leaf.sharding.is_equivalent_to(p.sharding, leaf.ndim), path
                checked += 1
    return checked


def _equal(a, b):
    """Arrays equal; typed PRNG keys (psgd_kron's state) compared by their key data."""
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(a, b)


def _close(a, b, tol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


@pytest.mark.parametrize("name", NAMES)
def test_jit_vmap_sharding_orbax(name, mesh, tmp_path):
    """One optimizer, everywhere: the jitted step on one device is the reference for the
    step on sharded params, for a vmapped batch of learning rates, and after an Orbax
    round trip of the state."""
    make, lr = OPTIMIZERS[name]
    tx = make(lr)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step)
    p0, g1, g2 = _mlp_init(), _grads(1), _grads(2)
    p1, s1 = step(p0, tx.init(p0), g1)
    p2, _ = step(p1, s1, g2)

    # Sharded over 8 devices: the state is created and stays sharded like the params.
    sp0 = _shard(p0, mesh)
    s0 = tx.init(sp0)
    checked = _assert_state_sharded_like_params(s0, sp0)
    assert checked == PARAM_SLOTS[name], (name, checked)
    sp1, ss1 = step(sp0, s0, _shard(g1, mesh))
    _assert_state_sharded_like_params(ss1, sp0)
    _close(sp1, p1)

    # vmap over an array of learning rates: lr 0 stands still, lr equals the scalar run.
    def from_rate(rate):
        tx_r = make(rate)
        updates, _ = tx_r.update(g1, tx_r.init(p0), p0)
        return optax.apply_updates(p0, updates)

    batched = jax.jit(jax.vmap(from_rate))(jnp.array([0.0, lr]))
    _close(jax.tree.map(lambda b: b[0], batched), p0)
    _close(jax.tree.map(lambda b: b[1], batched), p1, tol=1e-5)

    # Orbax: the restored state has the same structure and continues identically.
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", s1)
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "state", jax.eval_shape(lambda: s1))
    assert jax.tree.structure(restored) == jax.tree.structure(s1)
    jax.tree.map(_equal, restored, s1)
    jax.tree.map(np.testing.assert_array_equal, step(p1, restored, g2)[0], p2)


# --- bad input -------------------------------------------------------------------------
BAD = [
    (lambda: T.sgd(-0.1), "learning_rate"),
    (lambda: T.adam(float("nan")), "learning_rate"),
    (lambda: T.adamw(jnp.array([0.1, -0.1])), "learning_rate"),
    (lambda: T.lion(1e-3, b1=1.0), "b1"),
    (lambda: T.lamb(1e-3, b2=-0.1), "b2"),
    (lambda: T.nadam(1e-3, b2=1.5), "b2"),
    (lambda: T.radam(1e-3, b1=float("nan")), "b1"),
    (lambda: T.rmsprop(1e-3, decay=1.0), "decay"),
    (lambda: T.adadelta(rho=1.0), "rho"),
    (lambda: T.muon(1e-3, beta=1.0), "beta"),
    (lambda: T.ema_momentum(0.1, beta=-0.5), "beta"),
    (lambda: T.adagrad(0.1, eps=-1.0), "eps"),
    (lambda: T.normalized_sgd(beta=0.1, eps=0.0), "eps"),
    (lambda: T.amsgrad(0.1, max_of="torch"), "max_of"),
]


@pytest.mark.parametrize("make,arg", BAD)
def test_bad_hyperparameters_are_refused_by_name(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


@pytest.mark.parametrize("make", [T.adamw, T.nadamw, T.lion, T.lamb, T.lars])
def test_mask_not_matching_params_is_refused_at_init(make):
    wrong = {"hidden": {"kernel": True}, "out": True}
    with pytest.raises(JaxtrainError, match="mask"):
        make(0.01, mask=wrong).init(_mlp_init())
    right = {"hidden": {"kernel": True, "bias": False}, "out": True}
    make(0.01, mask=right).init(_mlp_init())
    make(0.01, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)).init(_mlp_init())


def test_mask_selects_what_decays():
    mask = {"hidden": {"kernel": True, "bias": False}, "out": False}
    tx = T.adamw(0.1, weight_decay=0.5, mask=mask)
    params = _mlp_init()
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["hidden"]["kernel"], -0.05 * params["hidden"]["kernel"])
    np.testing.assert_array_equal(updates["out"]["kernel"], 0.0)
