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

from ._jit import (
    BACKWARD,
    BACKWARD_APPLY,
    BACKWARD_INPUT,
    BACKWARD_SUMS,
    FORWARD_TRAIN,
    MOMENTS,
    NORMALIZE,
    NORMALIZE_BLOCK,
    helper,
    kernel,
)
from .common import (
    MEAN,
    SCALE,
    SHIFT,
    STATS_ROWS,
    activate,
    backward_channels,
    copy_into,
    forward_channels,
    frozen_channels,
    inference_channels,
    input_channels,
    moments_channels,
    passes,
    rescue,
    rescue_moments,
    row_frozen,
    row_grad_sums,
    row_input_sums,
    row_moment_sums,
    update_running,
)


@helper
def shifts(x):
    k = np.empty(x.shape[1])
    for c in range(x.shape[1]):
        k[c] = x[0, c, 0]
    return k


@helper
def moment_sums(x):
    """Per channel: the shift (first value) and the shifted sums, in one read of x."""
    outer, channels, inner = x.shape
    shift = shifts(x)
    s1 = np.zeros(channels)
    s2 = np.zeros(channels)
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
def gradient_sums(x, dy, stats, relu, thr):
    """Per channel ``sum(dy)`` and ``sum(dy * (x - mean))``, dy behind the activation's mask."""
    outer, channels, inner = x.shape
    s1 = np.zeros(channels)
    s2 = np.zeros(channels)
    for o in range(outer):
        for c in range(channels):
            a, b = row_grad_sums(
                x[o, c], dy[o, c], stats[MEAN, c], stats[SCALE, c], stats[SHIFT, c], relu, thr
            )
            s1[c] += a
            s2[c] += b
    return s1, s2


@helper
def write(x, stats, relu, thr, y):
    """``y = activation((x - mean) * scale + shift)``: one read of x, one write of y."""
    outer, channels, inner = x.shape
    for o in range(outer):
        for c in range(channels):
            m, s, b = stats[MEAN, c], stats[SCALE, c], stats[SHIFT, c]
            for i in range(inner):
                y[o, c, i] = activate((x[o, c, i] - m) * s + b, relu, thr)


@helper
def gradient(x, dy, stats, relu, thr, s1, s2, n, dgamma, dbeta, dx):
    """The training gradient from its sums over n values: the per-channel coefficients and
    dgamma, dbeta (``backward_channels``), then ``dx = k*dy - c1*(x - mean) + c0`` per channel,
    dy behind the activation's mask."""
    outer, channels, inner = x.shape
    coef = np.empty((3, channels))
    backward_channels(s1, s2, n, stats, dgamma, dbeta, coef[0], coef[1], coef[2])
    for o in range(outer):
        for c in range(channels):
            m, s, b = stats[MEAN, c], stats[SCALE, c], stats[SHIFT, c]
            kc, c1c, c0c = coef[0, c], coef[1, c], coef[2, c]
            for i in range(inner):
                d = x[o, c, i] - m
                e = np.float64(dy[o, c, i]) if passes(d * s + b, relu, thr) else 0.0
                dx[o, c, i] = kc * e - c1c * d + c0c


@kernel(*MOMENTS)
def moments(x, mean, var, tune):
    """Per-channel mean and biased variance of ``x`` (outer, C, inner); needs outer*inner >= 1.

    A channel holding NaN or +-inf gets NaN statistics; the other channels are unaffected.
    """
    shift, s1, s2 = moment_sums(x)
    moments_channels(shift, s1, s2, x.shape[0] * x.shape[2], mean, var)
    rescue_moments(x, mean, var)


@kernel(*FORWARD_TRAIN)
def forward_train(
    x,
    gamma,
    beta,
    eps,
    momentum,
    unbiased,
    rmax,
    dmax,
    relu,
    thr,
    running_mean,
    running_var,
    stats,
    y,
    tune,
):
    """Training forward: the shifted sums, the per-channel epilogue, y, the rescue, then the
    running averages."""
    shift, s1, s2 = moment_sums(x)
    n = x.shape[0] * x.shape[2]
    forward_channels(
        shift, s1, s2, n, eps, gamma, beta, rmax, dmax, running_mean, running_var, stats
    )
    write(x, stats, relu, thr, y)
    rescue(x, stats, eps, gamma, beta, rmax, dmax, running_mean, running_var, relu, thr, y)
    update_running(stats, n, momentum, unbiased, running_mean, running_var)


@kernel(*NORMALIZE)
def normalize(x, running_mean, running_var, gamma, beta, eps, relu, thr, stats, y, tune):
    """Inference: ``y = activation(gamma * (x - running_mean) / sqrt(running_var + eps) +
    beta)``."""
    inference_channels(running_mean, running_var, eps, gamma, beta, stats)
    write(x, stats, relu, thr, y)


# Backward: two reductions in one read of x and dy, then one pass for dx.
@kernel(*BACKWARD)
def backward_train(x, dy, stats, relu, thr, dgamma, dbeta, dx, tune):
    """Training backward: the sums, the per-channel coefficients, then dx."""
    s1, s2 = gradient_sums(x, dy, stats, relu, thr)
    gradient(x, dy, stats, relu, thr, s1, s2, x.shape[0] * x.shape[2], dgamma, dbeta, dx)


@kernel(*NORMALIZE_BLOCK)
def normalize_block(x, stats, relu, thr, y, tune):
    """``y`` from a given statistics block (a synchronized forward's global statistics)."""
    write(x, stats, relu, thr, y)


@kernel(*BACKWARD_SUMS)
def backward_sums(x, dy, stats, relu, thr, s1, s2, tune):
    """The training gradient's two sums alone (float64; see the rows family)."""
    t1, t2 = gradient_sums(x, dy, stats, relu, thr)
    copy_into(t1, s1)
    copy_into(t2, s2)


@kernel(*BACKWARD_APPLY)
def backward_apply(x, dy, stats, relu, thr, s1, s2, n, dgamma, dbeta, dx, tune):
    """The training gradient from given sums over n values."""
    gradient(x, dy, stats, relu, thr, s1, s2, n, dgamma, dbeta, dx)


@kernel(*BACKWARD)
def backward_frozen(x, dy, stats, relu, thr, dgamma, dbeta, dx, tune):
    """Frozen-statistics backward in one pass: ``dx = scale * dy`` (behind the activation's
    mask) and the sums for dgamma, dbeta."""
    outer, channels, inner = x.shape
    s1 = np.zeros(channels)
    s2 = np.zeros(channels)
    for o in range(outer):
        for c in range(channels):
            a, b = row_frozen(
                x[o, c],
                dy[o, c],
                dx[o, c],
                stats[MEAN, c],
                stats[SCALE, c],
                stats[SHIFT, c],
                relu,
                thr,
            )
            s1[c] += a
            s2[c] += b
    frozen_channels(s1, s2, stats, dgamma, dbeta)


@kernel(*BACKWARD_INPUT)
def backward_input(x, dy, gamma, eps, dgamma, dbeta, dx, tune):
    """Cache-free training backward: statistics and both gradient sums in one read of x and
    dy, then dx."""
    outer, channels, inner = x.shape
    k = shifts(x)
    s = np.zeros((4, channels))
    for o in range(outer):
        for c in range(channels):
            a, b, e, f = row_input_sums(x[o, c], dy[o, c], k[c])
            s[0, c] += a
            s[1, c] += b
            s[2, c] += e
            s[3, c] += f
    stats = np.empty((STATS_ROWS, channels))
    input_channels(k, s[0], s[1], s[2], s[3], outer * inner, eps, gamma, stats)
    gradient(x, dy, stats, 0, 0.0, s[2], s[3], outer * inner, dgamma, dbeta, dx)
