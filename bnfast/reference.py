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
    activation=None,
    renorm=None,
    virtual_batch_size=None,
    unbiased=True,
):
    """Batch norm forward; returns ``(y, cache)`` with cache a dict for :func:`backward`.

    The family, as the notes and the papers write it:

    - ``activation="relu"``: ``y = max(gamma * z_norm + beta, 0)``, applied to the output as
      rounded to x's dtype (a value that rounds to 0 is 0).
    - ``renorm=(rmax, dmax)`` (Ioffe 2017), training: with ``sigma_run = sqrt(running_var +
      eps)`` before this batch, ``r = clip(sqrt(sigma^2 + eps) / sigma_run, 1/rmax, rmax)``,
      ``d = clip((mu - running_mean) / sigma_run, -dmax, dmax)``,
      ``y = gamma * (z_norm * r + d) + beta``; r and d are constants for the gradient.
    - ``virtual_batch_size=k`` (ghost batches), training: the batch split by hand into groups
      of k consecutive samples along axis 0, each normalized on its own; the running averages
      updated once from the mean of the groups' means and of their variances.
    - ``unbiased=False``: the running variance is the biased batch variance.
    """
    x = np.asarray(x)
    axis = axis % x.ndim
    if training and virtual_batch_size is not None and x.shape[0] // virtual_batch_size > 1:
        return _ghost_forward(
            x,
            gamma,
            beta,
            axis,
            running_mean,
            running_var,
            momentum,
            eps,
            activation,
            renorm,
            virtual_batch_size,
            unbiased,
        )
    z = _channels_last(x, axis)
    m, channels = z.shape
    gamma = _vec(gamma, x.dtype, 1.0, channels)
    beta = _vec(beta, x.dtype, 0.0, channels)
    r, d = np.ones(channels), np.zeros(channels)
    if training:
        mu = z.mean(axis=0)
        sigma2 = ((z - mu) ** 2).mean(axis=0)
        if renorm is not None:
            rmax, dmax = renorm
            sigma_run = np.sqrt(_vec(running_var, x.dtype, 1.0, channels) + eps)
            r = np.clip(np.sqrt(sigma2 + eps) / sigma_run, 1.0 / rmax, rmax)
            d = np.clip((mu - _vec(running_mean, x.dtype, 0.0, channels)) / sigma_run, -dmax, dmax)
        if running_mean is not None:
            running_update(running_mean, mu, momentum)
            running_update(running_var, sigma2 * (m / (m - 1) if unbiased else 1.0), momentum)
    else:
        mu = _vec(running_mean, x.dtype, 0.0, channels)
        sigma2 = _vec(running_var, x.dtype, 1.0, channels)
    z_norm = (z - mu) / np.sqrt(sigma2 + eps)
    y = gamma * (z_norm * r + d) + beta
    mask = np.ones_like(y, dtype=bool)
    if activation == "relu":
        mask = y.astype(x.dtype) > 0  # PyTorch's ReLU gradient: where its (rounded) output > 0
        y = np.maximum(y, 0.0)
    cache = dict(
        x=x,
        axis=axis,
        training=training,
        mean=mu,
        var=sigma2,
        invstd=1.0 / np.sqrt(sigma2 + eps),
        gamma=gamma,
        beta=beta,
        z_norm=z_norm,
        r=r,
        d=d,
        mask=mask,
    )
    return _restore(y, x, axis), cache


def _ghost_forward(
    x, gamma, beta, axis, running_mean, running_var, momentum, eps, activation, renorm, k, unbiased
):
    """Ghost batches split by hand: :func:`forward` on each group of k samples, without running
    arrays (renorm reads copies), then one running update from the groups' statistics."""
    parts, ys, means, variances = [], [], [], []
    for start in range(0, x.shape[0], k):
        xg = x[start : start + k]
        rm = None if running_mean is None else np.array(running_mean, copy=True)
        rv = None if running_var is None else np.array(running_var, copy=True)
        yg, cache = forward(
            xg,
            gamma,
            beta,
            axis=axis,
            running_mean=rm,
            running_var=rv,
            momentum=0.0,
            eps=eps,
            activation=activation,
            renorm=renorm,
        )
        parts.append((start, start + k, cache))
        ys.append(yg)
        m = cache["z_norm"].shape[0]
        means.append(cache["mean"])
        variances.append(cache["var"] * (m / (m - 1) if unbiased else 1.0))
    if running_mean is not None:
        running_update(running_mean, np.mean(means, axis=0), momentum)
        running_update(running_var, np.mean(variances, axis=0), momentum)
    return np.concatenate(ys, axis=0), dict(x=x, axis=axis, parts=parts)


def backward(dy, cache):
    """Batch norm backward: ``(dx, dgamma, dbeta)`` from a :func:`forward` cache.

    With ``g = dy * mask`` (the activation's gradient) and ``xhat = z_norm``::

        dbeta  = sum g
        dgamma = sum g * (r * xhat + d)
        dz     = gamma * r * invstd / m * (m * g - sum g - xhat * sum(g * xhat))  (batch stats)
        dz     = gamma * invstd * g                                              (running stats)

    Virtual batches: each group's gradient, dgamma and dbeta summed over the groups.
    """
    x, axis = cache["x"], cache["axis"]
    if "parts" in cache:
        dx = np.empty(x.shape, x.dtype)
        dgamma = dbeta = 0.0
        for start, stop, part in cache["parts"]:
            dxg, dg, db = backward(dy[start:stop], part)
            dx[start:stop] = dxg
            dgamma = dgamma + dg.astype(np.float64)
            dbeta = dbeta + db.astype(np.float64)
        return dx, dgamma.astype(x.dtype), dbeta.astype(x.dtype)
    g = _channels_last(dy, axis) * cache["mask"]
    m = g.shape[0]
    z_norm, gamma, invstd = cache["z_norm"], cache["gamma"], cache["invstd"]
    r, d = cache["r"], cache["d"]
    dbeta = g.sum(axis=0)
    dgamma_hat = (g * z_norm).sum(axis=0)
    dgamma = r * dgamma_hat + d * dbeta
    if cache["training"]:
        dz = gamma * r * invstd / m * (m * g - dbeta - z_norm * dgamma_hat)
    else:
        dz = gamma * invstd * g
    return _restore(dz, x, axis), dgamma.astype(x.dtype), dbeta.astype(x.dtype)


def backward_from_input(dy, x, gamma=None, *, axis=1, eps=1e-5):
    """The training gradient from x itself: ``backward(dy, forward(x, gamma)[1])``."""
    return backward(dy, forward(x, gamma, axis=axis, eps=eps)[1])


def momentum_from_decay(decay):
    """Keras/Flax/numpy-ml ``momentum`` (the weight of the old value) to PyTorch's."""
    return 1.0 - decay
