"""Rules, presets, the fallback, optimizer-state shardings, compiled placement, bad input."""

import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _multiprocess import xla_flags
from _sharding_models import build, train_step
from jax.sharding import PartitionSpec as P

from jaxtrain import sharding
from jaxtrain.errors import JaxtrainError


def _spec_by_path(shardings):
    return {jax.tree_util.keystr(kp): s.spec
            for kp, s in jax.tree_util.tree_leaves_with_path(shardings)}


def _norm(spec, ndim):
    """A PartitionSpec padded with None to `ndim` entries (for comparisons)."""
    return tuple(spec) + (None,) * (ndim - len(spec))


@pytest.mark.parametrize("preset,sizes,expected", [
    # q/k/v kernels (embed, heads, kv), out (heads, kv, embed), up (embed, mlp), down.
    ("tp", dict(tensor=8), {"q": (None, "tensor", None), "out": ("tensor", None, None),
                            "up": (None, "tensor"), "down": ("tensor", None),
                            "emb": ("tensor", None)}),
    ("fsdp", dict(fsdp=8), {"q": ("fsdp", None, None), "out": (None, None, "fsdp"),
                            "up": ("fsdp", None), "down": ("fsdp", None),
                            "emb": (None, "fsdp")}),
    ("fsdp+tp", dict(fsdp=2, tensor=4), {"q": ("fsdp", "tensor", None),
                                         "out": ("tensor", None, "fsdp"),
                                         "up": ("fsdp", "tensor"), "down": ("tensor", "fsdp"),
                                         "emb": ("tensor", "fsdp")}),
    ("dp", dict(data=8), {"q": (None,) * 3, "out": (None,) * 3, "up": (None,) * 2,
                          "down": (None,) * 2}),
])
def test_presets_split_attention_and_mlp(devices, preset, sizes, expected):
    state, axes = build("gpt", optax.adam(1e-3))
    mesh = sharding.make_mesh(**{"data": 1, **sizes})
    specs = sharding.param_specs(state.params, mesh, preset, axes)
    flat = {"/".join(str(getattr(k, "key", k)) for k in kp): s
            for kp, s in jax.tree_util.tree_leaves_with_path(
                specs, is_leaf=lambda x: isinstance(x, P))}
    shapes = {"/".join(str(getattr(k, "key", k)) for k in kp): x.ndim
              for kp, x in jax.tree_util.tree_leaves_with_path(state.params)}
    picks = {"q": "attn/query/kernel", "out": "attn/out/kernel", "up": "mlp/up/kernel",
             "down": "mlp/down/kernel", "emb": "embed/embedding"}
    for short, want in expected.items():
        path = next(k for k in flat if k.endswith(picks[short]))
        assert _norm(flat[path], shapes[path]) == want, (path, flat[path])


@pytest.mark.parametrize("shape,fsdp,want", [
    ((6, 16, 4), 8, (None, "fsdp", None)),  # the largest divisible dimension
    ((8, 8), 8, ("fsdp", None)),  # ties: the first
    ((24, 16), 8, ("fsdp", None)),
    ((3, 5), 8, (None, None)),  # nothing divisible: replicated
    ((16,), 1, (None,)),  # no fsdp axis to use
    ((), 8, ()),  # scalars are replicated
])
def test_fallback_for_unannotated_params(devices, shape, fsdp, want):
    mesh = sharding.make_mesh(data=-1, fsdp=fsdp)
    specs = sharding.param_specs({"w": jnp.zeros(shape)}, mesh, "fsdp", None)
    assert _norm(specs["w"], len(shape)) == want


def test_a_mesh_axis_is_used_once_per_param(devices):
    mesh = sharding.make_mesh(data=1, fsdp=8)
    specs = sharding.param_specs({"w": jnp.zeros((16, 64))}, mesh, "fsdp",
                                 {"w": ("embed", "mlp")})
    assert _norm(specs["w"], 2) == ("fsdp", None)


def test_optimizer_state_follows_params_including_factored_and_scalars(devices):
    mesh = sharding.make_mesh(data=1, fsdp=8)
    params = {"w": jnp.ones((16, 8)), "b": jnp.ones((8,)), "x": {"k": jnp.ones((3, 24))}}
    axes = {"w": ("embed", "mlp"), "b": ("mlp",), "x": {"k": ()}}
    tx = optax.chain(
        optax.adafactor(learning_rate=1e-2, min_dim_size_to_factor=4),
        optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
        optax.masked(optax.ema(0.9), {"w": True, "b": False, "x": {"k": True}}),
    )
    state = {"params": params, "opt_state": tx.init(params), "rng": jax.random.key(0)}
    specs = _spec_by_path(sharding.state_shardings(state, mesh, "fsdp", axes))
    get = lambda needle: [s for k, s in specs.items() if needle in k]  # noqa: E731
    assert specs["['params']['w']"] == P("fsdp", None)
    assert specs["['params']['b']"] == P("fsdp")
    assert specs["['params']['x']['k']"] == P(None, "fsdp")  # fallback: 24 on fsdp
    # Adafactor factors w (16, 8) into v_row (8,) and v_col (16,): the 16 keeps `fsdp`;
    # x/k (3, 24) is too small to factor: its full second moment `v` is split like x/k,
    # and the (1,) placeholders are replicated.
    assert [_norm(s, 1) for s in get(".v_row['w']")] == [(None,)]
    assert [_norm(s, 1) for s in get(".v_col['w']")] == [("fsdp",)]
    assert get(".v['x']['k']") == [P(None, "fsdp")]
    assert get(".v_row['x']['k']") == [P()] and get(".v['w']") == [P()]
    # Adam's moments and the masked EMA copy: exactly the params' specs.
    assert get(".mu['w']") == [P("fsdp", None)] and get(".nu['b']") == [P("fsdp")]
    assert get(".ema['x']['k']") == [P(None, "fsdp")]
    # Counts, injected hyperparameters and the RNG key: replicated.
    scalars = [s for k, s in specs.items() if "count" in k or "hyperparams" in k or "rng" in k]
    assert scalars and all(s == P() for s in scalars)
    # The specs are usable: a jitted optimizer step keeps every one of them.
    placed = sharding.place(state, sharding.state_shardings(state, mesh, "fsdp", axes))
    new = jax.jit(lambda s: tx.update(s["params"], s["opt_state"], s["params"])[1])(placed)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(placed["opt_state"]), strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)


def test_real_train_state_shardings(devices):
    from flax import nnx

    from jaxtrain.models import CNN, logical_axes
    from jaxtrain.train import TrainState

    with nnx.use_eager_sharding(False):
        model = CNN(rngs=nnx.Rngs(0))
    state = TrainState.create(model, optax.adamw(1e-3), jax.random.key(0))
    axes = logical_axes(nnx.state(model, nnx.Param))
    mesh = sharding.make_mesh(data=2, fsdp=4)
    shardings = sharding.state_shardings(state, mesh, "fsdp", axes)
    assert shardings.params["backbone"]["dense"]["kernel"].spec == P("fsdp", None)
    assert shardings.opt_state[0].mu["backbone"]["dense"]["kernel"].spec == P("fsdp", None)
    assert shardings.step.spec == P() and shardings.rng.spec == P()


@pytest.mark.parametrize("preset,sizes", [("dp", dict(data=8)),
                                          ("fsdp+tp", dict(data=2, fsdp=2, tensor=2))])
def test_compiled_step_keeps_its_shardings_and_donates(devices, preset, sizes):
    state, axes = build("cnn", optax.adam(1e-3))
    mesh = sharding.make_mesh(**sizes)
    step = sharding.compile_step(train_step, mesh, preset, logical_axes=axes)
    batch = sharding.shard_batch({"image": np.zeros((16, 8, 8), np.float32),
                                  "label": np.zeros(16, np.int32)}, mesh)
    compiled = step.lower(state, batch).compile()
    state = sharding.place(state, step.shardings)
    ins, outs = compiled.input_shardings[0][0], compiled.output_shardings[0]
    for a, b, x in zip(jax.tree.leaves(ins), jax.tree.leaves(outs), jax.tree.leaves(state),
                       strict=True):
        assert a.is_equivalent_to(b, x.ndim)  # out == in: nothing to reshard next step
    first = state
    for _ in range(3):
        state, _ = step(state, batch)
    assert all(x.is_deleted() for x in jax.tree.leaves(first))  # donated
    assert step._jitted._cache_size() == 1  # one compilation for all steps
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(step.shardings), strict=True):
        assert a.sharding.is_equivalent_to(b, a.ndim)
    if preset == "dp":  # replicated params: gradients all-reduced, nothing moved otherwise
        hlo = compiled.as_text()
        assert "all-reduce" in hlo
        assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute"))


# --- bad input ------------------------------------------------------------------------


def test_batch_not_divisible_names_sizes(devices):
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    with pytest.raises(JaxtrainError, match=r"\['image'\] has leading size 6.*4-way"):
        sharding.shard_batch({"image": np.zeros((6, 8, 8))}, mesh)


def test_rule_naming_a_missing_mesh_axis(devices):
    mesh = sharding.make_mesh()
    with pytest.raises(JaxtrainError, match="'mlp' -> 'model'.*valid: pipe, data, fsdp, tensor"):
        sharding.param_specs({"w": jnp.zeros((4, 4))}, mesh, {"mlp": "model"},
                             {"w": ("embed", "mlp")})


def test_param_dimension_not_divisible_names_path_dim_and_axis(devices):
    mesh = sharding.make_mesh(data=2, tensor=4)
    params = {"attn": {"query": {"kernel": jnp.zeros((8, 6, 2))}}}
    axes = {"attn": {"query": {"kernel": ("embed", "heads", "kv")}}}
    with pytest.raises(JaxtrainError, match=r"param attn/query/kernel: dimension 1 \('heads', "
                       r"size 6\) is not divisible by mesh axis tensor of size 4"):
        sharding.state_shardings({"params": params}, mesh, "tp", axes, params=params)


def test_logical_names_must_match_rank(devices):
    mesh = sharding.make_mesh()
    with pytest.raises(JaxtrainError, match=r"param w: 1 logical axis names"):
        sharding.param_specs({"w": jnp.zeros((4, 4))}, mesh, "dp", {"w": ("embed",)})


def test_pmap_reduce_is_checked():
    with pytest.raises(JaxtrainError, match="reduce='avg'.*mean, sum"):
        sharding.pmap_step(train_step, reduce="avg")


def test_initialize_after_backend_start_is_refused(devices):
    with pytest.raises(JaxtrainError, match="before anything uses JAX"):
        sharding.initialize("127.0.0.1:1234", 2, 1)


@pytest.mark.parametrize("args,match", [
    (("127.0.0.1:1234", 2, None), "together, or none"),
    (("127.0.0.1:1234", 2, 2), r"process_id=2 must be an integer in \[0, 2\)"),
    (("127.0.0.1:1234", 0, 0), "num_processes=0"),
])
def test_initialize_checks_its_arguments(args, match):
    with pytest.raises(JaxtrainError, match=match):
        sharding.initialize(*args)


def test_coordinator_address_must_be_host_port():
    with pytest.raises(JaxtrainError, match="'localhost' must be host:port"):
        sharding.distributed.wait_for_coordinator("localhost", 1)


def test_unreachable_coordinator_times_out_with_its_address():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("from jaxtrain import sharding\n"
            "from jaxtrain.errors import JaxtrainError\n"
            "try:\n"
            f"    sharding.initialize('127.0.0.1:{port}', 2, 1, timeout=2)\n"
            "except JaxtrainError as e:\n"
            "    print('ERROR', e)\n")
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env)
    assert time.monotonic() - start < 30
    assert f"ERROR coordinator 127.0.0.1:{port} cannot be reached within 2 s" in out.stdout, (
        out.stdout + out.stderr)
