"""The lanes family: C-contiguous (outer, C, inner) with inner < ROWS_MIN (2-D, NHWC, small L).

Each outer index holds one contiguous row of ``C * inner`` lanes. Rows narrower than
``WIDE_LANES`` are read k at a time (``replicas``): the kernels work on the view
``(outer // k, P)``, ``P = k * C * inner`` lanes per row, lane l of channel ``(l // inner) % C``;
a channel's k replicas share its shift, so their sums add up. Work is a fixed grid of tasks
that depends on the shape and the machine's tuning vector only (never on the thread count):
lane tiles of ``T`` lanes (a multiple of inner, so a tile holds whole channels; ``TUNE_TILE``
keeps a tile's float64 per-lane buffers in L1d; arrays that stream from memory take
``TUNE_WIDE``, see ``blocks``) times row blocks of ``rb >= BLOCK_ROWS_MIN`` rows
(``TUNE_BLOCK`` bytes of x per task).

- Reductions run down a tile's rows eight at a time (on the fused route and for rows of a page
  or more, see ``grouped``; otherwise one at a time): per lane, the eight shifted values are
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
  channel in lane order; then a second parallel pass writes. Also for an array whose single
  fused tile threads could not split (fewer than ``2 * FUSE_LANES_MIN`` lanes) once it exceeds
  one core's L2 (see ``geometry``), its blocks then summed a group of rows at a time
  (``cached``). Passes that only write (inference, given statistics) take the same row-block
  partition (``blocks``).
- Memory beyond the outputs: O(T) per task on the fused route; on the two-pass route the
  partials (at most ``16 * P * ceil(outer / rb)`` bytes, <= x/8 for float32 since rb >= 64)
  and two float64 values per channel (<= x/8): at most x/4 in all, x/8 for float64 x.
- Shifts: each lane is accumulated around its channel's first value (the accuracy argument
  below). Per-lane copies of per-channel values are built per task, O(T), from the per-channel
  statistics block, so no write pass needs a per-channel scratch vector.

Statistics, in one read of x (both families).

Algorithm: shifted sums accumulated in float64. For each channel take a shift ``k`` = the
channel's first value, accumulate ``s1 = sum(x - k)`` and ``s2 = sum((x - k)**2)`` in
float64, then ``mean = k + s1/n`` and ``var = (s2 - s1*s1/n) / n``.

Why not ``E[x^2] - E[x]^2``: on float32 x = 1e4 + N(0, 1), shape (32, 64, 3136), that
formula gives a variance off by 1.6e5 relative with float32 sums, and still 1.1e-5 with
float64 sums (6e-4 at 1e7 values per channel). With the shift, ``s2`` exceeds ``s1**2/n`` by
the factor ``1 + (mean-k)**2/var`` only, and ``(x_i-mean)**2 <= n*var`` bounds that factor by
n; float64 accumulation then leaves a relative error of about ``1e-16 * (that factor)``: at
worst (the first value an extreme outlier) 1e-16 * n, e.g. 1e-9 at n = 1e7, still 200x inside
the float32 target; typically ~1e-15. Measured against a float64 two-pass reference on float32
x = 1e4 + N(0, 1) with 1e7 values per channel: at most 2.6e-13 relative (target 2e-7; PyTorch
2.13: 2e5 on 2-D and NHWC), in every layout; see ``tests/test_accuracy.py``.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import (
    ALL_ROUTES,
    BACKWARD,
    BACKWARD_FROZEN,
    BACKWARD_GIVEN,
    BACKWARD_INPUT,
    BACKWARD_SUMS,
    BACKWARD_TRAIN,
    BLOCK_ROWS_MIN,
    FORWARD,
    FORWARD_BATCH,
    FORWARD_GIVEN,
    FORWARD_RUNNING,
    FUSE_LANES_MIN,
    FUSE_TASKS_PER_THREAD,
    MOMENTS,
    P_COUNT,
    P_MODE,
    P_RELU,
    P_THR,
    PAGE_BYTES,
    TUNE_BLOCK,
    TUNE_L2,
    TUNE_STREAM,
    TUNE_STRIP,
    TUNE_THREADS,
    TUNE_TILE,
    TUNE_WIDE,
    WIDE_LANES,
    borrowed,
    helper,
    keep,
    parallel_kernel,
    step,
)
from .common import (
    MEAN,
    SCALE,
    SHIFT,
    STATS_ROWS,
    TILE_ROWS,
    VAR,
    activate,
    count_bad,
    expand,
    finish_channels,
    given_channels,
    gradient_channels,
    input_channels,
    moments_channels,
    parameter_gradients,
    passes,
    rebuild_channels,
    running_channels,
    same,
    settle_channels,
)

# Row segments at least this long (7/8 of a page) take several rows per pass in the write
# passes of arrays beyond the strip budget and in the dx passes (``affine_rows``,
# ``gradient_pairs``): 1024-lane tiles cut to whole channels fall just short of a page (NCHW
# 6x6: 1008 lanes; 7x7, 980 lanes, 3920 bytes, before those maps moved to the rows family
# (``_jit.ROWS_MIN``): four rows per pass there 1.15-1.37x faster), and shorter
# segments lost (float32, Zen 4, inference four rows per pass against one, 1 / 2 threads:
# rows of 3584 bytes 1.02 / 1.07x, 3072 bytes 0.90 / 0.87x, 2560 bytes 0.96 / 0.73x, 2048
# bytes 0.70 / 0.73x, 512 bytes 0.51 / 0.61x).
NEAR_PAGE = PAGE_BYTES - PAGE_BYTES // 8


@helper
def replicas(outer, lanes, tile):
    """``k``: how many consecutive rows one row of the view ``(outer // k, k * lanes)`` holds:
    the smallest divisor of ``outer`` that makes a row at least ``WIDE_LANES`` lanes and at most
    twice that (and a tile); ``outer`` itself when that is smaller; 1 when rows are wide enough
    or no divisor fits (rows then stay narrow: as correct, slower).

    A narrow row pays its loop set-up per row. Measured on one float32 array of 4.8 MB read as
    rows of w lanes (1 thread, us for moments / inference / forward / backward): w = 3:
    863 / 1672 / 2506 / 3775; w = 24: 394 / 543 / 825 / 1155; w = 48: 294 / 412 / 587 / 960;
    w = 96: 236 / 347 / 498 / 1055; w = 384: 227 / 349 / 470 / 1350. Beyond the last-level
    cache (51 MB) rows of 128-512 lanes streamed at half the speed of rows of 64 (moments 7.7
    against 3.6 ms), so the view stops at twice ``WIDE_LANES``."""
    if lanes >= WIDE_LANES or outer < 2:
        return 1
    kmin = (WIDE_LANES + lanes - 1) // lanes
    if outer <= kmin:
        return outer
    for k in range(kmin, min(outer, min(tile, 2 * WIDE_LANES) // lanes) + 1):
        if outer % k == 0:
            return k
    return 1


@helper
def geometry(x, tune):
    """``(rows, P, T, nt, rb, nrb)``: rows and lanes per row of the view the kernels work on,
    lanes per tile, tiles, rows per block, blocks.

    The view is ``x.reshape(rows, P)`` with ``P = k * C * inner`` (``k = replicas(...)``, see
    there): lane l belongs to channel ``(l // inner) % C``. When ``k > 1`` a row (at most a
    tile) is one tile, ``nt == 1``, so a tile holds every replica of its channels.
    Fused route (``nrb == 1``) when a strip of at least ``FUSE_LANES_MIN`` lanes over every row
    fits ``TUNE_STRIP`` bytes: the tile is then the widest such strip (a multiple of inner, at
    most ``TUNE_TILE``; the whole row when ``k > 1``); when the call runs on n > 1 threads
    (``TUNE_THREADS``), halved while there are fewer than ``FUSE_TASKS_PER_THREAD * n`` tiles
    and the tile stays at least ``FUSE_LANES_MIN`` lanes; once there is a tile per thread, only
    if half a tile fits one core's L2 (``TUNE_L2``: the write pass then rereads it from L2).
    A fused tile is one task: one tile leaves the second core idle. Float32, Zen 4 (1 MiB L2),
    2 threads, tbb, medians of interleaved rounds in three processes each, tiles of 1 / 2 / 4
    (us): forward (512, 1024) 192-205 / 168-213 / 134-141, backward 335-345 / 155-208 /
    178-180; (1024, 1024) forward 426-517 / 302-355 / 246-266, backward 709-917 / 339-508 /
    378-413; (512, 2048) as 2 tiles of 1024 / 4 of 512: forward 241-281 / 217-264, backward
    395-415 / 316-356. (2048, 1024), 2 tiles of 512 from the strip budget, lost as 4 of 256
    (2 MiB each, beyond L2): forward 487-561 / 575-625, backward 1044-1312 / 1210-1641. On one
    thread a split only costs ((1024, 1024) forward 366 us as one tile, 470 as four), so serial
    calls keep the widest.
    Not fused where a strip's row segments would be shorter than a page (``PAGE_BYTES``) and
    the strip larger than L2 (measured in the code).
    Each lane's sums run over the rows in the same order whatever the tile, so the split
    leaves results bitwise unchanged (tests/test_parallel.py, 1 to 8 threads). Otherwise tiles of
    ``TUNE_TILE`` lanes and row blocks of ``TUNE_BLOCK`` bytes (at least ``BLOCK_ROWS_MIN`` rows).
    """
    rows, lanes, tile, nt, rb, nrb = blocks(x, tune)
    inner = x.shape[2]
    narrow = lanes == x.shape[1] * inner  # k == 1: rows are not viewed several at a time
    strip = tile
    while narrow and strip > inner and rows * strip * x.itemsize > tune[TUNE_STRIP]:
        strip = max(inner, strip // 2 // inner * inner)
    nbytes = rows * lanes * x.itemsize
    if (
        narrow
        and strip == lanes < 2 * FUSE_LANES_MIN
        and nbytes >= tune[TUNE_L2]
        and nbytes <= tune[TUNE_STRIP]
    ):
        # One fused tile that threads could not split (a strip is halved only from 2 *
        # FUSE_LANES_MIN lanes), larger than one core's L2 (so the fused tile's second read
        # came from L3 anyway): the two-pass partition instead, at every thread count (the
        # route must not depend on it: the sums' order would), its row blocks grouped like a
        # fused tile's (``cached``: in cache that gains; streaming from memory it loses).
        # Float32, Zen 5, medians of interleaved rounds, fused -> this (us): (2048, 256)
        # forward 1 thread 130 -> 139, 2 threads 128 -> 76, backward 190 -> 198 / 192 -> 108;
        # (8192, 64) forward 127 -> 130 / 129 -> 74, backward 215 -> 220 / 218 -> 116. Arrays
        # of L2/2 to L2 (two blocks) gained nothing on two threads and lost 5-10% on one.
        return rows, lanes, tile, nt, rb, nrb
    if (
        narrow
        and strip < lanes
        and strip * x.itemsize < PAGE_BYTES
        and rows * strip * x.itemsize > tune[TUNE_L2]
    ):
        # The strip (cut by the budget or by the tile) holds row segments shorter than a page,
        # and it outgrows L2 (its second read comes from L3 either way): a fused tile reads in
        # groups of short interleaved segments, which stream poorly (see ``grouped``); the
        # two-pass route reads whole rows of a tile. Float32, Zen 4 (1 MiB L2), medians of
        # interleaved rounds, fused -> two-pass (ms), 1 / 2 threads: (2048, 1024) forward
        # 0.93 -> 0.90 / 0.53 -> 0.47, backward 4.42 -> 3.17 / 1.87 -> 1.63; (4096, 512)
        # forward 1.09 -> 0.83 / 1.22 -> 0.98, backward 4.24 -> 2.08 / 2.85 -> 1.39. Strips of
        # a page or more stay fused ((1024, 2048) forward 0.96 / 0.73 fused against 1.02 /
        # 0.81, (512, 4096) 0.91 / 0.44 against 0.99 / 0.50). Shape and machine only, as the
        # route must be.
        return rows, lanes, tile, nt, rb, nrb
    threads = tune[TUNE_THREADS]
    tasks = 1 if threads == 1 else FUSE_TASKS_PER_THREAD * threads
    while narrow and (lanes + strip - 1) // strip < tasks and strip >= 2 * FUSE_LANES_MIN:
        if (lanes + strip - 1) // strip >= threads and rows * (strip // 2) * x.itemsize > tune[
            TUNE_L2
        ]:
            break  # a tile per thread already, and half a tile would still not fit L2
        strip = max(inner, strip // 2 // inner * inner)
    if rows * strip * x.itemsize <= tune[TUNE_STRIP] and strip >= min(lanes, FUSE_LANES_MIN):
        return rows, lanes, strip, (lanes + strip - 1) // strip, max(1, rows), 1
    return rows, lanes, tile, nt, rb, nrb


@helper
def blocks(x, tune):
    """``geometry``'s partition without the fused route: tiles of ``TUNE_TILE`` lanes (of
    ``TUNE_WIDE`` from ``TUNE_STREAM`` bytes of x) times row blocks of ``TUNE_BLOCK`` bytes
    (at least ``BLOCK_ROWS_MIN`` rows). The two-pass
    route's, and every pass that writes without reducing (inference, given statistics): whole
    rows of a tile per task, so two threads share any array of two blocks or more. Strips cut
    for threads (fused geometry) gave an inference write one task where a strip could not be
    halved, and quarter-page row segments otherwise: float32, 2 threads, Zen 5, (2048, 256)
    85.6 -> 46.9 us, (512, 1024) 56.7 -> 40.6 us, (128, 1024) 18.0 -> 14.0 us; one thread
    and larger arrays unchanged or faster ((2048, 1024) 293 -> 267 us)."""
    outer, channels, inner = x.shape
    k = replicas(outer, channels * inner, tune[TUNE_TILE])
    rows, lanes = outer // k, k * channels * inner
    # an array that streams from memory takes wider tiles (``TUNE_WIDE``): longer runs of
    # each row per task. Float32, Zen 4, one process, the same arrays, tiles of 1024 -> 4096
    # lanes alternating call by call, 10th percentiles, forward / backward / inference, one
    # thread, two runs: (2048, 4096) 1.11-1.30x, (8192, 4096) 1.06-1.29x, (16384, 4096)
    # 1.05-1.27x; two threads 1.14-1.18x, 1.06-1.19x, 1.04-1.12x. In cache the narrow tile
    # wins (one thread, forward (512, 2048) 0.41 against 0.52 ms, (128, 4096) 0.21 / 0.27).
    per_tile = tune[TUNE_TILE]
    if x.size * x.itemsize >= tune[TUNE_STREAM]:
        per_tile = tune[TUNE_WIDE]
    tile = min(lanes, max(1, per_tile // inner) * inner)
    rb = max(BLOCK_ROWS_MIN, tune[TUNE_BLOCK] // (tile * x.itemsize))
    return rows, lanes, tile, (lanes + tile - 1) // tile, rb, (rows + rb - 1) // rb


@helper
def span(task, nt, tile, lanes, rb, outer):
    """``(r0, r1, l0, l1)``: the rows and lanes of a task of the grid (tile-minor order)."""
    b, l0 = task // nt, (task % nt) * tile
    return b * rb, min(outer, (b + 1) * rb), l0, min(lanes, l0 + tile)


# --- Loops over a tile (lanes l0:l1; per-lane vectors indexed from 0). The activation flag
# ``relu`` is the same for every element of a call, so the branches on it are loop-invariant.


@helper
def grouped(x2, r0, r1, l0, l1):
    """Whether the loops over a task's rows take them a group at a time (else one at a time):
    on the fused route (the task has every row, its strip is in cache), and for rows of at
    least a 4 KiB page. A group is read as interleaved streams, one per row, which streams from
    memory well only when each row is a page or more: float32 NHWC (32, 28, 28, 128), rows of
    512 B, one thread: backward 3.7-4.2 ms a group at a time against 2.4-2.6 ms one row at a
    time, moments 1.07 against 0.70 ms; 51 MB in rows of 1024 float32 lanes: moment sums 2.7 ms
    eight rows at a time against 4.7 ms one at a time. In cache, a group loads and stores the
    accumulators once per group (see the module notes)."""
    return (r0 == 0 and r1 == x2.shape[0]) or (l1 - l0) * x2.itemsize >= PAGE_BYTES


@helper
def moment_sums(x2, k, r0, r1, l0, l1, a1, a2, cached):
    """``a1[j], a2[j] = sum(x - k[j]), sum((x - k[j])**2)`` over rows r0:r1 of lane l0 + j;
    a group of rows at a time where ``grouped`` says so, the whole array is ``cached``, or the
    task's lanes are whole rows (then a group is one contiguous block, not interleaved
    streams). Bare loop, float32, one thread, Zen 5, blocks of 256 KiB, one row at a time ->
    eight: (12544, 256) from L3 488 -> 200 us, (50176, 32) 312 -> 117 us; from memory
    (401408, 64) 4.9 -> 3.4 ms, (200704, 128) 4.3 -> 3.4 ms. (The gradient sums read x and dy
    as eight streams: from memory four rows at a time lost, (401408, 64) 5.2 -> 14.0 ms, so
    they keep ``grouped``'s rule.)"""
    w = l1 - l0
    for j in range(w):
        a1[j] = 0.0
        a2[j] = 0.0
    xb = x2[r0:r1]  # rows from 0: see ``affine_rows``
    n, r = xb.shape[0], 0
    whole = l0 == 0 and l1 == x2.shape[1]
    while (cached or whole or grouped(x2, r0, r1, l0, l1)) and r + 8 <= n:
        x0, x1, x2_, x3 = xb[r, l0:l1], xb[r + 1, l0:l1], xb[r + 2, l0:l1], xb[r + 3, l0:l1]
        x4, x5, x6, x7 = xb[r + 4, l0:l1], xb[r + 5, l0:l1], xb[r + 6, l0:l1], xb[r + 7, l0:l1]
        for j in range(w):
            kj = k[j]
            d0, d1, d2, d3 = x0[j] - kj, x1[j] - kj, x2_[j] - kj, x3[j] - kj
            d4, d5, d6, d7 = x4[j] - kj, x5[j] - kj, x6[j] - kj, x7[j] - kj
            a1[j] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            a2[j] += ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)) + (
                (d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)
            )
        r += 8
    while r < n:
        xr = xb[r, l0:l1]
        for j in range(w):
            d = xr[j] - k[j]
            a1[j] += d
            a2[j] += d * d
        r += 1


@helper
def gradient_sums(x2, g2, m, s, b, relu, thr, r0, r1, l0, l1, a1, a2, cached):
    """``a1[j], a2[j] = sum(dy), sum(dy * (x - m[j]))`` over rows r0:r1 of lane l0 + j, dy
    behind the activation's mask (``(x - m) * s + b`` recomputed from x); four rows at a time,
    as the moment sums (the accumulators loaded and stored once per four rows).

    Kernels that take every route test the flag and call it with ``relu`` the constant True or
    False, which LLVM folds into the inlined loop (``passes`` is then ``v > thr`` alone, or
    gone: dy unmasked, as a loop written without the mask computes it); the ``.small`` twin
    passes the flag (one copy for a cold first step to compile). LLVM does not unswitch this
    four-row loop on a flag it does not know. Same bits. Without ReLU the constant False
    measured as the former separate unmasked copy of this loop did (float32, Zen 4, one
    thread, backward with ``out=``: 0.94-1.09x over (128-2048, 1024), (128, 4096), (512, 256),
    the unchanged ReLU calls 0.98-1.08x in the same runs), and that copy had measured 1.05-1.16x
    against the flag passed through. With ReLU, in-process interleaved 10th percentiles
    against the flag passed through, 1 / 2 threads: (128, 1024) 1.11-1.14x / 1.10x, (256, 1024)
    1.05-1.10x / 1.08-1.13x, (512, 1024) 1.10-1.12x / 1.10x (a third run 0.90x), (1024, 1024)
    1.08x / 1.04x, (2048, 1024) 1.03-1.06x / 1.09x, (512, 2048) 1.03x / 1.12x (the backward
    without ReLU, unchanged, 0.93-1.08x in the same runs); a layer step with ReLU (256, 1024)
    and (1024, 1024) 1.04-1.05x at both counts."""
    w = l1 - l0
    for j in range(w):
        a1[j] = 0.0
        a2[j] = 0.0
    xb, gb = x2[r0:r1], g2[r0:r1]  # rows from 0: see ``affine_rows``
    n, r = xb.shape[0], 0
    while (cached or grouped(x2, r0, r1, l0, l1)) and r + 4 <= n:
        x0, x1, x2_, x3 = xb[r, l0:l1], xb[r + 1, l0:l1], xb[r + 2, l0:l1], xb[r + 3, l0:l1]
        g0, g1, g2_, g3 = gb[r, l0:l1], gb[r + 1, l0:l1], gb[r + 2, l0:l1], gb[r + 3, l0:l1]
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
    while r < n:
        xr, gr = xb[r, l0:l1], gb[r, l0:l1]
        for j in range(w):
            d = xr[j] - m[j]
            e = np.float64(gr[j]) if passes(d * s[j] + b[j], relu, thr) else 0.0
            a1[j] += e
            a2[j] += e * d
        r += 1


@helper
def input_sums(x2, g2, k, r0, r1, l0, l1, a1, a2, a3, a4, cached):
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
    xb, gb = x2[r0:r1], g2[r0:r1]  # rows from 0: see ``affine_rows``
    n, r = xb.shape[0], 0
    while (cached or grouped(x2, r0, r1, l0, l1)) and r + 4 <= n:
        x0, x1, x2_, x3 = xb[r, l0:l1], xb[r + 1, l0:l1], xb[r + 2, l0:l1], xb[r + 3, l0:l1]
        g0, g1, g2_, g3 = gb[r, l0:l1], gb[r + 1, l0:l1], gb[r + 2, l0:l1], gb[r + 3, l0:l1]
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
    while r < n:
        xr, gr = xb[r, l0:l1], gb[r, l0:l1]
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
    """``y = activation((x - m[j]) * s[j] + b[j])`` on rows r0:r1, lanes l0:l1.

    One 2-D loop over the row block ``x2[r0:r1]``, rows from 0 and lanes at an unsigned
    offset: numba then knows no index is negative. Rows counted from r0 (or lanes at a signed
    offset) took a wrap-around test each and ran 5-30% slower than a bare loop over the same
    rows (Zen 5, (2048, 64) 19.1 / 25.2 us, (8192, 64) 73.5 / 96.6 us).

    Four rows per pass (``affine_fours``, called before it by ``write_task``) where the array
    is streamed (larger than the strip budget, so its passes read it from L3 or memory), not
    written in place, and the task's row segments are ``NEAR_PAGE`` or more:
    the pass loads each lane's m, s and b (float64) once for four rows, and on a CPU whose
    loads are 256 bits wide those loads bound the loop. Each element is computed as one row at
    a time computes it (same bits). Bare loop, float32, one thread, Zen 4, us, one row / four
    rows per pass (a float32 FMA loop ``y = x * s + t`` for scale): (2048, 1024) 617 / 426
    (266), (1024, 4096) 2270 / 1503 (1488). On Zen 5 (512-bit loads) four rows per pass
    measured the same as one ((2048, 1024) 292 / 292 us), so the rule costs nothing there. In
    cache the kernels' gain was not consistent (float32, Zen 4, (64-512, 1024) and (256-512,
    2048), two runs: inference 0.86-1.34x, forward 0.89-1.27x, with ReLU 0.81-1.22x), and
    those runs left y wherever the allocator put it, which moves this loop by up to 1.25x
    (``bnfast._checks.placed``); with y held 512 bytes before x the kernels gained (one thread:
    inference 1.15-1.25x, forward 1.10-1.17x) but ReLU calls, whose flag this loop tests per
    row, did not (1.01-1.08x) and two threads lost at (32, 4096) through the API (0.88-0.95x).
    So arrays within the strip budget keep one row; rows of 2 KiB four at a time ran 2x slower
    from L3 ((6272, 512): 766 / 1584 us). In place (``out=x``) one row at a time: a second four-row
    body cost compilation."""
    xb, yb = x2[r0:r1], y2[r0:r1]
    lo, w = np.uint64(l0), np.uint64(l1 - l0)
    if same(x2, y2):  # in place (inference with out=x): read y itself, see ``common.same``
        for i in range(xb.shape[0]):
            for j in range(w):
                yb[i, lo + j] = activate((yb[i, lo + j] - m[j]) * s[j] + b[j], relu, thr)
        return
    for r in range(xb.shape[0]):
        for j in range(w):
            yb[r, lo + j] = activate((xb[r, lo + j] - m[j]) * s[j] + b[j], relu, thr)


@helper
def affine_fours(x2, y2, m, s, b, relu, thr, r0, r1, l0, l1):
    """``affine_rows``' four rows per pass (see there when): rows r0 to the last multiple of
    four of r1 - r0, each element as one row at a time computes it (same bits); returns the
    first row not written. Written twice, without and with the activation: LLVM unswitches a
    one-row loop on ``relu`` but not this one (it tested the flag per row and vector). Float32,
    Zen 4, interleaved 10th percentiles, without ReLU, 1 / 2 threads: (2048, 1024) forward
    1.07-1.10x / 1.08x, inference 1.03-1.10x / 1.15x; (512, 4096), (1024, 4096) 0.97-1.04x.
    Only kernels that take every route call it (``write_task``): the ``.small`` twin's arrays
    are never beyond the strip budget, so a cold first step does not compile it."""
    xb, yb = x2[r0:r1], y2[r0:r1]
    lo, w = np.uint64(l0), np.uint64(l1 - l0)
    i, n = 0, xb.shape[0]
    while not relu and i + 4 <= n:
        for j in range(w):
            mj, sj, bj = m[j], s[j], b[j]
            yb[i, lo + j] = (xb[i, lo + j] - mj) * sj + bj
            yb[i + 1, lo + j] = (xb[i + 1, lo + j] - mj) * sj + bj
            yb[i + 2, lo + j] = (xb[i + 2, lo + j] - mj) * sj + bj
            yb[i + 3, lo + j] = (xb[i + 3, lo + j] - mj) * sj + bj
        i += 4
    while relu and i + 4 <= n:
        for j in range(w):
            mj, sj, bj = m[j], s[j], b[j]
            yb[i, lo + j] = activate((xb[i, lo + j] - mj) * sj + bj, relu, thr)
            yb[i + 1, lo + j] = activate((xb[i + 1, lo + j] - mj) * sj + bj, relu, thr)
            yb[i + 2, lo + j] = activate((xb[i + 2, lo + j] - mj) * sj + bj, relu, thr)
            yb[i + 3, lo + j] = activate((xb[i + 3, lo + j] - mj) * sj + bj, relu, thr)
        i += 4
    return r0 + i


@helper
def gradient_rows(x2, g2, d2, m, s, b, relu, thr, c1, c0, r0, r1, l0, l1):
    """``dx = s[j]*dy - c1[j]*(x - m[j]) + c0[j]`` (dy behind the activation's mask) on rows
    r0:r1, lanes l0:l1, one row at a time (two rows per pass were slower at every width
    measured: (12544, 256) 1861 against 1117 us, (2048, 1024) 762 against 676 us). The
    coefficient of dy is ``gradient_channels``' k, which is SCALE, so the lanes' s serves for
    it instead of a second expanded copy: one per-lane float64 vector fewer, so a 1024-lane
    tile's five (40 KiB) stay in a 48 KiB L1d where six did not. Bare loop, float32, one
    thread, Zen 5, paired medians: with the ReLU mask (which reads s and b) (512, 1024) 209 ->
    171 us, (2048, 1024) 1200 -> 1078 us; without it, and at 512 lanes or fewer, unchanged;
    same bits."""
    xb, gb, db = x2[r0:r1], g2[r0:r1], d2[r0:r1]  # 2-D, lanes at an unsigned offset:
    lo, w = np.uint64(l0), np.uint64(l1 - l0)  # see ``affine_rows``
    if same(g2, d2):  # dx into dy: read dy through dx (see ``common.same``)
        for i in range(xb.shape[0]):
            for j in range(w):
                d = xb[i, lo + j] - m[j]
                e = np.float64(db[i, lo + j]) if passes(d * s[j] + b[j], relu, thr) else 0.0
                db[i, lo + j] = s[j] * e - c1[j] * d + c0[j]
        return
    for i in range(xb.shape[0]):
        for j in range(w):
            d = xb[i, lo + j] - m[j]
            e = np.float64(gb[i, lo + j]) if passes(d * s[j] + b[j], relu, thr) else 0.0
            db[i, lo + j] = s[j] * e - c1[j] * d + c0[j]


@helper
def gradient_pairs(x2, g2, d2, m, s, b, relu, thr, c1, c0, r0, r1, l0, l1):
    """``gradient_rows`` two rows per pass where the row segments are ``NEAR_PAGE`` or more
    (else, in place, and for an odd last row: ``gradient_rows`` itself): the five per-lane
    float64 vectors are loaded once per two rows, each element computed as ``gradient_rows``
    computes it (same bits). Float32, Zen 4, in-process interleaved medians against one row at
    a time, 1 / 2 threads (ms): beyond the strip budget (1024, 2048) 2.72 -> 2.32 / 1.09 ->
    0.93, (1024, 4096) 7.19 -> 6.32 / 3.70 -> 3.28, (2048, 1024) 2.74 -> 2.53 / 1.23 -> 1.15;
    in cache, one thread (two threads split these tiles to 2 KiB segments: unchanged), (256,
    1024) 0.190 -> 0.155, (512, 1024) 0.340 -> 0.304, (128, 1024) 0.094 -> 0.081, (256, 2048)
    0.379 -> 0.346 (two runs: 1.04-1.23x). Four rows per pass lost at (1024, 4096)
    (0.79-0.85x: twelve streams of x, dy and dx), two rows over 2 KiB segments lost at (2048,
    512) and (512, 512), one thread (0.85-0.94x) and gained nothing on two. The pair loop is
    written without and with the activation's mask (LLVM unswitches one-row loops on ``relu``,
    not these; ``gradient_sums`` gets the same from a constant flag at its call sites); the
    ``.small`` twin does not take this helper (``tile_gradient``)."""
    if same(g2, d2) or (l1 - l0) * x2.itemsize < NEAR_PAGE:
        gradient_rows(x2, g2, d2, m, s, b, relu, thr, c1, c0, r0, r1, l0, l1)
        return
    n = r1 - r0
    xb, gb, db = x2[r0:r1], g2[r0:r1], d2[r0:r1]  # 2-D, lanes at an unsigned offset:
    lo, w = np.uint64(l0), np.uint64(l1 - l0)  # see ``affine_rows``
    for i in range(0, n - 1 if not relu else 0, 2):
        for j in range(w):
            sj, pj, qj = s[j], c1[j], c0[j]
            d = xb[i, lo + j] - m[j]
            db[i, lo + j] = sj * np.float64(gb[i, lo + j]) - pj * d + qj
            d = xb[i + 1, lo + j] - m[j]
            db[i + 1, lo + j] = sj * np.float64(gb[i + 1, lo + j]) - pj * d + qj
    for i in range(0, n - 1 if relu else 0, 2):
        for j in range(w):
            mj, sj, bj, pj, qj = m[j], s[j], b[j], c1[j], c0[j]
            d = xb[i, lo + j] - mj
            e = np.float64(gb[i, lo + j]) if passes(d * sj + bj, relu, thr) else 0.0
            db[i, lo + j] = sj * e - pj * d + qj
            d = xb[i + 1, lo + j] - mj
            e = np.float64(gb[i + 1, lo + j]) if passes(d * sj + bj, relu, thr) else 0.0
            db[i + 1, lo + j] = sj * e - pj * d + qj
    if n % 2 == 1:
        gradient_rows(x2, g2, d2, m, s, b, relu, thr, c1, c0, r1 - 1, r1, l0, l1)


@helper
def frozen_rows(x2, g2, d2, m, s, b, relu, thr, r0, r1, l0, l1, a1, a2):
    """``dx = s[j] * dy`` (x is read for dx only through the activation's mask, so an inf or
    NaN in x cannot reach dx without one) and the gradient sums for dgamma and dbeta, in one
    pass."""
    w = l1 - l0
    for j in range(w):
        a1[j] = 0.0
        a2[j] = 0.0
    xb, gb, db = x2[r0:r1], g2[r0:r1], d2[r0:r1]  # 2-D, lanes at an unsigned offset:
    lo, uw = np.uint64(l0), np.uint64(w)  # see ``affine_rows``
    if same(g2, d2):  # dx into dy: read dy through dx (see ``common.same``)
        for i in range(xb.shape[0]):
            for j in range(uw):
                d = xb[i, lo + j] - m[j]
                e = np.float64(db[i, lo + j]) if passes(d * s[j] + b[j], relu, thr) else 0.0
                a1[j] += e
                a2[j] += e * d
                db[i, lo + j] = s[j] * e
        return
    for i in range(xb.shape[0]):
        for j in range(uw):
            d = xb[i, lo + j] - m[j]
            e = np.float64(gb[i, lo + j]) if passes(d * s[j] + b[j], relu, thr) else 0.0
            a1[j] += e
            a2[j] += e * d
            db[i, lo + j] = s[j] * e


# --- Per-lane copies of per-channel values, and per-channel sums of per-lane ones. A tile
# starts on a channel boundary (l0 and T are multiples of inner), so these loops run
# channel-major, without an integer division per lane (~30 cycles each, three per lane). In a
# wide view (k > 1) a tile is the whole row, k replicas of the C channels.


@helper
def span_channels(l0, l1, inner, channels):
    """The channels ``c0:c1`` of the tile of lanes l0:l1 (all of them in a wide view)."""
    return l0 // inner, min(channels, l1 // inner)


@helper
def fold_into(a, inner, out):
    """Per channel: the sum of its lanes (its ``inner`` lanes in each replica), in lane order,
    into ``out`` (the tile's channels)."""
    n = out.shape[0]
    if inner == 1 and a.shape[0] == n:  # a lane per channel: the same sums, 0.0 + a[c]
        for c in range(n):
            out[c] = 0.0 + a[c]
        return
    for c in range(n):
        out[c] = 0.0
    for base in range(0, a.shape[0], n * inner):
        for c in range(n):
            t = out[c]
            for i in range(base + c * inner, base + (c + 1) * inner):
                t += a[i]
            out[c] = t


@step
def coefficients(stats, inner, c0, w):
    """Per lane: MEAN, SCALE and SHIFT of its channel (``y = (x - mean) * scale + shift``)."""
    return (
        expand(stats[MEAN], inner, c0, w),
        expand(stats[SCALE], inner, c0, w),
        expand(stats[SHIFT], inner, c0, w),
    )


@helper
def partials_per_channel(p1, p2, inner, sums):
    """Channels' sums from the partials p1 and p2 (blocks x lanes, the kernel's scratch: block
    0 is overwritten): per lane over blocks in block order, then over its lanes in lane order,
    into rows 0 and 1 of ``sums``. Blocks are added a block (a contiguous row of lanes) at a
    time into block 0, the same additions in the same order as lane by lane down the blocks
    (which strided P float64 per load and missed L1 on each, set conflicts at 32 KiB strides);
    a partial is never -0.0 (its sums start at +0.0), so block 0 itself equals 0.0 + block 0,
    the former first addition. Float32 (16384, 4096), 256 blocks of 4096 lanes, Zen 4,
    medians of interleaved rounds, 2 threads: moments 18.0 -> 10.5 ms, forward 38.7 -> 31.1,
    backward 58.9 -> 51.3; (8192, 1024) forward 3.83 -> 3.06 ms; one thread (16384, 4096)
    moments 26.0 -> 17.1 ms. Same bits."""
    channels = sums.shape[1]
    for c in range(channels):
        sums[0, c] = 0.0
        sums[1, c] = 0.0
    if p1.shape[0] == 0:  # no blocks (callers refuse empty batches before any kernel)
        return
    t1, t2 = p1[0], p2[0]
    for b in range(1, p1.shape[0]):
        q1, q2 = p1[b], p2[b]
        for lane in range(t1.shape[0]):
            t1[lane] += q1[lane]
            t2[lane] += q2[lane]
    for base in range(0, t1.shape[0], channels * inner):
        for c in range(channels):
            for lane in range(base + c * inner, base + (c + 1) * inner):
                sums[0, c] += t1[lane]
                sums[1, c] += t2[lane]


@helper
def channel_shifts(x2, inner, l0, k):
    """The shifts of the channels from lane l0 on (as many as ``k`` holds): each one's first
    value (lane ``l0 + c*inner`` of row 0, shared by its replicas so that their sums add up).
    A lane per channel (2-D) reads row 0 contiguously, which LLVM vectorizes (with the stride
    ``inner`` it stayed scalar: ~0.5 ns a channel, float32 (2, 4096) forward, Zen 4)."""
    row = x2[0, l0:]
    if inner == 1:
        for c in range(k.shape[0]):
            k[c] = row[c]
    else:
        for c in range(k.shape[0]):
            k[c] = row[c * inner]


# --- Task bodies: each allocates its own O(T) buffers (inside a called function, so that a
# --- parallel loop never shares them). Per-channel arrays are the kernel's, whole; a task
# --- writes its own channels' entries.


@step
def block_sums_task(x2, inner, k, r0, r1, l0, l1, p, b, cached):
    """Per-lane shifted moment sums of a task's rows into the partials ``p[0, b]``, ``p[1, b]``."""
    w = l1 - l0
    a1 = np.empty(w)
    a2 = np.empty(w)
    moment_sums(x2, expand(k, inner, l0 // inner, w), r0, r1, l0, l1, a1, a2, cached)
    p0, p1 = p[0, b], p[1, b]
    for j in range(w):
        p0[l0 + j] = a1[j]
        p1[l0 + j] = a2[j]


@step
def write_task(x2, y2, inner, stats, c0, relu, thr, r0, r1, l0, l1, streamed, routes):
    """y on a task's rows and lanes; column c0 of the work block ``stats`` is the channel of
    lane l0. ``routes``: the calling kernel's ``ALL_ROUTES`` (as in ``forward_tile``): the
    four-row pass of a streamed array (``affine_fours``) is pruned from the ``.small`` twin."""
    m, s, b = coefficients(stats, inner, c0, l1 - l0)
    if routes and streamed and (l1 - l0) * x2.itemsize >= NEAR_PAGE and not same(x2, y2):
        r0 = affine_fours(x2, y2, m, s, b, relu, thr, r0, r1, l0, l1)
    affine_rows(x2, y2, m, s, b, relu, thr, r0, r1, l0, l1)


@step
def sums_tile(x2, inner, l0, l1, k, s, a):
    """The fused route's reduction of a tile over every row: its channels' shifts (into k, the
    tile's own buffer: first value of each) and shifted sums (rows 0 and 1 of ``s``), through
    the per-lane sums ``a`` (2, T)."""
    channel_shifts(x2, inner, l0, k)
    w = l1 - l0
    a1, a2 = a[0], a[1]
    whole = np.bool_(False)  # a fused tile has every row: grouped anyway
    moment_sums(
        x2, expand(k, inner, np.int64(0), w), np.int64(0), x2.shape[0], l0, l1, a1, a2, whole
    )
    fold_into(a1, inner, s[0])
    fold_into(a2, inner, s[1])


@step
def tile_buffers(own, rows, wc, w):
    """A tile's buffers from one allocation ``own`` (flat): a block of ``rows`` rows of its
    ``wc`` channels and the (2, w) per-lane sums, both borrowed (see ``_jit.borrowed``): views
    of them cost no atomic reference count, so the caller keeps ``own`` until its last use of
    them (``_jit.keep``, or ``own`` passed on). Float32 (32, 64), one thread, Zen 5, kernel
    calls: forward 1.99 -> 1.68 us (the work block alone borrowed), same bits."""
    (flat,) = borrowed(own)
    return flat[: rows * wc].reshape((rows, wc)), flat[rows * wc :].reshape((2, w))


@step
def forward_tile(
    x2, y2, inner, l0, l1, gamma, beta, running_mean, running_var, params, kept, routes, streamed
):
    """The forward of one tile over every row, with a work block of its own (O(T)): the
    tile's statistics (batch: every row reduced, the fused route, so the write pass finds the
    tile in cache; running; or given in ``kept``), its channels finished, then written; the
    rows a cache keeps into ``kept`` (when it has columns); the running averages of its
    channels (of the good ones, in training); returns how many are bad
    (``common.settle_channels``). ``routes``: the calling kernel's ``ALL_ROUTES``, passed as
    the constant it is, so numba prunes the given statistics (a synchronized forward's) from
    the ``.small`` twin (a step's own module constant is not the twin's): 0.15 s of a cold
    first training step (Zen 5)."""
    c0, c1 = span_channels(l0, l1, inner, gamma.shape[0])
    wc, zero = c1 - c0, np.int64(0)
    mode = params[P_MODE]
    batch = mode == FORWARD_BATCH
    own = np.empty((STATS_ROWS + 3) * wc + 2 * (l1 - l0))  # one allocation (see tile_buffers)
    buf, a = tile_buffers(own, STATS_ROWS + 3, wc, l1 - l0)
    work, k, s = buf[:STATS_ROWS], buf[STATS_ROWS], buf[STATS_ROWS + 1 :]
    if batch:
        sums_tile(x2, inner, l0, l1, k, s, a)
        moments_channels(k, s[0], s[1], params[P_COUNT], work[MEAN], work[VAR])
    elif mode == FORWARD_RUNNING:
        running_channels(work, running_mean[c0:c1], running_var[c0:c1])
    elif routes:
        given_channels(kept, c0, c1, work)
    finish_channels(work, zero, c0, c1, gamma, beta, running_mean, running_var, params)
    relu, thr = params[P_RELU] != 0.0, params[P_THR]
    write_task(x2, y2, inner, work, zero, relu, thr, zero, x2.shape[0], l0, l1, streamed, routes)
    bad = settle_channels(k, work, zero, c0, c1, params, running_mean, running_var, kept)
    return bad + keep(own)


@step
def gradient_sums_task(x2, g2, inner, stats, relu, thr, r0, r1, l0, l1, p, b, cached):
    w = l1 - l0
    m, s, c = coefficients(stats, inner, l0 // inner, w)
    a1 = np.empty(w)
    a2 = np.empty(w)
    if relu:  # the flag as a constant: see ``gradient_sums``
        gradient_sums(x2, g2, m, s, c, True, thr, r0, r1, l0, l1, a1, a2, cached)
    else:
        gradient_sums(x2, g2, m, s, c, False, thr, r0, r1, l0, l1, a1, a2, cached)
    p0, p1 = p[0, b], p[1, b]
    for j in range(w):
        p0[l0 + j] = a1[j]
        p1[l0 + j] = a2[j]


@step
def gradient_task(x2, g2, d2, inner, stats, relu, thr, coef, r0, r1, l0, l1):
    """dx on a task's rows and lanes from the whole array's per-channel ``coef`` rows c1, c0
    (``coef[0]`` is SCALE, the lanes' s: see ``gradient_rows``), two rows per pass where the
    rows allow (``gradient_pairs``)."""
    c0, w = l0 // inner, l1 - l0
    m, s, b = coefficients(stats, inner, c0, w)
    p, q = expand(coef[1], inner, c0, w), expand(coef[2], inner, c0, w)
    gradient_pairs(x2, g2, d2, m, s, b, relu, thr, p, q, r0, r1, l0, l1)


@step
def tile_gradient(x2, g2, d2, inner, l0, l1, m, s, b, relu, thr, coef, routes):
    """dx over every row of a tile from per-lane m, s, b and the tile's own ``coef``; two rows
    per pass where the rows allow (``gradient_pairs``), except in the ``.small`` twin:
    ``routes`` is the calling kernel's ``ALL_ROUTES``, passed as the constant it is (as in
    ``forward_tile``), so numba prunes ``gradient_pairs`` from the twin (a cold first step
    compiles less; the twin's arrays are mostly narrower than a page per row anyway)."""
    w, zero, rows = l1 - l0, np.int64(0), x2.shape[0]
    p, q = expand(coef[1], inner, zero, w), expand(coef[2], inner, zero, w)
    if routes:
        gradient_pairs(x2, g2, d2, m, s, b, relu, thr, p, q, zero, rows, l0, l1)
    else:
        gradient_rows(x2, g2, d2, m, s, b, relu, thr, p, q, zero, rows, l0, l1)


@step
def tile_again(x2, inner, l0, l1, c0, c1, gamma, beta, params, dgamma, dbeta, buf, a):
    """A backward tile's work block (in ``buf``) where the cache kept no statistics (short
    batches of many channels, see ``bnfast._core``): the tile's statistics taken again with
    the forward's own sums (``sums_tile``), so the same bits. Called at kernel level, under
    ``ALL_ROUTES``: numba prunes that branch before it inlines steps, so the ``.small`` twin
    (and a new user's first step) does not compile this."""
    zero = np.int64(0)
    work, k, s = buf[:STATS_ROWS], buf[STATS_ROWS + 2], buf[STATS_ROWS : STATS_ROWS + 2]
    sums_tile(x2, inner, l0, l1, k, s, a)
    moments_channels(k, s[0], s[1], params[P_COUNT], work[MEAN], work[VAR])
    # (no renorm, so no running arrays are read: dgamma and dbeta stand in for them, arrays of
    # their type, so that finish_channels is the forward's compiled signature)
    finish_channels(work, zero, c0, c1, gamma, beta, dgamma, dbeta, params)


@step
def backward_tile(
    x2,
    g2,
    d2,
    inner,
    l0,
    l1,
    buf,
    a,
    relu,
    thr,
    n,
    sums,
    dgamma,
    dbeta,
    own,
    dx_too,
    routes,
):
    """The fused training backward of one tile from its work block (in ``buf``, rows
    ``TILE_ROWS``: the block, then room for the tile's two sums and three coefficients): its
    sums over every row, its channels' coefficients, then dx while the tile is in cache; the
    sums also into ``sums`` when it has columns. Buffers O(T) (the tile's own: ``buf`` and the
    per-lane sums ``a`` are borrowed views of ``own``, see ``tile_buffers``).

    Without ``dx_too``, the sums and dgamma, dbeta only: a synchronized rank's share
    (``BACKWARD_SUMS``), which took the two-pass route before. Float32, one thread, Zen 5,
    kernel calls (us), two-pass -> this: (32, 256) 4.38 -> 2.69, (128, 1024) 26.8 -> 19.7,
    same bits. (dx from the given global sums, ``BACKWARD_GIVEN``, stays on the two-pass route:
    its one pass was as fast or faster than a fused tile's, 2.75 against 3.15 and 21.4 against
    22.5 us.)"""
    w = l1 - l0
    c0, c1 = span_channels(l0, l1, inner, dgamma.shape[0])
    stats, t, coef = buf[:STATS_ROWS], buf[STATS_ROWS : STATS_ROWS + 2], buf[STATS_ROWS + 2 :]
    m, s, b = coefficients(stats, inner, np.int64(0), w)
    a1, a2 = a[0], a[1]
    whole = np.bool_(False)  # every row: grouped anyway
    zero = np.int64(0)
    if routes and not relu:  # the flag as a constant: see ``gradient_sums``
        gradient_sums(x2, g2, m, s, b, False, thr, zero, x2.shape[0], l0, l1, a1, a2, whole)
    elif routes:
        gradient_sums(x2, g2, m, s, b, True, thr, zero, x2.shape[0], l0, l1, a1, a2, whole)
    else:  # the ``.small`` twin: one loop for both (a cold first step compiles one)
        gradient_sums(x2, g2, m, s, b, relu, thr, zero, x2.shape[0], l0, l1, a1, a2, whole)
    fold_into(a1, inner, t[0])
    fold_into(a2, inner, t[1])
    gradient_channels(t, zero, n, stats, zero, c1 - c0, coef, dgamma[c0:c1], dbeta[c0:c1])
    keep_sums(t, c0, sums)
    if dx_too:
        tile_gradient(x2, g2, d2, inner, l0, l1, m, s, b, relu, thr, coef, routes)
    return keep(own)


@step
def frozen_tile(x2, g2, d2, inner, l0, l1, buf, a, relu, thr, sums, dgamma, dbeta, own):
    """The frozen backward of a tile over every row from its work block (``buf``, see
    ``backward_tile``): dx, and its channels' dgamma, dbeta (and sums, when ``sums`` has
    columns). Buffers O(T)."""
    w = l1 - l0
    c0, c1 = span_channels(l0, l1, inner, dgamma.shape[0])
    stats, t = buf[:STATS_ROWS], buf[STATS_ROWS : STATS_ROWS + 2]
    m, s, b = coefficients(stats, inner, np.int64(0), w)
    a1, a2 = a[0], a[1]
    frozen_rows(x2, g2, d2, m, s, b, relu, thr, np.int64(0), x2.shape[0], l0, l1, a1, a2)
    fold_into(a1, inner, t[0])
    fold_into(a2, inner, t[1])
    zero = np.int64(0)
    parameter_gradients(t, zero, stats, zero, c1 - c0, dgamma[c0:c1], dbeta[c0:c1])
    keep_sums(t, c0, sums)
    return keep(own)


@helper
def keep_sums(t, c0, sums):
    """A tile's sums (channel c0 at index 0 of t) into the caller's ``sums``, if it has
    columns (a virtual batch's or a synchronized backward's: the whole array's sums)."""
    if sums.shape[1] > 0:
        for j in range(t.shape[1]):
            sums[0, c0 + j] = t[0, j]
            sums[1, c0 + j] = t[1, j]


@step
def frozen_task(x2, g2, d2, inner, stats, relu, thr, r0, r1, l0, l1, a1, a2):
    m, s, b = coefficients(stats, inner, l0 // inner, l1 - l0)
    frozen_rows(x2, g2, d2, m, s, b, relu, thr, r0, r1, l0, l1, a1, a2)


@step
def input_tile(x, dy, x2, g2, d2, inner, l0, l1, gamma, params, dgamma, dbeta):
    """The fused cache-free backward of one tile: one read of x and dy for the statistics and
    both gradient sums, its channels' coefficients, then dx while the tile is in cache. Its
    own buffers, O(T): shifts, the four sums, a statistics block and the coefficients of its
    channels (gamma, dgamma, dbeta sliced to them)."""
    w = l1 - l0
    c0, c1 = span_channels(l0, l1, inner, gamma.shape[0])
    wc, zero = c1 - c0, np.int64(0)
    k = np.empty(wc)
    for j in range(wc):
        k[j] = x2[0, l0 + j * inner]
    a = np.empty((4, w))
    whole = np.bool_(False)  # every row: grouped anyway
    ki = expand(k, inner, zero, w)
    input_sums(x2, g2, ki, zero, x2.shape[0], l0, l1, a[0], a[1], a[2], a[3], whole)
    s = np.empty((4, wc))
    for i in range(4):
        fold_into(a[i], inner, s[i])
    stats = np.empty((STATS_ROWS, wc))
    n = params[P_COUNT]
    input_channels(x, dy, c0, k, s, n, gamma[c0:c1], params, stats, zero, wc)
    coef = np.empty((3, wc))
    gradient_channels(s[2:], zero, n, stats, zero, wc, coef, dgamma[c0:c1], dbeta[c0:c1])
    m, sc, b = coefficients(stats, inner, zero, w)
    relu, thr = params[P_RELU] != 0.0, params[P_THR]  # off: variables, not literals
    tile_gradient(x2, g2, d2, inner, l0, l1, m, sc, b, relu, thr, coef, ALL_ROUTES)


# --- Kernels: one per operation, its mode a parameter (``_jit.P_MODE``). Each has at most two
# parallel regions (``prange`` loops): one over the tasks that reduce (a fused tile, or a row
# block of a tile on the two-pass route), one over the tasks that write after the per-channel
# epilogue (two-pass route, inference). Numba outlines and compiles every parallel region on
# its own; with the routes' and phases' loops separate (up to four per kernel) the parallel
# kernels took 68 of 90 s of compiling every operation on both dtypes (now 58 s in all). The
# task count is a named variable: ``prange(a if b else c)`` loads ``prange`` into a phi node,
# which numba then does not recognize, and the loop silently runs serially.


@parallel_kernel(*MOMENTS, returns=True)
def moments(x, mean, var, tune):
    """Per-channel mean and biased variance (float64); returns how many channels are not
    finite (the caller then runs ``common.rescue_moments``)."""
    x, mean, var, tune = borrowed(x, mean, var, tune)
    outer, channels, inner = x.shape
    rows, lanes, tile, nt, rb, nrb = geometry(x, tune)
    cached = rows * lanes * x.itemsize <= tune[TUNE_STRIP]  # two-pass in cache: see geometry
    n = np.float64(outer * inner)
    x2 = x.reshape(rows, lanes)
    fused = nrb == 1
    k = np.empty(0 if fused else channels)
    p = np.empty((2, 0 if fused else nrb, lanes))
    if not fused:
        channel_shifts(x2, inner, np.int64(0), k)
    tasks = nt if fused else nt * nrb
    bad = 0
    if tasks > 0:  # an empty parallel region still wakes the thread pool
        for task in prange(tasks):
            r0, r1, l0, l1 = span(task, nt, tile, lanes, rb, rows)
            t = 0
            if fused:
                c0, c1 = span_channels(l0, l1, inner, channels)
                kt = np.empty(c1 - c0)
                st = np.empty((2, c1 - c0))
                sums_tile(x2, inner, l0, l1, kt, st, np.empty((2, l1 - l0)))
                moments_channels(kt, st[0], st[1], n, mean[c0:c1], var[c0:c1])
                t = count_bad(kt, mean[c0:c1], var[c0:c1], 0.0)
            else:
                block_sums_task(x2, inner, k, r0, r1, l0, l1, p, task // nt, cached)
            bad += t
    if not fused:
        sums = np.empty((2, channels))
        partials_per_channel(p[0], p[1], inner, sums)
        moments_channels(k, sums[0], sums[1], n, mean, var)
        bad = count_bad(k, mean, var, 0.0)
    return bad


@parallel_kernel(*FORWARD, returns=True, small=True)
def forward(x, gamma, beta, running_mean, running_var, params, stats, y, tune):
    """The forward of every mode: batch statistics (then the running averages, when running
    arrays of length C are given), running statistics, or given MEAN and VAR rows of ``stats``
    (then the running averages over ``params[P_COUNT]`` values); y with the fused activation,
    and the rows a cache keeps into ``stats`` (``common.KEPT`` or ``KEPT_RENORM`` rows; none
    when it has no columns). Where a task has every row of its tile (the fused route of batch
    statistics, when a strip of every row fits ``TUNE_STRIP``; a single row block otherwise)
    each tile is one task with its own work block (``forward_tile``); else a work block of the
    whole array (x then holds at least 64 values per channel: 56 bytes per channel is below
    x/4) and two passes. Returns how many channels' batch statistics are not finite or came
    from an ill-placed shift: the running averages of the others are updated, and the caller
    runs ``common.rescue`` (-1 from the ``.small`` twin where its routes do not apply: see
    ``_jit.ALL_ROUTES``)."""
    x, gamma, beta, running_mean, running_var, params, stats, y, tune = borrowed(
        x, gamma, beta, running_mean, running_var, params, stats, y, tune
    )
    outer, channels, inner = x.shape
    mode = params[P_MODE]
    batch = mode == FORWARD_BATCH
    # a pass that only writes takes whole rows of a tile per task (``blocks``); the ``.small``
    # twin takes every mode a tile at a time over every row (``forward_tile``: a small array
    # fits one strip, so ``geometry`` gives one row block), so numba prunes the whole-array
    # work block, its epilogue and the write task from it (a cold first step compiles less)
    if ALL_ROUTES and not batch:
        rows, lanes, tile, nt, rb, nrb = blocks(x, tune)
    else:
        rows, lanes, tile, nt, rb, nrb = geometry(x, tune)
    cached = rows * lanes * x.itemsize <= tune[TUNE_STRIP]  # two-pass in cache: see geometry
    relu, thr = params[P_RELU] != 0.0, params[P_THR]
    x2 = x.reshape(rows, lanes)
    y2 = y.reshape(rows, lanes)
    local = nrb == 1  # a task per tile, over every row
    reduce = batch and not local  # the two-pass route's partials
    if not ALL_ROUTES and (not local or mode == FORWARD_GIVEN):
        return -1
    own = np.empty((STATS_ROWS + 1, 0 if local else channels))  # (one allocation, kept below)
    (buf,) = borrowed(own)
    work, k = buf[:STATS_ROWS], buf[STATS_ROWS]  # k: the two-pass route's shifts
    zero = np.int64(0)
    if ALL_ROUTES:
        if reduce:
            channel_shifts(x2, inner, zero, k)
            p = np.empty((2, nrb, lanes))
            for task in prange(nt * nrb):
                r0, r1, l0, l1 = span(task, nt, tile, lanes, rb, rows)
                block_sums_task(x2, inner, k, r0, r1, l0, l1, p, task // nt, cached)
            sums = np.empty((2, channels))
            partials_per_channel(p[0], p[1], inner, sums)
            moments_channels(k, sums[0], sums[1], params[P_COUNT], work[MEAN], work[VAR])
        elif not local and mode == FORWARD_GIVEN:
            given_channels(stats, zero, channels, work)
    if ALL_ROUTES and not local:
        if mode == FORWARD_RUNNING:
            running_channels(work, running_mean, running_var)
        rm, rv = running_mean, running_var
        finish_channels(work, zero, zero, channels, gamma, beta, rm, rv, params)
    bad = 0
    for task in prange(nt * nrb):
        r0, r1, l0, l1 = span(task, nt, tile, lanes, rb, rows)
        t = 0
        if ALL_ROUTES and not local:
            write_task(
                x2, y2, inner, work, l0 // inner, relu, thr, r0, r1, l0, l1, not cached, ALL_ROUTES
            )
        else:
            t = forward_tile(
                x2,
                y2,
                inner,
                l0,
                l1,
                gamma,
                beta,
                running_mean,
                running_var,
                params,
                stats,
                ALL_ROUTES,
                not cached,
            )
        bad += t
    if ALL_ROUTES and not local:
        rm, rv = running_mean, running_var
        bad = settle_channels(k, work, zero, zero, channels, params, rm, rv, stats)
    return bad + keep(own)


@parallel_kernel(*BACKWARD, returns=True, small=True)
def backward(x, dy, gamma, beta, stats, params, sums, dgamma, dbeta, dx, tune):
    """The backward of every mode: the training gradient, the frozen-statistics gradient
    ``dx = scale * dy`` (one pass), the two sums alone (into ``sums``, for a synchronized
    backward), or dx, dgamma and dbeta from the given ``sums`` over ``params[P_COUNT]`` values.
    ``stats`` holds the rows the cache kept (``common.KEPT`` or ``KEPT_RENORM``); the work
    block is rebuilt from them, gamma and beta (per tile on the fused route, where a cache may
    also keep none: the tile's statistics are then taken again, with ``params[P_EPS]``). dy is
    behind the activation's mask, recomputed from x and the block. ``sums`` (2, C) receives the
    two sums in the training and frozen modes too; (2, 0) when not wanted (then the fused route
    needs only its tiles' own buffers). Returns 0 (-1 from the ``.small`` twin where its route
    does not apply; -2 when no statistics were kept and the route is not fused)."""
    x, dy, gamma, beta, stats, params, sums, dgamma, dbeta, dx, tune = borrowed(
        x, dy, gamma, beta, stats, params, sums, dgamma, dbeta, dx, tune
    )
    outer, channels, inner = x.shape
    rows, lanes, tile, nt, rb, nrb = geometry(x, tune)
    cached = rows * lanes * x.itemsize <= tune[TUNE_STRIP]  # two-pass in cache: see geometry
    mode = params[P_MODE]
    relu, thr, n = params[P_RELU] != 0.0, params[P_THR], params[P_COUNT]
    x2 = x.reshape(rows, lanes)
    g2 = dy.reshape(rows, lanes)
    d2 = dx.reshape(rows, lanes)
    frozen = mode == BACKWARD_FROZEN
    fused = nrb == 1 and mode != BACKWARD_GIVEN  # (a rank's sums alone: see backward_tile)
    if not ALL_ROUTES and (mode != BACKWARD_TRAIN or not fused or stats.shape[1] == 0):
        return -1
    if not fused and stats.shape[1] == 0:
        return -2
    reduce = not fused and mode != BACKWARD_GIVEN  # the two-pass route's partials
    if ALL_ROUTES:  # (the .small twin never reduces: no allocation there)
        p = np.empty((2, nrb if reduce else 0, lanes))
    work = stats  # (of the work block's type: the fused route needs no whole-array block)
    zero = np.int64(0)
    if not fused:  # (x holds >= 64 values per channel here)
        work = np.empty((STATS_ROWS, channels))
        rebuild_channels(stats, zero, channels, gamma, beta, work, zero)
    tasks = nt if fused else (nt * nrb if reduce else 0)
    if tasks > 0:  # an empty parallel region still wakes the thread pool
        for task in prange(tasks):
            r0, r1, l0, l1 = span(task, nt, tile, lanes, rb, rows)
            b = task // nt
            if fused:  # the tile's work block, rebuilt from the kept rows (or taken again)
                c0, c1 = span_channels(l0, l1, inner, channels)
                own = np.empty(TILE_ROWS * (c1 - c0) + 2 * (l1 - l0))  # (the tile step keeps it)
                tb, a = tile_buffers(own, TILE_ROWS, c1 - c0, l1 - l0)
                if not ALL_ROUTES:  # (a test of the constant alone: numba prunes it)
                    rebuild_channels(stats, c0, c1, gamma, beta, tb[:STATS_ROWS], zero)
                elif stats.shape[1] == 0:
                    tile_again(x2, inner, l0, l1, c0, c1, gamma, beta, params, dgamma, dbeta, tb, a)
                else:
                    rebuild_channels(stats, c0, c1, gamma, beta, tb[:STATS_ROWS], zero)
            if fused and not frozen:
                dx_too = mode == BACKWARD_TRAIN
                backward_tile(
                    x2,
                    g2,
                    d2,
                    inner,
                    l0,
                    l1,
                    tb,
                    a,
                    relu,
                    thr,
                    n,
                    sums,
                    dgamma,
                    dbeta,
                    own,
                    dx_too,
                    ALL_ROUTES,
                )
            elif ALL_ROUTES:
                if fused:
                    frozen_tile(
                        x2, g2, d2, inner, l0, l1, tb, a, relu, thr, sums, dgamma, dbeta, own
                    )
                elif frozen:
                    frozen_task(
                        x2,
                        g2,
                        d2,
                        inner,
                        work,
                        relu,
                        thr,
                        r0,
                        r1,
                        l0,
                        l1,
                        p[0, b, l0:l1],
                        p[1, b, l0:l1],
                    )
                else:
                    gradient_sums_task(x2, g2, inner, work, relu, thr, r0, r1, l0, l1, p, b, cached)
    if ALL_ROUTES:
        if not fused:
            s = sums if sums.shape[1] > 0 else np.empty((2, channels))
            if reduce:
                partials_per_channel(p[0], p[1], inner, s)
            if frozen or mode == BACKWARD_SUMS:  # (a synchronized rank's share: its sums)
                parameter_gradients(s, zero, work, zero, channels, dgamma, dbeta)
            else:
                coef = np.empty((3, channels))
                gradient_channels(s, zero, n, work, zero, channels, coef, dgamma, dbeta)
                for task in prange(nt * nrb):
                    r0, r1, l0, l1 = span(task, nt, tile, lanes, rb, rows)
                    gradient_task(x2, g2, d2, inner, work, relu, thr, coef, r0, r1, l0, l1)
    return 0


@parallel_kernel(*BACKWARD_INPUT)
def backward_input(x, dy, gamma, params, dgamma, dbeta, dx, tune):
    """Cache-free training backward: the batch statistics and both gradient sums from one read
    of x and dy, then dx; fused per tile when a strip of every row fits, else two passes (the
    sums' partials, then dx)."""
    x, dy, gamma, params, dgamma, dbeta, dx, tune = borrowed(
        x, dy, gamma, params, dgamma, dbeta, dx, tune
    )
    outer, channels, inner = x.shape
    rows, lanes, tile, nt, rb, nrb = geometry(x, tune)
    cached = rows * lanes * x.itemsize <= tune[TUNE_STRIP]  # two-pass in cache: see geometry
    x2 = x.reshape(rows, lanes)
    g2 = dy.reshape(rows, lanes)
    d2 = dx.reshape(rows, lanes)
    relu, thr = params[P_RELU] != 0.0, params[P_THR]  # off: variables, not literals
    fused = nrb == 1
    k = np.empty(0 if fused else channels)
    p = np.empty((4, 0 if fused else nrb, lanes))
    if not fused:
        channel_shifts(x2, inner, np.int64(0), k)
    tasks = nt if fused else nt * nrb
    if tasks > 0:  # an empty parallel region still wakes the thread pool
        for task in prange(tasks):
            r0, r1, l0, l1 = span(task, nt, tile, lanes, rb, rows)
            b = task // nt
            if fused:
                input_tile(x, dy, x2, g2, d2, inner, l0, l1, gamma, params, dgamma, dbeta)
            else:
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
                    cached,
                )
    if not fused:
        s = np.empty((4, channels))
        partials_per_channel(p[0], p[1], inner, s[0:2])
        partials_per_channel(p[2], p[3], inner, s[2:4])
        stats = np.empty((STATS_ROWS, channels))
        zero = np.int64(0)
        n = params[P_COUNT]
        input_channels(x, dy, zero, k, s, n, gamma, params, stats, zero, channels)
        coef = np.empty((3, channels))
        gradient_channels(s[2:], zero, n, stats, zero, channels, coef, dgamma, dbeta)
        for task in prange(nt * nrb):
            r0, r1, l0, l1 = span(task, nt, tile, lanes, rb, rows)
            gradient_task(x2, g2, d2, inner, stats, relu, thr, coef, r0, r1, l0, l1)
