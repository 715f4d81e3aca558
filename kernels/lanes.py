"""The lanes family: C-contiguous (outer, C, inner) with inner < ROWS_MIN (2-D, NHWC, small L).

Each outer index holds one contiguous row of ``P = C * inner`` lanes; lane l belongs to channel
``l // inner``. Work is a fixed grid of tasks that depends on the shape and the machine's tuning
vector only (never on the thread count): lane tiles of ``T`` lanes (a multiple of inner, so a
tile holds whole channels; ``TUNE_TILE`` keeps a tile's float64 per-lane buffers in L1d) times
row blocks of ``rb >= BLOCK_ROWS_MIN`` rows (``TUNE_BLOCK`` bytes of x per task).

- Reductions run down a tile's rows eight at a time: per lane, the eight shifted values are
  added in a fixed tree and the result added to the lane's float64 accumulator, so the loop is
  vectorized across lanes without any reassociation and the accumulators are loaded and stored
  once per eight rows. (Measured on float32 (1024, 4096), one thread: 2.5 ms for the former
  design's per-lane accumulators over stripes of the whole row, 1.1 ms for tiles of 64 lanes
  one row at a time, 0.78 ms for tiles of 1024 lanes eight rows at a time.)
- Fused route, when a strip of at least ``FUSE_LANES_MIN`` lanes over every row fits
  ``TUNE_STRIP`` bytes (MLP activations at small and medium batch): a task owns the channels of
  its strip outright. It reduces the strip, finishes its channels and writes their output while
  the strip is still in this core's cache, with O(T) buffers of its own and no partials: x is
  read from memory once. (Measured, float32 forward, interleaved: strips of 256 lanes were
  15-25% faster than the two-pass route at (2048, 1024), at 1 and 2 threads, and 20-30% at
  (512, 2048); strips of 32-128 lanes were slower, up to 4x: a strip narrower than a quarter
  page streams poorly from L3.)
- Two-pass route otherwise (then ``outer > rb >= 64``): each task writes its block's per-lane sums
  into partials (``nrb x P`` float64 pairs), combined per lane in block order, then lanes per
  channel in lane order; then a second parallel pass writes.
- Memory beyond the outputs: O(T) per task on the fused route; on the two-pass route the
  partials (at most ``16 * P * ceil(outer / rb)`` bytes, <= x/8 for float32 since rb >= 64)
  and two float64 values per channel (<= x/8): at most x/4 in all, x/8 for float64 x.
- Shifts: each lane is accumulated around its channel's first value (see ``strided`` for the
  accuracy argument). Per-lane copies of per-channel values are built per task, O(T), from the
  (4, C) statistics block, so no write pass needs a per-channel scratch vector.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import (
    BACKWARD,
    BACKWARD_INPUT,
    BLOCK_ROWS_MIN,
    FORWARD_TRAIN,
    FUSE_LANES_MIN,
    MOMENTS,
    NORMALIZE,
    TUNE_BLOCK,
    TUNE_STRIP,
    TUNE_TILE,
    helper,
    parallel_kernel,
    phase,
)
from .common import (
    MEAN,
    SCALE,
    SHIFT,
    STATS_ROWS,
    activate,
    backward_channels,
    forward_channels,
    frozen_channels,
    inference_channels,
    input_channels,
    moments_channels,
    passes,
    rescue,
    rescue_moments,
    update_running,
)


@helper
def geometry(x, tune):
    """``(P, T, nt, rb, nrb)``: lanes per row, lanes per tile, tiles, rows per block, blocks.

    Fused route (``nrb == 1``) when a strip of at least ``FUSE_LANES_MIN`` lanes over every row
    fits ``TUNE_STRIP`` bytes: the tile is then the widest such strip (a multiple of inner, at
    most ``TUNE_TILE``). Otherwise tiles of ``TUNE_TILE`` lanes and row blocks of
    ``TUNE_BLOCK`` bytes (at least ``BLOCK_ROWS_MIN`` rows).
    """
    outer, channels, inner = x.shape
    lanes = channels * inner
    tile = min(lanes, max(1, tune[TUNE_TILE] // inner) * inner)
    strip = tile
    while strip > inner and outer * strip * x.itemsize > tune[TUNE_STRIP]:
        strip = max(inner, strip // 2 // inner * inner)
    if outer * strip * x.itemsize <= tune[TUNE_STRIP] and strip >= min(lanes, FUSE_LANES_MIN):
        return lanes, strip, (lanes + strip - 1) // strip, max(1, outer), 1
    rb = max(BLOCK_ROWS_MIN, tune[TUNE_BLOCK] // (tile * x.itemsize))
    return lanes, tile, (lanes + tile - 1) // tile, rb, (outer + rb - 1) // rb


@helper
def span(task, nt, tile, lanes, rb, outer):
    """``(r0, r1, l0, l1)``: the rows and lanes of a task of the grid (tile-minor order)."""
    b, l0 = task // nt, (task % nt) * tile
    return b * rb, min(outer, (b + 1) * rb), l0, min(lanes, l0 + tile)


# --- Loops over a tile (lanes l0:l1; per-lane vectors indexed from 0). The activation flag
# ``relu`` is the same for every element of a call, so the branches on it are loop-invariant.


@helper
def moment_sums(x2, k, r0, r1, l0, l1, a1, a2):
    """``a1[j], a2[j] = sum(x - k[j]), sum((x - k[j])**2)`` over rows r0:r1 of lane l0 + j."""
    w = l1 - l0
    for j in range(w):
        a1[j] = 0.0
        a2[j] = 0.0
    r = r0
    while r + 8 <= r1:
        x0, x1, x2_, x3 = x2[r, l0:l1], x2[r + 1, l0:l1], x2[r + 2, l0:l1], x2[r + 3, l0:l1]
        x4, x5, x6, x7 = x2[r + 4, l0:l1], x2[r + 5, l0:l1], x2[r + 6, l0:l1], x2[r + 7, l0:l1]
        for j in range(w):
            kj = k[j]
            d0, d1, d2, d3 = x0[j] - kj, x1[j] - kj, x2_[j] - kj, x3[j] - kj
            d4, d5, d6, d7 = x4[j] - kj, x5[j] - kj, x6[j] - kj, x7[j] - kj
            a1[j] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            a2[j] += ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)) + (
                (d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)
            )
        r += 8
    while r < r1:
        xr = x2[r, l0:l1]
        for j in range(w):
            d = xr[j] - k[j]
            a1[j] += d
            a2[j] += d * d
        r += 1


@helper
def gradient_sums(x2, g2, m, s, b, relu, thr, r0, r1, l0, l1, a1, a2):
    """``a1[j], a2[j] = sum(dy), sum(dy * (x - m[j]))`` over rows r0:r1 of lane l0 + j, dy
    behind the activation's mask (``(x - m) * s + b`` recomputed from x); four rows at a time,
    as the moment sums (the accumulators loaded and stored once per four rows)."""
    w = l1 - l0
    for j in range(w):
        a1[j] = 0.0
        a2[j] = 0.0
    r = r0
    while r + 4 <= r1:
        x0, x1, x2_, x3 = x2[r, l0:l1], x2[r + 1, l0:l1], x2[r + 2, l0:l1], x2[r + 3, l0:l1]
        g0, g1, g2_, g3 = g2[r, l0:l1], g2[r + 1, l0:l1], g2[r + 2, l0:l1], g2[r + 3, l0:l1]
        for j in range(w):
            mj, sj, bj = m[j], s[j], b[j]
            d0, d1, d2, d3 = x0[j] - mj, x1[j] - mj, x2_[j] - mj, x3[j] - mj
            e0 = np.float64(g0[j]) if passes(d0 * sj + bj, relu, thr) else 0.0
            e1 = np.float64(g1[j]) if passes(d1 * sj + bj, relu, thr) else 0.0
            e2 = np.float64(g2_[j]) if passes(d2 * sj + bj, relu, thr) else 0.0
            e3 = np.float64(g3[j]) if passes(d3 * sj + bj, relu, thr) else 0.0
            a1[j] += (e0 + e1) + (e2 + e3)
            a2[j] += (e0 * d0 + e1 * d1) + (e2 * d2 + e3 * d3)
        r += 4
    while r < r1:
        xr, gr = x2[r, l0:l1], g2[r, l0:l1]
        for j in range(w):
            d = xr[j] - m[j]
            e = np.float64(gr[j]) if passes(d * s[j] + b[j], relu, thr) else 0.0
            a1[j] += e
            a2[j] += e * d
        r += 1


@helper
def input_sums(x2, g2, k, r0, r1, l0, l1, a1, a2, a3, a4):
    """The cache-free backward's one read of x and dy: per lane ``sum(x - k)``,
    ``sum((x - k)**2)``, ``sum(dy)``, ``sum(dy * (x - k))`` over rows r0:r1, four rows at a
    time (one row at a time, loading and storing four accumulators per element, made it slower
    than a forward and a backward together: float32 (512, 1024), 979 against 572 us)."""
    w = l1 - l0
    for j in range(w):
        a1[j] = 0.0
        a2[j] = 0.0
        a3[j] = 0.0
        a4[j] = 0.0
    r = r0
    while r + 4 <= r1:
        x0, x1, x2_, x3 = x2[r, l0:l1], x2[r + 1, l0:l1], x2[r + 2, l0:l1], x2[r + 3, l0:l1]
        g0, g1, g2_, g3 = g2[r, l0:l1], g2[r + 1, l0:l1], g2[r + 2, l0:l1], g2[r + 3, l0:l1]
        for j in range(w):
            kj = k[j]
            d0, d1, d2, d3 = x0[j] - kj, x1[j] - kj, x2_[j] - kj, x3[j] - kj
            e0, e1 = np.float64(g0[j]), np.float64(g1[j])
            e2, e3 = np.float64(g2_[j]), np.float64(g3[j])
            a1[j] += (d0 + d1) + (d2 + d3)
            a2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            a3[j] += (e0 + e1) + (e2 + e3)
            a4[j] += (e0 * d0 + e1 * d1) + (e2 * d2 + e3 * d3)
        r += 4
    while r < r1:
        xr, gr = x2[r, l0:l1], g2[r, l0:l1]
        for j in range(w):
            d = xr[j] - k[j]
            e = np.float64(gr[j])
            a1[j] += d
            a2[j] += d * d
            a3[j] += e
            a4[j] += e * d
        r += 1


@helper
def affine_rows(x2, y2, m, s, b, relu, thr, r0, r1, l0, l1):
    """``y = activation((x - m[j]) * s[j] + b[j])`` on rows r0:r1, lanes l0:l1; on wide tiles
    four rows per pass over the per-lane values. (Those three float64 loads per element bound
    the loop on wide tiles: float32 (2048, 1024), one thread, 431 us four rows at a time against
    552 us one row at a time. On tiles narrower than 512 lanes the four-row loop's per-group
    set-up (runtime alias checks of eight rows) costs more than it saves: (12544, 256), 2038
    against 974 us.)"""
    w = l1 - l0
    r = r0
    while w >= 512 and r + 4 <= r1:
        x0, x1, x2_, x3 = x2[r, l0:l1], x2[r + 1, l0:l1], x2[r + 2, l0:l1], x2[r + 3, l0:l1]
        y0, y1, y2_, y3 = y2[r, l0:l1], y2[r + 1, l0:l1], y2[r + 2, l0:l1], y2[r + 3, l0:l1]
        for j in range(w):
            mj, sj, bj = m[j], s[j], b[j]
            y0[j] = activate((x0[j] - mj) * sj + bj, relu, thr)
            y1[j] = activate((x1[j] - mj) * sj + bj, relu, thr)
            y2_[j] = activate((x2_[j] - mj) * sj + bj, relu, thr)
            y3[j] = activate((x3[j] - mj) * sj + bj, relu, thr)
        r += 4
    while r < r1:
        xr, yr = x2[r, l0:l1], y2[r, l0:l1]
        for j in range(w):
            yr[j] = activate((xr[j] - m[j]) * s[j] + b[j], relu, thr)
        r += 1


@helper
def gradient_rows(x2, g2, d2, m, s, b, relu, thr, k, c1, c0, r0, r1, l0, l1):
    """``dx = k[j]*dy - c1[j]*(x - m[j]) + c0[j]`` (dy behind the activation's mask) on rows
    r0:r1, lanes l0:l1, one row at a time (two rows per pass were slower at every width
    measured: (12544, 256) 1861 against 1117 us, (2048, 1024) 762 against 676 us)."""
    for r in range(r0, r1):
        xr, gr, dr = x2[r, l0:l1], g2[r, l0:l1], d2[r, l0:l1]
        for j in range(l1 - l0):
            d = xr[j] - m[j]
            e = np.float64(gr[j]) if passes(d * s[j] + b[j], relu, thr) else 0.0
            dr[j] = k[j] * e - c1[j] * d + c0[j]


@helper
def frozen_rows(x2, g2, d2, m, s, b, relu, thr, r0, r1, l0, l1, a1, a2):
    """``dx = s[j] * dy`` (x is read for dx only through the activation's mask, so an inf or
    NaN in x cannot reach dx without one) and the gradient sums for dgamma and dbeta, in one
    pass."""
    w = l1 - l0
    for j in range(w):
        a1[j] = 0.0
        a2[j] = 0.0
    for r in range(r0, r1):
        xr, gr, dr = x2[r, l0:l1], g2[r, l0:l1], d2[r, l0:l1]
        for j in range(w):
            d = xr[j] - m[j]
            e = np.float64(gr[j]) if passes(d * s[j] + b[j], relu, thr) else 0.0
            a1[j] += e
            a2[j] += e * d
            dr[j] = s[j] * e


# --- Per-lane copies of per-channel values, and per-channel sums of per-lane ones. A tile
# starts on a channel boundary (l0 and T are multiples of inner), so these loops run
# channel-major, without an integer division per lane (~30 cycles each, three per lane).


@helper
def expand(v, inner, c0, w):
    """Per lane of a w-lane tile starting at channel c0: its channel's entry of the
    per-channel vector v (indexed by channel), as float64."""
    out = np.empty(w)
    if inner == 1:
        for j in range(w):
            out[j] = v[c0 + j]
        return out
    for j in range(0, w, inner):
        e = np.float64(v[c0 + j // inner])
        for i in range(j, j + inner):
            out[i] = e
    return out


@helper
def fold(a, inner):
    """Per channel: the sum of its ``inner`` lanes, in lane order (a itself when inner is 1)."""
    if inner == 1:
        return a
    out = np.empty(a.shape[0] // inner)
    for c in range(out.shape[0]):
        t = 0.0
        for i in range(c * inner, (c + 1) * inner):
            t += a[i]
        out[c] = t
    return out


@helper
def shifts(x2, inner, l0, l1):
    """Per channel of the tile: its shift, the channel's first value (lane c*inner of row 0)."""
    k = np.empty((l1 - l0) // inner)
    for c in range(k.shape[0]):
        k[c] = x2[0, l0 + c * inner]
    return k


@helper
def coefficients(stats, inner, c0, w):
    """Per lane: MEAN, SCALE and SHIFT of its channel (``y = (x - mean) * scale + shift``)."""
    return (
        expand(stats[MEAN], inner, c0, w),
        expand(stats[SCALE], inner, c0, w),
        expand(stats[SHIFT], inner, c0, w),
    )


@helper
def partials_per_channel(p1, p2, inner, c0, c1):
    """Channels c0:c1's two sums from the partials: per lane over blocks in block order, then
    over its lanes in lane order."""
    s1 = np.zeros(c1 - c0)
    s2 = np.zeros(c1 - c0)
    for c in range(c0, c1):
        for lane in range(c * inner, (c + 1) * inner):
            t1 = 0.0
            t2 = 0.0
            for b in range(p1.shape[0]):
                t1 += p1[b, lane]
                t2 += p2[b, lane]
            s1[c - c0] += t1
            s2[c - c0] += t2
    return s1, s2


@helper
def channel_shifts(x2, inner, channels):
    k = np.empty(channels)
    for c in range(channels):
        k[c] = x2[0, c * inner]
    return k


# --- Task bodies: each allocates its own O(T) buffers (inside a called function, so that a
# --- parallel loop never shares them).


@helper
def tile_sums(x2, inner, r0, r1, l0, l1):
    """The tile's per-channel shifts and per-lane shifted moment sums over rows r0:r1."""
    k = shifts(x2, inner, l0, l1)
    a1 = np.empty(l1 - l0)
    a2 = np.empty(l1 - l0)
    moment_sums(x2, expand(k, inner, 0, l1 - l0), r0, r1, l0, l1, a1, a2)
    return k, a1, a2


@helper
def block_sums_task(x2, inner, r0, r1, l0, l1, p1, p2):
    k, a1, a2 = tile_sums(x2, inner, r0, r1, l0, l1)
    p1[l0:l1] = a1
    p2[l0:l1] = a2


@helper
def tile_moments(x2, inner, n, l0, l1, mean, var):
    """Mean and variance of the channels of tile l0:l1 over every row (the fused route)."""
    k, a1, a2 = tile_sums(x2, inner, 0, x2.shape[0], l0, l1)
    c0, c1 = l0 // inner, l1 // inner
    moments_channels(k, fold(a1, inner), fold(a2, inner), n, mean[c0:c1], var[c0:c1])


@helper
def write_task(x2, y2, inner, stats, relu, thr, r0, r1, l0, l1):
    m, s, b = coefficients(stats, inner, l0 // inner, l1 - l0)
    affine_rows(x2, y2, m, s, b, relu, thr, r0, r1, l0, l1)


@helper
def forward_tile(
    x2,
    y2,
    inner,
    n,
    l0,
    l1,
    eps,
    gamma,
    beta,
    rmax,
    dmax,
    running_mean,
    running_var,
    relu,
    thr,
    stats,
):
    """The fused training forward of one tile: every row reduced, its channels finished, then
    written while the tile is in cache."""
    k, a1, a2 = tile_sums(x2, inner, 0, x2.shape[0], l0, l1)
    c0, c1 = l0 // inner, l1 // inner
    rm = running_mean[c0:c1] if running_mean.shape[0] > 0 else running_mean
    rv = running_var[c0:c1] if running_var.shape[0] > 0 else running_var
    forward_channels(
        k,
        fold(a1, inner),
        fold(a2, inner),
        n,
        eps,
        gamma[c0:c1],
        beta[c0:c1],
        rmax,
        dmax,
        rm,
        rv,
        stats[:, c0:c1],
    )
    write_task(x2, y2, inner, stats, relu, thr, 0, x2.shape[0], l0, l1)


@helper
def gradient_sums_task(x2, g2, inner, stats, relu, thr, r0, r1, l0, l1, p1, p2):
    m, s, b = coefficients(stats, inner, l0 // inner, l1 - l0)
    gradient_sums(x2, g2, m, s, b, relu, thr, r0, r1, l0, l1, p1[l0:l1], p2[l0:l1])


@helper
def gradient_task(x2, g2, d2, inner, stats, relu, thr, coef, r0, r1, l0, l1):
    """dx on a task's rows and lanes from the per-channel ``coef`` rows k, c1, c0."""
    c0, w = l0 // inner, l1 - l0
    m, s, b = coefficients(stats, inner, c0, w)
    gradient_rows(
        x2,
        g2,
        d2,
        m,
        s,
        b,
        relu,
        thr,
        expand(coef[0], inner, c0, w),
        expand(coef[1], inner, c0, w),
        expand(coef[2], inner, c0, w),
        r0,
        r1,
        l0,
        l1,
    )


@helper
def backward_tile(x2, g2, d2, inner, n, l0, l1, stats, relu, thr, dgamma, dbeta):
    """The fused training backward of one tile: its sums over every row, its channels'
    coefficients, then dx while the tile is in cache."""
    w, c0, c1 = l1 - l0, l0 // inner, l1 // inner
    m, s, b = coefficients(stats, inner, c0, w)
    a1 = np.empty(w)
    a2 = np.empty(w)
    gradient_sums(x2, g2, m, s, b, relu, thr, 0, x2.shape[0], l0, l1, a1, a2)
    coef = np.empty((3, c1 - c0))
    backward_channels(
        fold(a1, inner),
        fold(a2, inner),
        n,
        stats[:, c0:c1],
        dgamma[c0:c1],
        dbeta[c0:c1],
        coef[0],
        coef[1],
        coef[2],
    )
    gradient_rows(
        x2,
        g2,
        d2,
        m,
        s,
        b,
        relu,
        thr,
        expand(coef[0], inner, 0, w),
        expand(coef[1], inner, 0, w),
        expand(coef[2], inner, 0, w),
        0,
        x2.shape[0],
        l0,
        l1,
    )


@helper
def frozen_task(x2, g2, d2, inner, stats, relu, thr, r0, r1, l0, l1, a1, a2):
    m, s, b = coefficients(stats, inner, l0 // inner, l1 - l0)
    frozen_rows(x2, g2, d2, m, s, b, relu, thr, r0, r1, l0, l1, a1, a2)


@helper
def frozen_tile(x2, g2, d2, inner, l0, l1, stats, relu, thr, dgamma, dbeta):
    """The frozen backward of a tile over every row, its channels' dgamma and dbeta."""
    a1 = np.empty(l1 - l0)
    a2 = np.empty(l1 - l0)
    frozen_task(x2, g2, d2, inner, stats, relu, thr, 0, x2.shape[0], l0, l1, a1, a2)
    c0, c1 = l0 // inner, l1 // inner
    frozen_channels(fold(a1, inner), fold(a2, inner), stats[:, c0:c1], dgamma[c0:c1], dbeta[c0:c1])


@helper
def input_tile(x2, g2, d2, inner, n, l0, l1, eps, gamma, dgamma, dbeta):
    """The fused cache-free backward of one tile: one read of x and dy for the statistics and
    both gradient sums, its channels' coefficients, then dx while the tile is in cache."""
    w, c0, c1 = l1 - l0, l0 // inner, l1 // inner
    k = shifts(x2, inner, l0, l1)
    a = np.empty((4, w))
    input_sums(x2, g2, expand(k, inner, 0, w), 0, x2.shape[0], l0, l1, a[0], a[1], a[2], a[3])
    stats = np.empty((STATS_ROWS, c1 - c0))
    s3, s4 = fold(a[2], inner).copy(), fold(a[3], inner).copy()
    input_channels(k, fold(a[0], inner), fold(a[1], inner), s3, s4, n, eps, gamma[c0:c1], stats)
    coef = np.empty((3, c1 - c0))
    backward_channels(s3, s4, n, stats, dgamma[c0:c1], dbeta[c0:c1], coef[0], coef[1], coef[2])
    m, s, b = coefficients(stats, inner, 0, w)
    gradient_rows(
        x2,
        g2,
        d2,
        m,
        s,
        b,
        0,
        0.0,
        expand(coef[0], inner, 0, w),
        expand(coef[1], inner, 0, w),
        expand(coef[2], inner, 0, w),
        0,
        x2.shape[0],
        l0,
        l1,
    )


# --- Phases shared by the kernels (prange loops, inlined into each kernel).


@phase
def sums_phase(x, tune):
    """The two-pass route's reduction: per-channel shifts and shifted sums of the whole array,
    from per-block, per-lane partials combined in a fixed order."""
    outer, channels, inner = x.shape
    lanes, tile, nt, rb, nrb = geometry(x, tune)
    x2 = x.reshape(outer, lanes)
    p1 = np.empty((nrb, lanes))
    p2 = np.empty((nrb, lanes))
    for task in prange(nt * nrb):
        r0, r1, l0, l1 = span(task, nt, tile, lanes, rb, outer)
        block_sums_task(x2, inner, r0, r1, l0, l1, p1[task // nt], p2[task // nt])
    s1, s2 = partials_per_channel(p1, p2, inner, 0, channels)
    return channel_shifts(x2, inner, channels), s1, s2


@phase
def write_phase(x, stats, relu, thr, y, tune):
    """``y = activation((x - mean) * scale + shift)`` per channel, over the task grid."""
    outer, channels, inner = x.shape
    lanes, tile, nt, rb, nrb = geometry(x, tune)
    x2 = x.reshape(outer, lanes)
    y2 = y.reshape(outer, lanes)
    for task in prange(nt * nrb):
        r0, r1, l0, l1 = span(task, nt, tile, lanes, rb, outer)
        write_task(x2, y2, inner, stats, relu, thr, r0, r1, l0, l1)


@phase
def gradient_write_phase(x, dy, stats, relu, thr, coef, dx, tune):
    """dx from the per-channel ``coef`` rows k, c1, c0, over the task grid."""
    outer, channels, inner = x.shape
    lanes, tile, nt, rb, nrb = geometry(x, tune)
    x2 = x.reshape(outer, lanes)
    g2 = dy.reshape(outer, lanes)
    d2 = dx.reshape(outer, lanes)
    for task in prange(nt * nrb):
        r0, r1, l0, l1 = span(task, nt, tile, lanes, rb, outer)
        gradient_task(x2, g2, d2, inner, stats, relu, thr, coef, r0, r1, l0, l1)


# --- Kernels.


@parallel_kernel(*MOMENTS)
def moments(x, mean, var, tune):
    """Per-channel mean and biased variance (rounded into mean's and var's dtype)."""
    outer, channels, inner = x.shape
    lanes, tile, nt, rb, nrb = geometry(x, tune)
    if nrb == 1:
        x2 = x.reshape(outer, lanes)
        for t in prange(nt):
            tile_moments(x2, inner, outer * inner, t * tile, min(lanes, (t + 1) * tile), mean, var)
    else:
        k, s1, s2 = sums_phase(x, tune)
        moments_channels(k, s1, s2, outer * inner, mean, var)
    rescue_moments(x, mean, var)


@parallel_kernel(*FORWARD_TRAIN)
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
    """Training forward: batch statistics, the per-channel epilogue (``forward_channels``: the
    statistics block, renormalized when ``rmax > 0``), ``y`` (with the activation), the rescue
    of overflowed channels, then the running averages; fused per tile when a strip of every row
    fits ``TUNE_STRIP``."""
    outer, channels, inner = x.shape
    lanes, tile, nt, rb, nrb = geometry(x, tune)
    n = outer * inner
    if nrb == 1:
        x2 = x.reshape(outer, lanes)
        y2 = y.reshape(outer, lanes)
        for t in prange(nt):
            forward_tile(
                x2,
                y2,
                inner,
                n,
                t * tile,
                min(lanes, (t + 1) * tile),
                eps,
                gamma,
                beta,
                rmax,
                dmax,
                running_mean,
                running_var,
                relu,
                thr,
                stats,
            )
    else:
        k, s1, s2 = sums_phase(x, tune)
        forward_channels(
            k, s1, s2, n, eps, gamma, beta, rmax, dmax, running_mean, running_var, stats
        )
        write_phase(x, stats, relu, thr, y, tune)
    rescue(x, stats, eps, gamma, beta, rmax, dmax, running_mean, running_var, relu, thr, y)
    update_running(stats, n, momentum, unbiased, running_mean, running_var)


@parallel_kernel(*NORMALIZE)
def normalize(x, running_mean, running_var, gamma, beta, eps, relu, thr, stats, y, tune):
    """Inference: ``y = activation(gamma * (x - running_mean) / sqrt(running_var + eps) +
    beta)``."""
    inference_channels(running_mean, running_var, eps, gamma, beta, stats)
    write_phase(x, stats, relu, thr, y, tune)


@parallel_kernel(*BACKWARD)
def backward_train(x, dy, stats, relu, thr, dgamma, dbeta, dx, tune):
    """Training backward: sums of dy and dy*(x - mean) (dy behind the activation's mask), the
    per-channel coefficients (``backward_channels``), then dx; fused per tile when a strip of
    every row fits."""
    outer, channels, inner = x.shape
    lanes, tile, nt, rb, nrb = geometry(x, tune)
    n = outer * inner
    x2 = x.reshape(outer, lanes)
    g2 = dy.reshape(outer, lanes)
    d2 = dx.reshape(outer, lanes)
    if nrb == 1:
        for t in prange(nt):
            backward_tile(
                x2,
                g2,
                d2,
                inner,
                n,
                t * tile,
                min(lanes, (t + 1) * tile),
                stats,
                relu,
                thr,
                dgamma,
                dbeta,
            )
    else:
        p1 = np.empty((nrb, lanes))
        p2 = np.empty((nrb, lanes))
        for task in prange(nt * nrb):
            r0, r1, l0, l1 = span(task, nt, tile, lanes, rb, outer)
            gradient_sums_task(
                x2, g2, inner, stats, relu, thr, r0, r1, l0, l1, p1[task // nt], p2[task // nt]
            )
        s1, s2 = partials_per_channel(p1, p2, inner, 0, channels)
        coef = np.empty((3, channels))
        backward_channels(s1, s2, n, stats, dgamma, dbeta, coef[0], coef[1], coef[2])
        gradient_write_phase(x, dy, stats, relu, thr, coef, dx, tune)


@parallel_kernel(*BACKWARD)
def backward_frozen(x, dy, stats, relu, thr, dgamma, dbeta, dx, tune):
    """Frozen-statistics backward: ``dx = scale * dy`` (behind the activation's mask) and the
    sums for dgamma, dbeta, in one pass."""
    outer, channels, inner = x.shape
    lanes, tile, nt, rb, nrb = geometry(x, tune)
    x2 = x.reshape(outer, lanes)
    g2 = dy.reshape(outer, lanes)
    d2 = dx.reshape(outer, lanes)
    if nrb == 1:
        for t in prange(nt):
            frozen_tile(
                x2,
                g2,
                d2,
                inner,
                t * tile,
                min(lanes, (t + 1) * tile),
                stats,
                relu,
                thr,
                dgamma,
                dbeta,
            )
    else:
        p1 = np.empty((nrb, lanes))
        p2 = np.empty((nrb, lanes))
        for task in prange(nt * nrb):
            r0, r1, l0, l1 = span(task, nt, tile, lanes, rb, outer)
            b = task // nt
            frozen_task(
                x2, g2, d2, inner, stats, relu, thr, r0, r1, l0, l1, p1[b, l0:l1], p2[b, l0:l1]
            )
        s1, s2 = partials_per_channel(p1, p2, inner, 0, channels)
        frozen_channels(s1, s2, stats, dgamma, dbeta)


@parallel_kernel(*BACKWARD_INPUT)
def backward_input(x, dy, gamma, eps, dgamma, dbeta, dx, tune):
    """Cache-free training backward: the batch statistics and both gradient sums from one read
    of x and dy, then dx; fused per tile when a strip of every row fits, else two passes (the
    sums' partials, then dx)."""
    outer, channels, inner = x.shape
    lanes, tile, nt, rb, nrb = geometry(x, tune)
    n = outer * inner
    x2 = x.reshape(outer, lanes)
    g2 = dy.reshape(outer, lanes)
    d2 = dx.reshape(outer, lanes)
    if nrb == 1:
        for t in prange(nt):
            input_tile(
                x2,
                g2,
                d2,
                inner,
                n,
                t * tile,
                min(lanes, (t + 1) * tile),
                eps,
                gamma,
                dgamma,
                dbeta,
            )
    else:
        k = channel_shifts(x2, inner, channels)
        p = np.empty((4, nrb, lanes))
        for task in prange(nt * nrb):
            r0, r1, l0, l1 = span(task, nt, tile, lanes, rb, outer)
            b = task // nt
            input_sums(
                x2,
                g2,
                expand(k, inner, l0 // inner, l1 - l0),
                r0,
                r1,
                l0,
                l1,
                p[0, b, l0:l1],
                p[1, b, l0:l1],
                p[2, b, l0:l1],
                p[3, b, l0:l1],
            )
        s1, s2 = partials_per_channel(p[0], p[1], inner, 0, channels)
        s3, s4 = partials_per_channel(p[2], p[3], inner, 0, channels)
        stats = np.empty((STATS_ROWS, channels))
        input_channels(k, s1, s2, s3, s4, n, eps, gamma, stats)
        coef = np.empty((3, channels))
        backward_channels(s3, s4, n, stats, dgamma, dbeta, coef[0], coef[1], coef[2])
        gradient_write_phase(x, dy, stats, 0, 0.0, coef, dx, tune)
