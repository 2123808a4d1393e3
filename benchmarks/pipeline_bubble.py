"""The GPipe bubble, measured against the theory (S-1)/(M+S-1), and activation memory per
device with and without the pipeline.

What is timed: the forward and backward pass of a GPT's stacked blocks (`GPT._run_blocks`
under `jax.grad`), embedding and head left out, for S stages (mesh `pipe=S` over S of the
8 simulated CPU devices) and M microbatches of a fixed size, so every tick does the same
work. The reference is the same blocks, unpipelined, on the same examples and the same S
devices (mesh `data=S`).

Why the bubble shows on a CPU: the simulated devices share the machine's cores, so stages
never run at the same time; but this pipeline computes every stage at every tick (a vmap
over the stage axis), the stages outside the diagonal on filler. The bubble is then
filler compute instead of idle time, the same share of the ticks: M + S - 1 ticks of S
stage slices, of which M x S do useful work. Two estimates:

Times are the process's CPU time per call (median of `--repeats`, calls alternating), the
work of all simulated devices together: on this shared 2-core machine wall time followed
other processes' load (first run: non-monotonic in M), CPU time far less. Wall medians
are printed beside it.

- `1 - reference / pipelined`: the share of the pipelined time not spent on useful work
  (it also counts the pipeline's own overhead: the hand-over permutes, the tick loop);
- a fit `T(M) = a + b M` over the microbatch counts: the share `a / T(M)` of time that
  does not grow with M (the theory's fixed S - 1 ticks: `a / b` should be S - 1).

Memory: the compiled program's per-device temporaries (`memory_analysis()`) of the
pipelined and the unpipelined pass at each M: activations held for the backward pass.

    python benchmarks/pipeline_bubble.py [--stages 2 4 --micro 1 2 4 8 16 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxtrain import sharding  # noqa: E402
from jaxtrain.models import GPT, logical_axes  # noqa: E402
from jaxtrain.sharding import pipeline  # noqa: E402

MIB = 2.0 ** 20


def build(args):
    with nnx.use_eager_sharding(False):
        model = GPT(vocab_size=64, d_model=args.d_model, num_layers=args.layers,
                    num_heads=args.heads, max_len=args.seq, scan_layers=True,
                    rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, logical_axes(params), nnx.to_pure_dict(params)


def compiled_pass(graphdef, axes, params, mesh, batch, args):
    """The jitted grad of the blocks on `batch` examples under `mesh`, compiled, with its
    placed inputs."""

    def blocks_loss(params, x):
        return jnp.mean(nnx.merge(graphdef, params)._run_blocks(x) ** 2)

    specs = sharding.param_specs(params, mesh, "dp", axes)
    placed = jax.device_put(params, jax.tree.map(
        lambda s: jax.sharding.NamedSharding(mesh, s), specs,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    x = jax.random.normal(jax.random.key(1), (batch, args.seq, args.d_model))
    x = jax.device_put(x, sharding.batch_sharding(mesh))
    fn = jax.jit(sharding.under_mesh(jax.grad(blocks_loss, argnums=(0, 1)), mesh))
    compiled = fn.lower(placed, x).compile()
    return compiled, (placed, x)


def timed(call, inputs) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call: the CPU time is the work of all
    the simulated devices' threads, which other processes' load inflates far less."""
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(call(*inputs))
    return time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--micro-size", type=int, default=4, help="examples per microbatch")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case")
    parser.add_argument("--rounds", type=int, default=1,
                        help="pipeline repeats: 1 GPipe, R > 1 circular (theory "
                             "(S-1)/(R M+S-1))")
    args = parser.parse_args()
    graphdef, axes, params = build(args)
    rows = []
    for s in args.stages:
        devices = jax.devices()[:s]
        piped_mesh = sharding.make_mesh(pipe=s, data=1, devices=devices)
        flat_mesh = sharding.make_mesh(data=s, devices=devices)
        calls = {}
        for m in args.micro:
            batch = m * args.micro_size
            with pipeline.schedule(m, args.rounds):
                calls[m, "pipe"] = compiled_pass(graphdef, axes, params, piped_mesh, batch,
                                                 args)
            calls[m, "flat"] = compiled_pass(graphdef, axes, params, flat_mesh, batch, args)
        for call, inputs in calls.values():
            jax.block_until_ready(call(*inputs))  # warm
        walls, cpus = {key: [] for key in calls}, {key: [] for key in calls}
        for _ in range(args.repeats):  # alternate, so load changes hit all alike
            for key, (call, inputs) in calls.items():
                wall, cpu = timed(call, inputs)
                walls[key].append(wall)
                cpus[key].append(cpu)
        medians = {key: statistics.median(v) for key, v in cpus.items()}
        slope, intercept = np.polyfit(args.micro, [medians[m, "pipe"] for m in args.micro], 1)
        for m in args.micro:
            piped, flat = medians[m, "pipe"], medians[m, "flat"]
            row = {
                "stages": s, "microbatches": m, "batch": m * args.micro_size,
                "pipelined_cpu_ms": round(piped * 1e3, 2),
                "unpipelined_cpu_ms": round(flat * 1e3, 2),
                "pipelined_wall_ms": round(statistics.median(walls[m, "pipe"]) * 1e3, 2),
                "unpipelined_wall_ms": round(statistics.median(walls[m, "flat"]) * 1e3, 2),
                "rounds": args.rounds,
                "theory": round((s - 1) / (args.rounds * m + s - 1), 3),
                "measured_vs_unpipelined": round(1 - flat / piped, 3),
                "measured_fit": round(intercept / piped, 3),
                "fit_fixed_ticks": round(intercept / slope, 2),
                "temp_mib_pipelined": round(
                    calls[m, "pipe"][0].memory_analysis().temp_size_in_bytes / MIB, 2),
                "temp_mib_unpipelined": round(
                    calls[m, "flat"][0].memory_analysis().temp_size_in_bytes / MIB, 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nrounds R = {args.rounds}")
    print("| S | M | theory (S-1)/(R M+S-1) | measured 1 - unpiped/piped | measured fit a/T(M) "
          "| fit a/b (theory S-1) | piped CPU ms | unpiped CPU ms | piped wall ms | unpiped "
          "wall ms | temp MiB/device piped | unpiped |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stages']} | {r['microbatches']} | {r['theory']:.3f} | "
              f"{r['measured_vs_unpipelined']:.3f} | {r['measured_fit']:.3f} | "
              f"{r['fit_fixed_ticks']} | {r['pipelined_cpu_ms']} | {r['unpipelined_cpu_ms']} | "
              f"{r['pipelined_wall_ms']} | {r['unpipelined_wall_ms']} | "
              f"{r['temp_mib_pipelined']} | {r['temp_mib_unpipelined']} |")


if __name__ == "__main__":
    main()
