"""Issue 14 (Reliability III): corrupted state, wrong values, checkpoints, what a call returns,
validation holes. Each test names the item it holds; each failed on the code before the fix."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import bnfast
from bnfast import reference as ref

# --- Item 1: a zero-size batch with virtual batches leaves the running statistics alone.


@pytest.mark.parametrize("shape,k", [((8, 3, 0), 4), ((0, 3), 4), ((4, 3, 0, 2), 2)])
def test_zero_size_batch_with_virtual_batches_leaves_running_stats(shape, k):
    rm, rv = np.full(3, 0.25), np.full(3, 2.0)
    y, cache = bnfast.forward(np.ones(shape), running_mean=rm, running_var=rv, virtual_batch_size=k)
    assert y.shape == shape
    np.testing.assert_array_equal(rm, 0.25)
    np.testing.assert_array_equal(rv, 2.0)
    dx, dgamma, dbeta = bnfast.backward(np.ones(shape), cache)
    assert dx.shape == shape
    np.testing.assert_array_equal(dgamma, 0.0)
    np.testing.assert_array_equal(dbeta, 0.0)
    # a layer keeps finite statistics and then trains as the reference does
    bn = bnfast.BatchNorm(3, virtual_batch_size=k, dtype=np.float64)
    bn(np.ones(shape))
    assert bn.num_batches_tracked == 1  # PyTorch counts an empty batch
    x = np.random.default_rng(0).normal(1.0, 2.0, (8, 3))
    bn(x)
    rm2, rv2 = np.zeros(3), np.ones(3)
    ref.forward(x, running_mean=rm2, running_var=rv2, virtual_batch_size=k)
    np.testing.assert_allclose(bn.running_mean, rm2, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(bn.running_var, rv2, rtol=1e-12)


# --- Item 2: eps below ~1e-308 on a constant channel: dx finite (the float64 reference's).


def _tiny_eps_case():
    x = np.ones((4, 2))
    x[:, 1] = [1, 2, 3, 4]
    dy = np.arange(8.0).reshape(4, 2)
    return x, dy


@pytest.mark.parametrize("eps", [1e-310, 5e-324, 1e-300])
@pytest.mark.parametrize(
    "kwargs", [{}, dict(activation="relu"), dict(renorm=(3.0, 1.0)), dict(beta=np.ones(2))]
)
def test_tiny_eps_on_a_constant_channel_gives_finite_gradients(eps, kwargs):
    x, dy = _tiny_eps_case()
    kwargs = dict(kwargs)
    beta = kwargs.pop("beta", None)
    if "renorm" in kwargs:
        kwargs.update(running_mean=np.zeros(2), running_var=np.ones(2))
    rkw = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
    y, cache = bnfast.forward(x, None, beta, eps=eps, **kwargs)
    dx, dgamma, dbeta = bnfast.backward(dy, cache)
    y_ref, cache_ref = ref.forward(x, None, beta, eps=eps, **rkw)
    dx_ref, dgamma_ref, dbeta_ref = ref.backward(dy, cache_ref)
    assert np.isfinite(dx_ref).all()  # the independent float64 answer is finite
    for got, want, what in ((y, y_ref, "y"), (dx, dx_ref, "dx"), (dgamma, dgamma_ref, "dg")):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300, err_msg=f"{what} {kwargs}")
    np.testing.assert_array_equal(dbeta, dbeta_ref)
    if not kwargs:  # the cache-free backward and the layer take the same coefficients
        got = bnfast.backward_from_input(dy, x, eps=eps)
        for a, b in zip(got, (dx_ref, dgamma_ref, dbeta_ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-300)
        bn = bnfast.BatchNorm(2, eps=eps, dtype=np.float64)
        bn(x)
        np.testing.assert_allclose(bn.backward(dy), dx_ref, rtol=1e-12, atol=1e-300)


# --- Item 3: float32 dgamma/dbeta of virtual batches: float64 inside, one rounding.


def test_virtual_batch_parameter_gradients_are_rounded_once():
    rng = np.random.default_rng(3)
    x = rng.normal(0.5, 2.0, (4096, 96)).astype(np.float32)
    dy = rng.normal(0.0, 1.0, (4096, 96)).astype(np.float32)
    _, cache = bnfast.forward(x, virtual_batch_size=512)
    _, dgamma, dbeta = bnfast.backward(dy, cache)
    # exact: the float64 reference on the same (exactly widened) values, rounded once
    _, c64 = ref.forward(x.astype(np.float64), virtual_batch_size=512)
    _, dg64, db64 = ref.backward(dy.astype(np.float64), c64)
    for got, want, what in ((dgamma, dg64, "dgamma"), (dbeta, db64, "dbeta")):
        assert got.dtype == np.float32
        ulps = np.abs(got.astype(np.float64) - want) / np.spacing(want.astype(np.float32))
        assert ulps.max() <= 1.0, f"{what}: {ulps.max():.1f} float32 ulps from the exact sum"


# --- Item 4: renorm is a tuple or list of two real numbers, or an array of shape (2,).


@pytest.mark.parametrize(
    "renorm,exc",
    [
        ({3.0, 1.0}, TypeError),
        ({3.0: 1.0, 2.0: 0.5}, TypeError),
        ("31", TypeError),
        (3.0, TypeError),
        ((3.0,), ValueError),
        ((3.0, 1.0, 0.0), ValueError),
        (np.array([3.0, 1.0, 0.0]), ValueError),
        (np.array([[3.0, 1.0]]), ValueError),
        ((0.5, 1.0), ValueError),
        ((3.0, "1"), TypeError),
    ],
    ids=str,
)
def test_renorm_is_refused_unless_a_pair_of_reals(renorm, exc):
    rm, rv = np.zeros(3), np.ones(3)
    x = np.random.default_rng(0).normal(size=(8, 3))
    with pytest.raises(exc, match="renorm"):
        bnfast.forward(x, running_mean=rm, running_var=rv, renorm=renorm)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)
    with pytest.raises(exc, match="renorm"):
        bnfast.BatchNorm(3, renorm=renorm)


@pytest.mark.parametrize("renorm", [[3.0, 1.0], np.array([3.0, 1.0]), (np.float32(3), 1)])
def test_renorm_pairs_are_read_in_order(renorm):
    x = np.random.default_rng(0).normal(2.0, 3.0, (8, 3))
    want = bnfast.forward(x, running_mean=np.zeros(3), running_var=np.ones(3), renorm=(3.0, 1.0))
    got = bnfast.forward(x, running_mean=np.zeros(3), running_var=np.ones(3), renorm=renorm)
    np.testing.assert_array_equal(got[0], want[0])
    bn = bnfast.BatchNorm(3, renorm=renorm)
    assert bn.renorm == (3.0, 1.0) and all(type(v) is float for v in bn.renorm)


# --- Item 5: caches and layers holding one pickle and deep-copy; backward gives the same bits.


@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(activation="relu"), dict(virtual_batch_size=4), dict(training=False)],
    ids=str,
)
@pytest.mark.parametrize("shape,axis", [((16, 5), 1), ((4, 5, 3, 3), 1), ((4, 3, 3, 5), -1)])
def test_cache_pickles_and_deep_copies(kwargs, shape, axis):
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    kw = dict(kwargs)
    if kw.get("training") is False:
        kw.update(running_mean=np.zeros(5), running_var=np.ones(5))
    _, cache = bnfast.forward(x, axis=axis, **kw)
    want = bnfast.backward(dy, cache)
    for clone in (pickle.loads(pickle.dumps(cache)), copy.deepcopy(cache), copy.copy(cache)):
        assert isinstance(clone, bnfast.BatchNormCache)
        for a, b in zip(bnfast.backward(dy, clone), want, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs", [{}, dict(activation="relu", reuse_buffers=True)], ids=str)
def test_layer_with_a_cache_pickles_and_deep_copies(kwargs):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(32, 6)).astype(np.float32)
    dy = rng.normal(size=(32, 6)).astype(np.float32)
    bn = bnfast.BatchNorm(6, **kwargs)
    bn(x)
    clones = [pickle.loads(pickle.dumps(bn)), copy.deepcopy(bn)]
    want = bn.backward(dy).copy()
    for clone in clones:
        np.testing.assert_array_equal(clone.backward(dy), want)
        np.testing.assert_array_equal(clone.dgamma, bn.dgamma)
        assert clone.gamma is clone.params()["gamma"]
        clone.gamma += 1.0  # the clone's arrays are its own
        assert not np.array_equal(clone.gamma, bn.gamma)
        want_y = bnfast.forward(x, clone.gamma, clone.beta, activation=clone.activation)[0]
        np.testing.assert_array_equal(clone(x), want_y)


# --- Item 6: out= of an ndarray subclass is returned itself (NumPy's convention).


class _Tagged(np.ndarray):
    pass


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("kind", ["matrix", "memmap", "subclass"])
def test_out_of_a_subclass_is_returned_itself(kind, tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 3))
    dy = rng.normal(size=(6, 3))

    def make():
        if kind == "matrix":
            return np.asmatrix(np.empty((6, 3)))
        if kind == "memmap":
            return np.memmap(tmp_path / f"o{make.n}", np.float64, "w+", shape=(6, 3))
        return np.empty((6, 3)).view(_Tagged)

    make.n = 0
    want_y, cache = bnfast.forward(x)
    want_dx = bnfast.backward(dy, cache)[0]
    for call, want in (
        (lambda o: bnfast.forward(x, out=o)[0], want_y),
        (lambda o: bnfast.backward(dy, cache, out=o)[0], want_dx),
        (lambda o: bnfast.backward_from_input(dy, x, out=o)[0], want_dx),
        (lambda o: bnfast.BatchNorm(3, dtype=np.float64).forward(x, out=o), want_y),
    ):
        make.n += 1
        o = make()
        got = call(o)
        assert got is o
        np.testing.assert_allclose(np.asarray(o), want, rtol=1e-12, atol=1e-14)


# --- Items 8-11: validation holes, each raised naming the argument before any write.


@pytest.mark.parametrize("k,exc", [(0, ValueError), (-1, ValueError), ("a", TypeError)])
def test_inference_checks_virtual_batch_size(k, exc):
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(exc, match="virtual_batch_size"):
        bnfast.forward(
            np.ones((4, 3)), training=False, running_mean=rm, running_var=rv, virtual_batch_size=k
        )
    # a valid size is accepted and ignored in inference, whatever the batch
    y = bnfast.forward(
        np.ones((3, 3)), training=False, running_mean=rm, running_var=rv, virtual_batch_size=2
    )[0]
    np.testing.assert_allclose(y, 1.0 / np.sqrt(1.0 + 1e-5))


@pytest.mark.parametrize("kwargs", [dict(center="no"), dict(scale=7), dict(center=None)])
def test_center_and_scale_are_checked_without_affine(kwargs):
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        bnfast.BatchNorm(3, affine=False, **kwargs)


@pytest.mark.parametrize(
    "activation,exc",
    [
        (np.array(["relu", "relu"]), TypeError),
        (["relu"], TypeError),
        (1, TypeError),
        ("ReLU", ValueError),
    ],
    ids=str,
)
def test_activation_must_be_none_or_relu(activation, exc):
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(exc, match="activation"):
        bnfast.forward(np.ones((4, 3)), running_mean=rm, running_var=rv, activation=activation)
    np.testing.assert_array_equal(rm, 0.0)
    with pytest.raises(exc, match="activation"):
        bnfast.BatchNorm(3, activation=activation)
    assert bnfast.BatchNorm(3, activation=np.str_("relu")).activation == "relu"


def _eval_layer():
    bn = bnfast.BatchNorm(3, dtype=np.float64)
    bn(np.random.default_rng(0).normal(size=(8, 3)))
    return bn


@pytest.mark.parametrize(
    "b,exc,words",
    [
        (np.ones(3) + 1j, TypeError, "b has dtype complex"),
        (["1", "2", "3"], TypeError, "b has dtype <U1"),
        (np.array([True, False, True]), TypeError, "b has dtype bool"),
    ],
    ids=str,
)
def test_folding_refuses_biases_that_are_not_real_numbers(b, exc, words):
    bn = _eval_layer().eval()
    with pytest.raises(exc, match=words):
        bnfast.fold_into_linear(np.ones((2, 3)), b, bn)
    with pytest.raises(exc, match=words):
        bnfast.fold_into_conv(np.ones((3, 2, 1)), b, bn)


def test_folding_refuses_a_layer_in_training_mode():
    bn = _eval_layer()  # still training
    with pytest.raises(ValueError, match=r"training mode.*bn\.eval\(\)"):
        bnfast.fold_into_linear(np.ones((2, 3)), None, bn)
    W2, b2 = bnfast.fold_into_linear(np.eye(3), None, bn.eval())
    x = np.random.default_rng(1).normal(size=(5, 3))
    np.testing.assert_allclose(x @ W2 + b2, bn(x), rtol=1e-12, atol=1e-12)
