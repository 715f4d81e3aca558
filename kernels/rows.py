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

from ._jit import BLOCK, FUSE_BYTES, helper, parallel_kernel, phase
from .common import (grad_coefficients, inverse_std, moments_from_sums, row_grad_sums,
                     row_moment_sums)


@helper
def blocks(outer, inner):
    """``(rows per block, blocks per channel)``: a function of the shape only."""
    rb = max(1, BLOCK // inner)
    return rb, (outer + rb - 1) // rb


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


@helper
def normalize_rows(x, c, r0, r1, m, s, b, y):
    for o in range(r0, r1):
        xr = x[o, c]
        yr = y[o, c]
        for i in range(xr.shape[0]):
            yr[i] = (xr[i] - m) * s + b


@helper
def grad_input_rows(x, dy, c, r0, r1, m, kc, c1c, c0c, dx):
    for o in range(r0, r1):
        xr = x[o, c]
        gr = dy[o, c]
        dr = dx[o, c]
        for i in range(xr.shape[0]):
            dr[i] = kc * gr[i] - c1c * (xr[i] - m) + c0c


@helper
def channel_total(part, c, nb):
    """A channel's two sums: its block partials added in block order (from 0.0)."""
    s1 = 0.0
    s2 = 0.0
    for b in range(nb):
        s1 += part[c * nb + b, 0]
        s2 += part[c * nb + b, 1]
    return s1, s2


@helper
def fused(x):
    """One task per channel (reduce, then write while the slice is in L2)? Shape only."""
    outer, channels, inner = x.shape
    return outer * inner * x.itemsize <= FUSE_BYTES and channels >= 4


@phase
def stats(x, mean, var):
    """Per-channel mean and biased variance: block sums in parallel, combined in block order."""
    outer, channels, inner = x.shape
    rb, nb = blocks(outer, inner)
    part = np.empty((channels * nb, 2))
    for t in prange(channels * nb):
        c = t // nb
        r0 = (t % nb) * rb
        part[t, 0], part[t, 1] = block_moment_sums(x, c, r0, min(outer, r0 + rb),
                                                   np.float64(x[0, c, 0]))
    for c in range(channels):
        s1, s2 = channel_total(part, c, nb)
        mean[c], var[c] = moments_from_sums(np.float64(x[0, c, 0]), s1, s2, outer * inner)


@phase
def write_normalized(x, mean, scale, shift, y):
    outer, channels, inner = x.shape
    rb, nb = blocks(outer, inner)
    for t in prange(channels * nb):
        c = t // nb
        r0 = (t % nb) * rb
        normalize_rows(x, c, r0, min(outer, r0 + rb), mean[c], scale[c], shift[c], y)


@phase
def gradient_sums(x, dy, mean, sum_dy, sum_dy_xmu):
    outer, channels, inner = x.shape
    rb, nb = blocks(outer, inner)
    part = np.empty((channels * nb, 2))
    for t in prange(channels * nb):
        c = t // nb
        r0 = (t % nb) * rb
        part[t, 0], part[t, 1] = block_grad_sums(x, dy, c, r0, min(outer, r0 + rb), mean[c])
    for c in range(channels):
        sum_dy[c], sum_dy_xmu[c] = channel_total(part, c, nb)


@phase
def write_grad_input(x, dy, mean, k, c1, c0, dx):
    outer, channels, inner = x.shape
    rb, nb = blocks(outer, inner)
    for t in prange(channels * nb):
        c = t // nb
        r0 = (t % nb) * rb
        grad_input_rows(x, dy, c, r0, min(outer, r0 + rb), mean[c], k[c], c1[c], c0[c], dx)


@parallel_kernel("x", "vec_out", "vec_out")
def moments(x, mean, var):
    """Per-channel mean and biased variance; needs outer*inner >= 1."""
    stats(x, mean, var)


@parallel_kernel("x", "vec", "vec", "vec", "out")
def normalize(x, mean, scale, shift, y):
    """``y = (x - mean[c]) * scale[c] + shift[c]``, float64 arithmetic; y may be x itself."""
    write_normalized(x, mean, scale, shift, y)


@parallel_kernel("x", "x", "vec", "vec_out", "vec_out")
def grad_sums(x, dy, mean, sum_dy, sum_dy_xmu):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``."""
    gradient_sums(x, dy, mean, sum_dy, sum_dy_xmu)


@parallel_kernel("x", "x", "vec", "vec", "vec", "vec", "out")
def grad_input(x, dy, mean, k, c1, c0, dx):
    """``dx = k[c]*dy - c1[c]*(x - mean[c]) + c0[c]``; dx may be dy itself."""
    write_grad_input(x, dy, mean, k, c1, c0, dx)


@parallel_kernel("x", "vec", "vec", "scalar", "vec_out", "vec_out", "vec_out", "out")
def forward_train(x, gamma, beta, eps, mean, var, invstd, y):
    """Training forward: batch statistics, then ``y = gamma*(x - mean)*invstd + beta``.

    With :func:`fused` shapes each channel is one task (sums over its blocks in order, then its
    rows normalized from cache); otherwise the same block sums run in parallel and are combined
    in the same order, so both routes give the same bits.
    """
    outer, channels, inner = x.shape
    if fused(x):
        rb, nb = blocks(outer, inner)
        for c in prange(channels):
            k = np.float64(x[0, c, 0])
            s1 = 0.0
            s2 = 0.0
            for b in range(nb):
                a1, a2 = block_moment_sums(x, c, b * rb, min(outer, (b + 1) * rb), k)
                s1 += a1
                s2 += a2
            mean[c], var[c] = moments_from_sums(k, s1, s2, outer * inner)
            invstd[c] = inverse_std(var[c], eps)
            normalize_rows(x, c, 0, outer, mean[c], gamma[c] * invstd[c], beta[c], y)
    else:
        stats(x, mean, var)
        for c in range(channels):
            invstd[c] = inverse_std(var[c], eps)
        write_normalized(x, mean, gamma * invstd, beta, y)


@parallel_kernel("x", "x", "vec", "vec", "vec", "vec_out", "vec_out", "out")
def backward_train(x, dy, mean, invstd, gamma, sum_dy, sum_dy_xmu, dx):
    """Training backward: the two sums, then dx, per channel from cache when :func:`fused`."""
    outer, channels, inner = x.shape
    n = outer * inner
    k = np.empty(channels)
    c1 = np.empty(channels)
    c0 = np.empty(channels)
    if fused(x):
        rb, nb = blocks(outer, inner)
        for c in prange(channels):
            s1 = 0.0
            s2 = 0.0
            for b in range(nb):
                a1, a2 = block_grad_sums(x, dy, c, b * rb, min(outer, (b + 1) * rb), mean[c])
                s1 += a1
                s2 += a2
            sum_dy[c] = s1
            sum_dy_xmu[c] = s2
            grad_coefficients(invstd, gamma, sum_dy, sum_dy_xmu, n, c, k, c1, c0)
            grad_input_rows(x, dy, c, 0, outer, mean[c], k[c], c1[c], c0[c], dx)
    else:
        gradient_sums(x, dy, mean, sum_dy, sum_dy_xmu)
        for c in range(channels):
            grad_coefficients(invstd, gamma, sum_dy, sum_dy_xmu, n, c, k, c1, c0)
        write_grad_input(x, dy, mean, k, c1, c0, dx)
