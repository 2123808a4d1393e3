"""`jaxtrain bench`: run the benchmark scripts of a source checkout and gather their output.

Each script in `benchmarks/` runs both sides of its comparison in one process,
alternating, and prints one JSON line per measurement followed by a short table. This
harness runs the chosen scripts one after another (each in a fresh process, so one's
compile caches and memory do not colour the next), prefixes a record of the machine
(JAX, jaxlib, Optax versions; device kind and count), and prints either the scripts'
tables (default) or every JSON line tagged with its benchmark (`--json`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import JaxtrainError

# name -> (script, arguments for --quick)
BENCHMARKS = {
    "optimizer": ("optimizer_step.py", ["--runs", "3", "--only", "sgd_momentum,adam,adamw,lion"]),
    "loop": ("loop_overhead.py", ["--reps", "2", "--steps", "80"]),
    "sharding": ("sharding_memory.py", ["--d-model", "128", "--layers", "2", "--ways", "8",
                                        "--capacity-mib", "32"]),
    "scan": ("scan_layers.py", ["--d-model", "128", "--layers", "4", "--steps", "3",
                                "--reps", "2"]),
    "checkpoint": ("checkpoint_io.py", ["--mb", "50", "--rounds", "1"]),
    "sweep": ("sweep.py", ["--points", "4", "--steps", "50", "--repeats", "1"]),
    "mfu": ("mfu.py", ["--steps", "3", "--reps", "1", "--d-model", "128", "--layers", "2"]),
    "conv": ("conv_vmap.py", ["--runs", "3"]),
    "metrics": ("step_metrics_cost.py", ["--reps", "1", "--steps", "100"]),
    "adamw": ("adamw_bandwidth.py", ["--params", "2e6", "--runs", "3"]),
    "breakdown": ("gpt_breakdown.py", ["--small"]),
    "data": ("data_throughput.py", ["--only", "loader,trainer", "--reps", "1", "--steps", "10",
                                    "--workers", "1"]),
    "scaling": ("scaling.py", ["--d-model", "64", "--layers", "1", "--repeats", "2"]),
}


def find_benchmarks(directory: str | Path | None = None) -> Path:
    """The `benchmarks/` folder: given, in the working directory, or beside the package."""
    candidates = [Path(directory)] if directory else [
        Path.cwd() / "benchmarks", Path(__file__).resolve().parent.parent / "benchmarks"]
    for path in candidates:
        if (path / BENCHMARKS["optimizer"][0]).is_file():
            return path
    looked = ", ".join(map(str, candidates))
    raise JaxtrainError(f"no benchmarks folder found (looked in {looked}); run from a source "
                        "checkout or pass --dir")


def environment() -> dict:
    """Versions and devices, recorded with every run."""
    import jax
    import jaxlib
    import optax

    devices = jax.devices()
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "optax": optax.__version__,
            "python": platform.python_version(), "device_kind": devices[0].device_kind,
            "device_count": len(devices), "platform": devices[0].platform,
            "cpu_count": os.cpu_count()}


def run(names: list[str], directory=None, quick: bool = False, as_json: bool = False,
        out=sys.stdout) -> int:
    """Run the named benchmarks (all when empty); returns the number that failed."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise JaxtrainError(f"unknown benchmark {unknown[0]!r} (valid: {', '.join(BENCHMARKS)})")
    folder = find_benchmarks(directory)
    env = environment()
    if as_json:
        print(json.dumps({"bench": "environment", **env}), file=out, flush=True)
    else:
        print("jaxtrain bench: " + ", ".join(f"{k} {v}" for k, v in env.items()), file=out)
    failed = 0
    for name in names or list(BENCHMARKS):
        script, quick_args = BENCHMARKS[name]
        command = [sys.executable, str(folder / script), *(quick_args if quick else [])]
        print(f"\n== {name}: {' '.join([script, *(quick_args if quick else [])])}",
              file=sys.stderr, flush=True)
        # lines are passed on as the script prints them: a long run shows its progress
        # stderr (XLA's logs can be long) goes to a file, so a full pipe never stalls it
        with tempfile.TemporaryFile("w+") as errors, subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=errors, text=True) as proc:
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.startswith("[Gloo]"):
                    continue
                is_json = line.startswith("{")
                if as_json and is_json:
                    print(json.dumps({"benchmark": name, **json.loads(line)}), file=out,
                          flush=True)
                elif not as_json and not is_json and line.strip():
                    print(f"[{name}] {line}", file=out, flush=True)
            proc.wait()
            errors.seek(0)
            stderr = errors.read()
        if proc.returncode:
            failed += 1
            tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"{name}: failed (exit {proc.returncode}): {tail}", file=sys.stderr)
    return failed
