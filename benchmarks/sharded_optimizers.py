"""Step time of Muon, Shampoo and SOAP against AdamW on the char GPT, sharded over 8
simulated CPU devices, and what sharded Muon costs against unsharded Muon.

The char GPT of `configs/char_gpt.yaml` (d_model 128, 5 layers, 4 heads, 256 bytes,
sequences of 128, batch 16) is trained by one jitted, donated step compiled with
`sharding.compile_step` for each (optimizer, placement):

- `fsdp`: params and optimizer state split 8 ways (`data=1, fsdp=8`);
- `dp`: params replicated on the 8 devices (`data=8`): unsharded Muon;
- `fsdp naive`: Muon on `fsdp` with its matrices not spread (`blocks._mesh_axes`
  patched to see no mesh): XLA then gathers every matrix on every device, as a Muon
  written without regard to sharding does (the 1.5-3.3x anchor of issue 20).

Per configuration it reports the median step time over `--repeats` rounds (the
configurations alternate within each round, one process), the ratio to AdamW on the
same placement, and the all-gather / all-to-all bytes of the compiled step. Simulated
devices share this machine's cores: the times show the partitioned program's overhead,
not a network, and they are noisy when other work loads the CPU.

    OPENBLAS_NUM_THREADS=1 python benchmarks/sharded_optimizers.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import sharding_memory  # noqa: E402
from scaling import collectives  # noqa: E402

from jaxtrain import sharding  # noqa: E402
from jaxtrain import transforms as T  # noqa: E402
from jaxtrain.transforms import blocks  # noqa: E402

SEQ, BATCH, DEVICES = 128, 16, 8
OPTIMIZERS = {
    "adamw": lambda: T.adamw(1e-3),
    "muon": lambda: T.muon(1e-3),
    "shampoo": lambda: T.shampoo(1e-3, num_devices=DEVICES),
    "soap": lambda: T.soap(1e-3, block_size=128, num_devices=DEVICES),
}
# (optimizer, placement): fsdp for each; dp and naive fsdp for Muon (and dp AdamW).
CONFIGS = [(n, "fsdp") for n in OPTIMIZERS] + [("adamw", "dp"), ("muon", "dp"),
                                               ("muon", "fsdp naive")]


def build(tx):
    """(state, logical axes, step) of the char GPT's shapes trained by `tx`."""
    shapes = SimpleNamespace(vocab=256, d_model=128, layers=5, heads=4, seq=SEQ)
    return sharding_memory.build(shapes, scan_layers=False, remat="none", shapes_only=False,
                                 tx=tx)


def prepare(name, placement):
    """(run one step, compiled HLO's collective bytes) for one configuration."""
    state, axes, step = build(OPTIMIZERS[name]())
    preset = placement.split()[0]
    mesh = sharding.make_mesh(**({"data": DEVICES} if preset == "dp" else
                                 {"data": 1, "fsdp": DEVICES}))
    shardings = sharding.state_shardings(state, mesh, preset, axes)
    state = sharding.place(state, shardings)
    rng = np.random.default_rng(0)
    batch = jax.device_put(jnp.asarray(rng.integers(0, 256, (BATCH, SEQ + 1)), jnp.int32),
                           sharding.batch_sharding(mesh))
    naive = mock.patch.object(blocks, "_mesh_axes", lambda: {}) if "naive" in placement \
        else mock.patch.object(blocks, "_mesh_axes", blocks._mesh_axes)
    with naive:
        fn = sharding.compile_step(step, mesh, shardings)
        compiled = fn.lower(state, batch).compile()
    found = collectives(compiled.as_text(), DEVICES)
    box = {"state": state}

    def run():
        box["state"], metrics = compiled(box["state"], batch)
        jax.block_until_ready(metrics)

    run()  # warm-up
    return run, found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runs, found = {}, {}
    for config in CONFIGS:
        runs[config], found[config] = prepare(*config)
    times = {c: [] for c in CONFIGS}
    for _ in range(args.repeats):
        for c in CONFIGS:
            start = time.perf_counter()
            runs[c]()
            times[c].append(time.perf_counter() - start)
    rows = []
    for (name, placement), ts in times.items():
        ms = 1e3 * statistics.median(ts)
        rows.append({"bench": "sharded_optimizers", "optimizer": name, "placement": placement,
                     "step_ms": ms, "times_ms": [1e3 * t for t in ts],
                     "collective_bytes": found[(name, placement)]})
        print(json.dumps(rows[-1]), flush=True)
    median = {(r["optimizer"], r["placement"]): r["step_ms"] for r in rows}
    print(f"\nchar GPT, batch {BATCH}x{SEQ}, {DEVICES} simulated CPU devices, "
          f"median of {args.repeats}")
    print(f"{'optimizer':<9} {'placement':<11} {'step ms':>8} {'/ adamw':>8} "
          f"{'all-gather MB':>14} {'all-to-all MB':>14}")
    for r in rows:
        base = median[("adamw", r["placement"].split()[0])]
        c = r["collective_bytes"]
        print(f"{r['optimizer']:<9} {r['placement']:<11} {r['step_ms']:8.1f} "
              f"{r['step_ms'] / base:8.2f} {c['all-gather'] / 1e6:14.2f} "
              f"{c['all-to-all'] / 1e6:14.2f}")
    print(f"muon fsdp / muon dp: {median[('muon', 'fsdp')] / median[('muon', 'dp')]:.2f}; "
          f"muon fsdp naive / muon fsdp: "
          f"{median[('muon', 'fsdp naive')] / median[('muon', 'fsdp')]:.2f}")


if __name__ == "__main__":
    main()
