"""The rows family: C-contiguous (outer, C, inner) with inner >= ROWS_MIN (NCHW, NCL, 5-D).

Each (o, c) row is contiguous and long. A row is summed in float64 around the channel's shift
(its first value) by a ``reduction`` helper, which LLVM vectorizes (see ``_jit``; accuracy
argument in ``strided``). Two partitions, both functions of the shape and the machine's tuning
vector only, so results do not depend on the thread count:

- Memory order (every pass but the fused route): tasks are blocks of ``rb`` outer indices
  (``TUNE_BLOCK`` bytes) times groups of channels (split only when there are fewer than
  ``MIN_TASKS`` blocks), each running through its rows in memory order; a reduction keeps one
  partial per (block, channel), combined per channel in block order. (Channel-major order,
  all of one channel's rows across the array, made inference 3x slower: float32 (64, 256, 196),
  one thread, 1.9 ms against 0.61 ms in memory order, the speed of a flat loop.)
- Fused route, when a channel's slice of x is at most ``TUNE_FUSE`` bytes (half of this core's
  L2) and there are at least 4 channels: one task per channel reduces its slice and then writes
  its output (y, or dx) while the slice is still in L2, so x (and dy) are read from memory once
  instead of twice.

Memory beyond the outputs: two float64 per (block, channel), four for the cache-free backward
(at most x/8 of float32 x, since a block holds at least one outer index of inner >= 64 values
per channel), and at most sixteen per channel.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import (
    BACKWARD,
    BACKWARD_APPLY,
    BACKWARD_INPUT,
    BACKWARD_SUMS,
    FORWARD_TRAIN,
    MIN_TASKS,
    MOMENTS,
    NORMALIZE,
    NORMALIZE_BLOCK,
    TUNE_BLOCK,
    TUNE_FUSE,
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
    copy_into,
    forward_channels,
    frozen_channels,
    inference_channels,
    input_channels,
    moments_channels,
    passes,
    rescue,
    rescue_moments,
    row_frozen,
    row_grad_sums,
    row_input_sums,
    row_moment_sums,
    update_running,
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
    """One task per channel (reduce, then write while the slice is in L2)? Shape only."""
    outer, channels, inner = x.shape
    return outer * inner * x.itemsize <= tune[TUNE_FUSE] and channels >= 4


@helper
def combine(part, s):
    """``s[i, c]``: the partials ``part[b, c, i]`` of every block added in block order."""
    for i in range(s.shape[0]):
        for c in range(part.shape[1]):
            t = 0.0
            for b in range(part.shape[0]):
                t += part[b, c, i]
            s[i, c] = t


@helper
def shifts(x):
    k = np.empty(x.shape[1])
    for c in range(x.shape[1]):
        k[c] = x[0, c, 0]
    return k


@helper
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


@helper
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


@helper
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


@helper
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


@helper
def normalize_row(xr, yr, m, s, b, relu, thr):
    for i in range(xr.shape[0]):
        yr[i] = activate((xr[i] - m) * s + b, relu, thr)


@helper
def write_task(x, stats, relu, thr, o0, o1, c0, c1, y):
    for o in range(o0, o1):
        for c in range(c0, c1):
            normalize_row(
                x[o, c], y[o, c], stats[MEAN, c], stats[SCALE, c], stats[SHIFT, c], relu, thr
            )


@helper
def grad_input_row(xr, gr, dr, m, s, b, relu, thr, kc, c1c, c0c):
    for i in range(xr.shape[0]):
        d = xr[i] - m
        e = np.float64(gr[i]) if passes(d * s + b, relu, thr) else 0.0
        dr[i] = kc * e - c1c * d + c0c


@helper
def grad_input_task(x, dy, stats, relu, thr, coef, o0, o1, c0, c1, dx):
    for o in range(o0, o1):
        for c in range(c0, c1):
            grad_input_row(
                x[o, c],
                dy[o, c],
                dx[o, c],
                stats[MEAN, c],
                stats[SCALE, c],
                stats[SHIFT, c],
                relu,
                thr,
                coef[0, c],
                coef[1, c],
                coef[2, c],
            )


@helper
def channel_sums(x, c, k):
    """A channel's shifted sums over its rows in order (the fused route)."""
    s1 = 0.0
    s2 = 0.0
    for o in range(x.shape[0]):
        a, b = row_moment_sums(x[o, c], k)
        s1 += a
        s2 += b
    return s1, s2


@helper
def channel_gradient_sums(x, dy, stats, relu, thr, c):
    s1 = 0.0
    s2 = 0.0
    for o in range(x.shape[0]):
        a, b = row_grad_sums(
            x[o, c], dy[o, c], stats[MEAN, c], stats[SCALE, c], stats[SHIFT, c], relu, thr
        )
        s1 += a
        s2 += b
    return s1, s2


@helper
def running_slice(running, c):
    """Channel c of a running array, or the empty array that means none."""
    return running[c : c + 1] if running.shape[0] > 0 else running


# --- Phases shared by the kernels (prange loops, inlined into each kernel).


@phase
def sums_phase(x, tune):
    """Per-channel shifts and shifted sums over the memory-order grid."""
    channels = x.shape[1]
    rb, nb, cg, ng = grid(x, tune)
    k = shifts(x)
    part = np.empty((nb, channels, 2))
    for t in prange(nb * ng):
        b, o0, o1, c0, c1 = task_span(t, x, rb, cg, ng)
        moment_task(x, k, o0, o1, c0, c1, part[b])
    s = np.empty((2, channels))
    combine(part, s)
    return k, s[0], s[1]


@phase
def write_phase(x, stats, relu, thr, y, tune):
    """``y = activation((x - mean) * scale + shift)`` per channel, in memory order."""
    rb, nb, cg, ng = grid(x, tune)
    for t in prange(nb * ng):
        b, o0, o1, c0, c1 = task_span(t, x, rb, cg, ng)
        write_task(x, stats, relu, thr, o0, o1, c0, c1, y)


@phase
def gradient_sums_phase(x, dy, stats, relu, thr, tune):
    """Per channel ``sum(dy)`` and ``sum(dy * (x - mean))`` (dy behind the activation's mask)
    over the memory-order grid, partials combined in block order."""
    channels = x.shape[1]
    rb, nb, cg, ng = grid(x, tune)
    part = np.empty((nb, channels, 2))
    for t in prange(nb * ng):
        b, o0, o1, c0, c1 = task_span(t, x, rb, cg, ng)
        gradient_task(x, dy, stats, relu, thr, o0, o1, c0, c1, part[b])
    s = np.empty((2, channels))
    combine(part, s)
    return s[0], s[1]


@phase
def gradient_phase(x, dy, stats, relu, thr, s1, s2, n, dgamma, dbeta, dx, tune):
    """The training gradient from its sums over n values: the per-channel coefficients and
    dgamma, dbeta (``backward_channels``), then dx in memory order."""
    coef = np.empty((3, x.shape[1]))
    backward_channels(s1, s2, n, stats, dgamma, dbeta, coef[0], coef[1], coef[2])
    rb, nb, cg, ng = grid(x, tune)
    for t in prange(nb * ng):
        b, o0, o1, c0, c1 = task_span(t, x, rb, cg, ng)
        grad_input_task(x, dy, stats, relu, thr, coef, o0, o1, c0, c1, dx)


# --- Kernels.


@parallel_kernel(*MOMENTS)
def moments(x, mean, var, tune):
    """Per-channel mean and biased variance (rounded into mean's and var's dtype)."""
    k, s1, s2 = sums_phase(x, tune)
    moments_channels(k, s1, s2, x.shape[0] * x.shape[2], mean, var)
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
    """Training forward: batch statistics, the per-channel epilogue (``forward_channels``), then
    ``y``; with :func:`fused` shapes each channel is one task (its rows summed in order, then
    normalized from cache)."""
    outer, channels, inner = x.shape
    n = outer * inner
    if fused(x, tune):
        k = shifts(x)
        s = np.empty((2, channels))
        for c in prange(channels):
            s[0, c], s[1, c] = channel_sums(x, c, k[c])
            forward_channels(
                k[c : c + 1],
                s[0, c : c + 1],
                s[1, c : c + 1],
                n,
                eps,
                gamma[c : c + 1],
                beta[c : c + 1],
                rmax,
                dmax,
                running_slice(running_mean, c),
                running_slice(running_var, c),
                stats[:, c : c + 1],
            )
            write_task(x, stats, relu, thr, 0, outer, c, c + 1, y)
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
    """Training backward: the two sums, the per-channel coefficients (``backward_channels``),
    then dx; per channel from cache when :func:`fused`."""
    outer, channels, inner = x.shape
    n = outer * inner
    if fused(x, tune):
        s = np.empty((2, channels))
        coef = np.empty((3, channels))
        for c in prange(channels):
            s[0, c], s[1, c] = channel_gradient_sums(x, dy, stats, relu, thr, c)
            backward_channels(
                s[0, c : c + 1],
                s[1, c : c + 1],
                n,
                stats[:, c : c + 1],
                dgamma[c : c + 1],
                dbeta[c : c + 1],
                coef[0, c : c + 1],
                coef[1, c : c + 1],
                coef[2, c : c + 1],
            )
            grad_input_task(x, dy, stats, relu, thr, coef, 0, outer, c, c + 1, dx)
    else:
        s1, s2 = gradient_sums_phase(x, dy, stats, relu, thr, tune)
        gradient_phase(x, dy, stats, relu, thr, s1, s2, n, dgamma, dbeta, dx, tune)


@parallel_kernel(*BACKWARD)
def backward_frozen(x, dy, stats, relu, thr, dgamma, dbeta, dx, tune):
    """Frozen-statistics backward: ``dx = scale * dy`` (behind the activation's mask) and the
    sums for dgamma, dbeta, in one pass in memory order."""
    channels = x.shape[1]
    rb, nb, cg, ng = grid(x, tune)
    part = np.empty((nb, channels, 2))
    for t in prange(nb * ng):
        b, o0, o1, c0, c1 = task_span(t, x, rb, cg, ng)
        frozen_task(x, dy, dx, stats, relu, thr, o0, o1, c0, c1, part[b])
    s = np.empty((2, channels))
    combine(part, s)
    frozen_channels(s[0], s[1], stats, dgamma, dbeta)


@parallel_kernel(*NORMALIZE_BLOCK)
def normalize_block(x, stats, relu, thr, y, tune):
    """``y`` from a given statistics block (a synchronized forward's global statistics)."""
    write_phase(x, stats, relu, thr, y, tune)


@parallel_kernel(*BACKWARD_SUMS)
def backward_sums(x, dy, stats, relu, thr, s1, s2, tune):
    """The training gradient's two sums alone (``s1 = sum(dy)``, ``s2 = sum(dy * (x - mean))``,
    dy behind the activation's mask), float64: a synchronized backward reduces them across
    processes, then calls :func:`backward_apply`."""
    t1, t2 = gradient_sums_phase(x, dy, stats, relu, thr, tune)
    copy_into(t1, s1)
    copy_into(t2, s2)


@parallel_kernel(*BACKWARD_APPLY)
def backward_apply(x, dy, stats, relu, thr, s1, s2, n, dgamma, dbeta, dx, tune):
    """The training gradient from given sums over n values (:func:`backward_sums`, reduced)."""
    gradient_phase(x, dy, stats, relu, thr, s1, s2, n, dgamma, dbeta, dx, tune)


@parallel_kernel(*BACKWARD_INPUT)
def backward_input(x, dy, gamma, eps, dgamma, dbeta, dx, tune):
    """Cache-free training backward: the batch statistics and both gradient sums from one read
    of x and dy (memory order), then dx."""
    outer, channels, inner = x.shape
    n = outer * inner
    rb, nb, cg, ng = grid(x, tune)
    k = shifts(x)
    part = np.empty((nb, channels, 4))
    for t in prange(nb * ng):
        b, o0, o1, c0, c1 = task_span(t, x, rb, cg, ng)
        input_task(x, dy, k, o0, o1, c0, c1, part[b])
    s = np.empty((4, channels))
    combine(part, s)
    stats = np.empty((STATS_ROWS, channels))
    input_channels(k, s[0], s[1], s[2], s[3], n, eps, gamma, stats)
    gradient_phase(x, dy, stats, 0, 0.0, s[2], s[3], n, dgamma, dbeta, dx, tune)
