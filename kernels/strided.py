"""The strided family: serial loops over any (outer, C, inner) view, 'A' layout included.

Used for views that are not C-contiguous after canonicalization (sliced, negative-stride,
broadcast); contiguous arrays go to the parallel ``rows``/``lanes`` families, which use the same
algorithms (and have the same accuracy).

Statistics, in one read of x.

Algorithm: shifted sums accumulated in float64. For each channel take a shift ``k`` = the
channel's first value, accumulate ``s1 = sum(x - k)`` and ``s2 = sum((x - k)**2)`` in float64,
then ``mean = k + s1/n`` and ``var = (s2 - s1*s1/n) / n``.

Why not ``E[x^2] - E[x]^2``: on float32 x = 1e4 + N(0, 1), shape (32, 64, 3136), that
formula gives a variance off by 1.6e5 relative with float32 sums, and still 1.1e-5 with
float64 sums (6e-4 at 1e7 values per channel). With the shift, ``s2`` exceeds ``s1**2/n`` by
the factor ``1 + (mean-k)**2/var`` only, and ``(x_i-mean)**2 <= n*var`` bounds that factor by
n; float64 accumulation then leaves a relative error of about ``1e-16 * (that factor)``: at
worst (the first value an extreme outlier) 1e-16 * n, e.g. 1e-9 at n = 1e7, still 200x inside
the float32 target; typically ~1e-15. Measured against a float64 two-pass reference on float32
x = 1e4 + N(0, 1) with 1e7 values per channel: at most 2.6e-13 relative (target 2e-7; PyTorch
2.13: 2e5 on 2-D and NHWC), in every layout; see ``tests/test_accuracy.py``.

Loop order follows the canonical view: with ``inner > 1`` each (o, c) row is reduced by the
shared ``common.row_moment_sums`` (vectorized through ``reassoc`` only, see ``_jit``); with
``inner == 1`` the loop runs across channels, whose accumulators are independent.
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel
from .common import (finish_moments, grad_coefficients, inverse_std, row_grad_sums,
                     row_moment_sums)


@kernel("x", "vec_out", "vec_out")
def moments(x, mean, var):
    """Per-channel mean and biased variance of ``x`` (outer, C, inner); needs outer*inner >= 1.

    A channel holding NaN or +-inf gets NaN statistics; the other channels are unaffected.
    """
    outer, channels, inner = x.shape
    n = outer * inner
    shift = np.empty(channels)
    s1 = np.zeros(channels)
    s2 = np.zeros(channels)
    for c in range(channels):
        shift[c] = x[0, c, 0]
    if inner == 1:
        for o in range(outer):
            for c in range(channels):
                d = x[o, c, 0] - shift[c]
                s1[c] += d
                s2[c] += d * d
    else:
        for o in range(outer):
            for c in range(channels):
                a, b = row_moment_sums(x[o, c], shift[c])
                s1[c] += a
                s2[c] += b
    finish_moments(shift, s1, s2, n, mean, var)


# Normalization: one read of x, one write of y.
@kernel("x", "vec", "vec", "vec", "out")
def normalize(x, mean, scale, shift, y):
    """Write ``y[o, c, i] = (x[o, c, i] - mean[c]) * scale[c] + shift[c]``; y may be x itself."""
    outer, channels, inner = x.shape
    if inner == 1:
        for o in range(outer):
            for c in range(channels):
                y[o, c, 0] = (x[o, c, 0] - mean[c]) * scale[c] + shift[c]
    else:
        for o in range(outer):
            for c in range(channels):
                m = mean[c]
                s = scale[c]
                b = shift[c]
                for i in range(inner):
                    y[o, c, i] = (x[o, c, i] - m) * s + b


# Backward: two reductions in one read of x and dy, then one pass for dx.
@kernel("x", "x", "vec", "vec_out", "vec_out")
def grad_sums(x, dy, mean, sum_dy, sum_dy_xmu):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``."""
    outer, channels, inner = x.shape
    for c in range(channels):
        sum_dy[c] = 0.0
        sum_dy_xmu[c] = 0.0
    if inner == 1:
        for o in range(outer):
            for c in range(channels):
                g = np.float64(dy[o, c, 0])
                sum_dy[c] += g
                sum_dy_xmu[c] += g * (x[o, c, 0] - mean[c])
    else:
        for o in range(outer):
            for c in range(channels):
                a, b = row_grad_sums(x[o, c], dy[o, c], mean[c])
                sum_dy[c] += a
                sum_dy_xmu[c] += b


@kernel("x", "x", "vec", "vec", "vec", "vec", "out")
def grad_input(x, dy, mean, k, c1, c0, dx):
    """Write ``dx[o, c, i] = k[c]*dy[o, c, i] - c1[c]*(x[o, c, i] - mean[c]) + c0[c]``."""
    outer, channels, inner = x.shape
    if inner == 1:
        for o in range(outer):
            for c in range(channels):
                dx[o, c, 0] = k[c] * dy[o, c, 0] - c1[c] * (x[o, c, 0] - mean[c]) + c0[c]
    else:
        for o in range(outer):
            for c in range(channels):
                kc = k[c]
                c1c = c1[c]
                c0c = c0[c]
                m = mean[c]
                for i in range(inner):
                    dx[o, c, i] = kc * dy[o, c, i] - c1c * (x[o, c, i] - m) + c0c


@kernel("x", "vec", "vec", "scalar", "vec_out", "vec_out", "vec_out", "out")
def forward_train(x, gamma, beta, eps, mean, var, invstd, y):
    """Training forward: :func:`moments`, then :func:`normalize` with ``gamma * invstd``."""
    moments(x, mean, var)
    for c in range(x.shape[1]):
        invstd[c] = inverse_std(var[c], eps)
    normalize(x, mean, gamma * invstd, beta, y)


@kernel("x", "x", "vec", "vec", "vec", "vec_out", "vec_out", "out")
def backward_train(x, dy, mean, invstd, gamma, sum_dy, sum_dy_xmu, dx):
    """Training backward: :func:`grad_sums`, the coefficients, then :func:`grad_input`."""
    channels = x.shape[1]
    grad_sums(x, dy, mean, sum_dy, sum_dy_xmu)
    k = np.empty(channels)
    c1 = np.empty(channels)
    c0 = np.empty(channels)
    for c in range(channels):
        grad_coefficients(invstd, gamma, sum_dy, sum_dy_xmu, x.shape[0] * x.shape[2], c, k, c1,
                          c0)
    grad_input(x, dy, mean, k, c1, c0, dx)
