"""Hypothesis strategies and a deterministic generator of memory layouts for the same values."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

DTYPES = (np.float32, np.float64)
LAYOUTS = ("C", "F", "permuted", "strided", "reversed", "readonly")


def lay_out(v: np.ndarray, layout: str, axis: int = 0, perm=None) -> np.ndarray:
    """An array equal to ``v`` element for element, stored in the given memory layout."""
    v = np.ascontiguousarray(v)
    if layout == "C":
        return v.copy()
    if layout == "F":
        return np.asfortranarray(v)
    if layout == "permuted":
        perm = perm if perm is not None else tuple(reversed(range(v.ndim)))
        return np.ascontiguousarray(v.transpose(perm)).transpose(np.argsort(perm))
    if layout == "strided":  # every other element along `axis` of a larger buffer
        shape = list(v.shape)
        shape[axis] *= 2
        buf = np.full(shape, np.nan, v.dtype)
        idx = [slice(None)] * v.ndim
        idx[axis] = slice(None, None, 2)
        buf[tuple(idx)] = v
        return buf[tuple(idx)]
    if layout == "reversed":  # negative stride along `axis`
        return np.flip(np.flip(v, axis).copy(), axis)
    if layout == "readonly":
        r = v.copy()
        r.flags.writeable = False
        return r
    raise ValueError(layout)


@st.composite
def batches(draw, *, dtype=None, min_count: int = 2, max_side: int = 4):
    """``(x, axis)``: ndim 2-5, any channel axis (drawn modulo ndim, sign included), values with
    a per-channel offset, in any of LAYOUTS; at least ``min_count`` values per channel."""
    dtype = draw(st.sampled_from(DTYPES)) if dtype is None else dtype
    ndim = draw(st.integers(2, 5))
    shape = draw(st.lists(st.integers(1, max_side), min_size=ndim, max_size=ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    a = axis % ndim
    count = int(np.prod(shape)) // shape[a]
    if count < min_count:
        other = (a + 1) % ndim
        shape[other] *= -(-min_count // count)
    shape = tuple(shape)
    width = 32 if dtype == np.float32 else 64
    values = draw(hnp.arrays(dtype, shape, elements=st.floats(-100, 100, width=width)))
    offsets = draw(hnp.arrays(dtype, shape[a], elements=st.floats(-1e3, 1e3, width=width)))
    bshape = [1] * ndim
    bshape[a] = shape[a]
    values = (values + offsets.reshape(bshape)).astype(dtype)
    layout = draw(st.sampled_from(LAYOUTS))
    perm = draw(st.permutations(range(ndim)))
    x = lay_out(values, layout, draw(st.integers(0, ndim - 1)), tuple(perm))
    return x, axis


def channel_vectors(draw, channels: int, dtype, *, low=-2.0, high=2.0):
    width = 32 if dtype == np.float32 else 64
    return draw(hnp.arrays(dtype, channels, elements=st.floats(low, high, width=width)))
