"""Adam's moments in bfloat16 (stochastic rounding) and 8 bits (blockwise, bitsandbytes'
scheme): against bitsandbytes (a test oracle), closed forms and float32 Adam."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import transforms
from jaxtrain.errors import JaxtrainError
from jaxtrain.transforms import compact_state as C
from jaxtrain.transforms.spec import build


@pytest.fixture(scope="module")
def bnb_exact():
    """bitsandbytes with its reference (pure torch, nearest-entry) blockwise quantizer in
    place of its CPU C kernel for the duration of the module. The C kernel's binary search
    is approximate: it stores unsigned values below ~1e-5 of the block's absmax as map
    entry 7 (1.6e-5) instead of the nearest, 0 (measured, bitsandbytes 0.50.2)."""
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    lib = torch.library.Library("bitsandbytes", "IMPL")
    lib.impl("quantize_blockwise", lambda a, code, size: op.redispatch(keys, a, code, size),
             "CPU")
    yield torch, bnb
    lib._destroy()


def test_dynamic_maps_are_bitsandbytes_maps(bnb_exact):
    torch, bnb = bnb_exact
    for signed in (True, False):
        theirs = bnb.functional.create_dynamic_map(signed=signed).numpy()
        np.testing.assert_allclose(C.dynamic_map(signed), theirs, rtol=2e-7, atol=0)


def test_blockwise_round_trip_is_bitsandbytes_and_within_half_a_map_gap(bnb_exact):
    torch, bnb = bnb_exact
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(3000) * np.exp(rng.uniform(-12, 0, 3000))).astype(np.float32)
    x[:256] = 0.0  # an all-zero block
    for signed, values in ((True, x), (False, x * x)):
        table = bnb.functional.create_dynamic_map(signed=signed)
        codes, state = bnb.functional.quantize_blockwise(torch.tensor(values), code=table,
                                                         blocksize=256)
        q = C.quantize_blockwise(jnp.asarray(values.reshape(50, 60)), signed, 256)
        assert q.codes.dtype == jnp.uint8 and q.codes.shape == (50, 60)
        np.testing.assert_array_equal(np.asarray(q.codes).ravel(), codes.numpy())
        np.testing.assert_array_equal(q.absmax, state.absmax.numpy())
        back = np.asarray(C.dequantize_blockwise(q, signed, 256)).ravel()
        np.testing.assert_allclose(back, bnb.functional.dequantize_blockwise(codes, state),
                                   rtol=1e-6, atol=0)
        # closed form: each value lands on the map entry nearest to value / absmax (a
        # half gap at most; the signed map ends at -0.993, so -absmax is 0.7% off)
        m = C.dynamic_map(signed)
        absmax = np.repeat(np.asarray(q.absmax), 256)[:values.size]
        scaled = np.divide(values, absmax, out=np.zeros_like(values), where=absmax > 0)
        hi = np.searchsorted(m, scaled)
        nearest = np.minimum(np.abs(scaled - m[np.clip(hi - 1, 0, 255)]),
                             np.abs(scaled - m[np.clip(hi, 0, 255)]))
        assert np.all(np.abs(back - values) <= (nearest + 1e-6) * absmax * (1 + 1e-5))
        assert np.all(np.abs(back - values) <= 0.0071 * absmax)
        assert np.all(back[:256] == 0)


def test_blocks_within_each_devices_piece_are_bitsandbytes_blocks(bnb_exact):
    """With `num_devices=8` a (32, 128) leaf is cut in 8 x 8 pieces of 4 x 16 values (an
    axis that 8 does not divide stays whole); each piece's values, row-major, are
    bitsandbytes' blocks (here of 64: one per piece), the scales shaped (8, 8, blocks)."""
    torch, bnb = bnb_exact
    assert C.pieces_for((32, 128), 8) == (8, 8) and C.pieces_for((30, 128), 8) == (1, 8)
    assert C.pieces_for((32, 128), 1) == (1, 1)
    x = np.random.default_rng(1).standard_normal((32, 128)).astype(np.float32)

    def by_piece(a):  # numpy: the pieces' values one after the other
        return a.reshape(8, 4, 8, 16).transpose(0, 2, 1, 3).reshape(-1)

    table = bnb.functional.create_dynamic_map(signed=True)
    codes, state = bnb.functional.quantize_blockwise(torch.tensor(by_piece(x)), code=table,
                                                     blocksize=64)
    q = C.quantize_blockwise(jnp.asarray(x), True, 64, C.pieces_for(x.shape, 8))
    assert q.codes.shape == (32, 128) and q.absmax.shape == (8, 8, 1)
    np.testing.assert_array_equal(by_piece(np.asarray(q.codes)), codes.numpy())
    np.testing.assert_array_equal(np.asarray(q.absmax).ravel(), state.absmax.numpy())
    np.testing.assert_allclose(by_piece(np.asarray(C.dequantize_blockwise(q, True, 64))),
                               bnb.functional.dequantize_blockwise(codes, state), rtol=1e-6,
                               atol=0)


def test_adamw_8bit_follows_bitsandbytes_adamw8bit(bnb_exact):
    """20 steps on the same gradients: the same 8-bit codes but where a value sits on the
    midpoint of two map entries (float32 rounding order decides: 1 code in 6144 differs
    by one entry, measured), and params within 1e-5 (measured 3e-6) but at such a value
    (1.3e-4 there; the params moved ~0.2)."""
    torch, bnb = bnb_exact
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal((64, 96)).astype(np.float32)  # 6144 >= min_8bit_size
    theirs = torch.nn.Parameter(torch.tensor(p0))
    opt = bnb.optim.AdamW8bit([theirs], lr=1e-2, weight_decay=0.1)
    tx = transforms.adamw_8bit(1e-2, weight_decay=0.1)
    params = {"w": jnp.asarray(p0)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(20):
        g = rng.standard_normal(p0.shape).astype(np.float32)
        theirs.grad = torch.tensor(g)
        opt.step()
        u, state = update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, u)
    adam_state = state.inner_state[0]
    for ours, key in ((adam_state.mu.codes["w"], "state1"), (adam_state.nu.codes["w"],
                                                           "state2")):
        apart = np.abs(np.asarray(ours, int) - opt.state[theirs][key].numpy().astype(int))
        assert apart.max() <= 1 and np.count_nonzero(apart) <= 6, key
    apart = np.abs(np.asarray(params["w"]) - theirs.detach().numpy())
    assert np.count_nonzero(apart > 1e-5) <= 6 and apart.max() < 1e-3  # 1.3e-4 at the tie


def _run(tx, params, grads):
    state, update = tx.init(params), jax.jit(tx.update)
    for g in grads:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def _bytes_per_param(state, params) -> float:
    n = sum(p.size for p in jax.tree.leaves(params))
    per_param = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    return sum(x.size * x.dtype.itemsize for x in per_param) / n


def test_compact_moments_follow_float32_adam_and_take_less_memory():
    """30 steps of Adam on a (128, 96) kernel and a bias: bfloat16 moments (stochastic
    rounding) and 8-bit moments stay within 3% of the largest distance float32 Adam moved
    (measured: 0.3% and 0.7%); the bias (< 4096 values) keeps float32 moments in 8 bits.
    Bytes per param counted from the state's arrays (scalars, hyperparameters, left out)."""
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.standard_normal((128, 96)), jnp.float32),
              "b": jnp.zeros((96,), jnp.float32)}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype),
                          params) for _ in range(30)]
    full, full_state = _run(optax.adamw(1e-2, weight_decay=0.1), params, grads)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(full), jax.tree.leaves(params), strict=True))
    cases = {"bf16": transforms.adamw(1e-2, weight_decay=0.1, mu_dtype="bfloat16",
                                      nu_dtype=jnp.bfloat16),
             "8bit": transforms.adamw_8bit(1e-2, weight_decay=0.1)}
    n_w, n_b = 128 * 96, 96
    expected = {"bf16": 4.0, "8bit": (2 * n_w + 2 * 4 * math.ceil(n_w / 256) + 8 * n_b)
                / (n_w + n_b)}
    assert _bytes_per_param(full_state, params) == 8.0
    for name, tx in cases.items():
        out, state = _run(tx, params, grads)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(full), strict=True):
            np.testing.assert_allclose(a, b, atol=0.03 * moved, rtol=0, err_msg=name)
        assert _bytes_per_param(state, params) == pytest.approx(expected[name])
    bf16_state = transforms.adam(1e-2, mu_dtype="bfloat16").init(params)
    assert {x.dtype.name for x in jax.tree.leaves(bf16_state) if x.ndim} == {
        "bfloat16", "float32"}  # mu in bfloat16, nu float32


def test_bfloat16_second_moment_stalls_to_nearest_not_with_stochastic_rounding():
    """A constant gradient of 1 for 1000 steps at b2 = 0.999: the exact nu is 1 - 0.999^t
    (0.632). Rounded to nearest in bfloat16, nu stops moving once 0.1% of it is under half
    a unit in the last place (at 0.25 here); stochastic rounding keeps it unbiased."""
    params = {"w": jnp.zeros((4096,), jnp.float32)}
    grads = {"w": jnp.ones((4096,), jnp.float32)}
    exact = 1 - 0.999 ** 1000

    def nu_after(tx):
        state = tx.init(params)

        def body(state, _):
            return tx.update(grads, state, params)[1], None

        state, _ = jax.lax.scan(body, state, None, length=1000)
        return float(jnp.mean(transforms.find_state(state, optax.ScaleByAdamState).nu["w"]
                              .astype(jnp.float32)))

    stochastic = nu_after(transforms.adam(1e-3, nu_dtype="bfloat16"))
    nearest = nu_after(transforms.low_precision_state(transforms.adam(1e-3)))
    assert stochastic == pytest.approx(exact, rel=0.01)
    assert nearest < 0.6 * exact


def test_moment_dtypes_from_a_spec_and_one_line_errors():
    params = {"w": jnp.zeros((4096,), jnp.float32)}
    state = build({"optimizer": {"name": "adamw", "mu_dtype": "bfloat16",
                                 "nu_dtype": "bfloat16"}, "learning_rate": 1e-3}).init(params)
    adam_state = transforms.find_state(state, optax.ScaleByAdamState)
    assert adam_state.mu["w"].dtype == adam_state.nu["w"].dtype == jnp.bfloat16
    state = build("optimizer: {name: adam_8bit, block_size: 128}\nlearning_rate: 1e-3"
                  ).init(params)
    assert transforms.find_state(state, optax.ScaleByAdamState).nu.absmax["w"].shape == (32,)
    for spec, message in [
        ({"name": "adamw", "nu_dtype": "int8"},
         "optimizer: adamw: nu_dtype must be one of float32, bfloat16 (8-bit moments: "
         "adamw_8bit), got 'int8'"),
        ({"name": "adam", "mu_dtype": "float16"}, "mu_dtype must be one of float32"),
        ({"name": "adamw_8bit", "block_size": 0}, "block_size"),
        ({"name": "adamw_8bit", "nu_dtype": "bfloat16"}, "unknown argument"),
    ]:
        with pytest.raises(JaxtrainError, match=None) as err:
            build({"optimizer": spec, "learning_rate": 1e-3})
        assert message in str(err.value) and "\n" not in str(err.value)
