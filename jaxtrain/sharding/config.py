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
    pipe: int = option(1, "pipeline-parallel axis size: stages, each holding a slice of the "
                          "model's stacked layers (docs/sharding.md)")


@dataclass(frozen=True)
class PipelineConfig:
    """How a step runs through the `pipe` stages (`jaxtrain.sharding.pipeline`)."""

    microbatches: int | None = option(None, "microbatches each batch is cut into on its way "
                                            "through the stages (GPipe; the bubble is "
                                            "(S-1)/(M+S-1)); null: the number of stages",
                                      positive=True)
    repeats: int = option(1, "rounds each microbatch makes through the stages: 1 is GPipe; "
                             "R > 1 the circular schedule (each stage holds R chunks of "
                             "layers; bubble (S-1)/(R M+S-1); needs microbatches >= stages "
                             "and layers divisible by stages x R)", positive=True)


@dataclass(frozen=True)
class ShardingConfig:
    """Where the step runs: a mesh of the devices and the rules placing the state on it."""

    preset: str | dict = option("dp", "partition rules: a preset (dp, fsdp, tp, fsdp+tp) or "
                                      "a table {logical axis: mesh axis}")
    mesh: MeshConfig = section(MeshConfig, "device mesh axis sizes")
    pipeline: PipelineConfig = section(PipelineConfig, "pipeline parallelism over mesh.pipe")
