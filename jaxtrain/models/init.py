"""Weight initialisers by name, for models and configs (`model: {name: mlp, init: he_normal}`).

Each is a variance-scaling rule: the kernel's variance is `scale / fan`, where `fan` is
the fan-in, or the mean of fan-in and fan-out for Xavier (Glorot), counted as JAX does
(a convolution kernel `(kh, kw, in, out)` has fan-in `kh * kw * in`). `*_normal` draws
from a normal truncated at two standard deviations and rescaled so that the variance is
exactly that; `*_uniform` from U(-a, a) with a = sqrt(3 variance).

    name             variance                     reference
    lecun_normal     1 / fan_in                   LeCun et al. 1998 (the default: Flax's)
    lecun_uniform    1 / fan_in
    he_normal        2 / fan_in                   He et al. 2015 (ReLU nets)
    he_uniform       2 / fan_in
    xavier_normal    2 / (fan_in + fan_out)       Glorot & Bengio 2010
    xavier_uniform   2 / (fan_in + fan_out)

GPT-2's init (Radford et al. 2019) is a plain normal of std 0.02, with the projections
that write into the residual stream scaled by 1 / sqrt(2 * num_layers): `gpt2_stds`.
"""

from __future__ import annotations

import jax

from ..errors import JaxtrainError

# name -> (scale, mode, distribution) of jax.nn.initializers.variance_scaling
INITIALIZERS = {
    "lecun_normal": (1.0, "fan_in", "truncated_normal"),
    "lecun_uniform": (1.0, "fan_in", "uniform"),
    "he_normal": (2.0, "fan_in", "truncated_normal"),
    "he_uniform": (2.0, "fan_in", "uniform"),
    "xavier_normal": (1.0, "fan_avg", "truncated_normal"),
    "xavier_uniform": (1.0, "fan_avg", "uniform"),
}
DEFAULT = "lecun_normal"


def initializer(name: str = DEFAULT, in_axis=-2, out_axis=-1):
    """The named initialiser (`jax.nn.initializers.variance_scaling`). `in_axis` and
    `out_axis` (ints or tuples) say which kernel axes are the fan-in and fan-out ones
    where they are not the last two (an attention kernel `(embed, heads, head_dim)`: in 0,
    out (1, 2))."""
    if name not in INITIALIZERS:
        raise JaxtrainError(f"unknown init {name!r} (valid: {', '.join(INITIALIZERS)})")
    return jax.nn.initializers.variance_scaling(*INITIALIZERS[name], in_axis=in_axis,
                                                out_axis=out_axis)


def variance(name: str, fan_in: int, fan_out: int) -> float:
    """The variance the named initialiser gives a kernel with these fans."""
    scale, mode, _ = INITIALIZERS[name]
    fan = fan_in if mode == "fan_in" else (fan_in + fan_out) / 2
    return scale / fan


def gpt2_stds(num_layers: int, std: float = 0.02) -> tuple[float, float]:
    """GPT-2's `(std, residual_std)`: every weight N(0, std^2), the projections into the
    residual stream (attention output, MLP down) N(0, (std / sqrt(2 num_layers))^2), so
    the residual stream's variance stays put as layers are added."""
    return std, std / (2 * num_layers) ** 0.5
