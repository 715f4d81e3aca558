"""Issue 8: nothing half-written. Aliasing between the arrays a call writes and reads, and
floating-point traps after a write. Each case names what it holds; each failed on the code
before the fix (accepted the call, or raised after writing)."""

from __future__ import annotations

import warnings

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
        out = buf[: 6 * C].reshape(6, C)
        return dict(x=_x(), running_mean=np.zeros(C), running_var=buf[6 * C - 1 :], out=out)

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
        return dict(
            x=_x(), running_mean=as_strided(np.zeros(1), (C,), (0,)), running_var=np.ones(C)
        )

    def out_self_overlapping():
        base = np.zeros(C)
        return dict(x=_x(), out=as_strided(base, (6, C), (0, 8)))

    def out_is_gamma_memory():
        out = np.zeros((6, C))
        return dict(x=_x(), gamma=out[2], out=out)

    def inference_out_is_running_var():
        out = np.ones((6, C))
        return dict(x=_x(), training=False, running_mean=np.zeros(C), running_var=out[5], out=out)

    def inference_out_partly_x():
        buf = _x(shape=(7, C))
        return dict(
            x=buf[:6], training=False, running_mean=np.zeros(C), running_var=np.ones(C), out=buf[1:]
        )

    return [
        ("out is a row of running_mean", "share memory", out_is_running_mean_row),
        ("out partly overlaps running_var", "share memory", out_partly_running_var),
        ("running_mean is a row of x", "running_mean overlaps x", running_mean_is_x_row),
        ("running_var is a view of x", "running_var overlaps x", running_var_is_x_column_view),
        ("running_mean is gamma", "running_mean overlaps gamma", running_mean_is_gamma),
        ("running_var partly overlaps beta", "running_var overlaps beta", running_var_partly_beta),
        ("running arrays partly overlap", "share memory", running_mean_partly_running_var),
        (
            "running_mean self-overlapping",
            "running_mean has elements that share memory",
            running_mean_self_overlapping,
        ),
        ("out self-overlapping", "out has elements that share memory", out_self_overlapping),
        ("out holds gamma", "out overlaps gamma", out_is_gamma_memory),
        (
            "inference: out holds running_var",
            "out overlaps running_var",
            inference_out_is_running_var,
        ),
        ("inference: out partly overlaps x", "out partly overlaps x", inference_out_partly_x),
    ]


def _snapshot(kwargs):
    return {k: np.array(v, copy=True) for k, v in kwargs.items() if isinstance(v, np.ndarray)}


def _unchanged(kwargs, before, what):
    for k, want in before.items():
        np.testing.assert_array_equal(kwargs[k], want, err_msg=f"{what}: {k} was written")


@pytest.mark.parametrize(
    "name,words,make", _forward_aliasing_cases(), ids=[c[0] for c in _forward_aliasing_cases()]
)
def test_forward_refuses_aliasing_and_writes_nothing(name, words, make):
    kwargs = make()
    before = _snapshot(kwargs)
    with pytest.raises(ValueError, match=words):
        bnfast.forward(**kwargs)
    _unchanged(kwargs, before, name)


def _trainer_vectors():
    """gamma, beta, running_mean, running_var as a trainer passes them (x's dtype and shape)."""
    return [np.ones(C), np.zeros(C), np.zeros(C), np.ones(C)]


def _trainer_aliasing_cases():
    """Forward's arguments as a trainer passes them (gamma, beta and the running arrays all
    arrays of x's dtype and shape), the case ``_checks.taken_as_is`` admits in one test:
    each aliases two of them in a way that test must not miss. (name, words in the message,
    a function of (x, gamma, beta, running_mean, running_var) returning the five to pass)."""
    return [
        (
            "gamma is running_mean",
            "running_mean overlaps gamma",
            lambda x, g, b, m, v: (x, m, b, m, v),
        ),
        (
            "beta views running_var",
            "running_var overlaps beta",
            lambda x, g, b, m, v: (x, g, v[:], m, v),
        ),
        ("running arrays are one", "share memory", lambda x, g, b, m, v: (x, g, b, m, m)),
        (
            "running_var is a row of x",
            "running_var overlaps x",
            lambda x, g, b, m, v: (x, g, b, m, x[1]),
        ),
        (
            "running_mean views gamma",
            "running_mean overlaps gamma",
            lambda x, g, b, m, v: (x, g, b, g[::-1], v),
        ),
    ]


@pytest.mark.parametrize(
    "name,words,alias", _trainer_aliasing_cases(), ids=[c[0] for c in _trainer_aliasing_cases()]
)
def test_trainer_shaped_call_refuses_aliasing(name, words, alias):
    x, g, b, rm, rv = alias(_x(), *_trainer_vectors())
    # the plain call admitted first (the fast test then has a plan and a valid call behind it)
    g0, b0, _, _ = _trainer_vectors()
    bnfast.forward(_x(1), g0, b0, running_mean=np.zeros(C), running_var=np.ones(C))
    kwargs = dict(x=x, gamma=g, beta=b, running_mean=rm, running_var=rv)
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
        "out self-overlapping": (
            dict(out=as_strided(np.zeros(4), (6, C, 4), (0, 0, 8))),
            "out has elements that share memory",
        ),
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
    y, _ = bnfast.forward(
        x, training=False, running_mean=np.zeros(C), running_var=np.ones(C), out=x
    )
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
    for a, b in zip(*results, strict=True):
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


@pytest.mark.parametrize(
    "shape,strides",
    [
        ((2, 3), (24, 16)),
        ((2, 3), (16, 24)),
        ((3, 3), (8, 16)),
        ((4,), (4,)),
        ((2, 2), (16, 8)),
        ((3, 2, 2), (8, 48, 24)),
        ((5,), (0,)),
        ((1, 4), (0, 8)),
    ],
)
def test_self_overlap_detection_against_brute_force(shape, strides):
    """Every element's byte range, compared pairwise: the ground truth for _checks."""
    from bnfast import _checks

    a = as_strided(np.zeros(64), shape, strides)
    starts = [sum(i * s for i, s in zip(idx, strides, strict=True)) for idx in np.ndindex(shape)]
    truth = any(abs(p - q) < a.itemsize for k, p in enumerate(starts) for q in starts[k + 1 :])
    assert _checks.self_overlapping(a) == truth, (shape, strides)


# Item 4: the frozen (inference) backward must not read x for dx.


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize(
    "shape,axis,layout",
    [((6, 3), 1, "C"), ((2, 3, 70), 1, "C"), ((2, 4, 4, 3), -1, "C"), ((6, 3), 1, "F")],
)
def test_frozen_backward_dx_ignores_nonfinite_x(bad, shape, axis, layout):
    rng = np.random.default_rng(5)
    x = rng.normal(size=shape)
    x[(0,) * len(shape)] = bad
    x = np.asfortranarray(x) if layout == "F" else x
    c = shape[axis]
    g, rm, rv = rng.uniform(0.5, 2, c), rng.normal(size=c), rng.uniform(1, 2, c)
    dy = rng.normal(size=shape)
    _, cache = bnfast.forward(x, g, training=False, running_mean=rm, running_var=rv, axis=axis)
    dx, dgamma, dbeta = bnfast.backward(dy, cache)
    k = np.moveaxis(
        np.broadcast_to(
            g / np.sqrt(rv + 1e-5),
            shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :] + (c,),
        ),
        -1,
        axis,
    )
    np.testing.assert_allclose(dx, dy * k, rtol=1e-14)  # finite everywhere, inf entry included
    np.testing.assert_allclose(dbeta, ref.moments(dy, axis=axis)[0] * dy.size / c, rtol=1e-12)
    assert not np.isfinite(dgamma[0])  # dgamma does read x: sum(dy * xhat) over an inf


# Item 5: extreme float64 values: statistics right wherever the true ones are finite.


@pytest.mark.parametrize("scale", [1e150, 1e153, 1e154])
@pytest.mark.parametrize("shape,axis", [((64, 3), 1), ((4, 3, 80), 1), ((9, 5, 3), -1)])
def test_huge_float64_data_normalizes_as_its_scaled_copy(scale, shape, axis):
    """Batch norm is scale-invariant: y(x; eps) = y(x / s; eps / s**2). From s = 1e154 the
    shifted squares used to overflow (y was beta everywhere, and NaN from 1e155); here the
    variance (at most s**2 / 3) is still a float64."""
    rng = np.random.default_rng(6)
    z = rng.uniform(-1, 1, shape) + 0.5
    x = z * scale
    for layout in ("C", "F"):
        xl = np.asfortranarray(x) if layout == "F" else x
        rm, rv = np.zeros(shape[axis]), np.ones(shape[axis])
        y, cache = bnfast.forward(xl, axis=axis, running_mean=rm, running_var=rv)
        y_ref = ref.forward(z, axis=axis, eps=1e-5 / scale / scale)[0]
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12, err_msg=layout)
        mean, var = bnfast.moments(xl, axis=axis)
        mean_z, var_z = ref.moments(z, axis=axis)
        np.testing.assert_allclose(mean / scale, mean_z, rtol=1e-12)
        np.testing.assert_allclose(var / scale / scale, var_z, rtol=1e-12)
        np.testing.assert_allclose(rm / scale, 0.1 * mean_z, rtol=1e-12)


@pytest.mark.parametrize("scale", [1e155, 1e200, 1e307])
def test_float64_data_whose_variance_overflows(scale):
    """The true variance exceeds float64 (inf), the mean does not: mean exact, invstd 0, so
    every output is beta (it was NaN from 1e155; the mean was wrong)."""
    z = np.random.default_rng(13).uniform(-1, 1, (40, 2))
    x = z * scale
    mean, var = bnfast.moments(x)
    np.testing.assert_allclose(mean / scale, z.mean(axis=0), rtol=1e-12)
    assert np.all(var == np.inf)
    y, cache = bnfast.forward(x, beta=np.array([0.5, -2.0]))
    np.testing.assert_array_equal(y, np.broadcast_to([0.5, -2.0], x.shape))


def test_float64_values_whose_difference_overflows():
    """[1e308, -1e308, 5e307]: the first value as shift overflowed the differences (mean was
    -inf). The mean is finite (1.67e307); the variance truly exceeds float64 (6.9e615): inf."""
    x = np.array([[1e308], [-1e308], [5e307]])
    mean, var = bnfast.moments(x)
    want = np.mean(x / 2.0**1000) * 2.0**1000
    np.testing.assert_allclose(mean, [want], rtol=1e-15)
    assert var[0] == np.inf
    y, cache = bnfast.forward(x, beta=np.array([0.25]))
    np.testing.assert_allclose(cache.mean, [want], rtol=1e-15)
    np.testing.assert_array_equal(y, 0.25)  # invstd is 0: every output is beta


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("where", [0, 3])
def test_nonfinite_channel_gets_nan_statistics(dtype, bad, where):
    """The README's rule, first value or not: NaN mean and variance (an inf at a later
    position used to give mean inf), an all-NaN output, the other channels unaffected."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6, 3)).astype(dtype)
    x[where, 1] = bad
    mean, var = bnfast.moments(x)
    assert np.isnan(mean[1]) and np.isnan(var[1]) and np.all(np.isfinite(mean[[0, 2]]))
    y, cache = bnfast.forward(x)
    assert np.isnan(cache.mean[1]) and np.isnan(cache.invstd[1])
    assert np.all(np.isnan(y[:, 1])) and np.all(np.isfinite(y[:, [0, 2]]))


# Item 6: foreign array types.


def test_masked_arrays_are_refused_and_subclasses_normalized():
    x = np.random.default_rng(8).normal(size=(6, 3))
    masked = np.ma.masked_array(x, mask=np.zeros_like(x, bool))
    with pytest.raises(TypeError, match="x is a numpy.ma.MaskedArray"):
        bnfast.forward(masked)
    with pytest.raises(TypeError, match="MaskedArray"):
        bnfast.moments(masked)
    _, cache = bnfast.forward(x)
    with pytest.raises(TypeError, match="dy is a numpy.ma.MaskedArray"):
        bnfast.backward(masked, cache)
    out = np.ma.masked_array(np.zeros_like(x))
    with pytest.raises(TypeError, match="out must be a NumPy array"):
        bnfast.forward(x, out=out)
    with pytest.raises(TypeError, match="out must be a NumPy array"):
        bnfast.backward(x, cache, out=out)
    with pytest.raises(TypeError, match="gamma is a numpy.ma.MaskedArray"):
        bnfast.forward(x, np.ma.masked_array(np.ones(3)))
    assert np.all(out == 0)
    with warnings.catch_warnings():  # NumPy discourages np.matrix; users still have them
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        matrix = np.asmatrix(x)
    y_plain = bnfast.forward(x)[0]
    y_matrix = bnfast.forward(matrix)[0]
    assert type(y_matrix) is np.ndarray
    np.testing.assert_array_equal(y_matrix, y_plain)
    dx_matrix = bnfast.backward(matrix, cache)[0]
    np.testing.assert_array_equal(dx_matrix, bnfast.backward(x, cache)[0])


# Item 7: tensors that require grad.


def test_torch_parameters(torch):
    x = np.random.default_rng(9).normal(size=(6, 3)).astype(np.float32)
    module = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        module.weight.mul_(2.0)
        module.running_mean.add_(0.5)
    with pytest.raises(TypeError, match=r"gamma is a tensor that requires grad.*detach"):
        bnfast.forward(x, module.weight)
    bn = bnfast.BatchNorm(3)
    bn.load_state_dict(module.state_dict(keep_vars=True))  # Parameters, detached
    np.testing.assert_array_equal(bn.gamma, np.full(3, 2.0, np.float32))
    np.testing.assert_array_equal(bn.running_mean, np.full(3, 0.5, np.float32))


# Item 8: numbers and containers that used to give unnamed or wrong errors.


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(eps=10**400), ValueError, "eps is too large"),
        (dict(momentum=10**400), ValueError, "momentum is too large"),
        (dict(x=[[1.0, 2.0], [3.0]]), ValueError, "x cannot be converted"),
    ],
)
def test_huge_ints_and_ragged_input_name_the_argument(kwargs, exc, words):
    args = {"x": np.random.default_rng(10).normal(size=(4, 2)), **kwargs}
    with pytest.raises(exc, match=words):
        bnfast.forward(**args)


def test_layer_construction_and_state_errors_name_the_problem():
    with pytest.raises(ValueError, match="num_features must be between 1 and"):
        bnfast.BatchNorm(2**70)
    bn = bnfast.BatchNorm(3)
    for bad in (None, ["weight", "bias"]):
        with pytest.raises(TypeError, match="load_state_dict takes a mapping"):
            bn.load_state_dict(bad)
    for bad in ("False", 0, None):
        with pytest.raises(TypeError, match="mode must be True or False"):
            bn.train(bad)
        with pytest.raises(ValueError):  # PyTorch's exception type, too
            bn.train(bad)
    assert bn.training is True


# Item 9: zero-size batches follow PyTorch.


@pytest.mark.parametrize("shape,axis", [((0, 5, 9), 1), ((0, 5), 1), ((3, 0, 4, 5), -1)])
def test_zero_size_training_batch(shape, axis):
    c = shape[axis]
    rm, rv = np.full(c, 0.5), np.full(c, 2.0)
    x = np.empty(shape)
    y, cache = bnfast.forward(x, axis=axis, running_mean=rm, running_var=rv)
    assert y.shape == shape and y.dtype == x.dtype
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)
    dx, dgamma, dbeta = bnfast.backward(np.empty(shape), cache)
    assert dx.shape == shape
    np.testing.assert_array_equal(dgamma, np.zeros(c))
    np.testing.assert_array_equal(dbeta, np.zeros(c))
    bn = bnfast.BatchNorm(c, axis=axis, dtype=np.float64)
    bn(x)
    bn.backward(np.empty(shape))
    assert bn.num_batches_tracked == 1  # PyTorch counts the batch
    np.testing.assert_array_equal(bn.running_mean, 0.0)


def test_zero_size_batch_matches_pytorch(torch):
    module = torch.nn.BatchNorm1d(5)
    xt = torch.empty(0, 5, 9, requires_grad=True)
    yt = module(xt)
    yt.sum().backward()
    bn = bnfast.BatchNorm(5)
    y = bn(np.empty((0, 5, 9), np.float32))
    bn.backward(np.empty((0, 5, 9), np.float32))
    assert y.shape == tuple(yt.shape) and bn.num_batches_tracked == int(module.num_batches_tracked)
    np.testing.assert_array_equal(bn.dgamma, module.weight.grad.numpy())
    np.testing.assert_array_equal(bn.running_var, module.running_var.numpy())


# Item 10: eps=0 is PyTorch's rule: accepted in eval, refused while training.


def test_eps_zero_in_eval_mode():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(6, 3))
    rm, rv = rng.normal(size=3), rng.uniform(1, 2, 3)
    y, _ = bnfast.forward(x, training=False, running_mean=rm, running_var=rv, eps=0.0)
    np.testing.assert_allclose(y, (x - rm) / np.sqrt(rv), rtol=1e-14)
    with pytest.raises(ValueError, match="eps must be finite and > 0 while training"):
        bnfast.forward(x, eps=0.0)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        bnfast.forward(x, training=False, running_mean=rm, running_var=rv, eps=-1e-5)
    bn = bnfast.BatchNorm(3, eps=0.0, dtype=np.float64).eval()
    bn.load_state_dict(
        {
            "weight": np.ones(3),
            "bias": np.zeros(3),
            "running_mean": rm,
            "running_var": rv,
            "num_batches_tracked": np.array(3),
        }
    )
    np.testing.assert_allclose(bn(x), (x - rm) / np.sqrt(rv), rtol=1e-14)
    with pytest.raises(ValueError, match="eps"):
        bn.train()(x)


# Item 12: every kernel's extra memory is a small fraction of x.


@pytest.mark.parametrize(
    "shape,axis",
    [
        ((2, 2_000_000), 1),
        ((32, 100_000), 1),
        ((2_000_000, 2), 1),
        ((4096, 1024), 1),
        ((2, 3, 700_000), 1),
        ((64, 28, 28, 96), -1),
        ((8, 16, 40, 40), 1),
        ((2, 8192, 7, 7), 1),  # the rows family's shortest rows (ROWS_MIN), many channels
    ],
)
def test_extra_memory_of_every_operation_is_bounded(shape, axis):
    """Traced peak during a call, minus what it returns as arrays (y or dx, dgamma and dbeta):
    at most x/4 + 1 MiB, the statistics a training cache keeps included (Reliability III item
    7: the (8, C) float64 block used to be kept beyond the bound, +128 MB for float32 (2, 2e6)
    where x is 16 MB). Two documented exceptions, each 16 bytes per channel: ``moments`` holds
    its float64 results before rounding them, and the frozen-statistics backward the running
    statistics in float64. (2, 2e6) used to take +168 MB in forward and +107 MB in backward:
    per-lane partials."""
    import tracemalloc

    x = np.random.default_rng(12).normal(size=shape).astype(np.float32)
    dy = np.ones_like(x)
    c = shape[axis]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    bound = x.nbytes // 4 + 2**20
    layer = bnfast.BatchNorm(c, axis=axis, activation="relu")
    layer(x)  # the layer's planned path from the second call on

    def step():
        layer(x)
        return layer.backward(dy)

    calls = {
        "forward": lambda: bnfast.forward(x, axis=axis, running_mean=rm, running_var=rv),
        "forward relu": lambda: bnfast.forward(x, axis=axis, activation="relu"),
        "inference": lambda: bnfast.forward(
            x, axis=axis, training=False, running_mean=rm, running_var=rv
        ),
        "layer step": step,
    }
    _, train_cache = bnfast.forward(x, axis=axis)
    _, eval_cache = calls["inference"]()
    calls["backward"] = lambda: bnfast.backward(dy, train_cache)
    calls["frozen backward"] = lambda: bnfast.backward(dy, eval_cache)
    calls["backward_from_input"] = lambda: bnfast.backward_from_input(dy, x, axis=axis)
    calls["moments"] = lambda: bnfast.moments(x, axis=axis)
    for name, call in calls.items():
        call()  # warm
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            result = call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        arrays = [
            a
            for a in (result if isinstance(result, tuple) else (result,))
            if isinstance(a, np.ndarray)
        ]
        extra = peak - before - sum(a.nbytes for a in arrays)
        if name in ("moments", "frozen backward"):
            extra -= 16 * c
        assert extra <= bound, (
            f"{name} {shape}: {extra / 1e6:.1f} MB beyond its outputs, "
            f"bound {bound / 1e6:.1f} MB (x is {x.nbytes / 1e6:.1f} MB)"
        )


def test_short_batches_of_many_channels_keep_no_statistics_and_backward_is_unchanged():
    """A training cache of float32 (2, 2e6) keeps no statistics (16 bytes per channel would
    exceed x/8), so backward takes them again from x. Its y, dx, dgamma, dbeta and statistics
    equal, bit for bit, those of 1000 of its channels run alone (a cache that keeps them):
    backward took them again with the forward's own arithmetic. Both match the float64
    reference."""
    rng = np.random.default_rng(5)
    x = rng.normal(3.0, 2.0, size=(2, 2_000_000)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    gamma = rng.normal(1.0, 0.5, size=x.shape[1]).astype(np.float32)
    beta = rng.normal(0.0, 0.5, size=x.shape[1]).astype(np.float32)
    y, cache = bnfast.forward(x, gamma, beta, activation="relu")
    assert cache.stats.shape == (2, 0)
    dx, dgamma, dbeta = bnfast.backward(dy, cache)
    part = slice(123_000, 124_000)
    xs, dys = np.ascontiguousarray(x[:, part]), np.ascontiguousarray(dy[:, part])
    ys, small = bnfast.forward(xs, gamma[part], beta[part], activation="relu")
    assert small.stats.shape == (2, 1000)
    dxs, dgs, dbs = bnfast.backward(dys, small)
    for got, want in [
        (y[:, part], ys),
        (dx[:, part], dxs),
        (dgamma[part], dgs),
        (dbeta[part], dbs),
        (cache.mean[part], small.mean),
        (cache.invstd[part], small.invstd),
    ]:
        np.testing.assert_array_equal(got, want)
    y64, c64 = ref.forward(xs.astype(np.float64), gamma[part], beta[part], activation="relu")
    want = (y64, *ref.backward(dys.astype(np.float64), c64))
    for got, exact in zip((ys, dxs, dgs, dbs), want, strict=True):
        np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-6)


def test_rescue_where_the_cache_keeps_no_statistics():
    """Float64 (4, 40000) keeps no statistics (4 values per channel), but a channel whose sums
    overflow (values near 1e154) and one holding inf need the rescue, which needs the first
    pass's statistics: the forward runs again for them, and the cache then keeps the rescued
    statistics (backward cannot take them again). Every output, the running averages (each
    channel's updated once) and the gradients equal those of the same channels run alone,
    where the cache keeps its statistics, bit for bit; the rescued channel matches the scaled
    reference, and the channel holding inf is NaN throughout."""
    rng = np.random.default_rng(17)
    x = rng.normal(size=(4, 40_000))
    z = rng.uniform(-1, 1, 4)
    x[:, 7] = z * 1e154
    x[2, 11] = np.inf
    dy = rng.normal(size=x.shape)
    rm, rv = np.zeros(40_000), np.ones(40_000)
    y, cache = bnfast.forward(x, running_mean=rm, running_var=rv, activation="relu")
    assert cache.stats.shape == (2, 40_000)
    dx, dgamma, dbeta = bnfast.backward(dy, cache)
    cols = slice(0, 1000)  # (wide rows: the same lane layout as the whole array's)
    xs, dys = np.ascontiguousarray(x[:, cols]), np.ascontiguousarray(dy[:, cols])
    rms, rvs = np.zeros(1000), np.ones(1000)
    ys, small = bnfast.forward(xs, running_mean=rms, running_var=rvs, activation="relu")
    dxs, dgs, dbs = bnfast.backward(dys, small)
    for got, want in [
        (y[:, cols], ys),
        (rm[cols], rms),
        (rv[cols], rvs),
        (dx[:, cols], dxs),
        (dgamma[cols], dgs),
        (dbeta[cols], dbs),
        (cache.mean[cols], small.mean),
    ]:
        np.testing.assert_array_equal(got, want)
    y_ref = ref.forward(z[:, None], eps=1e-5 / 1e154**2, activation="relu")[0][:, 0]
    np.testing.assert_allclose(y[:, 7], y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm[7] / 1e154, 0.1 * z.mean(), rtol=1e-12)
    assert np.isnan(rm[11]) and np.all(np.isnan(y[:, 11]))
