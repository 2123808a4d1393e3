"""Muon (Jordan et al., 2024; Liu et al., 2025 "Muon is Scalable for LLM Training") on
real models: stacked / scanned layers, convolutions, attention kernels and embeddings.

Each leaf is either a Muon leaf or an AdamW leaf, decided from its path and shape:

* AdamW: leaves of fewer than 2 dimensions (biases, norms), and the leaves whose path
  matches `adam_paths` (default: embeddings and classifier / LM heads, which the Muon
  papers keep on AdamW).
* Muon: every other leaf, seen as a batch of matrices. The leading axis of a leaf matching
  `stacked_paths` is a layer axis (a `scan`-ed or `vmap`-ed stack): each layer's matrix is
  orthogonalized on its own, never the stack as one matrix. The remaining axes are split
  into (fan-in axes, fan-out axes): 2 axes are (in, out) as a Flax kernel; 3 or more
  (a conv kernel HWIO, an attention kernel (embed, heads, head_dim)) are split where the
  two sides' sizes are closest (HWIO -> (H*W*I, O), (embed, heads, head_dim) ->
  (embed, heads*head_dim), (heads, head_dim, embed) -> (heads*head_dim, embed)); a conv
  kernel with very few channels may be cut elsewhere ((3, 3, 2, 4) -> (3*3, 2*4)): name
  it in `dimension_numbers`.
  `dimension_numbers={glob: (reduction_axes, output_axes) or None}` overrides the rule
  (None sends the leaf to AdamW).

The Muon update: momentum (Nesterov by default), orthogonalized by `ns_steps` quintic
Newton-Schulz iterations (as Optax's `contrib.muon`, written here: Optax keeps its
helpers private), scaled by
sqrt(max(1, fan_out/fan_in)) (or `consistent_rms * sqrt(max(fan_in, fan_out))`, Moonshot's
rule for reusing AdamW's learning rate), plus decoupled decay; times the learning rate.
`bias_correction=True` (default) bias-corrects the momentum as `optax.contrib.muon` does;
`bias_correction=False` is Keller Jordan's reference and `torch.optim.Muon`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from ..errors import JaxtrainError
from . import blocks
from ._frontier import check_mu_dtype, f32, finish, in_f32, inject, store_moments, zeros_f32
from .blocks import Plan
from .paths import matches, path_str
from .validate import check_learning_rate, check_nonnegative, check_positive, check_unit_interval

NS_COEFFS = (3.4445, -4.7750, 2.0315)
ADAM_PATHS = ("*embed*", "*head/*")


def _split(shape) -> int:
    """Where to cut `shape` into (fan-in, fan-out) axes: the cut making the two products
    closest (the later cut on a tie)."""
    best, cut = None, 1
    for s in range(1, len(shape)):
        gap = abs(math.log(math.prod(shape[:s]) / math.prod(shape[s:])))
        if best is None or gap <= best:
            best, cut = gap, s
    return cut


def dimension_rule(path: str, shape, adam_paths=ADAM_PATHS, stacked_paths=(),
                   dimension_numbers=None):
    """The `MuonDimensionNumbers` of one leaf, or None for an AdamW leaf (module docstring)."""
    for pattern, dims in (dimension_numbers or {}).items():
        if matches(path, pattern):
            if dims is None:
                return None
            reduction, output = dims
            return MuonDimensionNumbers(tuple(reduction), tuple(output))
    if matches(path, adam_paths):
        return None
    lead = 1 if stacked_paths and matches(path, stacked_paths) else 0
    rest = tuple(shape[lead:])
    if len(rest) < 2:
        return None
    cut = lead + _split(rest)
    return MuonDimensionNumbers(tuple(range(lead, cut)), tuple(range(cut, len(shape))))


class MuonMomentumState(NamedTuple):
    count: jax.Array
    mu: optax.Updates


def _momentum(beta, nesterov, bias_correction, mu_dtype):
    """m = beta*m + (1-beta)*g; Nesterov: beta*m + (1-beta)*g, bias-corrected as Optax
    (m by 1-beta^(t+1), g by 1-beta^t) when `bias_correction`."""

    def init(params):
        return MuonMomentumState(jnp.zeros([], jnp.int32), zeros_f32(params, mu_dtype))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        b = f32(beta)
        mu = jax.tree.map(lambda g, m: b * f32(m) + (1 - b) * f32(g), updates, state.mu)
        if bias_correction:
            cm, cg = (1 - b ** (t + 1), 1 - b**t) if nesterov else (1 - b**t, 1.0)
        else:
            cm = cg = 1.0
        if nesterov:
            out = jax.tree.map(lambda m, g: b * m / cm + (1 - b) * f32(g) / cg, mu, updates)
        else:
            out = jax.tree.map(lambda m: m / cm, mu)
        mu = jax.tree.map(lambda m, s: m.astype(s.dtype), mu, state.mu)
        return out, MuonMomentumState(count, mu)

    return optax.GradientTransformation(init, update)


class _Matrices(NamedTuple):
    """A leaf of `shape` seen as a batch of (fan-in, fan-out) matrices (`dims`; the other
    axes are the batch), wide side last: the one block shape `blocks.Plan` stacks."""

    shape: tuple
    dims: MuonDimensionNumbers

    def _order(self):
        reduction, output = tuple(self.dims.reduction_axis), tuple(self.dims.output_axis)
        batch = tuple(a for a in range(len(self.shape)) if a not in reduction + output)
        return batch, reduction, output

    def _sizes(self):
        return [math.prod(self.shape[a] for a in axes) for axes in self._order()]

    def block_shapes(self):
        _, m, n = self._sizes()
        return [(min(m, n), max(m, n))]

    def counts(self):
        return [self._sizes()[0]]

    def pieces(self, x):
        b, m, n = self._sizes()
        x = jnp.transpose(x, sum(self._order(), ())).reshape(b, m, n)
        return [x if m <= n else jnp.swapaxes(x, 1, 2)]

    def join(self, pieces):
        (x,) = pieces
        b, m, n = self._sizes()
        if m > n:
            x = jnp.swapaxes(x, 1, 2)
        order = sum(self._order(), ())
        x = x.reshape([self.shape[i] for i in order])
        return jnp.transpose(x, [order.index(i) for i in range(len(self.shape))])


def _newton_schulz_wide(m, ns_steps: int, eps):
    """A batch (b, m, n) of matrices with m <= n, each divided by its Frobenius norm
    (+ eps), then `ns_steps` quintic iterations X <- (aI + bA + cA^2)X with A = XX^T:
    aX + (bA + cA^2)X with the aX folded into the small matrix, one pass over X fewer."""
    m = m / (jnp.linalg.norm(m, axis=(1, 2), keepdims=True) + eps)
    a, b, c = NS_COEFFS
    eye = jnp.eye(m.shape[1], dtype=m.dtype)
    for _ in range(ns_steps):
        gram = jnp.einsum("bik,bjk->bij", m, m)  # X X^T with no transposed copy of X
        m = (a * eye + b * gram + c * gram @ gram) @ m
    return m


def newton_schulz(x, dims: MuonDimensionNumbers, ns_steps: int, eps):
    """`x` orthogonalized as a batch of (fan-in, fan-out) matrices (`dims`; the other axes
    are the batch), each with its wide side last (`_newton_schulz_wide`)."""
    view = _Matrices(tuple(x.shape), dims)
    return view.join([_newton_schulz_wide(view.pieces(x)[0], ns_steps, eps)])


def shape_scale(shape, dims: MuonDimensionNumbers, consistent_rms) -> float:
    """sqrt(max(1, fan_out/fan_in)) (Keller Jordan's width rule), or with `consistent_rms`
    consistent_rms * sqrt(max(fan_in, fan_out)) (Moonshot's)."""
    fan_in = math.prod(shape[a] for a in dims.reduction_axis)
    fan_out = math.prod(shape[a] for a in dims.output_axis)
    if consistent_rms is None:
        return math.sqrt(max(1.0, fan_out / fan_in))
    return consistent_rms * math.sqrt(max(fan_in, fan_out))


def _orthogonalize(rule, ns_steps, eps, consistent_rms):
    """Newton-Schulz of every matrix of every leaf. Matrices of one shape are stacked and
    the stack split across the devices of the mesh in use (`blocks`): each device
    orthogonalizes whole matrices, its share of them, and none gathers them all."""

    def apply(updates, params=None):
        del params
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        views = [_Matrices(tuple(x.shape), rule(path_str(kp), x.shape)) for kp, x in flat]
        plan = Plan(views, blocks.device_count() or 1)
        stacks = plan.stack([f32(x) for _, x in flat])
        done = plan.unstack({k: _newton_schulz_wide(m, ns_steps, eps)
                             for k, m in stacks.items()})
        return treedef.unflatten([shape_scale(v.shape, v.dims, consistent_rms) * x
                                  for v, x in zip(views, done, strict=True)])

    return optax.stateless(apply)


def _muon(learning_rate, beta, ns_steps, eps, weight_decay, nesterov, bias_correction,
          adam_b1, adam_b2, adam_learning_rate, adam_weight_decay, adam_paths, stacked_paths,
          dimension_numbers, consistent_rms, mu_dtype):
    rule = lambda path, shape: dimension_rule(path, shape, adam_paths, stacked_paths,
                                              dimension_numbers)
    muon_part = finish(
        optax.chain(_momentum(beta, nesterov, bias_correction, None),
                    _orthogonalize(rule, ns_steps, eps, consistent_rms)),
        learning_rate, weight_decay)
    adam_part = finish(
        in_f32(optax.scale_by_adam(adam_b1, adam_b2, eps, nesterov=nesterov,
                                   mu_dtype=jnp.float32)),
        learning_rate if adam_learning_rate is None else adam_learning_rate,
        adam_weight_decay)

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda kp, x: "adam" if rule(path_str(kp), x.shape) is None else "muon", params)

    return store_moments(optax.partition({"muon": muon_part, "adam": adam_part}, labels),
                         mu_dtype)


def muon(
    learning_rate,
    beta: float = 0.95,
    ns_steps: int = 5,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    nesterov: bool = True,
    bias_correction: bool = True,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_learning_rate=None,
    adam_weight_decay: float = 0.0,
    adam_paths=ADAM_PATHS,
    stacked_paths=(),
    dimension_numbers=None,
    consistent_rms: float | None = None,
    mu_dtype=None,
):
    """Muon with AdamW on the non-matrix leaves (see the module docstring for which leaf
    gets which). With `adam_paths=()` and only 2-D / 1-D leaves it is
    `optax.contrib.muon`; with `bias_correction=False` on 2-D leaves, `torch.optim.Muon`
    (tests compare both step by step). `mu_dtype` stores the momenta and AdamW's moments
    (float32 by default; bfloat16 with stochastic rounding, `_frontier.store_moments`)."""
    check_learning_rate(learning_rate)
    mu_dtype = check_mu_dtype("muon", mu_dtype)
    if adam_learning_rate is not None:
        check_learning_rate(adam_learning_rate, "muon: adam_learning_rate")
    check_unit_interval("muon", beta=beta, adam_b1=adam_b1, adam_b2=adam_b2)
    check_positive("muon", eps=eps)
    check_nonnegative("muon", weight_decay=weight_decay, adam_weight_decay=adam_weight_decay)
    if not isinstance(ns_steps, int) or ns_steps < 1:
        raise JaxtrainError(f"muon: ns_steps must be an integer >= 1, got {ns_steps!r}")
    adam_paths = (adam_paths,) if isinstance(adam_paths, str) else tuple(adam_paths)
    stacked_paths = (stacked_paths,) if isinstance(stacked_paths, str) else tuple(stacked_paths)
    return inject(
        _muon,
        static=("ns_steps", "nesterov", "bias_correction", "adam_paths", "stacked_paths",
                "dimension_numbers", "consistent_rms", "mu_dtype"),
        learning_rate=learning_rate, beta=beta, ns_steps=ns_steps, eps=eps,
        weight_decay=weight_decay, nesterov=nesterov, bias_correction=bias_correction,
        adam_b1=adam_b1, adam_b2=adam_b2, adam_learning_rate=adam_learning_rate,
        adam_weight_decay=adam_weight_decay, adam_paths=adam_paths,
        stacked_paths=stacked_paths, dimension_numbers=dimension_numbers,
        consistent_rms=consistent_rms, mu_dtype=mu_dtype,
    )
