"""LoRA adapters (Hu et al. 2021) on the kernels of `nnx.Linear`, `nnx.LinearGeneral` and
`nnx.Einsum` (attention's query/key/value/out projections: `nnx.MultiHeadAttention`, the
GPT of `jaxtrain.models`), as an NNX wrapper module.

`LoRA(base)` computes `base(x) + (alpha / rank) * dropout(x) @ lora_a @ lora_b`, with the
kernel's contracted input axes flattened into `lora_a`'s rows and its output axes into
`lora_b`'s columns; `lora_b` starts at zero, so the wrapped model starts as the base one.
(`flax.nnx.LoRA` has no `alpha`, no dropout and only 2-D kernels, hence this wrapper.)
`merge_lora` folds the adapters back into the kernels for export.

A kernel stacked on a leading `layers` axis (a GPT built with `scan_layers=True`) gets
one adapter per layer: `lora_a` (layers, fan_in, rank) and `lora_b` (layers, rank,
fan_out), sliced with the kernel inside the GPT's scan over layers, so the stacked
model adapted is the unrolled one adapted (`jaxtrain.checkpoint.layout` converts the
adapters with the rest).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from ..errors import JaxtrainError
from ..transforms.paths import matches
from .gpt import LAYER_AXIS

ADAPTED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def _einsum_input_axes(spec: str) -> int:
    """Contracted axes of an Einsum like `btd,dnh->btnh`: they must end the input and
    start the kernel, and the kernel's other axes must end the output, in order."""
    inputs, out = spec.replace(" ", "").split("->")
    x, kernel = inputs.split(",")
    contracted = [c for c in kernel if c in x and c not in out]
    n = len(contracted)
    if (not n or x[-n:] != "".join(contracted) or kernel[:n] != x[-n:]
            or not out.endswith(kernel[n:])):
        raise JaxtrainError(f"LoRA needs an Einsum that contracts the input's last axes with "
                            f"the kernel's first ones, got {spec!r}")
    return n


def _input_axes(base) -> int:
    """How many trailing input axes the base layer contracts with its kernel."""
    if isinstance(base, nnx.Linear):
        return 1
    if isinstance(base, nnx.Einsum):
        return _einsum_input_axes(base.einsum_str)
    if base.batch_axis:
        raise JaxtrainError("LoRA does not support LinearGeneral with batch_axis")
    axes = sorted(base.axis)
    if axes != list(range(-len(axes), 0)):
        raise JaxtrainError(f"LoRA needs the contracted axes last, got axis={base.axis}")
    return len(axes)


def _stacked_layers(base) -> int | None:
    """The number of layers when the base kernel is stacked on a leading layer axis (its
    logical axis names start with `layers`), else None."""
    names = base.kernel.get_metadata().get("out_sharding") or ()
    return base.kernel.shape[0] if names and names[0] == LAYER_AXIS else None


class LoRA(nnx.Module):
    """A Linear / LinearGeneral / Einsum layer plus a trainable low-rank update of its
    kernel (one per layer for a stacked kernel)."""

    def __init__(self, base, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 *, rngs: nnx.Rngs):
        if not isinstance(base, ADAPTED):
            raise JaxtrainError(f"LoRA wraps nnx.Linear, nnx.LinearGeneral or nnx.Einsum, "
                                f"got {type(base).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise JaxtrainError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise JaxtrainError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        alpha = float(rank if alpha is None else alpha)
        kernel = base.kernel[...]
        layers = _stacked_layers(base)
        lead = () if layers is None else (layers,)  # one adapter per stacked layer
        per_layer = kernel.shape[len(lead):]
        self.n_in = _input_axes(base)
        self.out_shape = tuple(per_layer[self.n_in:])
        fan_in = math.prod(per_layer[:self.n_in])
        self.scale = alpha / rank
        self.base = base
        init = nnx.initializers.he_uniform(batch_axis=tuple(range(len(lead))))
        self.lora_a = nnx.Param(init(rngs.params(), (*lead, fan_in, rank), kernel.dtype))
        self.lora_b = nnx.Param(
            jnp.zeros((*lead, rank, math.prod(self.out_shape)), kernel.dtype))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def delta(self):
        """The kernel update `(alpha / rank) * lora_a @ lora_b`, in the kernel's shape (a
        stacked kernel's: the product is batched over the layer axis)."""
        kernel = self.base.kernel[...]
        return (self.scale * self.lora_a[...] @ self.lora_b[...]).reshape(kernel.shape)

    def __call__(self, x, **kwargs):
        """`kwargs` (such as attention's `out_sharding`) go to the base layer."""
        h = self.dropout(x)
        lead = h.shape[:h.ndim - self.n_in]
        h = h.reshape(*lead, -1) @ self.lora_a[...] @ self.lora_b[...]
        return self.base(x, **kwargs) + self.scale * h.reshape(*lead, *self.out_shape)

    def merged(self):
        """The base layer with the update folded into its kernel."""
        kernel = self.base.kernel
        kernel[...] = kernel[...] + self.delta().astype(kernel.dtype)
        return self.base


def _path(keys) -> str:
    return "/".join(str(k) for k in keys)


def replace_module(model: nnx.Module, path: str, new: nnx.Module) -> None:
    """Put `new` where the submodule at `path` (`backbone/dense`, `layers/0/attn`) is."""
    *parents, last = path.split("/")
    node = model
    for key in parents:
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    if last.isdigit():
        node[int(last)] = new
    elif hasattr(node, last):
        setattr(node, last, new)
    else:
        raise JaxtrainError(f"model has no submodule {path!r}")


def apply_lora(model: nnx.Module, targets, rank: int, alpha: float | None = None,
               dropout: float = 0.0, *, rngs: nnx.Rngs) -> list[str]:
    """Wrap every Linear / LinearGeneral / Einsum whose path matches `targets` (globs or
    `re:` regexes) in `LoRA`, in place. Returns the wrapped paths."""
    found = [(_path(keys), m) for keys, m in nnx.iter_modules(model)
             if isinstance(m, ADAPTED) and keys]
    chosen = [(p, m) for p, m in found if matches(p, targets)]
    if not chosen:
        raise JaxtrainError(f"no Linear layer matches {targets!r} (layers: "
                            f"{', '.join(p for p, _ in found) or 'none'})")
    for path, module in chosen:
        replace_module(model, path, LoRA(module, rank, alpha, dropout, rngs=rngs))
    return [p for p, _ in chosen]


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every LoRA adapter into its base kernel, in place; the model's param paths
    and shapes are those it had before `apply_lora`."""
    wrapped = [(_path(keys), m) for keys, m in nnx.iter_modules(model)
               if isinstance(m, LoRA)]
    for path, module in wrapped:
        replace_module(model, path, module.merged())
    return model
