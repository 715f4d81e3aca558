"""The BatchNorm layer: modes, parameters and gradients, state round trips."""

from __future__ import annotations

import numpy as np
import pytest

import bnfast
from bnfast import reference as ref


def test_training_step_matches_functional_and_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(2, 3, (16, 4, 5)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    bn = bnfast.BatchNorm(4)
    bn.gamma[...] = rng.uniform(0.5, 1.5, 4)
    y = bn(x)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y_ref, cache = ref.forward(x, bn.gamma, bn.beta, running_mean=rm, running_var=rv)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-6)
    dx = bn.backward(dy)
    dx_ref, dg_ref, db_ref = ref.backward(dy, cache)
    np.testing.assert_allclose(dx, dx_ref, atol=1e-5)
    grads = bn.grads()
    np.testing.assert_allclose(grads["gamma"], dg_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["beta"], db_ref, rtol=1e-5, atol=1e-5)
    assert grads["gamma"] is bn.grads()["gamma"]  # persistent buffers an optimizer can hold
    assert bn.num_batches_tracked == 1


def test_params_update_in_place_and_eval_mode():
    rng = np.random.default_rng(1)
    bn = bnfast.BatchNorm(3, axis=-1, dtype=np.float64)
    x = rng.normal(5, 2, (8, 6, 3))
    bn(x)
    bn.backward(np.ones_like(x))
    params, grads = bn.params(), bn.grads()
    before = bn.beta.copy()
    params["beta"] -= 0.5 * grads["beta"]
    np.testing.assert_allclose(bn.beta, before - 0.5 * 48)  # dbeta = sum(dy) = 48 per channel
    assert bn.eval() is bn and not bn.training
    y = bn(x)
    want = bn.gamma * (x - bn.running_mean) / np.sqrt(bn.running_var + bn.eps) + bn.beta
    np.testing.assert_allclose(y, want, rtol=1e-12)
    assert bn.num_batches_tracked == 1  # eval does not count
    dx = bn.backward(np.ones_like(x))
    np.testing.assert_allclose(
        dx, np.broadcast_to(bn.gamma / np.sqrt(bn.running_var + bn.eps), x.shape), rtol=1e-12
    )


def test_without_affine_and_without_running_stats():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 2)).astype(np.float32)
    bn = bnfast.BatchNorm(2, affine=False, track_running_stats=False)
    assert bn.gamma is None and bn.params() == {} and bn.grads() == {}
    assert bn.state_dict() == {}
    y_train = bn(x)
    y_eval = bn.eval()(x)  # no running stats: eval mode uses batch statistics
    np.testing.assert_array_equal(y_train, y_eval)
    np.testing.assert_allclose(y_train, ref.forward(x)[0], atol=1e-6)
    dx = bn.backward(np.ones_like(x))
    np.testing.assert_allclose(dx, 0, atol=1e-6)


def test_state_dict_round_trip_and_copies():
    rng = np.random.default_rng(3)
    a = bnfast.BatchNorm(4, dtype=np.float64)
    for _ in range(3):
        a(rng.normal(1, 2, (8, 4)))
    a.gamma[...] = rng.normal(size=4)
    sd = a.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    sd["weight"][0] = 99.0
    assert a.gamma[0] != 99.0, "state_dict must return copies"
    b = bnfast.BatchNorm(4, dtype=np.float32)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        np.testing.assert_allclose(b.state_dict()[k], v, rtol=1e-7)
    assert b.gamma.dtype == np.float32 and b.num_batches_tracked == 3


def test_buffer_reuse_with_out():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 3, 2))
    bn = bnfast.BatchNorm(3, dtype=np.float64)
    out = np.empty_like(x)
    y = bn(x, out=out)
    assert y is out
    np.testing.assert_allclose(y, ref.forward(x)[0], atol=1e-12)


@pytest.mark.parametrize(
    "shape,axis", [((5, 3), 1), ((4, 3, 2, 2), 1), ((4, 2, 2, 3), -1), ((2, 3, 2, 2, 2), 1)]
)
def test_any_axis(shape, axis):
    x = np.random.default_rng(5).normal(size=shape).astype(np.float32)
    bn = bnfast.BatchNorm(3, axis=axis)
    np.testing.assert_allclose(bn(x), ref.forward(x, axis=axis)[0], atol=2e-6)
    assert "BatchNorm(3" in repr(bn)


@pytest.mark.parametrize("shape,axis", [((8, 16, 300), 1), ((16, 5, 6, 4), -1)])
def test_reuse_buffers(shape, axis):
    """reuse_buffers: the same arrays come back each call, with the same values as fresh ones."""
    rng = np.random.default_rng(6)
    fresh = bnfast.BatchNorm(shape[axis], axis=axis, dtype=np.float64)
    reuse = bnfast.BatchNorm(shape[axis], axis=axis, dtype=np.float64, reuse_buffers=True)
    ys, dxs = [], []
    for _ in range(3):
        x, dy = rng.normal(size=shape), rng.normal(size=shape)
        y_f, y_r = fresh(x), reuse(x)
        np.testing.assert_array_equal(y_r, y_f)
        dx_f, dx_r = fresh.backward(dy), reuse.backward(dy)
        np.testing.assert_array_equal(dx_r, dx_f)
        ys.append(y_r)
        dxs.append(dx_r)
    assert ys[0] is ys[1] is ys[2] and dxs[0] is dxs[1] is dxs[2]
    np.testing.assert_array_equal(fresh.running_mean, reuse.running_mean)
    y = reuse(ys[0].copy())
    y2 = reuse(y)  # feeding the kept output back in: a new buffer, not an overlap error
    assert y2 is not y and np.all(np.isfinite(y2))
    want = bnfast.forward(y2.copy(), axis=axis)[0]
    y3 = reuse(y2[::-1][::-1])  # a view of the kept output: a new buffer too
    assert y3 is not y2 and not np.shares_memory(y3, y2)
    np.testing.assert_array_equal(y3, want)
    dx = reuse.backward(rng.normal(size=shape))
    want = bnfast.backward(dx.copy(), reuse._cache)[0]
    dx2 = reuse.backward(dx)  # the kept gradient fed back as dy
    assert dx2 is not dx and not np.shares_memory(dx2, dx)
    np.testing.assert_array_equal(dx2, want)


_REASSIGNED = [
    ("axis", -1),
    ("eps", 1e-2),
    ("momentum", 0.5),
    ("momentum", None),
    ("activation", "relu"),
    ("unbiased", False),
    ("renorm", (1.5, 0.5)),
    ("training", False),
    ("track_running_stats", False),
    ("gamma", "new"),
    ("beta", "new"),
    ("running_mean", "new"),
    ("running_var", "new"),
    ("dgamma", "new"),
]


@pytest.mark.parametrize("name, value", _REASSIGNED, ids=[f"{n}={v}" for n, v in _REASSIGNED])
@pytest.mark.parametrize("shape", [(16, 6, 3, 6), (64, 6, 40, 6)])  # small call; parallel
def test_assigning_an_attribute_after_planned_calls_acts_as_on_a_new_layer(shape, name, value):
    """A layer's planned calls follow any public attribute assigned between calls (``axis``
    too): the next forward and backward give the bits of a copy of the layer made after the
    assignment (``deepcopy`` keeps no plan, so the copy's calls take the checked path)."""
    import copy

    rng = np.random.default_rng(5)
    bn = bnfast.BatchNorm(6, reuse_buffers=True)
    bn.gamma[...] = rng.uniform(0.5, 1.5, 6)
    bn.beta[...] = rng.normal(size=6)
    x = rng.normal(3, 2, shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    for _ in range(2):
        bn(x)
        bn.backward(dy)
    assert bn._plan is not None  # the second calls were planned
    if value == "new":
        value = rng.uniform(0.5, 1.5, 6).astype(np.float32)
    setattr(bn, name, value)
    twin = copy.deepcopy(bn)
    assert twin._plan is None
    y, y_twin = bn(x).copy(), twin(x)
    np.testing.assert_array_equal(y, y_twin)
    if bn.running_mean is not None:
        np.testing.assert_array_equal(bn.running_mean, twin.running_mean)
        np.testing.assert_array_equal(bn.running_var, twin.running_var)
    np.testing.assert_array_equal(bn.backward(dy), twin.backward(dy))
    for key, grad in bn.grads().items():
        np.testing.assert_array_equal(grad, twin.grads()[key])
    # against NumPy where the change decides which axis is normalized
    if name == "axis":
        x64 = x.astype(np.float64)
        mean, var = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
        want = bn.gamma * (x64 - mean) / np.sqrt(var + bn.eps) + bn.beta
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_assigning_the_same_setting_keeps_the_plan():
    """``train()`` every step and a schedule's repeated momentum keep the planned path."""
    bn = bnfast.BatchNorm(8)
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    bn(x)
    plan = bn._plan
    assert plan is not None
    bn.train()
    bn.momentum = float("0.1")  # equal, another object
    bn.reuse_buffers = True  # read per call
    bn.num_batches_tracked = 7
    assert bn._plan is plan
    bn.momentum = 0.2
    assert bn._plan is None


@pytest.mark.parametrize("shape", [(64, 48), (256, 1024)])  # a small call's plan; a parallel size
def test_planned_backward_follows_mode_changes_between_calls(shape):
    """The planned backward keeps its kernel plan in the layer's plan, keyed by the cache's
    mode: a layer whose eps, activation and train/eval mode change between calls (as a trainer's
    schedules and evaluations do) gives the float64 reference's gradients at every call."""
    rng = np.random.default_rng(3)
    c = shape[1]
    bn = bnfast.BatchNorm(c, reuse_buffers=True)
    bn.gamma[...] = rng.uniform(0.5, 1.5, c)
    bn.beta[...] = rng.normal(size=c)
    modes = [(1e-5, None, True), (1e-5, None, True), (1e-3, None, True), (1e-3, "relu", True)]
    modes += [(1e-3, "relu", False), (1e-3, "relu", True), (1e-5, None, False), (1e-5, None, True)]
    for eps, activation, training in modes:
        bn.eps, bn.activation = eps, activation
        bn.train(training)
        x = rng.normal(1, 2, shape).astype(np.float32)
        dy = rng.normal(size=shape).astype(np.float32)
        rm, rv = bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64)
        y = bn(x)
        dx = bn.backward(dy)
        g, b = bn.gamma.astype(np.float64), bn.beta.astype(np.float64)
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        if training:
            mean, var = x64.mean(0), x64.var(0)
        else:
            mean, var = rm, rv
        xhat = (x64 - mean) / np.sqrt(var + eps)
        pre = g * xhat + b
        want_y = np.maximum(pre, 0) if activation else pre
        e = dy64 * (pre > 0) if activation else dy64
        dbeta, dgamma = e.sum(0), (e * xhat).sum(0)
        if training:
            n = shape[0]
            want_dx = g / np.sqrt(var + eps) / n * (n * e - dbeta - xhat * dgamma)
        else:
            want_dx = e * g / np.sqrt(var + eps)
        label = f"eps {eps}, {activation}, training {training}"
        np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5, err_msg=label)
        np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-5, err_msg=label)
        np.testing.assert_allclose(bn.dgamma, dgamma, rtol=1e-4, atol=1e-3, err_msg=label)
        np.testing.assert_allclose(bn.dbeta, dbeta, rtol=1e-4, atol=1e-3, err_msg=label)


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("tracked", [True, False, "renorm"])
@pytest.mark.parametrize("shape", [(64, 48), (16, 6, 3, 6), (256, 1024)])  # small; NCHW; parallel
def test_planned_training_calls_in_any_order_give_the_functional_bits(shape, tracked, reuse):
    """A layer's planned training calls (the kernel launch, kept statistics block and backward
    kept in the plan) give the functional API's bits for calls in any order: two forwards
    before a backward, two backwards of one forward; with ``reuse_buffers`` (the statistics
    block is reused too) a copy of the layer taken between calls keeps its own; without it,
    an earlier output is never written again."""
    import copy

    rng = np.random.default_rng(11)
    c = shape[1]
    renorm = (1.5, 0.5) if tracked == "renorm" else None  # (four kept rows: r and d too)
    bn = bnfast.BatchNorm(
        c, activation="relu", track_running_stats=bool(tracked), reuse_buffers=reuse, renorm=renorm
    )
    bn.gamma[...] = rng.uniform(0.5, 1.5, c)
    bn.beta[...] = rng.normal(size=c)
    rm = rv = None
    if tracked:
        rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    data = [rng.normal(1, 2, shape).astype(np.float32) for _ in range(5)]
    grads = [rng.normal(size=shape).astype(np.float32) for _ in range(5)]
    cache = None
    kept = []  # (output, its value) of calls without reuse_buffers
    twin = twin_cache = None

    def forward(i, out=None):
        nonlocal cache
        y = bn(data[i], out=out)  # (out=: the checked path, between planned calls)
        want, cache = bnfast.forward(
            data[i],
            bn.gamma,
            bn.beta,
            running_mean=rm,
            running_var=rv,
            activation="relu",
            renorm=renorm,
        )
        np.testing.assert_array_equal(y, want)
        if tracked:
            np.testing.assert_array_equal(bn.running_mean, rm)
            np.testing.assert_array_equal(bn.running_var, rv)
        kept.append((y, y.copy()))

    def backward(i):
        dx = bn.backward(grads[i])
        want, dgamma, dbeta = bnfast.backward(grads[i], cache)
        np.testing.assert_array_equal(dx, want)
        np.testing.assert_array_equal(bn.dgamma, dgamma)
        np.testing.assert_array_equal(bn.dbeta, dbeta)
        kept.append((dx, dx.copy()))

    steps = ("f0", "b0", "f1", "b1", "f2", "f3", "b3", "b4", "out", "b2", "f4", "copy", "f0", "b1")
    for step in steps:
        if step == "copy":  # a copy between a forward and its backward
            twin, twin_cache = copy.deepcopy(bn), cache
        elif step == "out":
            forward(1, np.empty(shape, np.float32))
        else:
            (forward if step[0] == "f" else backward)(int(step[1]))
    assert bn._plan.made is bn._cache and bn._plan.bfast is not None  # the planned calls ran
    assert bn.num_batches_tracked == (7 if tracked else 0)
    np.testing.assert_array_equal(twin.backward(grads[2]), bnfast.backward(grads[2], twin_cache)[0])
    if not reuse:
        for out, value in kept:
            np.testing.assert_array_equal(out, value)
