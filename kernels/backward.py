"""Backward: the two per-channel reductions in one read of x and dy, then one pass for dx.

With ``xhat = (x - mean) * invstd`` and m values per channel, the batch-norm gradient is
``dx = gamma*invstd/m * (m*dy - sum(dy) - xhat*sum(dy*xhat))``. The caller turns the sums into
per-channel coefficients so that ``dx = k*dy - c1*(x - mean) + c0``; frozen (inference) batch
norm is the same pass with ``c1 = c0 = 0``. Sums are float64 with four accumulator pairs per
row (see ``stats.py`` for why the pairs).
"""

from __future__ import annotations

import numpy as np

from ._jit import helper, kernel


@helper
def row_grad_sums(x, dy, o, c, m):
    """Return ``(sum(dy[o, c, :]), sum(dy[o, c, :] * (x[o, c, :] - m)))`` in float64."""
    n = x.shape[2]
    a0 = a1 = a2 = a3 = 0.0
    b0 = b1 = b2 = b3 = 0.0
    i = 0
    while i + 4 <= n:
        g0 = np.float64(dy[o, c, i])
        g1 = np.float64(dy[o, c, i + 1])
        g2 = np.float64(dy[o, c, i + 2])
        g3 = np.float64(dy[o, c, i + 3])
        a0 += g0
        a1 += g1
        a2 += g2
        a3 += g3
        b0 += g0 * (x[o, c, i] - m)
        b1 += g1 * (x[o, c, i + 1] - m)
        b2 += g2 * (x[o, c, i + 2] - m)
        b3 += g3 * (x[o, c, i + 3] - m)
        i += 4
    while i < n:
        g0 = np.float64(dy[o, c, i])
        a0 += g0
        b0 += g0 * (x[o, c, i] - m)
        i += 1
    return (a0 + a1) + (a2 + a3), (b0 + b1) + (b2 + b3)


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
                a, b = row_grad_sums(x, dy, o, c, mean[c])
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
