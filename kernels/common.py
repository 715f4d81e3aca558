"""Per-channel arithmetic shared by the kernel families (the O(C) part of every operation), and
the row reductions of the ``rows`` and ``strided`` families.

Every family's kernel is: a reduction over x (and dy) -> these per-channel functions, inside the
same kernel call -> a write pass applying ``(x - m[c]) * a[c] + b[c]`` (or the gradient's
``k[c] * dy - c1[c] * (x - m[c]) + c0[c]``). The running-average update and every coefficient
are computed here in float64 and rounded once into their arrays' dtype; nothing of it is left
to NumPy after the kernel has written (it could raise under ``np.errstate``, after a write).
"""

from __future__ import annotations

import numpy as np

from ._jit import helper, reduction

# Rows of the float64 (4, C) statistics block a forward call writes (the cache keeps it): the
# mean and inverse std that normalized x, gamma (rounded to x's dtype), and the variance
# (biased batch variance while training, the running variance in inference).
MEAN, INVSTD, GAMMA, VAR = 0, 1, 2, 3


@helper
def moments_from_sums(k, s1, s2, n):
    """``(mean, var)`` from sums around the shift k: ``mean = k + s1/n``,
    ``var = (s2 - s1**2/n)/n``.

    Rounding can leave var a few ulps below zero for a constant channel: clamp without touching
    NaN (a NaN compares false), so a channel holding NaN or inf stays NaN.
    """
    v = (s2 - s1 * (s1 / n)) / n
    return k + s1 / n, 0.0 if v < 0.0 else v


@helper
def forward_channel(c, mean, var, n, eps, momentum, gamma, running_mean, running_var, stats):
    """Channel c of a training forward, from its batch ``mean`` and biased ``var`` over n values:
    the statistics block, and the running averages (PyTorch's rule, unbiased variance) when
    running arrays are given (length C; length 0 means none)."""
    stats[MEAN, c] = mean
    stats[INVSTD, c] = 1.0 / np.sqrt(var + eps)
    stats[GAMMA, c] = gamma[c]
    stats[VAR, c] = var
    if running_mean.shape[0] > 0:
        running_mean[c] = (1.0 - momentum) * np.float64(running_mean[c]) + momentum * mean
        running_var[c] = ((1.0 - momentum) * np.float64(running_var[c])
                          + momentum * (var * (n / (n - 1.0))))


@helper
def inference_channel(c, running_mean, running_var, eps, gamma, stats):
    """Channel c of an inference forward: the running statistics (in the data's precision, as
    passed) in the statistics block."""
    stats[MEAN, c] = running_mean[c]
    stats[VAR, c] = running_var[c]
    stats[INVSTD, c] = 1.0 / np.sqrt(stats[VAR, c] + eps)
    stats[GAMMA, c] = gamma[c]


@helper
def scale_of(stats, c):
    """The write pass's multiplier of ``x - mean``: ``gamma * invstd``."""
    return stats[GAMMA, c] * stats[INVSTD, c]


@helper
def backward_channel(c, sum_dy, sum_dy_xmu, n, stats, dgamma, dbeta):
    """Channel c of the training gradient as ``dx = k*dy - c1*(x - mean) + c0``; returns
    ``(k, c1, c0)``: ``k = gamma*invstd``, ``c1 = k*invstd*dgamma/n`` with
    ``dgamma = invstd*sum(dy*(x-mean))``, ``c0 = -k*sum(dy)/n``. Writes dgamma and dbeta (rounded
    into their dtype)."""
    invstd = stats[INVSTD, c]
    kc = stats[GAMMA, c] * invstd
    dgamma[c] = sum_dy_xmu * invstd
    dbeta[c] = sum_dy
    return kc, kc * invstd * (sum_dy_xmu * invstd) / n, -kc * sum_dy / n


@helper
def frozen_channel(c, sum_dy, sum_dy_xmu, stats, dgamma, dbeta):
    """dgamma and dbeta of the frozen-statistics gradient (its dx is ``scale_of * dy``)."""
    dgamma[c] = sum_dy_xmu * stats[INVSTD, c]
    dbeta[c] = sum_dy


@reduction
def row_moment_sums(row, k):
    """``(sum(row - k), sum((row - k)**2))`` in float64."""
    a = 0.0
    b = 0.0
    for i in range(row.shape[0]):
        d = row[i] - k
        a += d
        b += d * d
    return a, b


@reduction
def row_grad_sums(x_row, dy_row, m):
    """``(sum(dy), sum(dy * (x - m)))`` over one row, in float64."""
    a = 0.0
    b = 0.0
    for i in range(x_row.shape[0]):
        g = np.float64(dy_row[i])
        a += g
        b += g * (x_row[i] - m)
    return a, b


@reduction
def row_frozen(x_row, dy_row, dx_row, m, k):
    """One row of the frozen backward: ``dx = k * dy`` (x is not read for dx, so an inf or NaN
    in x cannot reach it) and the row's ``(sum(dy), sum(dy * (x - m)))`` for dgamma, dbeta."""
    a = 0.0
    b = 0.0
    for i in range(x_row.shape[0]):
        g = np.float64(dy_row[i])
        a += g
        b += g * (x_row[i] - m)
        dx_row[i] = k * g
    return a, b
