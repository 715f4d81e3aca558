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

from ._jit import helper, kernel
from .common import (
    MEAN,
    backward_channels,
    forward_channels,
    frozen_channels,
    inference_channels,
    moments_channels,
    rescue,
    rescue_moments,
    row_frozen,
    row_grad_sums,
    row_moment_sums,
    scale_of,
    update_running,
)


@helper
def moment_sums(x):
    """Per channel: the shift (first value) and the shifted sums, in one read of x."""
    outer, channels, inner = x.shape
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
    return shift, s1, s2


@helper
def gradient_sums(x, dy, stats):
    """Per channel ``sum(dy)`` and ``sum(dy * (x - mean))``."""
    outer, channels, inner = x.shape
    s1 = np.zeros(channels)
    s2 = np.zeros(channels)
    if inner == 1:
        for o in range(outer):
            for c in range(channels):
                g = np.float64(dy[o, c, 0])
                s1[c] += g
                s2[c] += g * (x[o, c, 0] - stats[MEAN, c])
    else:
        for o in range(outer):
            for c in range(channels):
                a, b = row_grad_sums(x[o, c], dy[o, c], stats[MEAN, c])
                s1[c] += a
                s2[c] += b
    return s1, s2


@helper
def write(x, stats, beta, y):
    """``y = (x - mean) * gamma * invstd + beta``: one read of x, one write of y."""
    outer, channels, inner = x.shape
    for o in range(outer):
        for c in range(channels):
            m = stats[MEAN, c]
            s = scale_of(stats, c)
            b = np.float64(beta[c])
            for i in range(inner):
                y[o, c, i] = (x[o, c, i] - m) * s + b


@kernel("x", "p_out", "p_out", "tune")
def moments(x, mean, var, tune):
    """Per-channel mean and biased variance of ``x`` (outer, C, inner); needs outer*inner >= 1.

    A channel holding NaN or +-inf gets NaN statistics; the other channels are unaffected.
    """
    shift, s1, s2 = moment_sums(x)
    moments_channels(shift, s1, s2, x.shape[0] * x.shape[2], mean, var)
    rescue_moments(x, mean, var)


@kernel("x", "p", "p", "scalar", "scalar", "p_out", "p_out", "stats_out", "out", "tune")
def forward_train(x, gamma, beta, eps, momentum, running_mean, running_var, stats, y, tune):
    """Training forward: the shifted sums, the per-channel epilogue, then y."""
    shift, s1, s2 = moment_sums(x)
    n = x.shape[0] * x.shape[2]
    forward_channels(shift, s1, s2, n, eps, gamma, stats)
    write(x, stats, beta, y)
    rescue(x, stats, eps, beta, y)
    update_running(stats, n, momentum, running_mean, running_var)


@kernel("x", "p", "p", "p", "p", "scalar", "stats_out", "out", "tune")
def normalize(x, running_mean, running_var, gamma, beta, eps, stats, y, tune):
    """Inference: ``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``."""
    inference_channels(running_mean, running_var, eps, gamma, stats)
    write(x, stats, beta, y)


# Backward: two reductions in one read of x and dy, then one pass for dx.
@kernel("x", "x", "stats", "p_out", "p_out", "out", "tune")
def backward_train(x, dy, stats, dgamma, dbeta, dx, tune):
    """Training backward: the sums, the per-channel coefficients, then dx."""
    outer, channels, inner = x.shape
    s1, s2 = gradient_sums(x, dy, stats)
    coef = np.empty((3, channels))
    backward_channels(s1, s2, outer * inner, stats, dgamma, dbeta, coef[0], coef[1], coef[2])
    for o in range(outer):
        for c in range(channels):
            kc, c1c, c0c, m = coef[0, c], coef[1, c], coef[2, c], stats[MEAN, c]
            for i in range(inner):
                dx[o, c, i] = kc * dy[o, c, i] - c1c * (x[o, c, i] - m) + c0c


@kernel("x", "x", "stats", "p_out", "p_out", "out", "tune")
def backward_frozen(x, dy, stats, dgamma, dbeta, dx, tune):
    """Frozen-statistics backward in one pass: ``dx = gamma * invstd * dy`` (never reads x)
    and the sums for dgamma, dbeta."""
    outer, channels, inner = x.shape
    s1 = np.zeros(channels)
    s2 = np.zeros(channels)
    for o in range(outer):
        for c in range(channels):
            a, b = row_frozen(x[o, c], dy[o, c], dx[o, c], stats[MEAN, c], scale_of(stats, c))
            s1[c] += a
            s2[c] += b
    frozen_channels(s1, s2, stats, dgamma, dbeta)
