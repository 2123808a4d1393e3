"""Hyperparameter injection shared by every jaxtrain optimizer.

`injected(factory, static, **hyperparams)` is
`optax.inject_hyperparams(factory, static_args=static)(**hyperparams)` (the state is
Optax's `InjectStatefulHyperparamsState`, so `current_hyperparams` and Optax's own tools
read it) with three differences, each fixing a fault of the plain wrapper:

- Hyperparameters are kept in float32, or in the params' dtype where that is wider
  (float64). The plain wrapper casts them to the params' dtype: in bfloat16, b2=0.999
  became 1.0 and Adam's bias correction divided by zero.
- Updates come back in the gradients' dtype and the state keeps the dtypes `init` gave it
  (moments in the params' dtype unless a factory asked for another). float32
  hyperparameters would otherwise promote bfloat16 moments to float32 after the first
  step, and a state whose dtypes drift breaks `lax.scan` and retraces `jit`.
- A hyperparameter given as an array (a tracer under `jit` or `vmap`, or the value an
  outer `optax.inject_hyperparams` passes at each step) is used as given at every
  update. Only those given as Python numbers are read back from the state, where
  `set_hyperparams` changes them. Plain nesting kept the value seen at `init` forever,
  so an outer schedule was silently ignored.

`init` also refuses a hyperparameter that loses its meaning in these dtypes (see
`validate.check_in_dtypes`): a learning rate of 1e39 is infinite in float32 and trained
NaN weights from the first step.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .validate import check_in_dtypes


def hyperparam_dtype(tree):
    """float32, or the widest floating dtype of `tree` where that is wider (float64)."""
    dtypes = [jnp.result_type(x) for x in jax.tree.leaves(tree)]
    floats = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    widest = max(floats, key=lambda d: jnp.finfo(d).bits, default=jnp.float32)
    return jnp.promote_types(widest, jnp.float32)


def _as_hyperparam(value, dtype):
    value = jnp.asarray(value)
    return value.astype(dtype) if jnp.issubdtype(value.dtype, jnp.floating) else value


def cast_like(tree, like):
    """`tree` with each leaf cast to the dtype of the matching leaf of `like`."""

    def cast(x, ref):
        dtype = getattr(ref, "dtype", None)
        if dtype is None or getattr(x, "dtype", dtype) == dtype:
            return x
        return x.astype(dtype)

    return jax.tree.map(cast, tree, like)


def _given_as_array(name, value, static) -> bool:
    return name not in static and isinstance(value, jax.Array | np.ndarray)


def injected(factory, static=(), dtype=None, only=None, **hyperparams
             ) -> optax.GradientTransformationExtraArgs:
    """`factory(**hyperparams)` with its numeric arguments injected (see the module
    docstring), held in `dtype` if given (else float32 or the params' wider one). The
    arguments named in `static` and, with `only`, every one not named there (defaults
    included) stay Python constants: for adadelta and lars, runtime rho/eps or
    weight_decay/trust_coefficient made the update 15-25% slower than Optax's (measured),
    while an injected learning rate alone costs nothing."""
    names = inspect.signature(factory).parameters  # defaults too: inject binds them
    static = tuple(k for k in names if k in static or (only is not None and k not in only))
    fixed_dtype = dtype
    given = {k: v for k, v in hyperparams.items() if _given_as_array(k, v, static)}

    def make(dtype):
        return optax.inject_hyperparams(factory, static_args=static,
                                        hyperparam_dtype=dtype)(**hyperparams)

    def init(params):
        dtype = fixed_dtype or hyperparam_dtype(params)
        check_in_dtypes(factory.__name__.lstrip("_"), hyperparams, dtype, params)
        return make(dtype).init(params)

    def update(updates, state, params=None, **extra):
        dtype = fixed_dtype or hyperparam_dtype(params if params is not None else updates)
        if given:
            state = state._replace(hyperparams={
                **state.hyperparams, **{k: _as_hyperparam(v, dtype) for k, v in given.items()}})
        new_updates, new_state = make(dtype).update(updates, state, params, **extra)
        return cast_like(new_updates, updates), cast_like(new_state, state)

    return optax.GradientTransformationExtraArgs(init, update)
