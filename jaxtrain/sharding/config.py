"""The `sharding` section of a run config: the device mesh and the partition rules."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option, section


@dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (`jaxtrain.sharding.make_mesh`); one may be -1 (the devices left)."""

    data: int = option(-1, "data-parallel axis size (-1: the devices left over)")
    fsdp: int = option(1, "fully sharded data-parallel axis size (params split over it)")
    tensor: int = option(1, "tensor-parallel axis size")


@dataclass(frozen=True)
class ShardingConfig:
    """Where the step runs: a mesh of the devices and the rules placing the state on it."""

    preset: str | dict = option("dp", "partition rules: a preset (dp, fsdp, tp, fsdp+tp) or "
                                      "a table {logical axis: mesh axis}")
    mesh: MeshConfig = section(MeshConfig, "device mesh axis sizes")
