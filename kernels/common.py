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


# The per-channel epilogues below take views of a range of channels (the caller slices every
# per-channel array, the (4, C) block included, to ``c0:c1``) and are plain loops indexed by
# the loop counter, each touching few arrays, which LLVM vectorizes across channels. (Indexed
# ``c0 + j``, numba's wraparound handling of a possibly negative index kept them scalar; so did
# one loop writing four arrays: LLVM gives up beyond 8 runtime alias checks. Scalar, the
# forward epilogue took 2.3 us for 256 channels, against kernels of ~10 us at float32
# (64, 256).)

@helper
def moments_channels(k, s1, s2, n, mean, var):
    """Mean and biased variance of channels from their shifts and shifted sums (rounded into
    mean's and var's dtype)."""
    for j in range(s1.shape[0]):
        mean[j], var[j] = moments_from_sums(k[j], s1[j], s2[j], n)


@helper
def forward_channels(k, s1, s2, n, eps, momentum, gamma, running_mean, running_var, stats):
    """Channels of a training forward, from their shifted sums over n values: the statistics
    block and, when running arrays are given (else they have length 0), the running averages
    (PyTorch's rule, unbiased variance), rounded once into their dtype."""
    means, invstds, gammas, variances = stats[MEAN], stats[INVSTD], stats[GAMMA], stats[VAR]
    moments_channels(k, s1, s2, n, means, variances)
    for j in range(s1.shape[0]):
        invstds[j] = 1.0 / np.sqrt(variances[j] + eps)
    for j in range(s1.shape[0]):
        gammas[j] = gamma[j]
    if running_mean.shape[0] > 0:
        unbias = n / (n - 1.0)
        for j in range(s1.shape[0]):
            running_mean[j] = ((1.0 - momentum) * np.float64(running_mean[j])
                               + momentum * means[j])
        for j in range(s1.shape[0]):
            running_var[j] = ((1.0 - momentum) * np.float64(running_var[j])
                              + momentum * (variances[j] * unbias))


@helper
def inference_channels(running_mean, running_var, eps, gamma, stats):
    """The statistics block of an inference forward: the running statistics (in the data's
    precision, as passed)."""
    means, invstds, gammas, variances = stats[MEAN], stats[INVSTD], stats[GAMMA], stats[VAR]
    for j in range(stats.shape[1]):
        means[j] = running_mean[j]
    for j in range(stats.shape[1]):
        variances[j] = running_var[j]
    for j in range(stats.shape[1]):
        invstds[j] = 1.0 / np.sqrt(variances[j] + eps)
    for j in range(stats.shape[1]):
        gammas[j] = gamma[j]


@helper
def scale_of(stats, c):
    """The write pass's multiplier of ``x - mean``: ``gamma * invstd``."""
    return stats[GAMMA, c] * stats[INVSTD, c]


@helper
def backward_channels(s1, s2, n, stats, dgamma, dbeta, k, c1, c0):
    """Channels of the training gradient, from ``s1 = sum(dy)`` and ``s2 = sum(dy*(x-mean))``,
    as ``dx = k*dy - c1*(x - mean) + c0``: ``k = gamma*invstd``, ``c1 = k*invstd*dgamma/n``
    with ``dgamma = invstd*s2``, ``c0 = -k*s1/n``; dgamma and dbeta rounded into their arrays."""
    invstds, gammas = stats[INVSTD], stats[GAMMA]
    for j in range(s1.shape[0]):
        k[j] = gammas[j] * invstds[j]
    for j in range(s1.shape[0]):
        c1[j] = k[j] * invstds[j] * (s2[j] * invstds[j]) / n
    for j in range(s1.shape[0]):
        c0[j] = -k[j] * s1[j] / n
    for j in range(s1.shape[0]):
        dgamma[j] = s2[j] * invstds[j]
    for j in range(s1.shape[0]):
        dbeta[j] = s1[j]


@helper
def frozen_channels(s1, s2, stats, dgamma, dbeta):
    """dgamma and dbeta of the frozen-statistics gradient (its dx is ``scale_of * dy``)."""
    invstds = stats[INVSTD]
    for j in range(s1.shape[0]):
        dgamma[j] = s2[j] * invstds[j]
    for j in range(s1.shape[0]):
        dbeta[j] = s1[j]


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
