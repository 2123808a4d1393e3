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

import sys
from argparse import Namespace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import sharding

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from sharding_memory import build, search  # noqa: E402

BATCH, SEQ = 16, 128
GPT_1_LAYER = Namespace(vocab=256, d_model=64, layers=1, heads=4, seq=SEQ)


def temp_bytes(scan_layers: bool, fsdp: int) -> int:
    """Temporaries per device of the AdamW step of a 1-layer GPT (d_model 64) on a
    `data=8/fsdp, fsdp=fsdp` mesh of the 8 simulated devices (the benchmark's step)."""
    state, axes, step = build(GPT_1_LAYER, scan_layers, "full" if scan_layers else "none")
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
