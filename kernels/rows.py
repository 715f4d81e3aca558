"""The rows family: C-contiguous (outer, C, inner) with inner >= ROWS_MIN (NCHW, NCL, 5-D).

Each (o, c) row is contiguous and long. Work is cut into blocks of ``rb = max(1, BLOCK //
inner)`` rows of one channel; a reduction computes one partial per block (in parallel) and
combines a channel's partials in block order, so results do not depend on the thread count.
A row is summed in float64 around the channel's shift (its first value) by a ``reduction``
helper, which LLVM vectorizes (see ``_jit``; accuracy argument in ``strided``).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import BLOCK, ROWS_MIN, helper, parallel_kernel, reduction  # noqa: F401
from .common import finish_moments


@helper
def blocks(outer, inner):
    """``(rows per block, blocks per channel)``: a function of the shape only."""
    rb = max(1, BLOCK // inner)
    return rb, (outer + rb - 1) // rb


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


@helper
def block_moment_sums(x, c, r0, r1, k):
    """Shifted sums over rows ``r0:r1`` of channel c, rows added in order."""
    s1 = 0.0
    s2 = 0.0
    for o in range(r0, r1):
        a, b = row_moment_sums(x[o, c], k)
        s1 += a
        s2 += b
    return s1, s2


@helper
def block_grad_sums(x, dy, c, r0, r1, m):
    """Gradient sums over rows ``r0:r1`` of channel c, rows added in order."""
    s1 = 0.0
    s2 = 0.0
    for o in range(r0, r1):
        a, b = row_grad_sums(x[o, c], dy[o, c], m)
        s1 += a
        s2 += b
    return s1, s2


@parallel_kernel("x", "vec_out", "vec_out")
def moments(x, mean, var):
    """Per-channel mean and biased variance; needs outer*inner >= 1."""
    outer, channels, inner = x.shape
    rb, nb = blocks(outer, inner)
    part = np.empty((channels * nb, 2))
    for t in prange(channels * nb):
        c = t // nb
        r0 = (t % nb) * rb
        part[t, 0], part[t, 1] = block_moment_sums(x, c, r0, min(outer, r0 + rb),
                                                   np.float64(x[0, c, 0]))
    shift = np.empty(channels)
    s1 = np.zeros(channels)
    s2 = np.zeros(channels)
    for c in range(channels):
        shift[c] = x[0, c, 0]
        for b in range(nb):
            s1[c] += part[c * nb + b, 0]
            s2[c] += part[c * nb + b, 1]
    finish_moments(shift, s1, s2, outer * inner, mean, var)


@parallel_kernel("x", "vec", "vec", "vec", "out")
def normalize(x, mean, scale, shift, y):
    """``y = (x - mean[c]) * scale[c] + shift[c]``, float64 arithmetic; y may be x itself."""
    outer, channels, inner = x.shape
    rb, nb = blocks(outer, inner)
    for t in prange(channels * nb):
        c = t // nb
        r0 = (t % nb) * rb
        m, s, b = mean[c], scale[c], shift[c]
        for o in range(r0, min(outer, r0 + rb)):
            xr = x[o, c]
            yr = y[o, c]
            for i in range(inner):
                yr[i] = (xr[i] - m) * s + b


@parallel_kernel("x", "x", "vec", "vec_out", "vec_out")
def grad_sums(x, dy, mean, sum_dy, sum_dy_xmu):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``."""
    outer, channels, inner = x.shape
    rb, nb = blocks(outer, inner)
    part = np.empty((channels * nb, 2))
    for t in prange(channels * nb):
        c = t // nb
        r0 = (t % nb) * rb
        part[t, 0], part[t, 1] = block_grad_sums(x, dy, c, r0, min(outer, r0 + rb), mean[c])
    for c in range(channels):
        sum_dy[c] = 0.0
        sum_dy_xmu[c] = 0.0
        for b in range(nb):
            sum_dy[c] += part[c * nb + b, 0]
            sum_dy_xmu[c] += part[c * nb + b, 1]


@parallel_kernel("x", "x", "vec", "vec", "vec", "vec", "out")
def grad_input(x, dy, mean, k, c1, c0, dx):
    """``dx = k[c]*dy - c1[c]*(x - mean[c]) + c0[c]``; dx may be dy itself."""
    outer, channels, inner = x.shape
    rb, nb = blocks(outer, inner)
    for t in prange(channels * nb):
        c = t // nb
        r0 = (t % nb) * rb
        m, kc, c1c, c0c = mean[c], k[c], c1[c], c0[c]
        for o in range(r0, min(outer, r0 + rb)):
            xr = x[o, c]
            gr = dy[o, c]
            dr = dx[o, c]
            for i in range(inner):
                dr[i] = kc * gr[i] - c1c * (xr[i] - m) + c0c
