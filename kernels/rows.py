"""The rows family: C-contiguous (outer, C, inner) with inner >= ROWS_MIN (NCHW, NCL, 5-D).

Each (o, c) row is contiguous and long. Work is cut into blocks of ``rb = max(1, B // inner)``
rows of one channel (B: ``TUNE_BLOCK`` bytes of x); a reduction computes one partial per block
(in parallel) and combines a channel's partials in block order, so results do not depend on the
thread count. A row is summed in float64 around the channel's shift (its first value) by a
``reduction`` helper, which LLVM vectorizes (see ``_jit``; accuracy argument in ``strided``).

Fused route: when a channel's slice of x is at most ``TUNE_FUSE`` bytes (half of this core's
L2) and there are at least 4 channels, one task per channel reduces it and then writes its
output (y, or dx) while the slice is still in L2, so x (and dy) are read from memory once
instead of twice. Memory beyond the outputs: two float64 per block (x/4096 at most) and six
per channel (at most x/10 of float32 x, since inner >= 64).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import TUNE_BLOCK, TUNE_FUSE, helper, parallel_kernel, phase
from .common import (MEAN, backward_channels, forward_channels, frozen_channels,
                     inference_channels, moments_channels, row_frozen, row_grad_sums,
                     row_moment_sums, scale_of)


@helper
def blocks(x, tune):
    """``(rows per block, blocks per channel)``: a function of the shape (and machine) only."""
    outer, inner = x.shape[0], x.shape[2]
    rb = max(1, tune[TUNE_BLOCK] // (inner * x.itemsize))
    return rb, (outer + rb - 1) // rb


@helper
def fused(x, tune):
    """One task per channel (reduce, then write while the slice is in L2)? Shape only."""
    outer, channels, inner = x.shape
    return outer * inner * x.itemsize <= tune[TUNE_FUSE] and channels >= 4


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
def block_frozen(x, dy, dx, c, r0, r1, m, k):
    """dx of rows ``r0:r1`` of channel c (frozen statistics) and their gradient sums."""
    s1 = 0.0
    s2 = 0.0
    for o in range(r0, r1):
        a, b = row_frozen(x[o, c], dy[o, c], dx[o, c], m, k)
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
def channel_moment_sums(x, c, rb, nb):
    """A channel's shifted sums over all its blocks, in block order (the fused route)."""
    outer = x.shape[0]
    k = np.float64(x[0, c, 0])
    s1 = 0.0
    s2 = 0.0
    for b in range(nb):
        a1, a2 = block_moment_sums(x, c, b * rb, min(outer, (b + 1) * rb), k)
        s1 += a1
        s2 += a2
    return k, s1, s2


# --- Phases shared by the kernels (prange loops, inlined into each kernel).

@phase
def sums_phase(x, tune):
    """Per-channel shifts and shifted sums: block sums in parallel, combined in block order."""
    outer, channels, inner = x.shape
    rb, nb = blocks(x, tune)
    part = np.empty((channels * nb, 2))
    for t in prange(channels * nb):
        c = t // nb
        r0 = (t % nb) * rb
        part[t, 0], part[t, 1] = block_moment_sums(x, c, r0, min(outer, r0 + rb),
                                                   np.float64(x[0, c, 0]))
    k = np.empty(channels)
    s1 = np.empty(channels)
    s2 = np.empty(channels)
    for c in range(channels):
        k[c] = x[0, c, 0]
        s1[c], s2[c] = channel_total(part, c, nb)
    return k, s1, s2


@phase
def write_phase(x, stats, beta, y, tune):
    """``y = (x - mean) * gamma * invstd + beta`` per channel, over the block grid."""
    outer, channels, inner = x.shape
    rb, nb = blocks(x, tune)
    for t in prange(channels * nb):
        c = t // nb
        r0 = (t % nb) * rb
        normalize_rows(x, c, r0, min(outer, r0 + rb), stats[MEAN, c], scale_of(stats, c),
                       np.float64(beta[c]), y)


# --- Kernels.

@parallel_kernel("x", "p_out", "p_out", "tune")
def moments(x, mean, var, tune):
    """Per-channel mean and biased variance (rounded into mean's and var's dtype)."""
    k, s1, s2 = sums_phase(x, tune)
    moments_channels(k, s1, s2, x.shape[0] * x.shape[2], mean, var)


@parallel_kernel("x", "p", "p", "scalar", "scalar", "p_out", "p_out", "stats_out", "out", "tune")
def forward_train(x, gamma, beta, eps, momentum, running_mean, running_var, stats, y, tune):
    """Training forward: batch statistics, the per-channel epilogue (``forward_channels``), then
    ``y``. With :func:`fused` shapes each channel is one task (sums over its blocks in order,
    then its rows normalized from cache); otherwise the same block sums run in parallel and are
    combined in the same order, so both routes give the same bits."""
    outer, channels, inner = x.shape
    n = outer * inner
    if fused(x, tune):
        rb, nb = blocks(x, tune)
        k = np.empty(channels)
        s1 = np.empty(channels)
        s2 = np.empty(channels)
        for c in prange(channels):
            k[c], s1[c], s2[c] = channel_moment_sums(x, c, rb, nb)
            forward_channels(k[c:c + 1], s1[c:c + 1], s2[c:c + 1], n, eps, momentum,
                             gamma[c:c + 1], running_mean[c:c + 1], running_var[c:c + 1],
                             stats[:, c:c + 1])
            normalize_rows(x, c, 0, outer, stats[MEAN, c], scale_of(stats, c),
                           np.float64(beta[c]), y)
    else:
        k, s1, s2 = sums_phase(x, tune)
        forward_channels(k, s1, s2, n, eps, momentum, gamma, running_mean, running_var, stats)
        write_phase(x, stats, beta, y, tune)


@parallel_kernel("x", "p", "p", "p", "p", "scalar", "stats_out", "out", "tune")
def normalize(x, running_mean, running_var, gamma, beta, eps, stats, y, tune):
    """Inference: ``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``."""
    inference_channels(running_mean, running_var, eps, gamma, stats)
    write_phase(x, stats, beta, y, tune)


@parallel_kernel("x", "x", "stats", "p_out", "p_out", "out", "tune")
def backward_train(x, dy, stats, dgamma, dbeta, dx, tune):
    """Training backward: the two sums, the per-channel coefficients (``backward_channels``),
    then dx; per channel from cache when :func:`fused`."""
    outer, channels, inner = x.shape
    n = outer * inner
    rb, nb = blocks(x, tune)
    s1 = np.empty(channels)
    s2 = np.empty(channels)
    coef = np.empty((3, channels))
    if fused(x, tune):
        for c in prange(channels):
            m = stats[MEAN, c]
            t1 = 0.0
            t2 = 0.0
            for b in range(nb):
                a1, a2 = block_grad_sums(x, dy, c, b * rb, min(outer, (b + 1) * rb), m)
                t1 += a1
                t2 += a2
            s1[c], s2[c] = t1, t2
            backward_channels(s1[c:c + 1], s2[c:c + 1], n, stats[:, c:c + 1], dgamma[c:c + 1],
                              dbeta[c:c + 1], coef[0, c:c + 1], coef[1, c:c + 1],
                              coef[2, c:c + 1])
            grad_input_rows(x, dy, c, 0, outer, m, coef[0, c], coef[1, c], coef[2, c], dx)
    else:
        part = np.empty((channels * nb, 2))
        for t in prange(channels * nb):
            c = t // nb
            r0 = (t % nb) * rb
            part[t, 0], part[t, 1] = block_grad_sums(x, dy, c, r0, min(outer, r0 + rb),
                                                     stats[MEAN, c])
        for c in range(channels):
            s1[c], s2[c] = channel_total(part, c, nb)
        backward_channels(s1, s2, n, stats, dgamma, dbeta, coef[0], coef[1], coef[2])
        for t in prange(channels * nb):
            c = t // nb
            r0 = (t % nb) * rb
            grad_input_rows(x, dy, c, r0, min(outer, r0 + rb), stats[MEAN, c], coef[0, c],
                            coef[1, c], coef[2, c], dx)


@parallel_kernel("x", "x", "stats", "p_out", "p_out", "out", "tune")
def backward_frozen(x, dy, stats, dgamma, dbeta, dx, tune):
    """Frozen-statistics backward: ``dx = gamma * invstd * dy`` (never reads x) and the sums
    for dgamma, dbeta, in one pass over the block grid."""
    outer, channels, inner = x.shape
    rb, nb = blocks(x, tune)
    part = np.empty((channels * nb, 2))
    for t in prange(channels * nb):
        c = t // nb
        r0 = (t % nb) * rb
        part[t, 0], part[t, 1] = block_frozen(x, dy, dx, c, r0, min(outer, r0 + rb),
                                              stats[MEAN, c], scale_of(stats, c))
    s1 = np.empty(channels)
    s2 = np.empty(channels)
    for c in range(channels):
        s1[c], s2[c] = channel_total(part, c, nb)
    frozen_channels(s1, s2, stats, dgamma, dbeta)
