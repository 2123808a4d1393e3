"""Launch several local processes for the multi-process tests and collect what they print."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).parent

# XLA:CPU options for test processes: the tests compile hundreds of small programs, and
# LLVM's optimisation of each was most of their CPU time (these cut a test file's CPU time
# by 40%); XLA:CPU's MLIR fusion emitters took 2/3 of what was left (off: a small GPT
# step compiles 3x faster, test_train_loop.py takes 27% less CPU). A test that runs long
# rather than compiling much can leave them out.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                " --xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int, fast_compile: bool = True) -> str:
    """XLA_FLAGS for a test process with `devices` simulated CPU devices."""
    fast = FAST_COMPILE if fast_compile else ""
    return f"--xla_force_host_platform_device_count={devices} {fast}".strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(devices: int) -> dict:
    """The test's environment for a child: `devices` CPU devices, this tree importable,
    none of the launcher variables the parent may have, and no shared compilation cache
    (a process that loads its step from the cache reaches the first collective far ahead
    of one that compiles, and gloo's 30 s start-up deadline ran out)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
           and not k.startswith(("SLURM_", "OMPI_", "PMIX_", "SKYPILOT_", "JAX_PERSISTENT",
                                 "JAX_COMPILATION_CACHE"))}
    env["XLA_FLAGS"] = xla_flags(devices)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(HERE.parent),
                                                      env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    return env


def launch(commands, timeout: float, end_others: bool = True):
    """Start each `(argv, env)`; return each one's (exit code, seconds it ran, output
    without gloo's chatter). With `end_others`, once one fails the rest are killed 2 s
    later (as a launcher would). Anything still running at `timeout` is killed (-9)."""
    start = time.monotonic()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for argv, env in commands]
    ended = [None] * len(procs)
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            for i, p in enumerate(procs):
                if p.poll() is not None and ended[i] is None:
                    ended[i] = now - start
            failed = any(p.poll() not in (None, 0) for p in procs)
            if (failed and end_others) or now - start > timeout:
                time.sleep(2 if failed and end_others else 0)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.1)
    finally:
        results = []
        for i, p in enumerate(procs):
            text = p.communicate(timeout=60)[0]
            lines = [ln for ln in text.splitlines() if not ln.startswith("[Gloo]")]
            seconds = ended[i] if ended[i] is not None else time.monotonic() - start
            results.append((p.returncode, seconds, "\n".join(lines)))
    return results
