"""Issue 8: nothing half-written. Aliasing between the arrays a call writes and reads, and
floating-point traps after a write. Each case names what it holds; each failed on the code
before the fix (accepted the call, or raised after writing)."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

import bnfast
from bnfast import reference as ref

C = 3


def _x(seed=0, shape=(6, C)):
    return np.random.default_rng(seed).normal(2.0, 1.5, shape)


def _forward_aliasing_cases():
    """(name, words in the message, factory returning forward's kwargs)."""
    def out_is_running_mean_row():
        out = np.zeros((6, C))
        return dict(x=_x(), running_mean=out[0], running_var=np.ones(C), out=out)

    def out_partly_running_var():
        buf = np.zeros(6 * C + 2)
        out = buf[:6 * C].reshape(6, C)
        return dict(x=_x(), running_mean=np.zeros(C), running_var=buf[6 * C - 1:], out=out)

    def running_mean_is_x_row():  # issue 8 item 2
        x = _x()
        return dict(x=x, running_mean=x[0], running_var=np.ones(C))

    def running_var_is_x_column_view():
        x = _x(shape=(C, 6)).T  # x[:, 0] of the transposed view is contiguous in memory
        return dict(x=x, running_mean=np.zeros(C), running_var=x.T[0, :C])

    def running_mean_is_gamma():
        g = np.ones(C)
        return dict(x=_x(), gamma=g, running_mean=g, running_var=np.ones(C))

    def running_var_partly_beta():
        buf = np.zeros(C + 1)
        return dict(x=_x(), beta=buf[:C], running_mean=np.zeros(C), running_var=buf[1:])

    def running_mean_partly_running_var():
        buf = np.zeros(C + 2)
        return dict(x=_x(), running_mean=buf[:C], running_var=buf[2:])

    def running_mean_self_overlapping():
        return dict(x=_x(), running_mean=as_strided(np.zeros(1), (C,), (0,)),
                    running_var=np.ones(C))

    def out_self_overlapping():
        base = np.zeros(C)
        return dict(x=_x(), out=as_strided(base, (6, C), (0, 8)))

    def out_is_gamma_memory():
        out = np.zeros((6, C))
        return dict(x=_x(), gamma=out[2], out=out)

    def inference_out_is_running_var():
        out = np.ones((6, C))
        return dict(x=_x(), training=False, running_mean=np.zeros(C), running_var=out[5],
                    out=out)

    def inference_out_partly_x():
        buf = _x(shape=(7, C))
        return dict(x=buf[:6], training=False, running_mean=np.zeros(C),
                    running_var=np.ones(C), out=buf[1:])

    return [
        ("out is a row of running_mean", "share memory", out_is_running_mean_row),
        ("out partly overlaps running_var", "share memory", out_partly_running_var),
        ("running_mean is a row of x", "running_mean overlaps x", running_mean_is_x_row),
        ("running_var is a view of x", "running_var overlaps x", running_var_is_x_column_view),
        ("running_mean is gamma", "running_mean overlaps gamma", running_mean_is_gamma),
        ("running_var partly overlaps beta", "running_var overlaps beta", running_var_partly_beta),
        ("running arrays partly overlap", "share memory", running_mean_partly_running_var),
        ("running_mean self-overlapping", "running_mean has elements that share memory",
         running_mean_self_overlapping),
        ("out self-overlapping", "out has elements that share memory", out_self_overlapping),
        ("out holds gamma", "out overlaps gamma", out_is_gamma_memory),
        ("inference: out holds running_var", "out overlaps running_var",
         inference_out_is_running_var),
        ("inference: out partly overlaps x", "out partly overlaps x", inference_out_partly_x),
    ]


def _snapshot(kwargs):
    return {k: np.array(v, copy=True) for k, v in kwargs.items() if isinstance(v, np.ndarray)}


def _unchanged(kwargs, before, what):
    for k, want in before.items():
        np.testing.assert_array_equal(kwargs[k], want, err_msg=f"{what}: {k} was written")


@pytest.mark.parametrize("name,words,make", _forward_aliasing_cases(),
                         ids=[c[0] for c in _forward_aliasing_cases()])
def test_forward_refuses_aliasing_and_writes_nothing(name, words, make):
    kwargs = make()
    before = _snapshot(kwargs)
    with pytest.raises(ValueError, match=words):
        bnfast.forward(**kwargs)
    _unchanged(kwargs, before, name)


def test_backward_refuses_aliasing_and_writes_nothing():
    x = _x(shape=(6, C, 4))
    dy = _x(1, shape=(6, C, 4))
    _, cache = bnfast.forward(x)
    cases = {
        "out is x": (dict(out=x), "out overlaps x"),
        "out partly dy": (None, "out partly overlaps dy"),
        "out self-overlapping": (dict(out=as_strided(np.zeros(4), (6, C, 4), (0, 0, 8))),
                                 "out has elements that share memory"),
    }
    for name, (kw, words) in cases.items():
        d = dy
        if kw is None:  # dy and out: two views of one buffer, shifted by one element
            buf = _x(2, shape=(6 * C * 4 + 1,))
            d, kw = buf[:-1].reshape(6, C, 4), dict(out=buf[1:].reshape(6, C, 4))
        before = _snapshot({"x": x, "dy": d, **kw})
        with pytest.raises(ValueError, match=words):
            bnfast.backward(d, cache, **kw)
        _unchanged({"x": x, "dy": d, **kw}, before, name)


def test_layer_refuses_its_gradients_aliasing_the_call():
    bn = bnfast.BatchNorm(C, dtype=np.float64)
    x = _x()
    bn(x)
    dy = _x(1)
    for name, kw, d in [("out holds dgamma", dict(out=None), dy), ("dy holds dbeta", {}, None)]:
        if d is None:  # dy's first row is the layer's dbeta
            d = dy.copy()
            bn.dbeta = d[0]
        else:
            out = np.zeros((6, C))
            bn.dgamma = out[3]
            kw = dict(out=out)
        before = _snapshot({"dy": d, "x": x, **kw})
        with pytest.raises(ValueError, match="share memory|overlaps"):
            bn.backward(d, **kw)
        _unchanged({"dy": d, "x": x, **kw}, before, name)


def test_layer_running_mean_aliasing_x_is_refused():
    bn = bnfast.BatchNorm(C, dtype=np.float64)
    x = _x()
    bn.running_mean = x[1]
    before = x.copy()
    with pytest.raises(ValueError, match="running_mean overlaps x"):
        bn(x)
    np.testing.assert_array_equal(x, before)
    assert bn.num_batches_tracked == 0


def test_allowed_in_place_calls_still_work():
    x = _x()
    want = ref.forward(x, training=False, running_mean=np.zeros(C), running_var=np.ones(C))[0]
    y, _ = bnfast.forward(x, training=False, running_mean=np.zeros(C), running_var=np.ones(C),
                          out=x)
    assert y is x
    np.testing.assert_allclose(x, want, rtol=1e-14)
    x = _x()
    _, cache = bnfast.forward(x)
    dy = _x(1)
    want = bnfast.backward(dy.copy(), cache)[0]
    assert bnfast.backward(dy, cache, out=dy)[0] is dy
    np.testing.assert_array_equal(dy, want)


# Item 3: a floating-point trap may not fire after the first write.

def test_errstate_raise_completes_the_call_with_narrow_running_arrays():
    """float32 x with std 1000 and float16 running arrays: the variance (~1e6) does not fit in
    float16. The update rounds to inf (IEEE, as PyTorch) instead of raising after out was
    written; everything equals the same call without the trap."""
    x = (np.random.default_rng(3).normal(0, 1000, (64, C))).astype(np.float32)
    results = []
    for trap in ("raise", "ignore"):
        rm, rv = np.zeros(C, np.float16), np.ones(C, np.float16)
        out = np.zeros_like(x)
        with np.errstate(all=trap):
            y, _ = bnfast.forward(x, running_mean=rm, running_var=rv, out=out)
        results.append((out.copy(), rm, rv))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    out, rm, rv = results[0]
    np.testing.assert_array_equal(out, bnfast.forward(x)[0])
    m, v = ref.moments(x.astype(np.float64))
    np.testing.assert_array_equal(rm, (0.1 * m).astype(np.float16))
    assert np.all(np.isinf(rv)) and np.all(0.9 + 0.1 * v * 64 / 63 > np.finfo(np.float16).max)


def test_errstate_raise_completes_backward_and_the_layer():
    """dgamma/dbeta beyond float32's range round to inf after dx was written: no exception."""
    x = np.random.default_rng(4).normal(size=(64, C)).astype(np.float32)
    dy = np.full_like(x, 3e38)
    _, cache = bnfast.forward(x)
    out = np.zeros_like(x)
    with np.errstate(all="raise"):
        dx, dgamma, dbeta = bnfast.backward(dy, cache, out=out)
    assert dx is out and np.all(np.isinf(dbeta))
    np.testing.assert_array_equal(out, bnfast.backward(dy, cache)[0])
    bn = bnfast.BatchNorm(C)
    bn.running_var = np.ones(C, np.float16)  # a narrower buffer, as a loaded state might have
    xs = (x * 1000).astype(np.float32)
    with np.errstate(all="raise"):
        bn(xs)
        bn.backward(dy)
    assert bn.num_batches_tracked == 1 and np.all(np.isinf(bn.running_var))
    assert np.all(np.isinf(bn.dbeta))


@pytest.mark.parametrize("shape,strides", [((2, 3), (24, 16)), ((2, 3), (16, 24)),
                                           ((3, 3), (8, 16)), ((4,), (4,)), ((2, 2), (16, 8)),
                                           ((3, 2, 2), (8, 48, 24)), ((5,), (0,)), ((1, 4), (0, 8))])
def test_self_overlap_detection_against_brute_force(shape, strides):
    """Every element's byte range, compared pairwise: the ground truth for _checks."""
    from bnfast import _checks

    a = as_strided(np.zeros(64), shape, strides)
    starts = [sum(i * s for i, s in zip(idx, strides)) for idx in np.ndindex(shape)]
    truth = any(abs(p - q) < a.itemsize for k, p in enumerate(starts) for q in starts[k + 1:])
    assert _checks.self_overlapping(a) == truth, (shape, strides)
