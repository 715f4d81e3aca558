"""Properties from the notes and the math, checked against independent quantities."""

from __future__ import annotations

import numpy as np
import pytest

import bnfast
from conftest import channels_last64, numeric_grad

LAYOUTS = [
    ((16, 3), 1),
    ((6, 4, 5), 1),
    ((4, 3, 5, 6), 1),
    ((4, 5, 6, 3), -1),
    ((2, 3, 4, 5, 6), 2),
]


def _data(shape, axis, dtype=np.float64, seed=0, loc=3.0, scale=2.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc, scale, shape).astype(dtype)
    c = shape[axis]
    return x, rng.uniform(0.5, 1.5, c).astype(dtype), rng.uniform(-1, 1, c).astype(dtype), rng


def _bshape(x, axis):
    s = [1] * x.ndim
    s[axis] = x.shape[axis]
    return s


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_identity_recovery(shape, axis, dtype):
    """gamma = sqrt(var + eps), beta = mean gives y == x (the notes' identity)."""
    x, _, _, _ = _data(shape, axis, dtype)
    mean, var = bnfast.moments(x, axis=axis)
    eps = 1e-5
    gamma = np.sqrt(var.astype(np.float64) + eps)
    y, _ = bnfast.forward(x, gamma, mean, axis=axis, eps=eps)
    tol = 4 * np.finfo(dtype).eps * np.max(np.abs(x))
    np.testing.assert_allclose(y, x, rtol=0, atol=tol)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_bias_before_bn_is_cancelled(shape, axis):
    """A per-channel constant added to x (a layer's bias) leaves y unchanged."""
    x, g, b, rng = _data(shape, axis)
    bias = rng.normal(0, 10, x.shape[axis]).reshape(_bshape(x, axis))
    y1, _ = bnfast.forward(x, g, b, axis=axis)
    y2, _ = bnfast.forward(x + bias, g, b, axis=axis)
    np.testing.assert_allclose(y2, y1, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_output_moments(shape, axis):
    """Per channel: mean(y) == beta and var(y) == gamma^2 * var / (var + eps)."""
    x, g, b, _ = _data(shape, axis, scale=0.01)  # small spread so that eps matters
    eps = 1e-4
    y, _ = bnfast.forward(x, g, b, axis=axis, eps=eps)
    z, zy = channels_last64(x, axis), channels_last64(y, axis)
    var = z.var(axis=0)
    np.testing.assert_allclose(zy.mean(axis=0), b, atol=1e-12)
    np.testing.assert_allclose(zy.var(axis=0), g**2 * var / (var + eps), rtol=1e-10)


def _loss_and_grads(x, g, b, w, axis, training, rm=None, rv=None):
    y, cache = bnfast.forward(
        x, g, b, axis=axis, training=training, running_mean=rm, running_var=rv, momentum=0.0
    )
    return float(np.sum(w * y)), cache


@pytest.mark.parametrize("shape,axis", LAYOUTS[:4])
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_finite_differences(shape, axis, training):
    """dx, dgamma, dbeta of L = sum(w * y) against central differences in float64."""
    x, g, b, rng = _data(shape, axis)
    w = rng.normal(size=x.shape)
    c = x.shape[axis]
    rm, rv = rng.normal(3, 1, c), rng.uniform(1, 5, c)
    loss, cache = _loss_and_grads(x, g, b, w, axis, training, rm, rv)
    dx, dg, db = bnfast.backward(w, cache)
    f = lambda: _loss_and_grads(x, g, b, w, axis, training, rm, rv)[0]  # noqa: E731
    np.testing.assert_allclose(dx, numeric_grad(f, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dg, numeric_grad(f, g), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, numeric_grad(f, b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_gradient_orthogonality(shape, axis):
    """With gamma constant per channel, per channel sum(dx) == 0 and sum(dx * xhat) == 0.

    The second identity uses sum(xhat**2) == m, exact only as eps -> 0 (it is m*var/(var+eps)),
    so eps is 1e-12 here against a variance of ~4.
    """
    x, g, b, rng = _data(shape, axis)
    dy = rng.normal(size=x.shape)
    eps = 1e-12
    _, cache = bnfast.forward(x, g, b, axis=axis, eps=eps)
    dx, _, _ = bnfast.backward(dy, cache)
    z, d = channels_last64(x, axis), channels_last64(dx, axis)
    xhat = (z - z.mean(0)) / np.sqrt(z.var(0) + eps)
    scale = np.abs(d).sum(axis=0)
    np.testing.assert_array_less(np.abs(d.sum(axis=0)), 1e-13 * scale)
    np.testing.assert_array_less(np.abs((d * xhat).sum(axis=0)), 1e-13 * scale * np.abs(xhat).max())


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0, 0.0])
def test_running_stats_closed_form(momentum):
    """After k steps: running = (1-m)^k * init + sum_j m (1-m)^(k-1-j) * stat_j."""
    rng = np.random.default_rng(5)
    c, k = 4, 7
    rm, rv = np.full(c, 0.5), np.full(c, 2.0)
    batches = [rng.normal(j, 1 + j, (10, c, 3)) for j in range(k)]
    for xb in batches:
        bnfast.forward(xb, running_mean=rm, running_var=rv, momentum=momentum)
    means = [xb.mean(axis=(0, 2)) for xb in batches]
    uvars = [xb.var(axis=(0, 2), ddof=1) for xb in batches]
    weights = [momentum * (1 - momentum) ** (k - 1 - j) for j in range(k)]
    np.testing.assert_allclose(
        rm,
        (1 - momentum) ** k * 0.5 + sum(w * m for w, m in zip(weights, means, strict=True)),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        rv,
        (1 - momentum) ** k * 2.0 + sum(w * v for w, v in zip(weights, uvars, strict=True)),
        rtol=1e-12,
    )


def test_cumulative_average_momentum_none():
    """BatchNorm(momentum=None): running stats are the plain average of the batch statistics."""
    rng = np.random.default_rng(6)
    bn = bnfast.BatchNorm(3, momentum=None, dtype=np.float64)
    batches = [rng.normal(j, 1 + j, (8, 3, 4)) for j in range(5)]
    for xb in batches:
        bn(xb)
    np.testing.assert_allclose(
        bn.running_mean, np.mean([xb.mean(axis=(0, 2)) for xb in batches], axis=0), rtol=1e-12
    )
    np.testing.assert_allclose(
        bn.running_var, np.mean([xb.var(axis=(0, 2), ddof=1) for xb in batches], axis=0), rtol=1e-12
    )
    assert bn.num_batches_tracked == 5


def test_inference_uses_running_stats():
    """Eval mode: y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta."""
    x, g, b, rng = _data((10, 4), 1)
    rm, rv = rng.normal(size=4), rng.uniform(1, 2, 4)
    y, _ = bnfast.forward(x, g, b, training=False, running_mean=rm, running_var=rv)
    np.testing.assert_allclose(y, g * (x - rm) / np.sqrt(rv + 1e-5) + b, rtol=1e-13)
