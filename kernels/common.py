"""Per-channel arithmetic shared by the kernel families (the O(C) part of every operation)."""

from __future__ import annotations

import numpy as np

from ._jit import helper, reduction


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
def finish_moments(shift, s1, s2, n, mean, var):
    """:func:`moments_from_sums` for every channel."""
    for c in range(mean.shape[0]):
        mean[c], var[c] = moments_from_sums(shift[c], s1[c], s2[c], n)


@helper
def inverse_std(var, eps):
    return 1.0 / np.sqrt(var + eps)


@helper
def grad_coefficients(invstd, gamma, sum_dy, sum_dy_xmu, n, c, k, c1, c0):
    """Training batch-norm gradient of channel c as ``dx = k*dy - c1*(x - mean) + c0``:
    ``k = gamma*invstd``, ``c1 = k*invstd*dgamma/n`` with ``dgamma = invstd*sum(dy*(x-mean))``,
    ``c0 = -k*sum(dy)/n``."""
    kc = gamma[c] * invstd[c]
    k[c] = kc
    c1[c] = kc * invstd[c] * (sum_dy_xmu[c] * invstd[c]) / n
    c0[c] = -kc * sum_dy[c] / n


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
