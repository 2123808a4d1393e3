"""Mixed precision: the dtype params are stored in and the dtype the model computes in.

Gradients are taken with respect to the stored params (the cast to the compute dtype is
inside the differentiated function), so with float32 storage the optimizer sees float32
gradients. float16 compute needs a dynamic `LossScale` in the TrainState.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from ..errors import JaxtrainError
from ..transforms.loss_scale import next_loss_scale
from .adapters import cast_floats


@dataclasses.dataclass(frozen=True)
class Policy:
    param_dtype: object = jnp.float32  # params and optimizer state
    compute_dtype: object = jnp.float32  # the forward and backward pass

    def cast_to_compute(self, tree):
        return cast_floats(tree, self.compute_dtype)

    @property
    def needs_loss_scale(self) -> bool:
        return jnp.dtype(self.compute_dtype) == jnp.float16


POLICIES = {
    "float32": Policy(),
    "bfloat16": Policy(jnp.float32, jnp.bfloat16),
    "bfloat16_params": Policy(jnp.bfloat16, jnp.bfloat16),
    "float16": Policy(jnp.float32, jnp.float16),
}


def get_policy(name: str | Policy | None = "auto", platform: str | None = None) -> Policy:
    """A policy by name. `auto`: bfloat16 compute with float32 params on accelerators,
    float32 throughout on CPU (where bfloat16 is emulated and slower)."""
    if isinstance(name, Policy):
        return name
    if name in (None, "auto"):
        platform = platform or jax.default_backend()
        return POLICIES["float32" if platform == "cpu" else "bfloat16"]
    if name not in POLICIES:
        raise JaxtrainError(
            f"unknown precision {name!r} (valid: auto, {', '.join(POLICIES)})"
        )
    return POLICIES[name]


class LossScale(struct.PyTreeNode):
    """Dynamic loss scaling held in the `TrainState` for `make_train_step`: halve the scale
    on a non-finite gradient (the step is skipped), double it after `period` finite steps
    in a row. The rule is `transforms.next_loss_scale`, that of the transform-level
    `transforms.dynamic_loss_scale` (which keeps its scale in the optimizer state)."""

    scale: jax.Array
    good_steps: jax.Array
    period: int = struct.field(pytree_node=False, default=2000)

    @classmethod
    def create(cls, initial: float = 2.0**15, period: int = 2000) -> LossScale:
        return cls(jnp.asarray(initial, jnp.float32), jnp.zeros((), jnp.int32), period)

    def adjust(self, finite) -> LossScale:
        """The scale after a step whose gradients were all finite or not: the rule of
        `transforms.dynamic_loss_scale` with its defaults (factor 2, at least 1)."""
        scale, good = next_loss_scale(self.scale, self.good_steps, finite, self.period)
        return self.replace(scale=scale, good_steps=good)
