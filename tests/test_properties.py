"""Hypothesis property tests: bnfast against bnfast.reference over ndim 2-5, every axis, float32
and float64, training and inference, with and without gamma/beta/running arrays/out, in
contiguous, transposed, strided, negative-stride and read-only layouts."""

from __future__ import annotations

import numpy as np
from _strategies import batches, channel_vectors
from hypothesis import given
from hypothesis import strategies as st

import bnfast
from bnfast import reference as ref
from conftest import assert_channels_close, backward_tolerance, describe, forward_tolerance


@st.composite
def forward_args(draw, *, training: bool):
    x, axis = draw(batches())
    c = x.shape[axis]
    gamma = channel_vectors(draw, c, x.dtype) if draw(st.booleans()) else None
    beta = channel_vectors(draw, c, x.dtype) if draw(st.booleans()) else None
    running = training is False or draw(st.booleans())
    rdtype = draw(st.sampled_from([np.float32, np.float64])) if running else None
    rm = channel_vectors(draw, c, rdtype) if running else None
    rv = channel_vectors(draw, c, rdtype, low=0.0, high=5.0) if running else None
    momentum = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 1.0]))
    use_out = draw(st.booleans())
    return x, axis, gamma, beta, rm, rv, momentum, eps, use_out


def _check_forward(args, training):
    x, axis, gamma, beta, rm, rv, momentum, eps, use_out = args
    what = describe(x, axis, f"forward(training={training})")
    x_before = x.copy()
    rm_b, rv_b = (None, None) if rm is None else (rm.copy(), rv.copy())
    rm_r, rv_r = (None, None) if rm is None else (rm.copy(), rv.copy())
    out = np.full(x.shape, np.nan, x.dtype) if use_out else None
    y, cache = bnfast.forward(
        x,
        gamma,
        beta,
        axis=axis,
        training=training,
        running_mean=rm_b,
        running_var=rv_b,
        momentum=momentum,
        eps=eps,
        out=out,
    )
    y_ref, cache_ref = ref.forward(
        x,
        gamma,
        beta,
        axis=axis,
        training=training,
        running_mean=rm_r,
        running_var=rv_r,
        momentum=momentum,
        eps=eps,
    )
    if use_out:
        assert y is out, what
    np.testing.assert_array_equal(x, x_before, err_msg=f"{what}: x was mutated")
    assert_channels_close(y, y_ref, forward_tolerance(x, axis, cache_ref), axis, what + " y")
    m = x.size // x.shape[axis]
    tol_mean = (8 + m) * np.finfo(np.float64).eps * (np.abs(cache_ref["mean"]) + 1e-300)
    assert_channels_close(
        cache.mean,
        cache_ref["mean"],
        tol_mean + 8 * np.finfo(np.float64).eps * channels_absmax(x, axis),
        axis,
        what + " mean",
    )
    np.testing.assert_allclose(
        cache.invstd, cache_ref["invstd"], rtol=1e-9 + m * 1e-13, err_msg=what + " invstd"
    )
    if rm is not None:
        for name, got, want in (("running_mean", rm_b, rm_r), ("running_var", rv_b, rv_r)):
            assert got.dtype == want.dtype
            # one rounding to the running dtype, plus both sides' float64 summation error
            rtol = 4 * np.finfo(got.dtype).eps + 2 * (8 + m) * np.finfo(np.float64).eps
            np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-12, err_msg=f"{what} {name}")
            if not training:
                np.testing.assert_array_equal(
                    got,
                    rm if name == "running_mean" else rv,
                    err_msg=f"{what}: inference changed {name}",
                )


def channels_absmax(x, axis):
    return np.max(
        np.abs(np.moveaxis(x.astype(np.float64), axis, -1)).reshape(-1, x.shape[axis]), axis=0
    )


@given(forward_args(training=True))
def test_forward_training_matches_reference(args):
    _check_forward(args, True)


@given(forward_args(training=False))
def test_inference_matches_reference(args):
    _check_forward(args, False)


@given(
    forward_args(training=True), st.booleans(), st.sampled_from(["none", "new", "dy"]), st.data()
)
def test_backward_matches_reference(args, training, out_kind, data):
    x, axis, gamma, beta, rm, rv, momentum, eps, _ = args
    if not training and rm is None:
        rm, rv = np.zeros(x.shape[axis]), np.ones(x.shape[axis])
    what = describe(x, axis, f"backward(training={training}, out={out_kind})")
    _, cache = bnfast.forward(
        x,
        gamma,
        beta,
        axis=axis,
        training=training,
        running_mean=rm,
        running_var=rv,
        momentum=0.0,
        eps=eps,
    )
    _, cache_ref = ref.forward(
        x,
        gamma,
        beta,
        axis=axis,
        training=training,
        running_mean=None if training else rm,
        running_var=None if training else rv,
        eps=eps,
    )
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    dy = rng.normal(0.0, 1.0, x.shape).astype(x.dtype)
    dy_before = dy.copy()
    x_before = x.copy()
    out = {"none": None, "new": np.empty_like(dy), "dy": dy}[out_kind]
    want = ref.backward(dy_before, cache_ref)
    got = bnfast.backward(dy, cache, out=out)
    if out is not None:
        assert got[0] is out
    else:
        np.testing.assert_array_equal(dy, dy_before, err_msg=f"{what}: dy was mutated")
    np.testing.assert_array_equal(x, x_before, err_msg=f"{what}: x was mutated")
    tols = backward_tolerance(x, dy_before, axis, cache_ref)
    for name, g, w, t in zip(("dx", "dgamma", "dbeta"), got, want, tols, strict=True):
        assert_channels_close(g, w, t, axis, f"{what} {name}")


@given(batches(min_count=1))
def test_moments_matches_reference(xa):
    x, axis = xa
    what = describe(x, axis, "moments")
    mean, var = bnfast.moments(x, axis=axis)
    mean_r, var_r = ref.moments(x, axis=axis)
    m = x.size // x.shape[axis]
    eps = np.finfo(x.dtype).eps
    scale = channels_absmax(x, axis)
    # Both round once to x's dtype; the float64 sums differ by summation error (the
    # reference's pairwise sum of a constant channel of 24 values is 2.6 ulps off, bnfast's exact).
    f64_sum = (8 + m) * np.finfo(np.float64).eps * scale
    assert_channels_close(mean, mean_r, 2 * eps * scale + f64_sum + 1e-300, axis, what + " mean")
    assert_channels_close(
        var,
        var_r,
        4 * eps * np.abs(var_r.astype(np.float64)) + f64_sum * scale + 1e-300,
        axis,
        what + " var",
    )
