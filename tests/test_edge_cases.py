"""Deterministic edge cases: every memory layout, size-1 axes, extreme magnitudes, NaN/inf,
result dtypes, no mutation of inputs, no copy of contiguous input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from _strategies import LAYOUTS, lay_out

import bnfast
from bnfast import _checks
from bnfast import reference as ref
from conftest import assert_channels_close, backward_tolerance, describe, forward_tolerance

SHAPES = [
    ((7, 3), 0),
    ((7, 3), 1),
    ((4, 3, 5), -1),
    ((2, 3, 4, 5), 1),
    ((2, 4, 5, 3), 3),
    ((2, 3, 1, 4, 2), 1),
    ((1, 3, 1, 5), 1),
    ((6, 1, 4), 1),
    ((3, 2, 2, 2, 2), -3),
]


def _cases():
    for (shape, axis), layout, dtype in itertools.product(
        SHAPES, LAYOUTS + ("broadcast",), (np.float32, np.float64)
    ):
        yield pytest.param(
            shape, axis, layout, dtype, id=f"{shape}-{axis}-{layout}-{dtype.__name__}"
        )


def _make(shape, axis, layout, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if layout == "broadcast":  # stride 0 along the first non-channel axis
        a = axis % len(shape)
        b = 0 if a != 0 else 1
        small = list(shape)
        small[b] = 1
        v = rng.normal(5, 3, small).astype(dtype)
        return np.broadcast_to(v, shape)
    v = rng.normal(5, 3, shape).astype(dtype)
    return lay_out(v, layout, axis=(axis + 1) % len(shape), perm=tuple(rng.permutation(len(shape))))


@pytest.mark.parametrize("shape,axis,layout,dtype", list(_cases()))
def test_layouts_match_reference(shape, axis, layout, dtype):
    x = _make(shape, axis, layout, dtype)
    what = describe(x, axis, f"layout {layout}")
    x_before = np.array(x)
    rng = np.random.default_rng(1)
    c = shape[axis]
    g, b = rng.uniform(0.5, 2, c).astype(dtype), rng.normal(size=c).astype(dtype)
    rm, rv = rng.normal(size=c), rng.uniform(1, 2, c)
    for training in (True, False):
        if training and x.size // c < 2:
            continue
        y, cache = bnfast.forward(
            x, g, b, axis=axis, training=training, running_mean=rm.copy(), running_var=rv.copy()
        )
        y_ref, cache_ref = ref.forward(
            x, g, b, axis=axis, training=training, running_mean=rm.copy(), running_var=rv.copy()
        )
        assert y.dtype == x.dtype and y.shape == x.shape
        assert_channels_close(
            y, y_ref, forward_tolerance(x, axis, cache_ref), axis, f"{what} training={training} y"
        )
        dy = lay_out(rng.normal(size=shape).astype(dtype), "F")
        got, want = bnfast.backward(dy, cache), ref.backward(dy, cache_ref)
        for name, gg, w, t in zip(
            ("dx", "dgamma", "dbeta"),
            got,
            want,
            backward_tolerance(x, dy, axis, cache_ref),
            strict=True,
        ):
            assert gg.dtype == x.dtype, f"{what} {name} dtype"
            assert_channels_close(gg, w, t, axis, f"{what} training={training} {name}")
    np.testing.assert_array_equal(x, x_before, err_msg=f"{what}: x mutated")


@pytest.mark.parametrize(
    "shape,axis", [((8, 16), 1), ((4, 16, 5, 6), 1), ((4, 5, 6, 16), -1), ((2, 16, 3, 4, 5), 1)]
)
@pytest.mark.parametrize("layout", ["C", "permuted", "F"])
def test_contiguous_input_is_not_copied(shape, axis, layout):
    """Any dense layout maps to a (outer, C, inner) view of x's own memory."""
    x = lay_out(
        np.zeros(shape, np.float32),
        layout,
        perm=tuple(np.random.default_rng(2).permutation(len(shape))),
    )
    lay = _checks.Layout.of(x, axis % x.ndim)
    x3 = lay.view3(x)
    assert np.shares_memory(x3, x), describe(x, axis)
    assert x3.flags.c_contiguous, describe(x, axis)
    y, _ = bnfast.forward(x, axis=axis)
    assert lay.view3(y).flags.c_contiguous  # y laid out like x's canonical view


@pytest.mark.parametrize(
    "dtype,loc,scale",
    [
        (dt, loc, scale)
        for dt in (np.float32, np.float64)
        for loc, scale in [(1e4, 1e-2), (1e-30, 1e-31), (-1e6, 1.0), (0.0, 1e-20)]
    ]
    + [(np.float32, 1e15, 1e14), (np.float64, 1e140, 1e138)],
)  # var stays in range
def test_extreme_magnitudes(dtype, loc, scale):
    rng = np.random.default_rng(3)
    x = (loc + scale * rng.standard_normal((64, 3, 5))).astype(dtype)
    assert np.all(np.isfinite(x))
    y, cache = bnfast.forward(x, eps=1e-5)
    y_ref, cache_ref = ref.forward(x, eps=1e-5)
    assert_channels_close(y, y_ref, forward_tolerance(x, 1, cache_ref), 1, describe(x, 1))
    mean, var = bnfast.moments(x)
    mean_r, var_r = ref.moments(x)
    # float32: one rounding each from float64. float64: both sides' summation error over 320
    # values, and for var the shifted sums' cancellation factor (bounded by m; kernels/strided.py).
    np.testing.assert_allclose(
        mean,
        mean_r,
        rtol=2 * np.finfo(dtype).eps,
        atol=(8 + x.size // 3) * np.finfo(np.float64).eps * np.abs(x).max(),
    )
    var_rtol = (
        8 * np.finfo(np.float32).eps
        if dtype == np.float32
        else ((8 + x.size // 3) * np.finfo(np.float64).eps)
    )
    np.testing.assert_allclose(var, var_r, rtol=var_rtol, atol=np.finfo(dtype).tiny)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("first", [True, False])
def test_nonfinite_propagates_per_channel(dtype, bad, first):
    """A channel with NaN/inf gets NaN statistics and an all-NaN output; others unaffected."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 3, 4)).astype(dtype)
    x[0 if first else 3, 1, 0 if first else 2] = bad
    y, cache = bnfast.forward(x)
    assert np.isnan(cache.mean[1]) or np.isnan(cache.invstd[1])
    assert np.all(np.isnan(y[:, 1]))
    clean = np.delete(x, 1, axis=1)
    y_clean, _ = bnfast.forward(clean)
    np.testing.assert_array_equal(np.delete(y, 1, axis=1), y_clean)
    mean, var = bnfast.moments(x)
    assert np.isnan(var[1]) and np.all(np.isfinite(np.delete(var, 1)))


def test_zero_size_inference_and_channels():
    rm, rv = np.zeros(3), np.ones(3)
    y, cache = bnfast.forward(np.empty((0, 3)), training=False, running_mean=rm, running_var=rv)
    assert y.shape == (0, 3)
    dx, dg, db = bnfast.backward(np.empty((0, 3)), cache)
    assert dx.shape == (0, 3) and np.all(dg == 0) and np.all(db == 0)
    y, cache = bnfast.forward(np.empty((5, 0, 2), np.float32))
    assert y.shape == (5, 0, 2) and y.dtype == np.float32


def test_out_with_a_layout_that_has_no_3d_view():
    """out= whose non-channel axes cannot merge: written through a temporary, still correct."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 3, 5, 6))
    big = np.zeros((4, 3, 10, 6))
    out = big[:, :, ::2, :]
    y, _ = bnfast.forward(x, out=out)
    assert y is out
    np.testing.assert_allclose(out, ref.forward(x)[0], atol=1e-13)
    assert np.all(big[:, :, 1::2, :] == 0), "wrote outside out"


def test_out_is_x_in_inference():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 4))
    want = ref.forward(x, training=False, running_mean=np.ones(4), running_var=np.ones(4))[0]
    y, _ = bnfast.forward(x, training=False, running_mean=np.ones(4), running_var=np.ones(4), out=x)
    assert y is x
    np.testing.assert_allclose(x, want, rtol=1e-14)


def test_backward_out_is_dy():
    rng = np.random.default_rng(7)
    x, dy = rng.normal(size=(5, 4, 3)), rng.normal(size=(5, 4, 3))
    _, cache = bnfast.forward(x)
    want = bnfast.backward(dy.copy(), cache)[0]
    dx, _, _ = bnfast.backward(dy, cache, out=dy)
    assert dx is dy
    np.testing.assert_array_equal(dy, want)


@pytest.mark.parametrize("pdtype", [np.float16, np.float32, np.float64])
def test_parameters_used_in_x_precision(pdtype):
    """gamma/beta of another float dtype are rounded to x's dtype; running arrays keep theirs."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(10, 3)).astype(np.float32)
    g64 = rng.uniform(0.5, 1.5, 3)
    g = g64.astype(pdtype)
    rm, rv = np.zeros(3, pdtype), np.ones(3, pdtype)
    y, _ = bnfast.forward(x, g, running_mean=rm, running_var=rv)
    y32, _ = bnfast.forward(x, g.astype(np.float32))
    np.testing.assert_array_equal(y, y32)
    assert rm.dtype == pdtype and rv.dtype == pdtype
    m, v = ref.moments(x.astype(np.float64))
    rtol = 4 * np.finfo(pdtype).eps + 32 * np.finfo(np.float64).eps  # + float64 sums
    np.testing.assert_allclose(rm, (0.1 * m).astype(pdtype), rtol=rtol)
    np.testing.assert_allclose(rv, (0.9 + 0.1 * v * 10 / 9).astype(pdtype), rtol=rtol)


def _vector(values: np.ndarray, kind: str) -> np.ndarray:
    """``values`` as a 1-D array of another layout: every other element of a larger buffer,
    or a reversed view."""
    if kind == "strided":
        v = np.zeros(2 * values.size, values.dtype)[::2]
        v[...] = values
        return v
    return np.ascontiguousarray(values[::-1])[::-1]


@pytest.mark.parametrize("kind", ["strided", "reversed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape,axis",
    # small calls (planned kernels without dispatch), lanes and rows families beyond the serial
    # threshold (the parallel kernels through numba's dispatch), NHWC
    [((16, 24), 1), ((4, 6, 5, 5), 1), ((1024, 96), 1), ((8, 96, 30, 30), 1), ((8, 5, 5, 12), -1)],
)
def test_strided_vectors_give_the_contiguous_bits(shape, axis, dtype, kind):
    """gamma, beta and the running arrays of any 1-D layout give the bits of contiguous ones in
    every operation (the kernels take contiguous vectors: bnfast copies gamma and beta, and
    updates strided running arrays in place from contiguous copies), the running arrays are
    updated in place, and gamma and beta are left alone."""
    rng = np.random.default_rng(11)
    x = rng.normal(3, 2, shape).astype(dtype)
    dy = rng.normal(0, 1, shape).astype(dtype)
    c = shape[axis]
    g0, b0 = rng.uniform(0.5, 1.5, c).astype(dtype), rng.normal(0, 1, c).astype(dtype)
    m0, v0 = rng.normal(3, 1, c).astype(dtype), rng.uniform(2, 5, c).astype(dtype)

    def run(make):
        g, b, rm, rv = make(g0), make(b0), make(m0), make(v0)
        got = {}
        for name, kw in (("plain", {}), ("relu", {"activation": "relu"})):
            y, cache = bnfast.forward(x, g, b, axis=axis, running_mean=rm, running_var=rv, **kw)
            got[name] = (y, *bnfast.backward(dy, cache), rm.copy(), rv.copy())
        y, cache = bnfast.forward(
            x, g, b, axis=axis, running_mean=rm, running_var=rv, renorm=(2, 1)
        )
        got["renorm"] = (y, *bnfast.backward(dy, cache), rm.copy(), rv.copy())
        y, cache = bnfast.forward(
            x, g, b, axis=axis, training=False, running_mean=rm, running_var=rv
        )
        got["inference"] = (y, *bnfast.backward(dy, cache))
        if axis != 0:
            y, cache = bnfast.forward(
                x,
                g,
                b,
                axis=axis,
                running_mean=rm,
                running_var=rv,
                virtual_batch_size=shape[0] // 2,
            )
            got["ghost"] = (y, *bnfast.backward(dy, cache), rm.copy(), rv.copy())
        got["from input"] = bnfast.backward_from_input(dy, x, g, axis=axis)
        bn = bnfast.BatchNorm(c, axis=axis, dtype=dtype, activation="relu")
        bn.gamma, bn.beta, bn.running_mean, bn.running_var = make(g0), make(b0), make(m0), make(v0)
        for _ in range(2):  # (the second call may take a plan)
            y = bn(x)
            got["layer"] = (y, bn.backward(dy), bn.dgamma.copy(), bn.running_mean.copy())
        np.testing.assert_array_equal(g, g0)
        np.testing.assert_array_equal(b, b0)
        return got, rm

    want, _ = run(np.array)
    got, rm = run(lambda v: _vector(v, kind))
    assert not rm.flags.c_contiguous  # (the test's own arrays were strided)
    for name in want:
        for i, (a, b) in enumerate(zip(want[name], got[name], strict=True)):
            np.testing.assert_array_equal(b, a, err_msg=f"{name}, output {i}")


@pytest.mark.parametrize("layout", ["C", "F", "permuted", "strided", "reversed", "readonly"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((6, 5), 1), ((4, 5, 6), 1), ((3, 4, 5, 6), -1)])
def test_the_cache_keeps_a_view_exactly_when_there_is_one(shape, axis, dtype, layout):
    """``Layout.is_view`` (from strides and itemsize, memoized) agrees with ``view3``: the cache
    keeps x's canonical view when it is a view of x, and nothing when it would be a copy."""
    from _strategies import lay_out

    from bnfast import _checks as chk

    x = lay_out(np.random.default_rng(0).normal(size=shape).astype(dtype), layout, axis=0)
    layout3 = chk.Layout.of(x, axis % x.ndim)
    v = layout3.view3(x)
    assert v.flags.c_contiguous
    assert layout3.is_view(x) == np.may_share_memory(v, x), (shape, axis, layout, x.strides)
    cache = bnfast.forward(x, axis=axis)[1]
    assert (cache.view is not None) == layout3.is_view(x)
