"""The lanes family: C-contiguous (outer, C, inner) with inner < ROWS_MIN (2-D, NHWC, small L).

The array is read as one flat sequence of ``outer`` periods of ``P = C * inner`` values; value j
belongs to channel ``(j % P) // inner``. A stripe of ``LW = P * k`` lanes (k periods, LW >=
LANES_MIN) is the SIMD-friendly unit: per-lane float64 accumulators (channels-last with C = 3 gets
66 lanes instead of 3), each around its channel's shift. Blocks of ``SB`` stripes are the fixed
partition: a reduction keeps one lane vector per block, combines blocks in order per lane, then
lanes into channels in lane order, so results do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import BLOCK, LANES_MIN, MAX_BLOCKS, MIN_STRIPES, helper, parallel_kernel
from .common import finish_moments


@helper
def stripes(x):
    """``(P, LW, total, n_stripes, stripes_per_block, n_blocks)``: the shape's partition."""
    outer, channels, inner = x.shape
    period = channels * inner
    lw = period * max(1, (LANES_MIN + period - 1) // period)
    total = outer * period
    ns = (total + lw - 1) // lw
    sb = max(MIN_STRIPES, BLOCK // lw, (ns + MAX_BLOCKS - 1) // MAX_BLOCKS)
    return period, lw, total, ns, sb, (ns + sb - 1) // sb


@helper
def lane_values(v, x, lw):
    """Per-lane copy of a per-channel vector: lane l gets ``v[(l % P) // inner]``."""
    channels, inner = x.shape[1], x.shape[2]
    out = np.empty(lw)
    for lane in range(lw):
        out[lane] = v[(lane % (channels * inner)) // inner]
    return out


@helper
def lanes_to_channels(part, x, out):
    """``out[c] = sum over lanes of c (in lane order) of sum over blocks (in order)``."""
    channels, inner = x.shape[1], x.shape[2]
    nb, lw = part.shape
    for c in range(channels):
        out[c] = 0.0
    for lane in range(lw):
        t = 0.0
        for b in range(nb):
            t += part[b, lane]
        out[(lane % (channels * inner)) // inner] += t


@parallel_kernel("x", "vec_out", "vec_out")
def moments(x, mean, var):
    """Per-channel mean and biased variance; needs outer*inner >= 1."""
    channels = x.shape[1]
    period, lw, total, ns, sb, nb = stripes(x)
    xf = x.reshape(total)
    shift = np.empty(channels)
    for c in range(channels):
        shift[c] = x[0, c, 0]
    k = lane_values(shift, x, lw)
    p1 = np.zeros((nb, lw))
    p2 = np.zeros((nb, lw))
    for b in prange(nb):
        a1 = p1[b]
        a2 = p2[b]
        for s in range(b * sb, min(ns, (b + 1) * sb)):
            base = s * lw
            for lane in range(min(lw, total - base)):
                d = xf[base + lane] - k[lane]
                a1[lane] += d
                a2[lane] += d * d
    s1 = np.empty(channels)
    s2 = np.empty(channels)
    lanes_to_channels(p1, x, s1)
    lanes_to_channels(p2, x, s2)
    finish_moments(shift, s1, s2, total // channels, mean, var)


@parallel_kernel("x", "vec", "vec", "vec", "out")
def normalize(x, mean, scale, shift, y):
    """``y = (x - mean[c]) * scale[c] + shift[c]``, float64 arithmetic; y may be x itself."""
    period, lw, total, ns, sb, nb = stripes(x)
    xf = x.reshape(total)
    yf = y.reshape(total)
    m = lane_values(mean, x, lw)
    s = lane_values(scale, x, lw)
    t = lane_values(shift, x, lw)
    for b in prange(nb):
        for st in range(b * sb, min(ns, (b + 1) * sb)):
            base = st * lw
            for lane in range(min(lw, total - base)):
                yf[base + lane] = (xf[base + lane] - m[lane]) * s[lane] + t[lane]


@parallel_kernel("x", "x", "vec", "vec_out", "vec_out")
def grad_sums(x, dy, mean, sum_dy, sum_dy_xmu):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``."""
    period, lw, total, ns, sb, nb = stripes(x)
    xf = x.reshape(total)
    gf = dy.reshape(total)
    m = lane_values(mean, x, lw)
    p1 = np.zeros((nb, lw))
    p2 = np.zeros((nb, lw))
    for b in prange(nb):
        a1 = p1[b]
        a2 = p2[b]
        for s in range(b * sb, min(ns, (b + 1) * sb)):
            base = s * lw
            for lane in range(min(lw, total - base)):
                g = np.float64(gf[base + lane])
                a1[lane] += g
                a2[lane] += g * (xf[base + lane] - m[lane])
    lanes_to_channels(p1, x, sum_dy)
    lanes_to_channels(p2, x, sum_dy_xmu)


@parallel_kernel("x", "x", "vec", "vec", "vec", "vec", "out")
def grad_input(x, dy, mean, k, c1, c0, dx):
    """``dx = k[c]*dy - c1[c]*(x - mean[c]) + c0[c]``; dx may be dy itself."""
    period, lw, total, ns, sb, nb = stripes(x)
    xf = x.reshape(total)
    gf = dy.reshape(total)
    df = dx.reshape(total)
    m = lane_values(mean, x, lw)
    kl = lane_values(k, x, lw)
    c1l = lane_values(c1, x, lw)
    c0l = lane_values(c0, x, lw)
    for b in prange(nb):
        for s in range(b * sb, min(ns, (b + 1) * sb)):
            base = s * lw
            for lane in range(min(lw, total - base)):
                df[base + lane] = (kl[lane] * gf[base + lane]
                                   - c1l[lane] * (xf[base + lane] - m[lane]) + c0l[lane])
