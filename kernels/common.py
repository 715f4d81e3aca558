"""Per-channel arithmetic shared by the kernel families (the O(C) part of every operation), the
rescue of overflowed channels (a cold kernel of its own) and the contiguous-row reductions of
the ``rows`` family.

Every kernel is: a reduction over x (and dy) -> these per-channel functions, inside the same
kernel call -> a write pass applying ``(x - m[c]) * a[c] + b[c]`` (or the gradient's
``k[c] * dy - c1[c] * (x - m[c]) + c0[c]``). The running-average update and every coefficient
are computed here in float64 and rounded once into their arrays' dtype; nothing of it is left
to NumPy after the kernel has written (it could raise under ``np.errstate``, after a write).

Compile time: each per-channel function takes the whole arrays (the work block, gamma,
beta, the running arrays) and a channel range ``c0:c1`` and slices inside, so it is compiled
once per dtype whoever calls it (a fused tile, the two-pass route, the rescue). Called with
slices of different layouts, ``finish_channels`` compiled three times for one first training
step. The loops run over the sliced rows (``stats[ROW, c0:c1]``, 1-D 'C'), indexed by the loop
counter, few arrays per loop: LLVM vectorizes them across channels. (Indexed ``c0 + j``,
numba's wraparound handling of a possibly negative index kept them scalar; so did one loop
writing four arrays: LLVM gives up beyond 8 runtime alias checks. Scalar, the forward
epilogue took 2.3 us for 256 channels, against kernels of ~10 us at float32 (64, 256).)
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import (
    FORWARD_BATCH,
    FORWARD_RUNNING,
    P_COUNT,
    P_DMAX,
    P_EPS,
    P_MODE,
    P_MOMENTUM,
    P_RELU,
    P_RMAX,
    P_THR,
    P_UNBIASED,
    RESCUE,
    RESCUE_MOMENTS,
    borrowed,
    exact,
    from_python,
    helper,
    kernel,
    reduction,
    shared,
    step,
)

# Rows of the float64 per-channel work block of a forward or backward call: the mean and the
# inverse std that normalized x, Batch Renormalization's ``R`` and ``D`` (1 and 0 without it),
# the variance (the biased batch variance while training, the running variance in inference),
# and the write pass's ``SCALE`` and ``SHIFT`` (``y = (x - MEAN) * SCALE + SHIFT``): ``INVSTD =
# 1 / sqrt(VAR + eps)``, ``SCALE = gamma * INVSTD * R``, ``SHIFT = gamma * D + beta`` (gamma
# and beta in x's dtype). A cache keeps only the first ``KEPT`` rows
# (``KEPT_RENORM`` under renorm): backward rebuilds the rest from them, gamma and beta with
# multiplications only (:func:`rebuild_channels`, the forward's own arithmetic, so the same
# bits). Kept as the variance instead of the inverse std, a square root and a division per
# channel in every backward cost float32 (2, 4096) 14.7 -> 20.3 us (Zen 5, one thread).
# Forward and backward make the block per tile where a task has every row of its tile (O(T)
# memory), for the whole array otherwise (x then holds at least 64 values per channel: 56
# bytes per channel is below x/4). A forward given ``KEPT_VAR`` rows keeps VAR too (the
# API's running updates of ghost batches and of running arrays of another dtype).
MEAN, INVSTD, R, D, VAR, SCALE, SHIFT = 0, 1, 2, 3, 4, 5, 6
STATS_ROWS = 7
TILE_ROWS = STATS_ROWS + 5  # and a backward tile's two sums and three coefficients
KEPT = 2  # MEAN, INVSTD
KEPT_RENORM = 4  # MEAN, INVSTD, R, D
KEPT_VAR = 5  # and VAR


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
def moments_channels(k, s1, s2, n, mean, var):
    """Mean and biased variance of channels from their shifts and shifted sums (vectors of the
    same length, rounded into mean's and var's dtype)."""
    for j in range(s1.shape[0]):
        mean[j], var[j] = moments_from_sums(k[j], s1[j], s2[j], n)


@helper
def clip(v, lo, hi):
    """``v`` clipped to [lo, hi]; NaN stays NaN (both comparisons are false)."""
    return lo if v < lo else (hi if v > hi else v)


@helper
def finish_channels(stats, w0, c0, c1, gamma, beta, running_mean, running_var, params):
    """Channels c0:c1 (columns ``w0:w0 + c1 - c0`` of the work block ``stats``), from their
    MEAN and VAR rows: INVSTD, R, D, SCALE and SHIFT. Batch Renormalization (Ioffe 2017)
    when ``params[P_RMAX] > 0``, against the running statistics as they were before this batch:
    ``sigma_run = sqrt(running_var + eps)``, ``r = clip(sqrt(var + eps) / sigma_run, 1/rmax,
    rmax)``, ``d = clip((mean - running_mean) / sigma_run, -dmax, dmax)``; r and d are
    constants for backward. (Its loops live in this one function: as four helpers they cost a
    cold first training step 0.5 s more, Zen 5.)"""
    eps, rmax, dmax = params[P_EPS], params[P_RMAX], params[P_DMAX]
    w1 = w0 + c1 - c0
    means, invstds, variances = stats[MEAN, w0:w1], stats[INVSTD, w0:w1], stats[VAR, w0:w1]
    rs, ds = stats[R, w0:w1], stats[D, w0:w1]
    for j in range(invstds.shape[0]):
        invstds[j] = 1.0 / np.sqrt(variances[j] + eps)
    if rmax > 0.0:
        # sigma_run first into the D row (contiguous float64), read by both loops: the running
        # arrays are strided ('A') vectors, and the loops that read them with sqrt and division
        # did not vectorize (renorm's extra cost float32 (128, 512), one thread, Zen 5: 5.3 us;
        # the forward kernel at (32, 64), renorm 2.32 -> 2.02 us against 1.78 plain; same bits)
        rm, rv = running_mean[c0:c1], running_var[c0:c1]
        for j in range(means.shape[0]):
            ds[j] = np.sqrt(np.float64(rv[j]) + eps)
        for j in range(means.shape[0]):
            rs[j] = clip(np.sqrt(variances[j] + eps) / ds[j], 1.0 / rmax, rmax)
        for j in range(means.shape[0]):
            ds[j] = clip((means[j] - np.float64(rm[j])) / ds[j], -dmax, dmax)
    else:
        for j in range(rs.shape[0]):
            rs[j] = 1.0
        for j in range(rs.shape[0]):
            ds[j] = 0.0
    scale_shift(stats, w0, c0, c1, gamma, beta, rmax > 0.0)


@step
def scale_shift(stats, w0, c0, c1, gamma, beta, renorm):
    """SCALE and SHIFT of channels c0:c1 (columns ``w0:...``) from their INVSTD, R and D rows:
    the end of :func:`finish_channels` and of :func:`rebuild_channels` (inlined in each: as a
    compiled function of its own it cost the first training step 0.3 s, and through
    ``finish_channels`` the backward 0.7 s)."""
    w1 = w0 + c1 - c0
    invstds, rs, ds = stats[INVSTD, w0:w1], stats[R, w0:w1], stats[D, w0:w1]
    scales, shifts = stats[SCALE, w0:w1], stats[SHIFT, w0:w1]
    g, b = gamma[c0:c1], beta[c0:c1]
    if renorm:
        for j in range(invstds.shape[0]):
            shifts[j] = np.float64(g[j]) * ds[j] + b[j]
    else:
        for j in range(invstds.shape[0]):
            shifts[j] = b[j]
    for j in range(invstds.shape[0]):
        scales[j] = np.float64(g[j]) * invstds[j] * rs[j]


@helper
def rebuild_channels(kept, c0, c1, gamma, beta, stats, w0):
    """A backward's work block for channels c0:c1 (columns ``w0:...`` of ``stats``) from the
    rows a cache kept (``kept``: MEAN and INVSTD, and R and D under renorm, columns c0:c1)."""
    w1 = w0 + c1 - c0
    for i in range(kept.shape[0]):
        src, dst = kept[i, c0:c1], stats[i, w0:w1]
        for j in range(dst.shape[0]):
            dst[j] = src[j]
    renorm = kept.shape[0] >= KEPT_RENORM
    if not renorm:
        rs, ds = stats[R, w0:w1], stats[D, w0:w1]
        for j in range(rs.shape[0]):
            rs[j] = 1.0
        for j in range(rs.shape[0]):
            ds[j] = 0.0
    scale_shift(stats, w0, c0, c1, gamma, beta, renorm)


@helper
def running_channels(stats, running_mean, running_var):
    """An inference forward's MEAN and VAR rows: the running statistics (in the data's
    precision, as passed)."""
    means, variances = stats[MEAN], stats[VAR]
    for j in range(means.shape[0]):
        means[j] = running_mean[j]
    for j in range(means.shape[0]):
        variances[j] = running_var[j]


@helper
def given_channels(kept, c0, c1, stats):
    """A synchronized forward's given statistics of channels c0:c1 (``kept`` rows 0 and 1: the
    mean and the biased variance; the call then overwrites them with the kept rows, MEAN and
    INVSTD) into the work block's MEAN and VAR rows (from column 0)."""
    src, dst = kept[0, c0:c1], stats[MEAN]
    for j in range(dst.shape[0]):
        dst[j] = src[j]
    src, dst = kept[1, c0:c1], stats[VAR]
    for j in range(dst.shape[0]):
        dst[j] = src[j]


# A channel's one-pass sums run around a shift k, its first value (every family). Their
# rounding errors grow with |mean - k|, which the float64 mean then carries into the outputs
# near zero: float32, 10^6 values per channel with the first value at 30 / 10^3 / 10^4 sigma
# from the mean, worst y 0.5 / 5.2 / 91 ulps of the exact result (10^5 values at 316 sigma:
# 109 ulps, dx 2.7). Such a channel counts as bad, like one whose sums overflowed, and the
# rescue recomputes it around its first-pass mean. Normal data never comes near (a first
# value 32 sigma from the mean); the criterion costs one compare per channel.
ILL_SHIFT = 1024.0  # (mean - k)**2 > ILL_SHIFT * (var + eps): |mean - k| beyond 32 sigma


@helper
def ill_shifted(k, mean, var, eps):
    """Whether sums around the shift k lose accuracy that shows (see ``ILL_SHIFT``); False for
    non-finite statistics."""
    d = mean - k
    return d * d > ILL_SHIFT * (var + eps)


@helper
def count_bad(k, mean, var, eps):
    """How many channels' statistics are not finite or came from ill-placed shifts
    (``ill_shifted``; ``k``: the channels' shifts, their first values ``x[0, c, 0]`` in every
    family): a training forward or moments kernel returns it, and the caller runs the rescue
    when it is not 0."""
    bad = 0
    for c in range(mean.shape[0]):  # branch-free, so that it stays one vectorized pass
        m, v = mean[c], var[c]
        finite = np.isfinite(m) & np.isfinite(v)
        bad += (not finite) | ill_shifted(k[c], m, v, eps)
    return bad


@helper
def bad_flags(k, mean, var, eps):
    """Per channel: what :func:`count_bad` counts."""
    flags = np.zeros(mean.shape[0], np.bool_)
    for c in range(mean.shape[0]):
        m, v = mean[c], var[c]
        flags[c] = not (np.isfinite(m) and np.isfinite(v)) or ill_shifted(k[c], m, v, eps)
    return flags


@helper
def settle_channels(k, stats, w0, c0, c1, params, running_mean, running_var, kept):
    """The end of a forward for channels c0:c1 (columns ``w0:...`` of the work block, shifts
    ``k``). Batch statistics: how many are bad (:func:`count_bad`; the return value); none:
    their running averages; some: none of the running averages, and ``-VAR`` in place of
    every channel's INVSTD (an inverse std is positive: the sign marks the channels the rescue
    kernel must finish, and -VAR is their variance exactly; settling them there kept that code
    out of the first training step's compilation). Given statistics: the running averages.
    Then the rows a cache keeps into ``kept`` (the first ``kept.shape[0]``; none when it has
    no columns)."""
    w1 = w0 + c1 - c0
    means, variances = stats[MEAN, w0:w1], stats[VAR, w0:w1]
    mode = params[P_MODE]
    bad = 0
    if mode == FORWARD_BATCH:
        bad = count_bad(k, means, variances, params[P_EPS])
    if bad > 0:
        invstds = stats[INVSTD, w0:w1]
        for j in range(invstds.shape[0]):
            invstds[j] = -variances[j]
    elif mode != FORWARD_RUNNING and running_mean.shape[0] > 0:
        update_running(means, variances, params, running_mean[c0:c1], running_var[c0:c1])
    if kept.shape[1] > 0:
        for i in range(kept.shape[0]):
            src, dst = stats[i, w0:w1], kept[i, c0:c1]
            for j in range(dst.shape[0]):
                dst[j] = src[j]
    return bad


@shared
def update_running(means, variances, params, running_mean, running_var):
    """The running averages from the batch's means and biased variances (PyTorch's rule:
    weight ``momentum`` for the batch; the variance unbiased, ``var * n / (n - 1)``, when
    ``params[P_UNBIASED]``, else biased as Keras, Flax and numpy-ml keep it; n is
    ``params[P_COUNT]``, the values per channel), in float64, rounded once into their dtype;
    nothing when the running arrays have length 0. The one running-average update of bnfast
    (also called from Python for ghost batches' combined statistics and running arrays of
    another dtype; the rescue calls it a channel at a time)."""
    if running_mean.shape[0] == 0:
        return
    momentum = params[P_MOMENTUM]
    n = params[P_COUNT]
    unbias = n / (n - 1.0) if params[P_UNBIASED] != 0.0 else 1.0
    for c in range(means.shape[0]):
        running_mean[c] = (1.0 - momentum) * np.float64(running_mean[c]) + momentum * means[c]
    for c in range(means.shape[0]):
        running_var[c] = (1.0 - momentum) * np.float64(running_var[c]) + momentum * (
            variances[c] * unbias
        )


@helper
def same(a, b):
    """Do arrays a and b start at the same address? Then b is the caller's a itself: inference
    with ``out=x``, backward with ``out=dy`` (the API allows only that very view, not a partial
    overlap). A loop that reads a and writes b must then read b: LLVM vectorizes it behind a
    runtime check that the two ranges do not overlap, and with the same range it runs its
    scalar loop instead. Float32, one thread, Zen 5, ms, out of place / in place before / in
    place reading the output: inference (12544, 256) 0.58 / 1.67 / 0.45; backward 1.50 / 3.18;
    (2048, 1024) inference 0.32 / 1.74, backward 1.50 / 2.16; NCHW (32, 64, 28, 28) inference
    0.13 / 0.59, backward 0.43 / 1.17. The same values are read, so the same bits.

    Each such loop of the rows family and ``row_frozen`` is written once, as a ``step``
    (inlined) called with the output as its own source when in place. The lanes family's three
    keep an explicit in-place twin: their rows are slices, and two slices of one array were
    still two pointers to LLVM (inlined the same way, in-place inference (12544, 256) stayed
    at 1.65 ms); per-row inlined bodies fixed that but measured 5-10% slower out of place on
    backward, within this VM's noise but not shown equal."""
    return a.ctypes.data == b.ctypes.data


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
def gradient_channels(s, so, n, stats, c0, c1, coef, dgamma, dbeta):
    """Channels c0:c1 of the training gradient, from ``s[0] = sum(dy)`` and ``s[1] =
    sum(dy*(x-mean))`` (dy behind the activation's mask), as ``dx = k*dy - c1*(x - mean) +
    c0``: ``coef[0] = k = SCALE`` (gamma * invstd * r: Batch Renormalization's r and d are
    constants), ``coef[1] = k*(invstd*(s2*invstd/n))``, ``coef[2] = -k*s1/n``; dgamma and dbeta
    rounded into their arrays. ``s`` and ``coef`` hold channel c0 at index ``so`` (a tile's
    own buffers: 0; the whole array's: c0), the block and dgamma, dbeta at c0.

    ``k * (invstd * (s2 * invstd / n))``, not ``(k * invstd) * ...``: with eps below ~1e-308 a
    constant channel has invstd ~1e155 and s2 == 0 exactly; k * invstd overflowed to inf and
    inf * 0 made dx NaN. This order gives 0 there (and the same value to a few float64 ulps
    elsewhere, invisible after the one rounding into float32)."""
    w = c1 - c0
    s1, s2 = s[0, so : so + w], s[1, so : so + w]
    invstds, scales = stats[INVSTD, c0:c1], stats[SCALE, c0:c1]
    k, a, b = coef[0, so : so + w], coef[1, so : so + w], coef[2, so : so + w]
    for j in range(w):
        k[j] = scales[j]
    for j in range(w):
        a[j] = k[j] * (invstds[j] * (s2[j] * invstds[j] / n))
    for j in range(w):
        b[j] = -k[j] * s1[j] / n
    if dgamma.shape[0] > 0:  # (length 0: not wanted, a synchronized call's given sums)
        parameter_gradients(s, so, stats, c0, c1, dgamma, dbeta)


@shared
def parameter_gradients(s, so, stats, c0, c1, dgamma, dbeta):
    """dgamma and dbeta of channels c0:c1 from the two sums (channel c0 at index ``so`` of
    ``s``), rounded into their arrays (any dtype: float64 ones give a virtual batch's
    unrounded share)."""
    w = c1 - c0
    s1, s2 = s[0, so : so + w], s[1, so : so + w]
    invstds, rs, ds = stats[INVSTD, c0:c1], stats[R, c0:c1], stats[D, c0:c1]
    dg, db = dgamma[c0:c1], dbeta[c0:c1]
    for j in range(w):
        dg[j] = dgamma_of(s1[j], s2[j], invstds[j], rs[j], ds[j])
    for j in range(w):
        db[j] = s1[j]


@helper
def input_channels(x, dy, base, k, s, n, gamma, params, stats, c0, c1):
    """The cache-free backward's statistics of channels c0:c1 from one pass of sums around the
    shifts k (``s`` rows: ``sum(x - k)``, ``sum((x - k)**2)``, ``sum(dy)``, ``sum(dy * (x -
    k))``): MEAN, VAR and the rest of the block, and in place of ``s[3]``, ``sum(dy * (x -
    mean)) = sum(dy * (x - k)) - (mean - k) * sum(dy)``: the shift is a value of the channel, so
    the correction is small against the sum and loses nothing that matters (the same argument
    as for the variance, in ``lanes``) unless the shift lies far from the mean
    (``ill_shifted``): such a channel's sums are taken again around its first-pass mean, from
    x and dy (index ``base + j`` of channel j of these vectors), before anything is written."""
    moments_channels(k[c0:c1], s[0, c0:c1], s[1, c0:c1], n, stats[MEAN, c0:c1], stats[VAR, c0:c1])
    eps = params[P_EPS]
    flags = np.zeros(c1 - c0, np.bool_)
    for j in range(c1 - c0):
        flags[j] = ill_shifted(k[c0 + j], stats[MEAN, c0 + j], stats[VAR, c0 + j], eps)
    if flags.any():  # sums again around the mean (the correction below is then 0)
        means, variances = stats[MEAN, c0:c1], stats[VAR, c0:c1]
        recentred(x, dy, base + c0, means, variances, flags, k[c0:c1], s[3, c0:c1])
    zeros = stats[D]  # beta does not enter the gradient; no renorm (P_RMAX is 0)
    for j in range(c0, c1):
        zeros[j] = 0.0
    finish_channels(stats, c0, c0, c1, gamma, zeros, zeros, zeros, params)
    means, s3, s4, kk = stats[MEAN, c0:c1], s[2, c0:c1], s[3, c0:c1], k[c0:c1]
    for j in range(s4.shape[0]):
        s4[j] = s4[j] - (means[j] - kk[j]) * s3[j]


@exact
def merge_moments(a, b):
    """Rows ``(count, mean, M2)`` of ``a`` merged into ``b`` (Chan, Golub, LeVeque 1979):
    ``mean = (na*ma + nb*mb) / n``, ``M2 = M2a + M2b + (mb - ma)**2 * (na*nb/n)``, symmetric in
    a and b bit for bit (so no reduction tree can make ranks differ); equal means stay exact
    (``(2v + v) / 3`` need not be v: constant channels, and the check rows); two empty sets
    merge into an empty one. The synchronized forward's MPI operator: 7 us of NumPy per
    application at C = 64, ~1 us here."""
    for i in range(a.shape[0]):
        na, ma, qa = a[i, 0], a[i, 1], a[i, 2]
        nb, mb, qb = b[i, 0], b[i, 1], b[i, 2]
        n = na + nb
        m = n if n > 1.0 else 1.0
        d = mb - ma
        q = qa + qb + d * d * (na * nb / m)
        if d != 0.0:
            b[i, 1] = (na * ma + nb * mb) / m
        b[i, 2] = q
        b[i, 0] = n


@from_python
def pack_moments(count, mean, var, checks, msg):
    """A synchronized forward's message: rows ``(count, mean, M2 = var * count)`` per channel
    (all 0 from a rank without values), then the check rows (``bnfast._sync``). One call
    instead of six NumPy assignments (4 us of a 10 us merge at C = 64)."""
    channels = mean.shape[0]
    for j in range(channels):
        msg[j, 0] = count
        msg[j, 1] = mean[j] if count > 0 else 0.0
        msg[j, 2] = var[j] * count if count > 0 else 0.0
    for i in range(checks.shape[0]):
        for k in range(3):
            msg[channels + i, k] = checks[i, k]


@from_python
def unpack_moments(out, mean, var):
    """The merged message into the global ``mean`` and biased ``var`` (M2 / count); returns
    the global count, or -1 when a check row's M2 is not 0 (the ranks disagree)."""
    channels = mean.shape[0]
    for i in range(channels, out.shape[0]):
        if out[i, 2] != 0.0:
            return -1
    total = out[0, 0] if channels > 0 else 0.0
    n = total if total > 1.0 else 1.0
    for j in range(channels):
        mean[j] = out[j, 1]
        var[j] = out[j, 2] / n
    return np.int64(total)


# --- The rescue of a channel whose shifted sums overflowed (float64 data beyond ~1e154: the
# squares overflow; beyond ~9e307 the differences do) or ran around an ill-placed shift
# (``ILL_SHIFT``). Cold path, a kernel of its own: a training forward or moments kernel counts
# such channels once (``count_bad``, a vectorized O(C) loop, the whole cost on normal data) and
# returns the count; the caller runs these only when it is not 0. (Inside the hot kernels, the
# rescue added ~1.2 s to a cold first training step.)


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
def rescued_moments(x, c):
    """Channel c's ``(scale, mean, var)`` recomputed from its values times f, a power of two
    that brings them to at most 2**500 (exact), shifted sums in float64, scaled back (var
    overflows to inf only if the true variance does); ``(0.0, NaN, NaN)`` when the channel
    holds inf or NaN. For channels whose sums overflowed (values beyond ~1e154): rare, so one
    channel at a time."""
    top = channel_extent(x, c)
    if not np.isfinite(top):
        return 0.0, np.nan, np.nan
    e = math.frexp(top)[1]
    f = math.ldexp(1.0, 500 - e) if e > 500 else 1.0
    k = np.float64(x[0, c, 0]) * f
    s1 = 0.0
    s2 = 0.0
    for o in range(x.shape[0]):
        for i in range(x.shape[2]):
            d = np.float64(x[o, c, i]) * f - k
            s1 += d
            s2 += d * d
    mean, var = moments_from_sums(k, s1, s2, x.shape[0] * x.shape[2])
    return f, mean / f, var / f / f


# Channels with ill-placed shifts (``ILL_SHIFT``) can be many (a sparse channel whose first
# value is one of its few non-zeros: every channel of an input can be one), so they are taken
# again in memory order, a tile of whole channels (``RECENTRE_LANES`` lanes, or one channel of
# more) at a time over every row: one more pass over x, however many. One channel at a time,
# each pass read every cache line of an (N, C) array: float32 (4096, 256) with every channel
# flagged, forward 0.14 -> 9.3 ms.
RECENTRE_LANES = 1024


@helper
def ill_channels(x, mean, var, eps):
    """Per channel: finite statistics from sums around an ill-placed shift (``ill_shifted``)."""
    flags = np.zeros(mean.shape[0], np.bool_)
    for c in range(mean.shape[0]):
        m, v = mean[c], var[c]
        k = np.float64(x[0, c, 0])
        flags[c] = np.isfinite(m) and np.isfinite(v) and ill_shifted(k, m, v, eps)
    return flags


@helper
def recentred(x, dy, base, mean, var, flags, k, s4):
    """The flagged channels' mean and var again, from float64 sums around their first-pass
    mean; with an ``s4`` of nonzero length, then the cache-free backward's ``sum(dy * (x -
    mean))`` around that new mean into s4, and the mean into their shifts k. In memory order
    (see ``RECENTRE_LANES``; lanes at an unsigned offset, rows from 0: see
    ``lanes.affine_rows``); the products in a pass of their own (one loop writing three
    accumulators ran scalar: LLVM's runtime alias checks). Entry j of the vectors is channel
    ``base + j`` of x."""
    outer, channels, inner = x.shape
    x2 = x.reshape(outer, channels * inner)
    g2 = dy.reshape(outer, channels * inner)
    per = max(1, RECENTRE_LANES // inner)
    n = outer * inner
    for t0 in range(0, flags.shape[0], per):
        t1 = min(flags.shape[0], t0 + per)
        if not flags[t0:t1].any():
            continue
        w = (t1 - t0) * inner
        lo = np.uint64((base + t0) * inner)
        m = expand(mean, inner, t0, w)
        a1 = np.zeros(w)
        a2 = np.zeros(w)
        for o in range(outer):
            for j in range(np.uint64(w)):
                d = np.float64(x2[o, lo + j]) - m[j]
                a1[j] += d
                a2[j] += d * d
        for c in range(t1 - t0):
            if flags[t0 + c]:
                s1 = 0.0
                s2 = 0.0
                for i in range(c * inner, (c + 1) * inner):
                    s1 += a1[i]
                    s2 += a2[i]
                mean[t0 + c], var[t0 + c] = moments_from_sums(mean[t0 + c], s1, s2, n)
        if s4.shape[0] == 0:
            continue
        m = expand(mean, inner, t0, w)
        for j in range(w):
            a1[j] = 0.0
        for o in range(outer):
            for j in range(np.uint64(w)):
                a1[j] += np.float64(g2[o, lo + j]) * (np.float64(x2[o, lo + j]) - m[j])
        for c in range(t1 - t0):
            if flags[t0 + c]:
                t = 0.0
                for i in range(c * inner, (c + 1) * inner):
                    t += a1[i]
                s4[t0 + c] = t
                k[t0 + c] = mean[t0 + c]


@helper
def expand(v, inner, c0, w):
    """Per lane of a w-lane tile starting at channel c0: its channel's entry of the float64
    per-channel vector v (indexed by channel, cyclically: a wide row's replicas). Where each
    lane is its own channel (inner 1, no wrap: 2-D arrays) that is v's own slice, a view: the
    copy loop cost ~1 ns per lane and vector, 4-5 vectors per tile, which was 40% of a
    training forward and backward at (2, 4096) or (32, 4096) (9-11 ns per channel in all;
    float32, one thread, Zen 5)."""
    c, n = c0 % v.shape[0], v.shape[0]
    if inner == 1 and c + w <= n:
        return v[c : c + w]
    out = np.empty(w)
    for j in range(0, w, inner):
        e = np.float64(v[c])
        for i in range(j, j + inner):
            out[i] = e
        c = c + 1 if c + 1 < n else 0
    return out


@helper
def rewrite_flagged(x, y, stats, flags, relu, thr):
    """y of the flagged channels again from the block, in memory order a tile at a time (see
    ``RECENTRE_LANES``)."""
    outer, channels, inner = x.shape
    x2 = x.reshape(outer, channels * inner)
    y2 = y.reshape(outer, channels * inner)
    per = max(1, RECENTRE_LANES // inner)
    mask = flags.astype(np.float64)  # (a per-lane float64 mask: the write stays vectorized)
    for c0 in range(0, channels, per):
        c1 = min(channels, c0 + per)
        if not flags[c0:c1].any():
            continue
        w = (c1 - c0) * inner
        m = expand(stats[MEAN], inner, c0, w)
        sc = expand(stats[SCALE], inner, c0, w)
        b = expand(stats[SHIFT], inner, c0, w)
        f = expand(mask, inner, c0, w)
        lo = np.uint64(c0 * inner)
        for o in range(outer):
            for j in range(np.uint64(w)):
                if f[j] != 0.0:
                    v = (np.float64(x2[o, lo + j]) - m[j]) * sc[j] + b[j]
                    y2[o, lo + j] = activate(v, relu, thr)


@kernel(*RESCUE)
def rescue(x, gamma, beta, running_mean, running_var, params, stats, y):
    """After a training forward that returned a non-zero count, with the whole work block
    (``stats``, ``(STATS_ROWS, C)``; the forward's kept rows in it, where ``-VAR`` in place of
    INVSTD marks the channels of each tile that counted bad ones: see
    ``settle_channels``): the marked channels' variance and their bad ones (:func:`bad_flags`);
    a bad channel whose mean is finite is recomputed around that mean (``recentred``: an
    ill-placed shift, or sums that overflowed) and its y rewritten, in memory order; one whose
    statistics are still not finite is recomputed from rescaled values when its values are
    finite (its y rewritten with rescaled arithmetic), NaN statistics and an all-NaN y when it
    holds inf or NaN (as the README says); every marked channel finished (the good ones' y is
    already right) and its running averages updated (the forward updated the others')."""
    x, gamma, beta, running_mean, running_var, params, stats, y = borrowed(
        x, gamma, beta, running_mean, running_var, params, stats, y
    )
    relu, thr = params[P_RELU] != 0.0, params[P_THR]
    rm, rv = running_mean, running_var
    means, invstds, variances = stats[MEAN], stats[INVSTD], stats[VAR]
    channels = means.shape[0]
    marked = np.zeros(channels, np.bool_)
    k = np.empty(channels)
    for c in range(channels):
        marked[c] = math.copysign(1.0, invstds[c]) < 0.0 or np.isnan(invstds[c])
        if marked[c]:
            variances[c] = -invstds[c]
        k[c] = x[0, c, 0]
    flags = bad_flags(k, means, variances, params[P_EPS]) & marked
    again = np.zeros(channels, np.bool_)
    for c in range(channels):
        again[c] = flags[c] and np.isfinite(means[c])
    zero = np.int64(0)
    if again.any():
        none = np.empty(0)
        recentred(x, x, zero, means, variances, again, none, none)
    for c in range(channels):
        if marked[c]:
            finish_channels(stats, c, c, c + 1, gamma, beta, rm, rv, params)
    if again.any():
        rewrite_flagged(x, y, stats, again, relu, thr)
    for c in range(channels):
        if not flags[c] or (again[c] and np.isfinite(means[c]) and np.isfinite(variances[c])):
            continue
        f, mean, var = rescued_moments(x, c)
        means[c] = mean
        variances[c] = var
        finish_channels(stats, c, c, c + 1, gamma, beta, rm, rv, params)
        s = stats[SCALE, c]
        b = stats[SHIFT, c]
        g = 1.0 if f == 0.0 else f
        for o in range(x.shape[0]):
            for i in range(x.shape[2]):
                v = (np.float64(x[o, c, i]) * g - mean * g) * (s / g) + b
                y[o, c, i] = activate(v, relu, thr)
    for c in range(channels):  # (the one update, a channel at a time)
        if marked[c]:
            update_running(
                means[c : c + 1], variances[c : c + 1], params, rm[c : c + 1], rv[c : c + 1]
            )


@kernel(*RESCUE_MOMENTS)
def rescue_moments(x, mean, var):
    """:func:`rescue` for the moments kernel (float64 statistics, no output)."""
    x, mean, var = borrowed(x, mean, var)
    ill = ill_channels(x, mean, var, 0.0)
    if ill.any():
        none = np.empty(0)
        recentred(x, x, np.int64(0), mean, var, ill, none, none)
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
    if same(dy_row, dx_row):  # dx into dy: read dy through dx_row (see ``same``)
        return frozen_row_loop(x_row, dx_row, dx_row, m, scale, shift, relu, thr)
    return frozen_row_loop(x_row, dy_row, dx_row, m, scale, shift, relu, thr)


@step
def frozen_row_loop(x_row, dy_row, dx_row, m, scale, shift, relu, thr):
    """``row_frozen``'s loop, inlined at both of its calls (so, called with dx_row as its own
    source, it reads and writes through one array: ``same``); compiled with the caller's
    fastmath flags."""
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
