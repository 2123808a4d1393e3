"""Peak memory of a compiled fsdp step: splitting the params wider must not grow the
temporaries (issue 24). Compiled only, never run: the figures are the compiler's.

Without `models.gpt.batch_sharded` XLA kept a block's weights split and gathered the
whole fsdp group's activations instead, so the per-device temporaries grew with the
split (this test's GPT, batch_sharded made the identity: scanned 25.8 MiB at 8-way vs
6.4 at 2-way, unrolled 9.1 vs 4.6); pinned to the batch split they stay flat (3.4 vs 3.5).

With `data` > 1 the same compiles logged XLA's "Involuntary full rematerialization" (the
embedding gradient's scatter resharded through a full copy) until `models.gpt.whole_rows`
kept the looked-up table's rows whole. The check reads what XLA writes to stderr while
compiling: these programs are compiled by no other test, so the persistent compilation
cache cannot skip the compile."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain import sharding
from jaxtrain.models import GPT, logical_axes

BATCH, SEQ = 16, 128


def temp_bytes(scan_layers: bool, fsdp: int) -> int:
    """Temporaries per device of the AdamW step of a 1-layer GPT (d_model 64) on a
    `data=8/fsdp, fsdp=fsdp` mesh of the 8 simulated devices."""
    make = lambda: GPT(vocab_size=256, d_model=64, num_layers=1, num_heads=4,  # noqa: E731
                       max_len=SEQ, scan_layers=scan_layers,
                       remat="full" if scan_layers else "none", rngs=nnx.Rngs(0))
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(make)
    graphdef, params = nnx.split(model, nnx.Param)
    axes = logical_axes(params)
    params = nnx.to_pure_dict(params)
    tx = optax.adamw(1e-3)

    def step(state, batch):
        def loss(p):
            logits = nnx.merge(graphdef, p)(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(state["params"])
        updates, opt = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt}, {
            "loss": value}

    state = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p)}, params)
    mesh = sharding.make_mesh(data=8 // fsdp, fsdp=fsdp)
    shardings = sharding.state_shardings(state, mesh, "fsdp", axes)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, shardings)
    batch = jax.ShapeDtypeStruct((BATCH, SEQ + 1), jnp.int32,
                                 sharding=sharding.batch_sharding(mesh))
    compiled = sharding.compile_step(step, mesh, shardings).lower(abstract, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_fsdp_temporaries_do_not_grow_with_the_split(devices, capfd, scan_layers):
    capfd.readouterr()
    two = temp_bytes(scan_layers, 2)  # data 4 x fsdp 2
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    eight = temp_bytes(scan_layers, 8)
    assert eight <= 1.25 * two, (
        f"fsdp 8-way step temporaries {eight / 2**20:.1f} MiB vs 2-way {two / 2**20:.1f}: "
        "the split gathers activations instead of layer weights")


def test_capacity_search_finds_the_deepest_fit_in_few_compiles():
    """`benchmarks/sharding_memory.search` against counting up one layer at a time, on
    affine peaks (4 probes: the line's two points, the answer and one more) and on peaks
    with a wobble under one layer's bytes."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from sharding_memory import search

    rng = np.random.default_rng(0)
    for trial in range(300):
        per_layer, fixed = rng.uniform(1, 50), rng.uniform(0, 500)
        wobble = rng.uniform(0, 0.5 * per_layer, 5000) if trial % 2 else np.zeros(5000)
        budget = rng.uniform(0, 4000)  # under search's limit of 4096 layers
        peaks = fixed + per_layer * np.arange(5000) + wobble
        calls = []
        found = search(lambda n: calls.append(n) or peaks[n], budget)  # noqa: B023
        deepest = next(n for n in range(1, 5000) if peaks[n] > budget) - 1
        assert found == deepest, (trial, found, deepest, calls)
        if not trial % 2 and deepest >= 4:
            assert len(calls) <= 4, (trial, calls)
