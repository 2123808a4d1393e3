"""Per-device memory of a GPT train step under dp, fsdp, tp and fsdp+tp, from the compiled step.

For each placement the AdamW train step (params and optimizer state donated) is compiled
by `sharding.compile_step` on 8 simulated CPU devices, for the unrolled GPT (blocks one
by one, no remat: the layout before issue 24) and the scanned one (`scan_layers=True`,
`--remat`, default `full`). Per device it reports: params and optimizer state (shard
shapes of the compiled step's input shardings), arguments and temporaries (its
`memory_analysis()`), peak = arguments + temporaries (outputs alias the donated
arguments), the compiler's own peak figure where it gives one, and whether XLA warned of
an "Involuntary full rematerialization" while compiling it.

Targets (issue 24), checked for the scanned fsdp 8-way row: temporaries at most two
layers' gathered weights + one layer's gradients + activations (the estimate is printed),
and peak at most 0.15 of the unrolled dp step's.

Capacity (`--capacity-mib B`, 0 to skip): at the given width, the most layers whose
scanned step's peak fits B MiB per device under `dp` (8 replicas) and under 8-way
`fsdp`, found from compiled memory alone (the step is compiled, never run): the peak is
affine in the layer count, so it is compiled at 2 and 4 layers, the line predicts the
answer, and compiling at it and at one layer more confirms it (`search`); each compile
is printed as it finishes.

    python benchmarks/sharding_memory.py [--d-model 256 --layers 4 --heads 8 --seq 128]
    python benchmarks/sharding_memory.py --d-model 512 --layers 8 --heads 8 --vocab 256 \
        --seq 64 --batch 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxtrain import sharding  # noqa: E402
from jaxtrain.models import GPT, logical_axes  # noqa: E402

MIB = 2.0 ** 20
WARNING = "Involuntary full rematerialization"


def placements(ways: list[int]) -> list[tuple[str, dict, int]]:
    """(preset, mesh sizes, ways the params are split) for 8 devices. fsdp+tp at N-way is
    tensor=2 x fsdp=N/2 (at 2-way it would be plain tp or fsdp, so it starts at 4)."""
    rows = [("dp", dict(data=8), 1)]
    rows += [("fsdp", dict(data=8 // n, fsdp=n), n) for n in ways]
    rows += [("tp", dict(data=8 // n, tensor=n), n) for n in ways]
    rows += [("fsdp+tp", dict(data=8 // n, fsdp=n // 2, tensor=2), n) for n in ways if n >= 4]
    return rows


def build(args, scan_layers: bool, remat: str, shapes_only: bool = True, tx=None):
    """(state, logical axes, step) of the GPT `args` describes, trained by `tx` (AdamW
    by default); with `shapes_only` the state is shapes (nothing initialised), else real
    arrays (seed 0). Scanned shapes are those of a 2-layer GPT with the stacked `layers`
    dim widened to `args.layers`: the same shapes, without building every block (building
    100 blocks, even abstractly, took 45 s)."""
    built = min(args.layers, 2) if shapes_only and scan_layers else args.layers
    make = lambda: GPT(  # noqa: E731
        vocab_size=args.vocab, d_model=args.d_model, num_layers=built,
        num_heads=args.heads, max_len=args.seq, scan_layers=scan_layers, remat=remat,
        rngs=nnx.Rngs(0))
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(make) if shapes_only else make()
    graphdef, params = nnx.split(model, nnx.Param)
    axes = logical_axes(params)
    params = nnx.to_pure_dict(params)
    if built != args.layers:
        params["blocks"] = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((args.layers, *x.shape[1:]), x.dtype),
            params["blocks"])
    tx = optax.adamw(1e-3) if tx is None else tx

    def step(state, batch):
        def loss(p):
            logits = nnx.merge(graphdef, p)(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(state["params"])
        updates, opt = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt}, {
            "loss": value}

    init = lambda p: {"params": p, "opt_state": tx.init(p)}  # noqa: E731
    state = jax.eval_shape(init, params) if shapes_only else init(params)
    return state, axes, step


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` under `shardings` (the first device's shards)."""
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        total += int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
    return total


@contextlib.contextmanager
def captured_stderr():
    """XLA logs from C++ to file descriptor 2: collect what it writes meanwhile."""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        text = []
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text.append(tmp.read().decode(errors="replace"))


def measure(state, axes, step, preset, sizes, ways, batch) -> dict:
    mesh = sharding.make_mesh(**sizes)
    shardings = sharding.state_shardings(state, mesh, preset, axes)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, shardings)
    with captured_stderr() as log:
        compiled = sharding.compile_step(step, mesh, shardings).lower(
            abstract, jax.ShapeDtypeStruct(batch.shape, batch.dtype,
                                           sharding=sharding.batch_sharding(mesh))).compile()
    ins = compiled.input_shardings[0][0]
    mem = compiled.memory_analysis()
    return {
        "placement": f"{preset} {ways}-way" if ways > 1 else preset,
        "mesh": sizes, "ways": ways,
        "params_bytes": per_device_bytes(state["params"], ins["params"]),
        "opt_state_bytes": per_device_bytes(state["opt_state"], ins["opt_state"]),
        "argument_bytes": mem.argument_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "peak_bytes": mem.argument_size_in_bytes + mem.temp_size_in_bytes,
        "compiler_peak_bytes": getattr(mem, "peak_memory_in_bytes", None),
        "involuntary_remat": WARNING in log[0],
    }


def temp_target_bytes(args, ways: int = 8) -> dict:
    """Issue 24's bound on the scanned fsdp step's temporaries, in bytes (float32): two
    layers' gathered weights, one layer's gradients, and activations: the layer inputs the
    scan keeps for the backward pass, one layer's live intermediates (q, k, v, attention
    out, MLP hidden and its GELU, the residual stream; attention weights and their
    softmax), and the logits with their softmax and gradient."""
    d, t, layers = args.d_model, args.seq, args.layers
    b = args.batch // ways
    layer = (12 * d * d + 4 * d) * 4
    activations = 4 * (layers * b * t * d + b * t * (4 * d + 8 * d + 2 * d)
                       + 2 * b * args.heads * t * t + 3 * b * t * args.vocab)
    return {"layer_bytes": layer, "activation_bytes": activations,
            "temp_target_bytes": 3 * layer + activations}


def capacity(args, budget: int, batch) -> list[dict]:
    """The largest layer count (and its params) whose scanned step fits `budget` bytes per
    device, under dp and under 8-way fsdp, from compiled memory alone (nothing runs).

    At a fixed width the step's peak is affine in the layer count (per layer: its share of
    params, gradients and optimizer state, and the layer input the scan keeps), so it is
    compiled at 2 and 4 layers, the line through them predicts the answer, and the answer
    is confirmed by compiling at it and at one layer more; a miss refits through the
    nearest probes (bisecting if that stalls). Each probe is printed as it is compiled."""
    rows = []
    for preset, sizes in (("dp", dict(data=8)), ("fsdp", dict(data=1, fsdp=8))):
        probes: dict[int, tuple[int, int]] = {}  # layers -> (peak bytes, params)

        def peak(layers, preset=preset, sizes=sizes, probes=probes):
            if layers not in probes:
                wide = argparse.Namespace(**{**vars(args), "layers": layers})
                state, axes, step = build(wide, True, args.remat)
                n = sum(x.size for x in jax.tree.leaves(state["params"]))
                probes[layers] = (measure(state, axes, step, preset, sizes, 8, batch)[
                    "peak_bytes"], n)
                print(json.dumps({"bench": "sharding_capacity_probe", "placement": preset,
                                  "layers": layers, "params": n,
                                  "peak_bytes": probes[layers][0],
                                  "fits": probes[layers][0] <= budget}))
                print(f"probe {preset} {layers} layers: peak {probes[layers][0] / MIB:.1f} MiB"
                      f" {'fits' if probes[layers][0] <= budget else 'does not fit'}",
                      flush=True)
            return probes[layers][0]

        layers = search(peak, budget)
        low, high = min(probes), max(probes)
        slope = (probes[high][0] - probes[low][0]) / max(high - low, 1)
        rows.append({"bench": "sharding_capacity", "placement": preset, "budget_bytes": budget,
                     "layers": layers, "params": probes[layers][1] if layers else 0,
                     "peak_bytes": probes[layers][0] if layers else None,
                     "bytes_per_layer": slope, "compiles": len(probes)})
    rows[1]["params_over_dp"] = rows[1]["params"] / max(rows[0]["params"], 1)
    return rows


def search(peak, budget: int, first: int = 2, second: int = 4, limit: int = 4096) -> int:
    """The largest layer count `n` with `peak(n) <= budget` (0 if one layer does not fit;
    at most `limit`), for `peak` increasing in `n` and near affine. Probes `first` and
    `second`, then the largest count the line through the probes nearest the answer
    predicts together with the count above it (the pair that settles the answer if the
    line is right), narrowing the bracket of counts known to fit and not to; after three
    such rounds it bisects the bracket."""
    seen: dict[int, int] = {}
    fits, over = 0, limit + 1  # largest count known to fit, smallest known not to

    def probe(n):
        nonlocal fits, over
        if fits < n < over:
            seen[n] = peak(n)
            fits, over = (n, over) if seen[n] <= budget else (fits, n)

    probe(first)
    probe(second)
    if over == first:
        probe(1)
    rounds = 0
    while over - fits > 1:
        lo = fits if fits in seen else min(seen)
        others = [n for n in seen if n != lo]
        hi = over if over in seen else max(others, key=lambda n: (n < lo, n))
        slope = (seen[hi] - seen[lo]) / (hi - lo)
        guess = lo + int((budget - seen[lo]) // slope) if slope > 0 else 2 * fits
        if rounds >= 3:
            guess = (fits + over) // 2
        guess = min(max(guess, fits + 1), over - 1)
        probe(guess)
        probe(guess + 1)
        rounds += 1
    return fits


def report(args, rows, state) -> None:
    """The derived fractions, the table and the target line of the measured rows."""
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    dp = {r["layout"]: r for r in rows if r["placement"] == "dp"}
    baseline = dp.get("unrolled", rows[0])
    full = baseline["params_bytes"] + baseline["opt_state_bytes"]
    for row in rows:
        row["state_fraction"] = (row["params_bytes"] + row["opt_state_bytes"]) / full
        row["peak_over_dp"] = row["peak_bytes"] / dp[row["layout"]]["peak_bytes"]
        row["peak_over_unrolled_dp"] = row["peak_bytes"] / baseline["peak_bytes"]
    target = temp_target_bytes(args)
    print(json.dumps({"bench": "sharding_memory_target", **target}))
    print(f"\nGPT d_model={args.d_model} layers={args.layers} heads={args.heads} "
          f"vocab={args.vocab}: {n_params:,} params; AdamW; batch {args.batch}x{args.seq}; "
          "per-device MiB; peak = args + temp; /dp: peak over the same layout's dp peak; "
          "/dp0: over the unrolled dp peak")
    print(f"{'layout':<9} {'placement':<15} {'params':>7} {'opt':>7} {'args':>7} {'temp':>7} "
          f"{'peak':>7} {'xla':>7} {'/dp':>6} {'/dp0':>6} remat-warning")
    for r in rows:
        xla = r["compiler_peak_bytes"]
        print(f"{r['layout']:<9} {r['placement']:<15} {r['params_bytes'] / MIB:7.2f} "
              f"{r['opt_state_bytes'] / MIB:7.2f} {r['argument_bytes'] / MIB:7.2f} "
              f"{r['temp_bytes'] / MIB:7.2f} {r['peak_bytes'] / MIB:7.2f} "
              f"{'-' if xla is None else f'{xla / MIB:7.2f}':>7} {r['peak_over_dp']:6.3f} "
              f"{r['peak_over_unrolled_dp']:6.3f} {'yes' if r['involuntary_remat'] else 'no'}")
    for r in rows:
        if r["layout"] == "scanned" and r["placement"] == "fsdp 8-way":
            print(f"\nscanned fsdp 8-way: temporaries {r['temp_bytes'] / MIB:.1f} MiB vs target "
                  f"{target['temp_target_bytes'] / MIB:.1f} (2 x {target['layer_bytes'] / MIB:.1f}"
                  f" gathered + {target['layer_bytes'] / MIB:.1f} grads + "
                  f"{target['activation_bytes'] / MIB:.1f} activations); peak "
                  f"{r['peak_over_unrolled_dp']:.3f} of the unrolled dp peak (target <= 0.15)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--remat", default="full", help="remat policy of the scanned GPT")
    parser.add_argument("--ways", default="2,4,8", help="split sizes to measure")
    parser.add_argument("--layouts", default="unrolled,scanned")
    parser.add_argument("--capacity-mib", type=float, default=256.0)
    args = parser.parse_args()
    ways = [int(n) for n in args.ways.split(",")]
    batch = jnp.zeros((args.batch, args.seq + 1), jnp.int32)
    rows = []
    for layout in [x for x in args.layouts.split(",") if x]:
        scanned = layout == "scanned"
        state, axes, step = build(args, scanned, args.remat if scanned else "none")
        for preset, sizes, n in placements(ways):
            row = {"bench": "sharding_memory", "layout": layout,
                   "remat": args.remat if scanned else "none",
                   **measure(state, axes, step, preset, sizes, n, batch)}
            rows.append(row)
            print(json.dumps(row), flush=True)  # as measured: long runs show progress
    if rows:
        report(args, rows, state)
    if args.capacity_mib > 0:
        found = capacity(args, int(args.capacity_mib * MIB), batch)
        print(f"\ncapacity: the deepest GPT (d_model={args.d_model}, scanned, remat="
              f"{args.remat}) whose step's peak fits {args.capacity_mib:g} MiB per device")
        for row in found:
            print(json.dumps(row), flush=True)
        print(f"{'placement':<11} {'layers':>6} {'params':>13} {'peak MiB':>9} {'MiB/layer':>9} "
              f"{'compiles':>8}")
        for row in found:
            peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / MIB:9.1f}"
            print(f"{row['placement'] + (' 8-way' if row['placement'] == 'fsdp' else ''):<11} "
                  f"{row['layers']:>6} {row['params']:>13,} {peak:>9} "
                  f"{row['bytes_per_layer'] / MIB:9.2f} {row['compiles']:>8}")
        print(f"fsdp 8-way fits {found[1]['params_over_dp']:.1f}x the params of dp "
              "(target >= 6x)")


if __name__ == "__main__":
    main()
