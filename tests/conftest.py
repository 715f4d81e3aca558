"""Shared test helpers: tolerances derived from an error bound, array layouts, torch fixture."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    max_examples=60,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=1000)
settings.load_profile(os.environ.get("BNFAST_HYPOTHESIS_PROFILE", "default"))

DTYPES = (np.float32, np.float64)


def describe(x: np.ndarray, axis: int, fn: str = "") -> str:
    """Names what failed: function, dtype, shape, axis and memory order."""
    order = "C" if x.flags.c_contiguous else "F" if x.flags.f_contiguous else "strided"
    ro = "" if x.flags.writeable else " read-only"
    return f"{fn} {x.dtype} shape={x.shape} axis={axis} {order} strides={x.strides}{ro}"


def channels_last64(a: np.ndarray, axis: int) -> np.ndarray:
    a = np.moveaxis(np.asarray(a, np.float64), axis, -1)
    return a.reshape(-1, a.shape[-1])


def _slack(dtype, m: int, factor=1.0):
    """Error budget in units of the scale below: float32 results are rounded once from float64
    (a few float32 ulps). float64 results carry float64 error of both bnfast and the reference:
    summation, ~(8 + m) ulps for m values per channel, times the cancellation factor of
    bnfast's shifted variance (``_shift_factor``, 1 to about m: a channel whose first value is
    its extreme outlier). The budget ``(3 + factor) (8 + m)`` ulps keeps the former ``4 (8 + m)``
    where the factor is 1; CI's Hypothesis run found 1.8x that former budget at m = 48 with
    the factor 48 (one outlier, first, among zeros), and a scan of 20,000 such channels
    reached 1.79x: 0.14x of this budget."""
    if np.dtype(dtype) == np.float32:
        return 8 * np.finfo(np.float32).eps
    return (3 + factor) * (8 + m) * np.finfo(np.float64).eps


def _shift_factor(x, axis, cache):
    """Per channel, how much bnfast's shifted variance can amplify the float64 summation error:
    ``1 + (mean - k)**2 / (var + eps)``, k the channel's shift (its first value in the canonical
    view; the accuracy notes of ``kernels/lanes.py``), ``var + eps = 1 / invstd**2``."""
    from bnfast._checks import Layout

    v = Layout.of(x, axis % x.ndim).view3(x)
    if v.shape[0] * v.shape[2] == 0:
        return 1.0
    first = v[0, :, 0].astype(np.float64)
    return 1.0 + (np.asarray(cache["mean"]) - first) ** 2 * np.asarray(cache["invstd"]) ** 2


def forward_tolerance(x, axis, cache) -> np.ndarray:
    """Per-channel absolute tolerance for y, from the reference cache.

    ``y = gamma*((x - mean)*invstd*r + d) + beta`` (r = 1, d = 0 without renorm); an error of
    ``eps*max|x|`` in ``x - mean`` and the rounding of y scale with ``S_c =
    |gamma|*(invstd*(max|x_c| + |mean_c|) + |d_c|) + |beta_c|`` (r: the callers' renorm factor).
    Without the ``|d|`` term a constant channel under renorm had a bound of ~0 against y =
    gamma*d + beta, whose rounding is an ulp of |gamma*d| (Hypothesis, float64 zeros, d = -0.17,
    gamma 1.5: 5.6e-17 against 5.4e-305; the same bits at 02464cf).
    """
    z = channels_last64(x, axis)
    xmax = np.max(np.abs(z), axis=0, initial=0.0)
    d = np.abs(np.asarray(cache.get("d", 0.0)))
    s = np.abs(cache["gamma"]) * (cache["invstd"] * (xmax + np.abs(cache["mean"])) + d)
    beta = np.asarray(cache.get("beta", 0.0))
    slack = _slack(x.dtype, z.shape[0], _shift_factor(x, axis, cache))
    return slack * (s + np.abs(beta) + np.finfo(np.float64).tiny)


def backward_tolerance(x, dy, axis, cache):
    """Absolute tolerances ``(dx per channel, dgamma per channel, dbeta per channel)``."""
    z = channels_last64(x, axis)
    g = channels_last64(dy, axis)
    m = z.shape[0]
    invstd, gamma, mean = cache["invstd"], cache["gamma"], cache["mean"]
    spread = (np.max(np.abs(z), axis=0, initial=0.0) + np.abs(mean)) * invstd  # >= max|xhat|
    gmax = np.max(np.abs(g), axis=0, initial=0.0)
    slack = _slack(x.dtype, m, _shift_factor(x, axis, cache))
    tiny = np.finfo(np.float64).tiny
    dx = slack * np.abs(gamma) * invstd * gmax * (3 + 2 * spread**2) + tiny
    dgamma = slack * m * gmax * (1 + spread) + tiny
    dbeta = slack * m * gmax + tiny
    return dx, dgamma, dbeta


def assert_channels_close(got, want, atol_c, axis, what: str) -> None:
    """|got - want| <= atol of each element's channel; dtype must match want's."""
    got = np.asarray(got)
    assert got.dtype == np.asarray(want).dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == np.shape(want), f"{what}: shape {got.shape} != {np.shape(want)}"
    if got.ndim == 1:
        err = np.abs(got.astype(np.float64) - np.asarray(want, np.float64))
    else:
        err = np.abs(channels_last64(got, axis) - channels_last64(want, axis))
    bad = ~(err <= atol_c)
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {err.size} values off; worst error "
        f"{err.max():.3e} vs tolerance {np.broadcast_to(atol_c, err.shape)[bad].min():.3e}"
    )


def numeric_grad(f, a: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar ``f()`` with respect to ``a`` (changed in place
    and restored)."""
    grad = np.empty(a.shape)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        up = f()
        a[i] = old - h
        down = f()
        a[i] = old
        grad[i] = (up - down) / (2 * h)
    return grad


@pytest.fixture(autouse=True)
def _parallel_kernels_run():
    """Above the serial threshold the tests run the parallel kernels, not whichever of them and
    the serial twins ran faster lately (``bnfast._threading.ADAPTIVE``; its own test turns it
    on): what they check of the parallel code must run it."""
    from bnfast import _threading

    _threading.ADAPTIVE = False
    yield
    _threading.ADAPTIVE = True


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")


def _parts(x, dy, cache_ref):
    """``(rows, x part, dy part, cache)`` of each virtual batch of a reference cache along axis
    0 (the whole batch when there are none)."""
    if "parts" not in cache_ref:
        return [(slice(None), x, dy, cache_ref)]
    return [
        (slice(s, e), x[s:e], None if dy is None else dy[s:e], c) for s, e, c in cache_ref["parts"]
    ]


def forward_bound(x, axis, cache_ref) -> np.ndarray:
    """Per-element tolerance for y (x's shape): each virtual batch's rows bounded by its own
    statistics (a constant part has invstd 1/sqrt(eps): its bound is its own, not the batch's)."""
    shape_c = [1] * x.ndim
    shape_c[axis % x.ndim] = x.shape[axis]
    out = np.empty(x.shape)
    for rows, xp, _, c in _parts(x, None, cache_ref):
        out[rows] = forward_tolerance(xp, axis, c).reshape(shape_c)
    return out


def backward_bounds(x, dy, axis, cache_ref):
    """``(dx per element, dgamma per channel, dbeta per channel)`` tolerances: dx of each virtual
    batch by its own statistics, dgamma and dbeta as the sum of the parts' bounds (they are sums
    over the parts)."""
    shape_c = [1] * x.ndim
    shape_c[axis % x.ndim] = x.shape[axis]
    dx = np.empty(x.shape)
    dgamma = dbeta = 0.0
    for rows, xp, dyp, c in _parts(x, dy, cache_ref):
        tdx, tdg, tdb = backward_tolerance(xp, dyp, axis, c)
        dx[rows] = tdx.reshape(shape_c)
        dgamma, dbeta = dgamma + tdg, dbeta + tdb
    return dx, dgamma, dbeta


def assert_close_to_bound(got, want, bound, axis, what: str) -> None:
    """:func:`assert_channels_close` with a per-element bound of x's shape (or per channel)."""
    atol = bound if np.ndim(bound) == 1 else channels_last64(bound, axis)
    assert_channels_close(got, want, atol, axis, what)
