"""TrainState: everything a run needs to continue, as one pytree.

Params and the model's other state (BatchNorm statistics, ...) are kept as plain nested
dicts of arrays, which Optax, Orbax and the sharding rules all take as they are; the
Flax NNX module structure (`graphdef`) is static and rebuilt with `model()`.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx, struct

from ..models.annotate import logical_axes


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    model_state: Any
    graphdef: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation, rng) -> TrainState:
        """From a Flax NNX model (its params are trained, everything else carried along)."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params = nnx.to_pure_dict(params)
        return cls(
            step=jax.numpy.zeros((), jax.numpy.int32),
            params=params,
            opt_state=tx.init(params),
            rng=rng,
            model_state=nnx.to_pure_dict(rest),
            graphdef=graphdef,
            tx=tx,
        )

    def model(self, params=None) -> nnx.Module:
        """The Flax NNX model with these (or the given) params."""
        return nnx.merge(self.graphdef, self.params if params is None else params,
                         self.model_state)

    def apply_gradients(self, grads, **extra_args) -> TrainState:
        """One optimizer step: transform the gradients and add them to the params."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra_args)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            opt_state=opt_state,
        )

    def saveable(self) -> dict:
        """The arrays of the state as a plain dict (what checkpoints hold)."""
        return {
            "step": self.step,
            "params": self.params,
            "opt_state": self.opt_state,
            "rng": self.rng,
            "model_state": self.model_state,
        }

    def with_saved(self, saved: dict) -> TrainState:
        """This state with its arrays replaced by a `saveable()` dict."""
        return self.replace(**saved)


def param_logical_axes(model: nnx.Module) -> dict:
    """The logical axis names of a model's params, as a pure-dict tree of tuples."""
    return logical_axes(nnx.state(model, nnx.Param))
