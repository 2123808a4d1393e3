"""Adam's moments stored in less than float32: bfloat16 with stochastic rounding, or 8 bits
per value, blockwise quantized as in bitsandbytes' 8-bit Adam.

Formats of a stored moment (`scale_by_adam_compact(mu=..., nu=...)`):
- "float32": as Optax stores it (4 bytes/param);
- "bfloat16": 2 bytes/param, written with an unbiased stochastic rounding
  (`low_precision.stochastic_round_bf16`). To nearest, the second moment stalls:
  nu <- b2*nu + (1-b2)*g^2 changes nu by (1-b2) = 0.1% of its size at b2 = 0.999, a
  quarter of bfloat16's half unit in the last place (2^-9 = 0.2%), so every such step
  rounds back to the old nu. Stochastic rounding keeps the expectation exact;
- "8bit": ~1 byte/param (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
  Quantization"; bitsandbytes' `Adam8bit`, whose CPU kernel this follows): the leaf,
  flattened, is cut into blocks of `block_size` values (256, bitsandbytes' default), each
  divided by its absolute maximum (kept in float32) and stored as the index (uint8) of the
  nearest value of a 256-entry dynamic map: signed for the first moment, unsigned for
  the second (`dynamic_map`, bitsandbytes' `create_dynamic_map`). Leaves of fewer than
  `min_8bit_size` values (4096 as bitsandbytes) stay float32. Such a moment is one
  `Blockwise8bit` of two trees shaped like the params (`codes`, `absmax`), so that
  `sharding.state_shardings` shards each leaf's codes like the param (found by its path).
  With `num_devices` > 1 the blocks stay within pieces: every axis that `num_devices`
  divides is cut in that many, and the values of each piece are blocked row-major
  (`pieces_for`); `absmax` is then (*pieces, blocks) and sharded like the param, so a
  param sharded on any axes over up to `num_devices` devices is quantized where it lies,
  with no all-gather. (Row-major blocks over the whole leaf, as bitsandbytes, span the
  devices of a param sharded on a later axis: each update gathered the whole param.)
The moments are always computed in float32: each step decodes them, updates them, takes
the Adam step from the float32 values and encodes them again for storage.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .low_precision import stochastic_round_bf16

F32 = jnp.float32
FORMATS = ("float32", "bfloat16", "8bit")


def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes' dynamic quantization map (`create_dynamic_map(signed, 7, 8)`), 256
    sorted float32 values in [-1, 1] (signed) or [0, 1]: for each exponent 10^-6 .. 10^0 a
    linear run of fractions (more of them at larger exponents), plus 0 and 1. Dense near 0,
    so small moments keep their relative precision (Dettmers 2016, arXiv:1511.04561). The
    signed map ends at -0.993 (and +1): a block's most negative value is stored 0.7% short."""
    data = []
    for i in range(7):
        items = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = np.linspace(0.1, 1, items, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10.0 ** (-6 + i) * means).tolist()
        if signed:
            data += (-(10.0 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return np.sort(np.asarray(data, np.float32))


class Blockwise8bit(NamedTuple):
    """A leaf (or, in an optimizer state, a tree of leaves) quantized to 8 bits: `codes`
    (uint8, the leaf's shape) index the dynamic map; `absmax` (float32, one per block of
    the flattened leaf) scales each block. In a state, a leaf kept in float32 has its
    values in `codes` and an empty `absmax`."""

    codes: jax.Array
    absmax: jax.Array


def pieces_for(shape, num_devices: int) -> tuple:
    """Per axis of a leaf of `shape`, the pieces that its quantization blocks keep within:
    `num_devices` where that divides the axis, else 1. A param sharded on any axes over
    up to `num_devices` devices then holds whole pieces, so each device quantizes its
    own values (all 1: one piece, bitsandbytes' row-major blocks of the whole leaf)."""
    return tuple(num_devices if num_devices > 1 and s % num_devices == 0 else 1
                 for s in shape)


def _to_tiles(x, pieces):
    """`x` as (*pieces, values of one piece): tile (i, j, ...) holds piece i of axis 0,
    piece j of axis 1, ..., its values row-major. Reshapes and a transpose that keep a
    sharded axis' pieces on their devices."""
    d = x.ndim
    local = [s // p for s, p in zip(x.shape, pieces, strict=True)]
    y = x.reshape([v for pair in zip(pieces, local, strict=True) for v in pair])
    return y.transpose([*range(0, 2 * d, 2), *range(1, 2 * d, 2)]).reshape(*pieces, -1)


def _from_tiles(tiles, shape, pieces):
    """`_to_tiles`' inverse."""
    d = len(shape)
    local = [s // p for s, p in zip(shape, pieces, strict=True)]
    y = tiles.reshape(*pieces, *local)
    return y.transpose([k for i in range(d) for k in (i, d + i)]).reshape(shape)


def _pieces_of(q: Blockwise8bit) -> tuple:
    """The pieces `q` was quantized in: `absmax` is (*pieces, blocks) when any axis has
    more than one piece, else (blocks,)."""
    if q.absmax.ndim == q.codes.ndim + 1:
        return q.absmax.shape[:-1]
    return (1,) * q.codes.ndim


def quantize_blockwise(x, signed: bool, block_size: int = 256, pieces=None) -> Blockwise8bit:
    """`x` to 8 bits: per block of `block_size` values (row-major within each of `pieces`,
    see `pieces_for`; the last block of a piece short), x / absmax rounded to the nearest
    entry of `dynamic_map(signed)`."""
    table = jnp.asarray(dynamic_map(signed))
    pieces = tuple(pieces or (1,) * jnp.ndim(x))
    tiles = _to_tiles(jnp.asarray(x).astype(F32), pieces)
    n = tiles.shape[-1]
    blocks = -(-n // block_size)
    padded = jnp.pad(tiles, [(0, 0)] * len(pieces) + [(0, blocks * block_size - n)])
    padded = padded.reshape(*pieces, blocks, block_size)
    absmax = jnp.max(jnp.abs(padded), axis=-1)
    inverse = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    scaled = jnp.clip(padded * inverse[..., None], -1.0, 1.0)
    scaled = scaled.reshape(*pieces, blocks * block_size)[..., :n]
    middles = (table[:-1] + table[1:]) / 2
    codes = jnp.searchsorted(middles, scaled, side="left", method="scan")
    codes = _from_tiles(codes.astype(jnp.uint8), jnp.shape(x), pieces)
    return Blockwise8bit(codes, absmax if max(pieces, default=1) > 1 else absmax.reshape(-1))


def dequantize_blockwise(q: Blockwise8bit, signed: bool, block_size: int = 256) -> jax.Array:
    """The float32 values `q` stands for: map[codes] * absmax of each value's block."""
    table = jnp.asarray(dynamic_map(signed))
    pieces = _pieces_of(q)
    tiles = _to_tiles(table[q.codes.astype(jnp.int32)], pieces)
    n = tiles.shape[-1]
    absmax = q.absmax.reshape(*pieces, -1)
    padded = jnp.pad(tiles, [(0, 0)] * len(pieces) + [(0, absmax.shape[-1] * block_size - n)])
    out = padded.reshape(*absmax.shape, block_size) * absmax[..., None]
    return _from_tiles(out.reshape(*pieces, -1)[..., :n], q.codes.shape, pieces)


def check_format(owner: str, name: str, value, valid=("float32", "bfloat16")) -> str:
    """`value` (None, a dtype or its name) as a format name of `valid`, else a one-line
    ValueError naming `owner`, `name` and the valid set."""
    if value is None:
        return "float32"
    try:
        text = jnp.dtype(value).name
    except TypeError:
        text = str(value)
    if text not in valid:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(valid)} "
                         f"(8-bit moments: {owner}_8bit), got {value!r}")
    return text


def _format(stored) -> str:
    if isinstance(stored, Blockwise8bit):
        return "8bit" if stored.codes.dtype == jnp.uint8 else "float32"
    return "bfloat16" if stored.dtype == jnp.bfloat16 else "float32"


def _leaves(stored, treedef) -> list:
    """Per param, its stored moment: an array, or a `Blockwise8bit` pair."""
    if isinstance(stored, Blockwise8bit):
        return [Blockwise8bit(c, a) for c, a in zip(treedef.flatten_up_to(stored.codes),
                                                    treedef.flatten_up_to(stored.absmax),
                                                    strict=True)]
    return treedef.flatten_up_to(stored)


def _tree(leaves, treedef):
    """The stored moment from per-param leaves (`_leaves`' inverse)."""
    if leaves and isinstance(leaves[0], Blockwise8bit):
        return Blockwise8bit(treedef.unflatten([q.codes for q in leaves]),
                             treedef.unflatten([q.absmax for q in leaves]))
    return treedef.unflatten(leaves)


def _encode(x, stored, signed, block_size, key):
    """`x` stored as `stored` is (its format)."""
    fmt = _format(stored)
    if fmt == "bfloat16":
        return stochastic_round_bf16(x, key)
    if fmt == "8bit":
        return quantize_blockwise(x, signed, block_size, _pieces_of(stored))
    return Blockwise8bit(x, stored.absmax) if isinstance(stored, Blockwise8bit) else x


def _decode(stored, signed, block_size):
    if _format(stored) == "8bit":
        return dequantize_blockwise(stored, signed, block_size)
    return (stored.codes if isinstance(stored, Blockwise8bit) else stored).astype(F32)


def scale_by_adam_compact(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu="float32",
                          nu="float32", block_size: int = 256, min_8bit_size: int = 4096,
                          seed: int = 0, num_devices: int = 1) -> optax.GradientTransformation:
    """`optax.scale_by_adam` with the first moment stored as `mu` and the second as `nu`
    (each "float32", "bfloat16" or "8bit", see the module docstring). The stochastic
    rounding's bits come from `fold_in(PRNGKey(seed), step)`: no key in the state, and a
    run with a seed is reproducible. The state is Optax's `ScaleByAdamState`, its
    `mu`/`nu` trees of arrays, or in 8 bits `Blockwise8bit` pairs of trees, their blocks
    within the pieces of `pieces_for(shape, num_devices)`."""

    def fmt_of(fmt, p):
        return "float32" if fmt == "8bit" and p.size < min_8bit_size else fmt

    def init_fn(params):
        def zeros(fmt, signed):
            def one(p):
                f = fmt_of(fmt, p)
                if f == "8bit":
                    return quantize_blockwise(jnp.zeros_like(p, dtype=F32), signed, block_size,
                                              pieces_for(p.shape, num_devices))
                if fmt == "8bit":  # a small leaf of an 8-bit moment: float32, no scales
                    return Blockwise8bit(jnp.zeros_like(p, dtype=F32), jnp.zeros((0,), F32))
                return jnp.zeros_like(p, dtype=jnp.bfloat16 if f == "bfloat16" else F32)
            leaves, treedef = jax.tree.flatten(params)
            return _tree([one(p) for p in leaves], treedef)

        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros(mu, True),
                                      zeros(nu, False))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        step_key = jax.random.fold_in(jax.random.PRNGKey(seed), count)
        leaves, treedef = jax.tree.flatten(updates)
        mus, nus = _leaves(state.mu, treedef), _leaves(state.nu, treedef)
        out, new_mu, new_nu = [], [], []
        t = count.astype(F32)
        bc1, bc2 = 1 - jnp.asarray(b1, F32) ** t, 1 - jnp.asarray(b2, F32) ** t
        for i, (g, m_s, v_s) in enumerate(zip(leaves, mus, nus, strict=True)):
            g32 = g.astype(F32)
            m = b1 * _decode(m_s, True, block_size) + (1 - b1) * g32
            v = b2 * _decode(v_s, False, block_size) + (1 - b2) * g32 * g32
            step = (m / bc1) / (jnp.sqrt(v / bc2 + eps_root) + eps)
            out.append(step.astype(g.dtype))
            key = jax.random.fold_in(step_key, i)
            new_mu.append(_encode(m, m_s, True, block_size, jax.random.fold_in(key, 0)))
            new_nu.append(_encode(v, v_s, False, block_size, jax.random.fold_in(key, 1)))
        return treedef.unflatten(out), optax.ScaleByAdamState(
            count, _tree(new_mu, treedef), _tree(new_nu, treedef))

    return optax.GradientTransformation(init_fn, update_fn)
