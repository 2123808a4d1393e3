"""How step time and collective bytes grow with the number of devices, for `dp` and `fsdp`.

The GPT AdamW step of `sharding_memory.py` is compiled by `sharding.compile_step` on 1, 2,
4 and 8 of 8 simulated CPU devices (weak scaling: `--per-device` sequences per device),
with a 1-D mesh (`data=n` for dp, `fsdp=n` for fsdp). From the compiled HLO every
all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute is read with its
buffer size (the unsplit buffer; a reduce-scatter's result times `n`), and turned into the
bytes each device sends over a ring (all-reduce 2(n-1)/n x buffer, the others (n-1)/n x
buffer). The HLO of a global mesh is the same whether its devices belong to one process
or to many, so these bytes are what n processes of one device each would exchange; the
step times are one process's simulated devices sharing this machine's cores, so they show
the overhead of the partitioned program, not a network. `docs/scale-out.md` turns the
bytes into estimates for a TPU pod and H100 hosts.

    python benchmarks/scaling.py [--d-model 256 --layers 4 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from sharding_memory import build  # noqa: E402

from jaxtrain import sharding  # noqa: E402

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
OP = re.compile(r"=\s*(?P<shape>.+?)\s+(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\(")
ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1,
            "pred": 1, "s64": 8, "u64": 8}


def collectives(hlo: str, n: int) -> dict:
    """{kind: buffer bytes} of the collectives in compiled HLO text (async pairs counted once,
    at their start; ops inside loops once)."""
    found = {k: 0 for k in KINDS}
    for match in OP.finditer(hlo):
        size = 0
        for dtype, dims in ARRAY.findall(match["shape"]):
            if dtype in ITEMSIZE:
                size += ITEMSIZE[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
        found[match["kind"]] += size * (n if match["kind"] == "reduce-scatter" else 1)
    return found


def wire_bytes(found: dict, n: int) -> float:
    """Bytes one device sends for these collectives on a ring of n devices."""
    if n == 1:
        return 0.0
    share = (n - 1) / n
    return sum(b * (2 * share if k == "all-reduce" else share) for k, b in found.items())


def measure(state, axes, step, preset, n, args):
    mesh = sharding.make_mesh(devices=jax.devices()[:n],
                              **({"data": n} if preset == "dp" else {"data": 1, "fsdp": n}))
    shardings = sharding.state_shardings(state, mesh, preset, axes)
    batch = jnp.zeros((args.per_device * n, args.seq + 1), jnp.int32)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    placed = sharding.place(jax.tree.map(jnp.copy, state), shardings)
    fn = sharding.compile_step(step, mesh, shardings)
    compiled = fn.lower(placed, batch).compile()
    found = collectives(compiled.as_text(), n)
    placed, metrics = fn(placed, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        placed, metrics = fn(placed, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    params = sum(x.size for x in jax.tree.leaves(state["params"]))
    return {"bench": "scaling", "preset": preset, "devices": n,
            "global_batch": args.per_device * n, "params": int(params),
            "step_ms": 1e3 * statistics.median(times),
            "collective_bytes": found, "wire_bytes_per_device": wire_bytes(found, n),
            "wire_bytes_per_param": wire_bytes(found, n) / params}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--per-device", type=int, default=2, help="sequences per device")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    state, axes, step = build(args, scan_layers=False, remat="none", shapes_only=False)
    rows = []
    for preset in ("dp", "fsdp"):
        for n in (1, 2, 4, 8):
            rows.append(measure(state, axes, step, preset, n, args))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nGPT d_model={args.d_model} layers={args.layers}: {rows[0]['params']:,} params, "
          f"AdamW, {args.per_device}x{args.seq} tokens per device (simulated CPU devices)")
    print(f"{'preset':<6} {'n':>2} {'step ms':>8} {'all-reduce MB':>14} {'all-gather MB':>14} "
          f"{'red-scatter MB':>15} {'wire MB/dev':>12} {'wire B/param':>13}")
    mb = 1e6
    for r in rows:
        c = r["collective_bytes"]
        print(f"{r['preset']:<6} {r['devices']:>2} {r['step_ms']:8.1f} "
              f"{c['all-reduce'] / mb:14.2f} {c['all-gather'] / mb:14.2f} "
              f"{c['reduce-scatter'] / mb:15.2f} {r['wire_bytes_per_device'] / mb:12.2f} "
              f"{r['wire_bytes_per_param']:13.2f}")


if __name__ == "__main__":
    main()
