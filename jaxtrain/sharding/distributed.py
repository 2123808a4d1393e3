"""Many processes through JAX's own runtime, started from whatever launched them.

`start_from_env` is what `jaxtrain train` and the `Trainer` call first: it finds out how
the process was launched and, when it is one of several, joins `jax.distributed`. In order:

1. explicit arguments (`--coordinator`, `--num-processes`, `--process-id`);
2. torchrun-style variables `MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE`, `RANK`
   (torchrun, `torch.distributed.launch`, Kubeflow's PyTorchJob, many schedulers); the
   coordinator listens on `JAX_COORDINATOR_PORT` if set, else on `MASTER_PORT + 1`
   (torchrun's own store already holds `MASTER_PORT`);
3. SkyPilot's `SKYPILOT_NODE_IPS`, `SKYPILOT_NODE_RANK`, `SKYPILOT_NUM_NODES` (one process
   per node; the coordinator is the first node, port `JAX_COORDINATOR_PORT` or 8476);
4. the clusters JAX itself detects: SLURM (`srun`), Open MPI's `mpirun`, Cloud TPU VMs and
   pods, GKE; JAX then also picks the coordinator and the local devices.

Launcher variables come before JAX's detection because they describe this very process,
while SLURM's describe an allocation a torchrun may run inside. One process and none of
these: nothing is started. Call it before anything touches a JAX backend.

`initialize` wraps `jax.distributed.initialize` for explicit values: a coordinator that
does not answer within `timeout` seconds is a one-line `JaxtrainError` naming the address.
`heartbeat_timeout` bounds how long the others live on after one process dies: JAX's
coordination service declares a process dead once it has sent no heartbeat for that long
and then aborts every process of the job (JAX's default is 100 s).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import jax

from ..errors import JaxtrainError
from .mesh import describe_sizes

SKYPILOT_PORT = 8476  # JAX's customary coordinator port
HEARTBEAT_TIMEOUT = 100  # s, JAX's default: a process silent this long is declared dead


@dataclass(frozen=True)
class Launch:
    """How this process was launched: `launcher` names it; `coordinator` is `host:port`,
    or None where JAX's cluster detection finds it."""

    launcher: str
    num_processes: int
    process_id: int
    coordinator: str | None = None


def detect_launch(coordinator: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None, env=None) -> Launch | None:
    """The launch this process belongs to, or None for a single process (see the module
    docstring for the order). Reads `env` (default `os.environ`); starts nothing."""
    env = os.environ if env is None else env
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise JaxtrainError(
                "give --coordinator, --num-processes and --process-id together (got "
                f"{coordinator!r}, {num_processes!r}, {process_id!r})")
        return _checked("flags", coordinator, num_processes, process_id)
    torchrun = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
    if all(k in env for k in torchrun):
        port = env.get("JAX_COORDINATOR_PORT") or str(_int(env, "MASTER_PORT") + 1)
        return _checked("torchrun", f"{env['MASTER_ADDR']}:{port}",
                        _int(env, "WORLD_SIZE"), _int(env, "RANK"))
    sky = ("SKYPILOT_NODE_IPS", "SKYPILOT_NODE_RANK", "SKYPILOT_NUM_NODES")
    if all(k in env for k in sky):
        ips = env["SKYPILOT_NODE_IPS"].split()
        if not ips:
            raise JaxtrainError("SKYPILOT_NODE_IPS is empty: no node to coordinate")
        port = env.get("JAX_COORDINATOR_PORT", str(SKYPILOT_PORT))
        return _checked("skypilot", f"{ips[0]}:{port}", _int(env, "SKYPILOT_NUM_NODES"),
                        _int(env, "SKYPILOT_NODE_RANK"))
    if env is os.environ:  # JAX's detection reads os.environ itself
        cluster = _jax_cluster()
        if cluster is not None:
            count, rank = cluster.get_process_count(), cluster.get_process_id()
            return _checked(cluster.name, None, count, rank)
    return None


def start_from_env(coordinator: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None, *, timeout: float = 300.0,
                   heartbeat_timeout: int = HEARTBEAT_TIMEOUT) -> Launch | None:
    """Join `jax.distributed` as `detect_launch` finds this process was launched (nothing
    for one process, or when the runtime is already up); returns the launch or None."""
    launch = detect_launch(coordinator, num_processes, process_id)
    if launch is None or jax.distributed.is_initialized():
        return launch
    if launch.coordinator is None:  # a cluster JAX knows: it picks address and devices
        initialize(timeout=timeout, heartbeat_timeout=heartbeat_timeout)
    else:
        initialize(launch.coordinator, launch.num_processes, launch.process_id,
                   timeout=timeout, heartbeat_timeout=heartbeat_timeout)
    return launch


def describe(launch: Launch | None, mesh) -> str:
    """One line: the launcher, the process count and the global mesh."""
    name = "one process" if launch is None else f"{launch.launcher} launch"
    shape = describe_sizes(mesh.shape)
    return (f"{name}: {jax.process_count()} process(es), {jax.device_count()} "
            f"{jax.default_backend()} device(s) ({jax.local_device_count()} local), "
            f"mesh {shape}")


def check_started() -> None:
    """A one-line error when the launcher's variables say this is one process of several
    but `jax.distributed` was not started: each would train alone, on its own devices."""
    if jax.distributed.is_initialized():
        return
    launch = detect_launch()
    if launch is not None:
        raise JaxtrainError(
            f"this is process {launch.process_id} of {launch.num_processes} ({launch.launcher} "
            "launch) but jax.distributed was not started: call "
            "jaxtrain.sharding.start_from_env() before creating any JAX array")


def is_main_process() -> bool:
    """Whether this process writes what is written once: logs, plots, summaries."""
    return jax.process_index() == 0


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None,
               timeout: float = 300.0, heartbeat_timeout: int = HEARTBEAT_TIMEOUT) -> None:
    """Join (or, as process 0, start) the distributed runtime; then `jax.devices()` lists
    the devices of all processes and `jax.process_index()` is this one's id. A process
    that sends no heartbeat for `heartbeat_timeout` seconds (killed, its host lost) is
    declared dead and the coordination service then aborts all the others."""
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise JaxtrainError(
            "sharding.initialize: give coordinator_address, num_processes and process_id "
            f"together, or none of them for auto-detection (got {coordinator_address!r}, "
            f"{num_processes!r}, {process_id!r})"
        )
    if num_processes is not None:
        _checked("initialize", coordinator_address, num_processes, process_id)
    if _backend_started():
        raise JaxtrainError(
            "sharding.initialize must run before anything uses JAX devices or arrays "
            "(a JAX backend is already initialized in this process)"
        )
    if num_processes is not None and process_id != 0:
        wait_for_coordinator(coordinator_address, timeout)
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, local_device_ids=local_device_ids,
        initialization_timeout=max(1, int(timeout)),
        heartbeat_timeout_seconds=max(1, int(heartbeat_timeout)),
    )


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Retry a TCP connection to `host:port` until it opens or `timeout` seconds pass."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise JaxtrainError(f"coordinator address {address!r} must be host:port")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise JaxtrainError(
                    f"coordinator {address} cannot be reached within {timeout:g} s "
                    f"({err.strerror or err}); is process 0 running and the port open?"
                ) from None
            time.sleep(0.2)


def _checked(launcher: str, coordinator, num_processes, process_id) -> Launch | None:
    """A validated launch; None when it is one process (nothing to start)."""
    if not isinstance(num_processes, int) or num_processes < 1:
        raise JaxtrainError(f"{launcher}: num_processes={num_processes!r} must be a positive "
                            "integer")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise JaxtrainError(f"{launcher}: process_id={process_id!r} must be an integer in "
                            f"[0, {num_processes})")
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not host or not sep or not port.isdigit():
            raise JaxtrainError(f"{launcher}: coordinator {coordinator!r} must be host:port")
    if num_processes == 1:
        return None
    return Launch(launcher, num_processes, process_id, coordinator)


def _int(env, key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise JaxtrainError(f"environment variable {key}={env[key]!r} must be an "
                            "integer") from None


def _jax_cluster():
    """The cluster environment JAX's own auto-detection would use, or None."""
    from jax._src import clusters  # the public API runs the detection but does not name it

    return next((c for c in clusters.ClusterEnv._cluster_types
                 if not c.opt_in_only_method and c.is_env_present()), None)


def _backend_started() -> bool:
    from jax._src import xla_bridge  # the public API has no such query

    return xla_bridge.backends_are_initialized()
