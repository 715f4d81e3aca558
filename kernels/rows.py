"""The rows family: C-contiguous (outer, C, inner) with inner >= ROWS_MIN (NCHW, NCL, 5-D).

Each (o, c) row is contiguous and long. A row is summed in float64 around the channel's shift
(its first value) by a ``reduction`` helper, which LLVM vectorizes (see ``_jit``; accuracy
argument in ``lanes``). Two partitions, both functions of the shape and the machine's tuning
vector only, so results do not depend on the thread count:

- Memory order (every pass but the fused route): tasks are blocks of ``rb`` outer indices
  (``TUNE_BLOCK`` bytes) times groups of channels (split only when there are fewer than
  ``MIN_TASKS`` blocks), each running through its rows in memory order; a reduction keeps one
  partial per (block, channel), combined per channel in block order. (Channel-major order,
  all of one channel's rows across the array, made inference 3x slower: float32 (64, 256, 196),
  one thread, 1.9 ms against 0.61 ms in memory order, the speed of a flat loop.)
- Fused route, when x fits one core's L2 (``TUNE_L2``) and there are at least 4 channels: one
  task per channel reduces its slice and then writes its output (y, or dx) from L1/L2 (see
  :func:`fused` for why only there).

Memory beyond the outputs: two float64 per (block, channel), four for the cache-free backward
(at most x/6 of float32 x, since a block holds at least one outer index of inner >= 48 values
per channel), and at most sixteen per channel.
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
    FORWARD,
    FORWARD_BATCH,
    FORWARD_GIVEN,
    FORWARD_RUNNING,
    MIN_TASKS,
    MOMENTS,
    P_COUNT,
    P_MODE,
    P_RELU,
    P_THR,
    TUNE_BLOCK,
    TUNE_L2,
    borrowed,
    helper,
    parallel_kernel,
    step,
)
from .common import (
    MEAN,
    SCALE,
    SHIFT,
    STATS_ROWS,
    VAR,
    activate,
    count_bad,
    finish_channels,
    given_channels,
    gradient_channels,
    input_channels,
    moments_channels,
    parameter_gradients,
    passes,
    rebuild_channels,
    row_frozen,
    row_grad_sums,
    row_input_sums,
    row_moment_sums,
    running_channels,
    same,
    settle_channels,
)


@helper
def grid(x, tune):
    """``(rb, nb, cg, ng)``: outer indices per block, blocks, channels per group, groups."""
    outer, channels, inner = x.shape
    rb = max(1, tune[TUNE_BLOCK] // (channels * inner * x.itemsize))
    nb = (outer + rb - 1) // rb
    ng = min(channels, max(1, MIN_TASKS // nb))
    cg = (channels + ng - 1) // ng
    return rb, nb, cg, (channels + cg - 1) // cg


@helper
def task_span(t, x, rb, cg, ng):
    """``(block, o0, o1, c0, c1)`` of task t of the memory-order grid."""
    b, g = t // ng, t % ng
    return b, b * rb, min(x.shape[0], (b + 1) * rb), g * cg, min(x.shape[1], (g + 1) * cg)


@helper
def fused(x, tune):
    """One task per channel (reduce its slice, then write it from cache)? Shape and machine
    only, so the sums' order never depends on the thread count.

    Only for arrays that fit one core's L2. A channel's slice of a larger array is ``outer``
    segments of ``inner`` values scattered at a stride of ``C * inner``: read channel by
    channel, every segment starts a new stream (a page or less each at 7x7 to 32x32), and the
    slice came from L3 or memory at that pace where the memory-order route streams the array.
    Fused (slices up to half of L2, the former rule) against memory order, float32, Zen 4 (1
    MiB L2, 32 MiB L3), medians of interleaved calls, 1 / 2 threads (ms): forward (64, 32, 32,
    32) 1.18 / 0.62 against 0.65 / 0.41, (32, 128, 28, 28) 2.33 / 1.54 against 1.18 / 0.63,
    (64, 256, 14, 14) 2.31 / 1.32 against 1.19 / 0.97, (32, 64, 56, 56) 3.65 / 2.06 against
    2.20 / 1.69, beyond L3 (256, 256, 14, 14) 9.90 / 6.00 against 5.18 / 4.50; backward 1.94 /
    1.08 against 1.07 / 0.76, 3.40 / 2.28 against 1.93 / 1.18, 3.69 / 2.37 against 1.92 /
    1.94, 5.40 / 3.29 against 3.62 / 2.94, 12.5 / 7.9 against 8.2 / 7.5. Within L2 the two
    tie (0.95-1.1x either way: (4, 32, 32, 32), (16, 64, 14, 14), (2, 16, 32, 32)), and the
    ``.small`` twins (arrays below ``SERIAL_BELOW``, half of L2) keep the fused route alone."""
    return x.nbytes <= tune[TUNE_L2] and x.shape[1] >= 4


@helper
def combine(part, sums):
    """``sums[i, c]``: the partials ``part[b, c, i]`` of every block added in block order, for
    the rows of ``sums``; a block at a time (contiguous), the same additions in the same order
    as one (i, c) at a time down the blocks (see ``lanes.partials_per_channel``)."""
    for i in range(sums.shape[0]):
        for c in range(part.shape[1]):
            sums[i, c] = 0.0
    for b in range(part.shape[0]):
        for c in range(part.shape[1]):
            for i in range(sums.shape[0]):
                sums[i, c] += part[b, c, i]


@helper
def shifts(x, k):
    for c in range(x.shape[1]):
        k[c] = x[0, c, 0]


@step
def moment_task(x, k, o0, o1, c0, c1, part):
    """Shifted sums of rows o0:o1, channels c0:c1, in memory order, into ``part[c]``."""
    for c in range(c0, c1):
        part[c, 0] = 0.0
        part[c, 1] = 0.0
    for o in range(o0, o1):
        for c in range(c0, c1):
            a, b = row_moment_sums(x[o, c], k[c])
            part[c, 0] += a
            part[c, 1] += b


@step
def gradient_task(x, dy, stats, relu, thr, o0, o1, c0, c1, part):
    """``sum(dy)``, ``sum(dy * (x - mean))`` (dy behind the activation's mask) of rows o0:o1,
    channels c0:c1, into ``part[c]``."""
    for c in range(c0, c1):
        part[c, 0] = 0.0
        part[c, 1] = 0.0
    for o in range(o0, o1):
        for c in range(c0, c1):
            a, b = row_grad_sums(
                x[o, c], dy[o, c], stats[MEAN, c], stats[SCALE, c], stats[SHIFT, c], relu, thr
            )
            part[c, 0] += a
            part[c, 1] += b


@step
def frozen_task(x, dy, dx, stats, relu, thr, o0, o1, c0, c1, part):
    """The frozen backward of rows o0:o1, channels c0:c1: dx and the gradient sums."""
    for c in range(c0, c1):
        part[c, 0] = 0.0
        part[c, 1] = 0.0
    for o in range(o0, o1):
        for c in range(c0, c1):
            a, b = row_frozen(
                x[o, c],
                dy[o, c],
                dx[o, c],
                stats[MEAN, c],
                stats[SCALE, c],
                stats[SHIFT, c],
                relu,
                thr,
            )
            part[c, 0] += a
            part[c, 1] += b


@step
def input_task(x, dy, k, o0, o1, c0, c1, part):
    """The cache-free backward's four sums of rows o0:o1, channels c0:c1, into ``part[c]``."""
    for c in range(c0, c1):
        for i in range(4):
            part[c, i] = 0.0
    for o in range(o0, o1):
        for c in range(c0, c1):
            a, b, e, f = row_input_sums(x[o, c], dy[o, c], k[c])
            part[c, 0] += a
            part[c, 1] += b
            part[c, 2] += e
            part[c, 3] += f


@step
def write_task(x, stats, relu, thr, o0, o1, c0, c1, y):
    if same(x, y):  # inference with out=x: read y itself (see ``common.same``)
        write_rows(y, stats, relu, thr, o0, o1, c0, c1, y)
    else:
        write_rows(x, stats, relu, thr, o0, o1, c0, c1, y)


@step
def write_rows(x, stats, relu, thr, o0, o1, c0, c1, y):
    """``write_task``'s loop, inlined at both of its calls (see ``common.same``)."""
    for o in range(o0, o1):
        for c in range(c0, c1):
            xr, yr = x[o, c], y[o, c]
            m, s, b = stats[MEAN, c], stats[SCALE, c], stats[SHIFT, c]
            for i in range(xr.shape[0]):
                yr[i] = activate((xr[i] - m) * s + b, relu, thr)


@step
def grad_input_task(x, dy, stats, relu, thr, coef, o0, o1, c0, c1, dx):
    if same(dy, dx):  # dx into dy: read dy through dx (see ``common.same``)
        grad_input_rows(x, dx, stats, relu, thr, coef, o0, o1, c0, c1, dx)
    else:
        grad_input_rows(x, dy, stats, relu, thr, coef, o0, o1, c0, c1, dx)


@step
def grad_input_rows(x, dy, stats, relu, thr, coef, o0, o1, c0, c1, dx):
    """``grad_input_task``'s loop, inlined at both of its calls (see ``write_rows``)."""
    for o in range(o0, o1):
        for c in range(c0, c1):
            xr, gr, dr = x[o, c], dy[o, c], dx[o, c]
            m, s, b = stats[MEAN, c], stats[SCALE, c], stats[SHIFT, c]
            kc, c1c, c0c = coef[0, c], coef[1, c], coef[2, c]
            for i in range(xr.shape[0]):
                d = xr[i] - m
                e = np.float64(gr[i]) if passes(d * s + b, relu, thr) else 0.0
                dr[i] = kc * e - c1c * d + c0c


@step
def channel_sums(x, c, k, sums):
    """A channel's shifted sums over its rows in order (the fused route), into ``sums[:, c]``."""
    s1 = 0.0
    s2 = 0.0
    for o in range(x.shape[0]):
        a, b = row_moment_sums(x[o, c], k[c])
        s1 += a
        s2 += b
    sums[0, c] = s1
    sums[1, c] = s2


@step
def channel_gradient_sums(x, dy, stats, relu, thr, c, sums):
    s1 = 0.0
    s2 = 0.0
    for o in range(x.shape[0]):
        a, b = row_grad_sums(
            x[o, c], dy[o, c], stats[MEAN, c], stats[SCALE, c], stats[SHIFT, c], relu, thr
        )
        s1 += a
        s2 += b
    sums[0, c] = s1
    sums[1, c] = s2


# --- Kernels: one per operation, its mode a parameter (``_jit.P_MODE``); at most two parallel
# regions each (see ``lanes``): the reduction's tasks (a fused channel, or a block of the
# memory-order grid), then the write's.


@parallel_kernel(*MOMENTS, returns=True)
def moments(x, mean, var, tune):
    """Per-channel mean and biased variance (float64); returns how many channels are not
    finite (the caller then runs ``common.rescue_moments``)."""
    x, mean, var, tune = borrowed(x, mean, var, tune)
    channels = x.shape[1]
    rb, nb, cg, ng = grid(x, tune)
    k = np.empty(channels)
    shifts(x, k)
    part = np.empty((nb, channels, 2))
    for t in prange(nb * ng):
        b, o0, o1, c0, c1 = task_span(t, x, rb, cg, ng)
        moment_task(x, k, o0, o1, c0, c1, part[b])
    sums = np.empty((2, channels))
    combine(part, sums)
    moments_channels(k, sums[0], sums[1], np.float64(x.shape[0] * x.shape[2]), mean, var)
    return count_bad(k, mean, var, 0.0)


@parallel_kernel(*FORWARD, returns=True, small=True)
def forward(x, gamma, beta, running_mean, running_var, params, stats, y, tune):
    """The forward of every mode (see ``lanes.forward``), with a work block of the whole array
    (x holds at least ``ROWS_MIN`` values per channel: 56 bytes per channel is below x/3);
    with :func:`fused` shapes and batch statistics each channel is one task (its rows summed in
    order, then normalized from cache)."""
    x, gamma, beta, running_mean, running_var, params, stats, y, tune = borrowed(
        x, gamma, beta, running_mean, running_var, params, stats, y, tune
    )
    outer, channels, inner = x.shape
    mode = params[P_MODE]
    relu, thr = params[P_RELU] != 0.0, params[P_THR]
    rb, nb, cg, ng = grid(x, tune)
    batch = mode == FORWARD_BATCH
    fused_route = batch and fused(x, tune)
    reduce = batch and not fused_route
    if not ALL_ROUTES and (reduce or mode == FORWARD_GIVEN):
        return -1
    k = np.empty(channels)
    if batch:
        shifts(x, k)
    work = np.empty((STATS_ROWS, channels))
    sums = np.empty((2, channels))
    part = np.empty((nb if reduce else 0, channels, 2))
    zero = np.int64(0)
    tasks = channels if fused_route else (nb * ng if reduce else 0)
    if tasks > 0:  # an empty parallel region still wakes the thread pool
        for t in prange(tasks):
            if fused_route:
                c = t
                channel_sums(x, c, k, sums)
                moments_channels(
                    k[c : c + 1],
                    sums[0, c : c + 1],
                    sums[1, c : c + 1],
                    params[P_COUNT],
                    work[MEAN, c : c + 1],
                    work[VAR, c : c + 1],
                )
                rm, rv = running_mean, running_var
                finish_channels(work, c, c, c + 1, gamma, beta, rm, rv, params)
                write_task(x, work, relu, thr, zero, outer, c, c + 1, y)
            elif ALL_ROUTES:
                b, o0, o1, c0, c1 = task_span(t, x, rb, cg, ng)
                moment_task(x, k, o0, o1, c0, c1, part[b])
    if not fused_route:
        if mode == FORWARD_RUNNING:
            running_channels(work, running_mean, running_var)
        elif ALL_ROUTES:
            if reduce:
                combine(part, sums)
                moments_channels(k, sums[0], sums[1], params[P_COUNT], work[MEAN], work[VAR])
            else:
                given_channels(stats, zero, channels, work)
        rm, rv = running_mean, running_var
        finish_channels(work, zero, zero, channels, gamma, beta, rm, rv, params)
        for t in prange(nb * ng):
            b, o0, o1, c0, c1 = task_span(t, x, rb, cg, ng)
            write_task(x, work, relu, thr, o0, o1, c0, c1, y)
    rm, rv = running_mean, running_var
    return settle_channels(k, work, zero, zero, channels, params, rm, rv, stats)


@parallel_kernel(*BACKWARD, returns=True, small=True)
def backward(x, dy, gamma, beta, stats, params, sums, dgamma, dbeta, dx, tune):
    """The backward of every mode (see ``lanes.backward``), its work block rebuilt for the
    whole array from the kept rows (x holds at least ``ROWS_MIN`` values per channel, so the
    cache always keeps them here); per channel from cache when :func:`fused` and training."""
    x, dy, gamma, beta, stats, params, sums, dgamma, dbeta, dx, tune = borrowed(
        x, dy, gamma, beta, stats, params, sums, dgamma, dbeta, dx, tune
    )
    outer, channels, inner = x.shape
    mode = params[P_MODE]
    relu, thr, n = params[P_RELU] != 0.0, params[P_THR], params[P_COUNT]
    rb, nb, cg, ng = grid(x, tune)
    frozen = mode == BACKWARD_FROZEN
    fused_route = mode == BACKWARD_TRAIN and fused(x, tune)
    if not ALL_ROUTES and not fused_route:
        return -1
    if stats.shape[1] == 0:
        return -2
    zero = np.int64(0)
    work = np.empty((STATS_ROWS, channels))
    rebuild_channels(stats, zero, channels, gamma, beta, work, zero)
    s = sums if sums.shape[1] > 0 else np.empty((2, channels))  # rows: O(C) is <= x/16
    reduce = not fused_route and mode != BACKWARD_GIVEN
    coef = np.empty((3, channels))
    part = np.empty((nb if reduce else 0, channels, 2))
    tasks = channels if fused_route else (nb * ng if reduce else 0)
    if tasks > 0:  # an empty parallel region still wakes the thread pool
        for t in prange(tasks):
            if fused_route:
                c = t
                channel_gradient_sums(x, dy, work, relu, thr, c, s)
                gradient_channels(s, c, n, work, c, c + 1, coef, dgamma, dbeta)
                grad_input_task(x, dy, work, relu, thr, coef, zero, outer, c, c + 1, dx)
            elif ALL_ROUTES:
                b, o0, o1, c0, c1 = task_span(t, x, rb, cg, ng)
                if frozen:
                    frozen_task(x, dy, dx, work, relu, thr, o0, o1, c0, c1, part[b])
                else:
                    gradient_task(x, dy, work, relu, thr, o0, o1, c0, c1, part[b])
    if ALL_ROUTES:
        if not fused_route:
            if reduce:
                combine(part, s)
            if frozen or mode == BACKWARD_SUMS:  # (a synchronized rank's share: its sums)
                parameter_gradients(s, zero, work, zero, channels, dgamma, dbeta)
            else:
                gradient_channels(s, zero, n, work, zero, channels, coef, dgamma, dbeta)
                for t in prange(nb * ng):
                    b, o0, o1, c0, c1 = task_span(t, x, rb, cg, ng)
                    grad_input_task(x, dy, work, relu, thr, coef, o0, o1, c0, c1, dx)
    return 0


@parallel_kernel(*BACKWARD_INPUT)
def backward_input(x, dy, gamma, params, dgamma, dbeta, dx, tune):
    """Cache-free training backward: the batch statistics and both gradient sums from one read
    of x and dy (memory order), then dx."""
    x, dy, gamma, params, dgamma, dbeta, dx, tune = borrowed(
        x, dy, gamma, params, dgamma, dbeta, dx, tune
    )
    outer, channels, inner = x.shape
    rb, nb, cg, ng = grid(x, tune)
    k = np.empty(channels)
    shifts(x, k)
    part = np.empty((nb, channels, 4))
    for t in prange(nb * ng):
        b, o0, o1, c0, c1 = task_span(t, x, rb, cg, ng)
        input_task(x, dy, k, o0, o1, c0, c1, part[b])
    s = np.empty((4, channels))
    combine(part, s)
    stats = np.empty((STATS_ROWS, channels))
    zero = np.int64(0)
    n = params[P_COUNT]
    input_channels(x, dy, zero, k, s, n, gamma, params, stats, zero, channels)
    coef = np.empty((3, channels))
    gradient_channels(s[2:], zero, n, stats, zero, channels, coef, dgamma, dbeta)
    relu, thr = params[P_RELU] != 0.0, params[P_THR]  # off: variables, not literals
    for t in prange(nb * ng):
        b, o0, o1, c0, c1 = task_span(t, x, rb, cg, ng)
        grad_input_task(x, dy, stats, relu, thr, coef, o0, o1, c0, c1, dx)
