"""TrainState: everything a run needs to continue, as one pytree.

Params and the model's other state (BatchNorm statistics, ...) are kept as plain nested
dicts of arrays, which Optax, Orbax and the sharding rules all take as they are. How the
params become a model is static: a Flax NNX `graphdef`, a Flax Linen module, or a plain
`apply(params, batch)` function (see `adapters.py`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ..errors import JaxtrainError
from ..models.annotate import logical_axes
from ..transforms.paths import tree_mismatch
from ..transforms.wrappers import EmaState, ema
from .adapters import ApplyAdapter, LinenAdapter, NnxAdapter, cast_floats

# No non-finite step seen yet: (first step, first bad leaf index, count of bad steps).
NO_NONFINITE = (-1, -1, 0)


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # the run's base key; a step's key is `step_rng()`
    model_state: Any
    data_position: jax.Array  # batches consumed: the data order is a function of it
    nonfinite: jax.Array  # int32[3], see NO_NONFINITE
    ema_params: Any = None
    loss_scale: Any = None  # a `precision.LossScale` when training in float16
    adapter: Any = struct.field(pytree_node=False, default=None)
    tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)
    ema_decay: float | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, model, tx: optax.GradientTransformation, rng, *, params=None,
               sample=None, ema_decay: float | None = None, param_dtype=None,
               loss_scale=None) -> TrainState:
        """A fresh state from a Flax NNX model, a Flax Linen module (with `sample`, an
        input to initialise it, or its `params`), or an `apply(params, batch)` function
        with its `params`.

        `ema_decay` keeps an exponential moving average of the params; `param_dtype`
        (e.g. `jnp.bfloat16`) stores params, and so the optimizer state, in that dtype.
        """
        if isinstance(model, nnx.Module):
            if params is not None:
                raise JaxtrainError("an NNX model carries its own params; do not pass params")
            graphdef, nnx_params, rest = nnx.split(model, nnx.Param, ...)
            adapter, params = NnxAdapter(graphdef), nnx.to_pure_dict(nnx_params)
            model_state = nnx.to_pure_dict(rest)
        elif _is_linen(model):
            adapter = LinenAdapter(model)
            params, model_state = adapter.init(rng, params, sample)
        elif callable(model):
            if params is None:
                raise JaxtrainError("an apply(params, batch) function needs its params=")
            adapter, model_state = ApplyAdapter(model), {}
        else:
            raise JaxtrainError(
                f"cannot train a {type(model).__name__}: give a Flax NNX model, a Flax Linen "
                "module or an apply(params, batch) function"
            )
        if param_dtype is not None:
            params = cast_floats(params, param_dtype)
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise JaxtrainError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=rng,
            model_state=model_state,
            data_position=jnp.zeros((), jnp.int32),
            nonfinite=jnp.asarray(NO_NONFINITE, jnp.int32),
            ema_params=None if ema_decay is None else jax.tree.map(jnp.copy, params),
            loss_scale=loss_scale,
            adapter=adapter,
            tx=tx,
            ema_decay=ema_decay,
        )

    @property
    def graphdef(self):
        """The Flax NNX graph definition (NNX states only)."""
        return self.adapter.graphdef

    @property
    def apply_fn(self):
        """A `(params, *args) -> output` function for this state's model."""
        return self.adapter.apply_fn

    def model(self, params=None, train: bool = True):
        """What the loss function receives: the NNX module, a Linen callable, or params
        (for an `apply` function), with these (or the given) params."""
        return self.adapter.bind(self.params if params is None else params,
                                 self.model_state, train)

    def step_rng(self) -> jax.Array:
        """This step's key, `fold_in(rng, step)`: a pure function of the step, and dead code
        (free) in a step whose loss ignores it, where a split carried in the state is not."""
        return jax.random.fold_in(self.rng, self.step)

    def apply_gradients(self, grads, **extra_args) -> TrainState:
        """One optimizer step: transform the gradients, add them to the params, move the
        EMA, advance the step. Gradients (and so updates) of another structure or shape
        than the params, a hand-written step's mistake, are refused naming the first path
        that differs. Gradients may carry leading per-example axes for a transform that
        reduces them (`dp_aggregate`); its updates must then have the params' shapes."""
        wrong = tree_mismatch(grads, self.params, "gradients", "param", leading=True)
        if wrong is not None:
            raise JaxtrainError(f"apply_gradients: the gradients do not match the params: "
                                f"{wrong}")
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra_args)
        wrong = tree_mismatch(updates, self.params, "updates", "param")
        if wrong is not None:
            raise JaxtrainError(f"apply_gradients: the optimizer's updates do not match the "
                                f"params: {wrong} (gradients with leading per-example axes "
                                f"need a transform that reduces them, e.g. dp_aggregate)")
        params = optax.apply_updates(self.params, updates)
        ema_params = self.ema_params
        if ema_params is not None:  # the `transforms.ema` rule, kept outside the optimizer
            _, averaged = ema(self.ema_decay).update(updates, EmaState(ema_params),
                                                     self.params)
            ema_params = averaged.ema
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema_params)

    def saveable(self) -> dict:
        """The arrays of the state as a plain dict (what checkpoints hold)."""
        saved = {
            "step": self.step,
            "params": self.params,
            "opt_state": self.opt_state,
            "rng": self.rng,
            "model_state": self.model_state,
            "data_position": self.data_position,
            "nonfinite": self.nonfinite,
        }
        if self.ema_params is not None:
            saved["ema_params"] = self.ema_params
        if self.loss_scale is not None:
            saved["loss_scale"] = self.loss_scale
        return saved

    def with_saved(self, saved: dict) -> TrainState:
        """This state with its arrays replaced by a `saveable()` dict."""
        return self.replace(**saved)


def _is_linen(model) -> bool:
    from flax import linen

    return isinstance(model, linen.Module)


def param_logical_axes(model: nnx.Module) -> dict:
    """The logical axis names of a model's params, as a pure-dict tree of tuples."""
    return logical_axes(nnx.state(model, nnx.Param))
