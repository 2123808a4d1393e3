"""FLOP counts of layers (2 per multiply-add), for the models' `flops_per_*` methods."""

from __future__ import annotations

import math


def _valid_taps(n: int, k: int, stride: int) -> tuple[int, int]:
    """(output size, multiply-adds that fall inside the input) along one SAME-padded
    dimension: padding contributes no work, as XLA's cost analysis counts it."""
    out = math.ceil(n / stride)
    pad_lo = max((out - 1) * stride + k - n, 0) // 2
    taps = sum(0 <= o * stride + t - pad_lo < n for o in range(out) for t in range(k))
    return out, taps


def conv2d(h: int, w: int, k: int, stride: int, c_in: int, c_out: int
           ) -> tuple[float, int, int]:
    """FLOPs of a SAME-padded k x k convolution on an h x w x c_in input, and the output
    height and width."""
    out_h, taps_h = _valid_taps(h, k, stride)
    out_w, taps_w = _valid_taps(w, k, stride)
    return 2.0 * taps_h * taps_w * c_in * c_out, out_h, out_w
