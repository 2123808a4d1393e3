"""How a TrainState's params become the thing a loss function calls.

Three kinds of model, one protocol: `bind(params, model_state, train)` gives what
`loss_fn(model_or_params, batch, rng)` receives, and `state_of(bound, model_state)` reads
back the model's updated non-param state (BatchNorm statistics, ...) after the call.
Adapters are static parts of the TrainState (compared by identity).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import unfreeze

from ..errors import JaxtrainError


def cast_floats(tree, dtype):
    """`tree` with its floating-point leaves cast to `dtype` (integers left alone)."""
    if dtype is None:
        return tree
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x,
        tree,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class NnxAdapter:
    """Flax NNX: the loss receives the module merged from the graphdef and the params."""

    graphdef: object

    def bind(self, params, model_state, train: bool):
        model = nnx.merge(self.graphdef, params, model_state)
        model.train() if train else model.eval()
        return model

    def state_of(self, bound, model_state):
        _, _, rest = nnx.split(bound, nnx.Param, ...)
        return nnx.to_pure_dict(rest)


class LinenModel:
    """A Linen module bound to params and collections; calling it in training mode
    updates the mutable collections (`batch_stats`, ...), which `state` then holds."""

    def __init__(self, module, params, model_state: dict, train: bool):
        self.module, self.params, self.state, self.train = module, params, model_state, train

    def __call__(self, *args, **kwargs):
        variables = {"params": self.params, **self.state}
        if self.train and self.state:
            out, updates = self.module.apply(variables, *args, mutable=list(self.state),
                                             **kwargs)
            self.state = {**self.state, **updates}
            return out
        return self.module.apply(variables, *args, **kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class LinenAdapter:
    """Flax Linen: the loss receives a `LinenModel` callable."""

    module: object

    def init(self, rng, params, sample):
        if params is not None:
            return params, {}
        if sample is None:
            raise JaxtrainError("a Linen module needs sample= (an input) or params=")
        variables = unfreeze(self.module.init(rng, sample))
        params = variables.pop("params")
        return params, variables

    def bind(self, params, model_state, train: bool):
        return LinenModel(self.module, params, model_state, train)

    def state_of(self, bound, model_state):
        return bound.state

    @property
    def apply_fn(self):
        return lambda params, *args, **kw: self.module.apply({"params": params}, *args, **kw)


@dataclasses.dataclass(frozen=True, eq=False)
class ApplyAdapter:
    """A plain `apply(params, batch)` function: the loss receives the params themselves."""

    apply_fn: object

    def bind(self, params, model_state, train: bool):
        return params

    def state_of(self, bound, model_state):
        return model_state
