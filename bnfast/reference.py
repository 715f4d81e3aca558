"""Pure-NumPy twins of bnfast's public functions: the math, written to read like the notes.

This is the test oracle and the documentation, not a fast path: every step is a separate NumPy
expression in float64 (two passes for the variance), and the result is rounded to x's dtype
once at the end. With the channel axis moved last and the rest flattened, each channel c holds
m values ``z_1 .. z_m``:

    mu       = 1/m * sum_i z_i
    sigma^2  = 1/m * sum_i (z_i - mu)^2                 (biased: normalization)
    z_norm_i = (z_i - mu) / sqrt(sigma^2 + eps)
    z~_i     = gamma * z_norm_i + beta

Running statistics (PyTorch's convention; momentum is the weight of the new batch):

    running_mean <- (1 - momentum) * running_mean + momentum * mu
    running_var  <- (1 - momentum) * running_var  + momentum * sigma^2 * m / (m - 1)

Backward, with ``dy = dL/dz~``:

    dbeta  = sum_i dy_i
    dgamma = sum_i dy_i * z_norm_i
    dz_i   = gamma / sqrt(sigma^2 + eps) / m * (m * dy_i - dbeta - z_norm_i * dgamma)
                                                                        (batch statistics)
    dz_i   = gamma / sqrt(running_var + eps) * dy_i                                  (running stats)
"""

from __future__ import annotations

import numpy as np


def _channels_last(a, axis):
    """float64 copy of ``a`` as (m, C): the channel axis last, every other axis flattened."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    return a.reshape(-1, a.shape[-1])


def _restore(z, x, axis):
    """Inverse of :func:`_channels_last` for an (m, C) result, rounded to x's dtype."""
    shape = np.moveaxis(np.empty(x.shape, dtype=[]), axis, -1).shape
    return np.moveaxis(z.reshape(shape), -1, axis).astype(x.dtype)


def _vec(v, dtype, default, channels):
    """A per-channel vector used in x's precision (None -> default)."""
    if v is None:
        return np.full(channels, default)
    return np.asarray(v).astype(dtype).astype(np.float64)


def moments(x, *, axis=1):
    """Per-channel mean and biased variance (two passes, float64), in x's dtype."""
    z = _channels_last(x, axis)
    mu = z.mean(axis=0)
    sigma2 = ((z - mu) ** 2).mean(axis=0)
    return mu.astype(x.dtype), sigma2.astype(x.dtype)


def running_update(running, batch, momentum):
    """``running <- (1 - momentum) * running + momentum * batch``, in place, in running's dtype."""
    running[...] = (1.0 - momentum) * np.asarray(running, np.float64) + momentum * batch


def forward(
    x,
    gamma=None,
    beta=None,
    *,
    axis=1,
    training=True,
    running_mean=None,
    running_var=None,
    momentum=0.1,
    eps=1e-5,
):
    """Batch norm forward; returns ``(y, cache)`` with cache a dict for :func:`backward`."""
    x = np.asarray(x)
    axis = axis % x.ndim
    z = _channels_last(x, axis)
    m, channels = z.shape
    gamma = _vec(gamma, x.dtype, 1.0, channels)
    beta = _vec(beta, x.dtype, 0.0, channels)
    if training:
        mu = z.mean(axis=0)
        sigma2 = ((z - mu) ** 2).mean(axis=0)
        if running_mean is not None:
            running_update(running_mean, mu, momentum)
            running_update(running_var, sigma2 * m / (m - 1), momentum)
    else:
        mu = _vec(running_mean, x.dtype, 0.0, channels)
        sigma2 = _vec(running_var, x.dtype, 1.0, channels)
    z_norm = (z - mu) / np.sqrt(sigma2 + eps)
    y = gamma * z_norm + beta
    cache = dict(
        x=x,
        axis=axis,
        training=training,
        mean=mu,
        invstd=1.0 / np.sqrt(sigma2 + eps),
        gamma=gamma,
        beta=beta,
        z_norm=z_norm,
    )
    return _restore(y, x, axis), cache


def backward(dy, cache):
    """Batch norm backward: ``(dx, dgamma, dbeta)`` from a :func:`forward` cache."""
    x, axis = cache["x"], cache["axis"]
    g = _channels_last(dy, axis)
    m = g.shape[0]
    z_norm, gamma, invstd = cache["z_norm"], cache["gamma"], cache["invstd"]
    dbeta = g.sum(axis=0)
    dgamma = (g * z_norm).sum(axis=0)
    if cache["training"]:
        dz = gamma * invstd / m * (m * g - dbeta - z_norm * dgamma)
    else:
        dz = gamma * invstd * g
    return _restore(dz, x, axis), dgamma.astype(x.dtype), dbeta.astype(x.dtype)
