"""Every variant of the family x every route of both kernel families x both dtypes, at sizes
that run the parallel kernels (above this machine's serial threshold), against the float64
reference: forward, running statistics, backward (training and frozen), the cache-free
backward. The variants come from the shared registry (``bnfast._compare.VARIANTS``); the
routes from this machine's tuning vector (the same rules the kernels partition by)."""

from __future__ import annotations

import numpy as np
import pytest
from test_parallel import _parallel_size, _two_pass_rows

import bnfast
from bnfast import _compare as cmp
from bnfast import _threading
from bnfast import reference as ref
from conftest import (
    assert_channels_close,
    assert_close_to_bound,
    backward_bounds,
    describe,
    forward_bound,
    forward_tolerance,
)

ROUTES = {
    "lanes fused": (_parallel_size((64, 256), 1), 1, "C"),
    "lanes two-pass": ((_two_pass_rows(256) // 4 * 4, 256), 1, "C"),
    "lanes narrow rows (NHWC C=3)": (_parallel_size((4, 60, 60, 3), -1), -1, "C"),
    "rows fused (NCHW)": (_parallel_size((4, 8, 48, 50), 1), 1, "C"),
    "rows memory order (C < 4)": (_parallel_size((4, 3, 40000), 1), 1, "C"),
    "copied (sliced view)": (_parallel_size((64, 512), 1), 1, "sliced"),
}


def _data(shape, axis, layout, dtype):
    rng = np.random.default_rng(5)
    full = list(shape)
    if layout == "sliced":
        full[axis] *= 2
    x = rng.normal(0.7, 2.0, full).astype(dtype)
    dy = rng.normal(size=full).astype(dtype)
    if layout == "sliced":
        index = [slice(None)] * len(full)
        index[axis] = slice(None, None, 2)
        x, dy = x[tuple(index)], dy[tuple(index)]
    c = x.shape[axis]
    g = np.linspace(0.5, 1.5, c).astype(dtype)
    b = np.linspace(-0.5, 0.5, c).astype(dtype)
    return x, dy, g, b


def _check_backward(got, want, x, dy, axis, cache_ref, scale, what):
    for name, a, w, t in zip(
        ("dx", "dgamma", "dbeta"), got, want, backward_bounds(x, dy, axis, cache_ref), strict=True
    ):
        assert a.dtype == x.dtype
        assert_close_to_bound(a, w, scale * t, axis, f"{what} {name}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("variant", list(cmp.VARIANTS))
@pytest.mark.parametrize("route", list(ROUTES))
def test_variant_on_every_route(route, variant, dtype):
    shape, axis, layout = ROUTES[route]
    x, dy, g, b = _data(shape, axis, layout, dtype)
    assert x.nbytes >= _threading.SERIAL_BELOW  # the parallel kernels run
    kwargs = cmp.variant_kwargs(variant, x.shape[0])
    c = x.shape[axis]
    rm, rv = np.linspace(-0.5, 0.5, c), np.linspace(1.0, 4.0, c)
    rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
    what = describe(x, axis, f"{route} {variant}")
    y, cache = bnfast.forward(x, g, b, axis=axis, running_mean=rm1, running_var=rv1, **kwargs)
    y_ref, cache_ref = ref.forward(x, g, b, axis=axis, running_mean=rm2, running_var=rv2, **kwargs)
    rn = kwargs.get("renorm", (1.0, 0.0))
    scale = 4 * rn[0] * (1 + rn[1])
    bound = scale * forward_bound(x, axis, cache_ref)  # each virtual batch by its own statistics
    assert y.dtype == x.dtype
    assert_close_to_bound(y, y_ref, bound, axis, f"{what} y")
    np.testing.assert_allclose(rm1, rm2, rtol=1e-10, atol=1e-12, err_msg=what)
    np.testing.assert_allclose(rv1, rv2, rtol=1e-10, atol=1e-12, err_msg=what)
    if kwargs.get("activation") == "relu":  # the mask where the output's sign is undetermined
        dy = np.where(np.abs(y_ref) <= bound, 0, dy).astype(x.dtype)
    got, want = bnfast.backward(dy, cache), ref.backward(dy, cache_ref)
    _check_backward(got, want, x, dy, axis, cache_ref, scale, what + " training")
    # inference and its frozen gradient, with the variant's activation
    act = kwargs.get("activation")
    y, cache = bnfast.forward(
        x, g, b, axis=axis, training=False, running_mean=rm, running_var=rv, activation=act
    )
    y_ref, cache_ref = ref.forward(
        x, g, b, axis=axis, training=False, running_mean=rm, running_var=rv, activation=act
    )
    assert_channels_close(y, y_ref, 4 * forward_tolerance(x, axis, cache_ref), axis, what)
    if act is None:  # (with ReLU: the mask near 0 as above; the training case covers it)
        got, want = bnfast.backward(dy, cache), ref.backward(dy, cache_ref)
        _check_backward(got, want, x, dy, axis, cache_ref, 4, what + " frozen")
    if variant == "plain":
        got = bnfast.backward_from_input(dy, x, g, axis=axis)
        want = ref.backward_from_input(dy, x, g, axis=axis)
        _, c0 = ref.forward(x, g, axis=axis)
        _check_backward(got, want, x, dy, axis, c0, 4, what + " backward_from_input")
