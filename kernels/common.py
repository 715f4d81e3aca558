"""Per-channel arithmetic shared by the kernel families (the O(C) part of every operation), and
the row reductions of the ``rows`` and ``strided`` families.

Every family's kernel is: a reduction over x (and dy) -> these per-channel functions, inside the
same kernel call -> a write pass applying ``(x - m[c]) * a[c] + b[c]`` (or the gradient's
``k[c] * dy - c1[c] * (x - m[c]) + c0[c]``). The running-average update and every coefficient
are computed here in float64 and rounded once into their arrays' dtype; nothing of it is left
to NumPy after the kernel has written (it could raise under ``np.errstate``, after a write).
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import helper, reduction

# Rows of the float64 (8, C) statistics block a forward call writes (the cache keeps it): the
# mean and inverse std that normalized x, gamma (rounded to x's dtype), the variance (biased
# batch variance while training, the running variance in inference), the write pass's
# ``SCALE`` and ``SHIFT`` (``y = (x - MEAN) * SCALE + SHIFT``), and Batch Renormalization's
# ``R`` and ``D`` (1 and 0 without it): ``SCALE = GAMMA * INVSTD * R``,
# ``SHIFT = GAMMA * D + beta``.
MEAN, INVSTD, GAMMA, VAR, SCALE, SHIFT, R, D = 0, 1, 2, 3, 4, 5, 6, 7
STATS_ROWS = 8


@helper
def copy_into(src, dst):
    """``dst[:] = src`` as a loop. Kernels never assign array slices: numba compiles a
    formatted shape-mismatch error for each (str, repr and string concatenation of ints), which
    took ~3 s of a cold first training step; kernels raise nothing (see ``_jit``)."""
    for i in range(src.shape[0]):
        dst[i] = src[i]


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
def clip(v, lo, hi):
    """``v`` clipped to [lo, hi]; NaN stays NaN (both comparisons are false)."""
    return lo if v < lo else (hi if v > hi else v)


@helper
def finish_channels(stats, eps, gamma, beta, rmax, dmax, running_mean, running_var):
    """From the MEAN and VAR rows: INVSTD, GAMMA, R, D, SCALE and SHIFT of channels (views of a
    range, sliced by the caller). Batch Renormalization (Ioffe 2017) when ``rmax > 0``, against
    the running statistics as they were before this batch: ``sigma_run = sqrt(running_var +
    eps)``, ``r = clip(sqrt(var + eps) / sigma_run, 1/rmax, rmax)``, ``d = clip((mean -
    running_mean) / sigma_run, -dmax, dmax)``; r and d are constants for backward."""
    means, invstds, gammas, variances = stats[MEAN], stats[INVSTD], stats[GAMMA], stats[VAR]
    scales, shifts, rs, ds = stats[SCALE], stats[SHIFT], stats[R], stats[D]
    for j in range(means.shape[0]):
        invstds[j] = 1.0 / np.sqrt(variances[j] + eps)
    for j in range(means.shape[0]):
        gammas[j] = gamma[j]
    if rmax > 0.0:
        for j in range(means.shape[0]):
            rs[j] = clip(
                np.sqrt(variances[j] + eps) / np.sqrt(np.float64(running_var[j]) + eps),
                1.0 / rmax,
                rmax,
            )
        for j in range(means.shape[0]):
            ds[j] = clip(
                (means[j] - np.float64(running_mean[j]))
                / np.sqrt(np.float64(running_var[j]) + eps),
                -dmax,
                dmax,
            )
        for j in range(means.shape[0]):
            shifts[j] = gammas[j] * ds[j] + beta[j]
    else:
        for j in range(means.shape[0]):
            rs[j] = 1.0
        for j in range(means.shape[0]):
            ds[j] = 0.0
        for j in range(means.shape[0]):
            shifts[j] = beta[j]
    for j in range(means.shape[0]):
        scales[j] = gammas[j] * invstds[j] * rs[j]


@helper
def forward_channels(k, s1, s2, n, eps, gamma, beta, rmax, dmax, running_mean, running_var, stats):
    """Channels of a training forward, from their shifted sums over n values: the statistics
    block (the running averages are updated by :func:`update_running`, after :func:`rescue`)."""
    moments_channels(k, s1, s2, n, stats[MEAN], stats[VAR])
    finish_channels(stats, eps, gamma, beta, rmax, dmax, running_mean, running_var)


@helper
def update_running(stats, n, momentum, unbiased, running_mean, running_var):
    """The running averages from the batch statistics (PyTorch's rule: weight ``momentum`` for
    the batch; the variance unbiased, ``var * n / (n - 1)``, when ``unbiased``, else biased as
    Keras, Flax and numpy-ml keep it), in float64, rounded once into their dtype; nothing when
    the running arrays have length 0."""
    if running_mean.shape[0] == 0:
        return
    means, variances = stats[MEAN], stats[VAR]
    unbias = n / (n - 1.0) if unbiased else 1.0
    for c in range(means.shape[0]):
        running_mean[c] = (1.0 - momentum) * np.float64(running_mean[c]) + momentum * means[c]
    for c in range(means.shape[0]):
        running_var[c] = (1.0 - momentum) * np.float64(running_var[c]) + momentum * (
            variances[c] * unbias
        )


@helper
def inference_channels(running_mean, running_var, eps, gamma, beta, stats):
    """The statistics block of an inference forward: the running statistics (in the data's
    precision, as passed)."""
    means, variances = stats[MEAN], stats[VAR]
    for j in range(means.shape[0]):
        means[j] = running_mean[j]
    for j in range(means.shape[0]):
        variances[j] = running_var[j]
    finish_channels(stats, eps, gamma, beta, 0.0, 0.0, running_mean, running_var)


@helper
def activate(v, relu, thr):
    """The fused activation: ReLU when ``relu``, as ``relu(y)`` of the rounded output y: 0 when
    v would round to a value <= 0 in the data's dtype (``thr`` is half its smallest subnormal);
    NaN stays NaN."""
    return 0.0 if relu and v <= thr else v


@helper
def passes(v, relu, thr):
    """Does the gradient pass the activation at pre-activation v? PyTorch's ReLU passes it where
    its output is > 0 (not at 0; not at NaN)."""
    return not relu or v > thr


@helper
def dgamma_of(s1, s2, invstd, r, d):
    """``sum(dy * (r * xhat + d))`` from ``s1 = sum(dy)``, ``s2 = sum(dy * (x - mean))``."""
    t = s2 * invstd * r
    return t if d == 0.0 else t + d * s1


@helper
def backward_channels(s1, s2, n, stats, dgamma, dbeta, k, c1, c0):
    """Channels of the training gradient, from ``s1 = sum(dy)`` and ``s2 = sum(dy*(x-mean))``
    (dy behind the activation's mask), as ``dx = k*dy - c1*(x - mean) + c0``: ``k = SCALE``
    (gamma * invstd * r: Batch Renormalization's r and d are constants),
    ``c1 = k*(invstd*(s2*invstd/n))``, ``c0 = -k*s1/n``; dgamma and dbeta rounded into their
    arrays."""
    invstds, scales, rs, ds = stats[INVSTD], stats[SCALE], stats[R], stats[D]
    for j in range(s1.shape[0]):
        k[j] = scales[j]
    # k * (invstd * (s2 * invstd / n)), not (k * invstd) * ...: with eps below ~1e-308 a
    # constant channel has invstd ~1e155 and s2 == 0 exactly; k * invstd overflows to inf and
    # inf * 0 made dx NaN. This order gives c1 = 0 there (and the same value to a few float64
    # ulps elsewhere, invisible after the one rounding into float32).
    for j in range(s1.shape[0]):
        c1[j] = k[j] * (invstds[j] * (s2[j] * invstds[j] / n))
    for j in range(s1.shape[0]):
        c0[j] = -k[j] * s1[j] / n
    for j in range(s1.shape[0]):
        dgamma[j] = dgamma_of(s1[j], s2[j], invstds[j], rs[j], ds[j])
    for j in range(s1.shape[0]):
        dbeta[j] = s1[j]


@helper
def frozen_channels(s1, s2, stats, dgamma, dbeta):
    """dgamma and dbeta of the frozen-statistics gradient (its dx is ``SCALE * dy``)."""
    invstds, rs, ds = stats[INVSTD], stats[R], stats[D]
    for j in range(s1.shape[0]):
        dgamma[j] = dgamma_of(s1[j], s2[j], invstds[j], rs[j], ds[j])
    for j in range(s1.shape[0]):
        dbeta[j] = s1[j]


# --- The rescue of a channel whose shifted sums overflowed (float64 data beyond ~1e154: the
# squares overflow; beyond ~9e307 the differences do). Cold path: a forward or moments kernel
# tests each channel's mean and variance once (a vectorized O(C) loop, the whole cost on normal
# data) and recomputes only a non-finite one, from values scaled by a power of two (exact).


@helper
def channel_extent(x, c):
    """Largest |x| in channel c of an (outer, C, inner) view; NaN if the channel holds NaN."""
    top = 0.0
    for o in range(x.shape[0]):
        for i in range(x.shape[2]):
            a = abs(np.float64(x[o, c, i]))
            if not a <= top:  # larger, or NaN
                top = a
    return top


@helper
def rescue_scale(x, c):
    """A power of two that brings channel c's values to at most 2**500 (so that differences,
    squares and their sums stay finite), or 0.0 when the channel holds inf or NaN."""
    top = channel_extent(x, c)
    if not np.isfinite(top):
        return 0.0
    e = math.frexp(top)[1]
    return math.ldexp(1.0, 500 - e) if e > 500 else 1.0


@helper
def rescaled_moments(x, c, f):
    """``(mean, var)`` of channel c from its values times f (a power of two: exact), shifted
    sums in float64, scaled back; var overflows to inf only if the true variance does."""
    k = np.float64(x[0, c, 0]) * f
    s1 = 0.0
    s2 = 0.0
    for o in range(x.shape[0]):
        for i in range(x.shape[2]):
            d = np.float64(x[o, c, i]) * f - k
            s1 += d
            s2 += d * d
    mean, var = moments_from_sums(k, s1, s2, x.shape[0] * x.shape[2])
    return mean / f, var / f / f


@helper
def rescued_moments(x, c):
    """Channel c's ``(scale, mean, var)`` recomputed from rescaled values; ``(0.0, NaN, NaN)``
    when it holds inf or NaN."""
    f = rescue_scale(x, c)
    if f == 0.0:
        return 0.0, np.nan, np.nan
    mean, var = rescaled_moments(x, c, f)
    return f, mean, var


@helper
def needs_rescue(means, variances):
    """How many channels have a non-finite mean or variance (a vectorized pass)."""
    bad = 0
    for c in range(means.shape[0]):
        bad += not (np.isfinite(means[c]) and np.isfinite(variances[c]))
    return bad


@helper
def rescue(x, stats, eps, gamma, beta, rmax, dmax, running_mean, running_var, relu, thr, y):
    """Channels whose statistics are not finite: recomputed from rescaled values when the
    channel's values are finite (then their y rewritten with rescaled arithmetic), NaN
    statistics and an all-NaN y when the channel holds inf or NaN (as the README says)."""
    means, variances = stats[MEAN], stats[VAR]
    if needs_rescue(means, variances) == 0:
        return
    for c in range(means.shape[0]):
        if np.isfinite(means[c]) and np.isfinite(variances[c]):
            continue
        f, mean, var = rescued_moments(x, c)
        means[c] = mean
        variances[c] = var
        rm = running_mean[c : c + 1] if running_mean.shape[0] > 0 else running_mean
        rv = running_var[c : c + 1] if running_var.shape[0] > 0 else running_var
        finish_channels(
            stats[:, c : c + 1], eps, gamma[c : c + 1], beta[c : c + 1], rmax, dmax, rm, rv
        )
        s = stats[SCALE, c]
        b = stats[SHIFT, c]
        g = 1.0 if f == 0.0 else f
        for o in range(x.shape[0]):
            for i in range(x.shape[2]):
                v = (np.float64(x[o, c, i]) * g - mean * g) * (s / g) + b
                y[o, c, i] = activate(v, relu, thr)


@helper
def rescue_moments(x, mean, var):
    """:func:`rescue` for the moments kernel (statistics in the data's dtype, no output)."""
    if needs_rescue(mean, var) == 0:
        return
    for c in range(mean.shape[0]):
        if not (np.isfinite(mean[c]) and np.isfinite(var[c])):
            f, mean[c], var[c] = rescued_moments(x, c)


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
def row_grad_sums(x_row, dy_row, m, scale, shift, relu, thr):
    """``(sum(dy), sum(dy * (x - m)))`` over one row, in float64, dy behind the activation's
    mask (recomputed from x: ``(x - m) * scale + shift``)."""
    a = 0.0
    b = 0.0
    for i in range(x_row.shape[0]):
        d = x_row[i] - m
        g = np.float64(dy_row[i]) if passes(d * scale + shift, relu, thr) else 0.0
        a += g
        b += g * d
    return a, b


@reduction
def row_frozen(x_row, dy_row, dx_row, m, scale, shift, relu, thr):
    """One row of the frozen backward: ``dx = scale * dy`` (x is not read for it unless the
    activation's mask needs it, so an inf or NaN in x cannot reach dx) and the row's
    ``(sum(dy), sum(dy * (x - m)))`` for dgamma, dbeta."""
    a = 0.0
    b = 0.0
    for i in range(x_row.shape[0]):
        d = x_row[i] - m
        g = np.float64(dy_row[i]) if passes(d * scale + shift, relu, thr) else 0.0
        a += g
        b += g * d
        dx_row[i] = scale * g
    return a, b


@reduction
def row_input_sums(x_row, dy_row, k):
    """One read of a row of x and dy for the cache-free backward: ``sum(x - k)``,
    ``sum((x - k)**2)``, ``sum(dy)``, ``sum(dy * (x - k))``, in float64."""
    a = 0.0
    b = 0.0
    e = 0.0
    f = 0.0
    for i in range(x_row.shape[0]):
        d = x_row[i] - k
        g = np.float64(dy_row[i])
        a += d
        b += d * d
        e += g
        f += g * d
    return a, b, e, f


@helper
def input_channels(k, s1, s2, s3, s4, n, eps, gamma, stats):
    """The cache-free backward's statistics from one pass of sums around the shift k (see
    :func:`row_input_sums`): the block for :func:`backward_channels`, and in place of ``s4``,
    ``sum(dy * (x - mean)) = sum(dy * (x - k)) - (mean - k) * sum(dy)``: the shift is a value
    of the channel, so the correction is small against the sum and loses nothing that matters
    (the same argument as for the variance, in ``strided``)."""
    moments_channels(k, s1, s2, n, stats[MEAN], stats[VAR])
    zeros = stats[D]  # beta does not enter the gradient
    for j in range(zeros.shape[0]):
        zeros[j] = 0.0
    finish_channels(stats, eps, gamma, zeros, 0.0, 0.0, zeros, zeros)
    means = stats[MEAN]
    for j in range(s4.shape[0]):
        s4[j] = s4[j] - (means[j] - k[j]) * s3[j]
