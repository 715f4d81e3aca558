"""Memory-bandwidth probes for ``python -m bnfast``: how fast this machine reads and copies."""

from __future__ import annotations

import numba
from numba import prange

from ._jit import JIT_OPTIONS, REDUCTION_FASTMATH

_OPTIONS = {**JIT_OPTIONS, "fastmath": REDUCTION_FASTMATH}


@numba.njit(parallel=True, **_OPTIONS)
def read(a):
    """Sum of a float32 array in 64 parallel chunks: one read of every byte."""
    n = a.shape[0]
    chunk = (n + 63) // 64
    total = 0.0
    for b in prange(64):
        seg = a[b * chunk : min(n, (b + 1) * chunk)]  # a slice, so that LLVM vectorizes
        s = 0.0
        for i in range(seg.shape[0]):
            s += seg[i]
        total += s
    return total


@numba.njit(parallel=True, **_OPTIONS)
def copy(src, dst):
    """``dst[:] = src`` in 64 parallel chunks: one read and one write of every byte."""
    n = src.shape[0]
    chunk = (n + 63) // 64
    for b in prange(64):
        s = src[b * chunk : min(n, (b + 1) * chunk)]
        d = dst[b * chunk : min(n, (b + 1) * chunk)]
        for i in range(s.shape[0]):
            d[i] = s[i]
