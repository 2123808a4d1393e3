"""Many hosts through JAX's own runtime: `initialize` wraps `jax.distributed.initialize`.

Call it first, before anything touches a JAX backend (`jax.devices()`, any array).
With no arguments JAX detects the cluster where it can (TPU pods, SLURM, Open MPI);
otherwise pass the coordinator address, the process count and this process's id.
A coordinator that does not answer within `timeout` seconds is a `JaxtrainError`
naming the address, instead of the runtime aborting the process.
"""

from __future__ import annotations

import socket
import time

import jax

from ..errors import JaxtrainError


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None,
               timeout: float = 300.0) -> None:
    """Join (or, as process 0, start) the distributed runtime; then `jax.devices()` lists
    the devices of all processes and `jax.process_index()` is this one's id."""
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise JaxtrainError(
            "sharding.initialize: give coordinator_address, num_processes and process_id "
            f"together, or none of them for auto-detection (got {coordinator_address!r}, "
            f"{num_processes!r}, {process_id!r})"
        )
    if num_processes is not None:
        if not isinstance(num_processes, int) or num_processes < 1:
            raise JaxtrainError(f"num_processes={num_processes!r} must be a positive integer")
        if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
            raise JaxtrainError(
                f"process_id={process_id!r} must be an integer in [0, {num_processes})"
            )
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


def _backend_started() -> bool:
    from jax._src import xla_bridge  # the public API has no such query

    return xla_bridge.backends_are_initialized()
