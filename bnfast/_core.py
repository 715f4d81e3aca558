"""The functional API: validate, map to the canonical (outer, C, inner) view, call a kernel.

The kernel behind each function, in the family ``_threading.kernels_for`` picks from the view's
memory layout (``kernels.rows``, ``kernels.lanes`` or ``kernels.strided``): ``moments`` ->
``moments``; ``forward`` -> ``forward_train`` (training) or ``normalize`` (inference);
``backward`` -> ``backward_train`` (training cache) or ``grad_sums`` + ``grad_input`` (inference
cache). The math they implement is written out in ``bnfast.reference``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _checks as chk
from . import _threading


@dataclass(frozen=True, eq=False)
class BatchNormCache:
    """What :func:`backward` needs from one :func:`forward` call. Immutable.

    Attributes
    ----------
    x : ndarray
        The forward input (a reference, not a copy: do not modify it before backward).
    mean, invstd : ndarray
        float64, shape ``(C,)``: the statistics that normalized ``x`` (the batch's when
        ``training``, the running ones otherwise); ``invstd = 1/sqrt(var + eps)``.
    gamma : ndarray
        float64, shape ``(C,)``: the scale, rounded to x's dtype (ones when none was given).
    axis : int
        The channel axis, non-negative.
    training : bool
        True: batch statistics, full gradient. False: running statistics, frozen-BN gradient.
    """

    x: np.ndarray
    mean: np.ndarray
    invstd: np.ndarray
    gamma: np.ndarray
    axis: int
    training: bool
    _layout: chk.Layout
    _x3: np.ndarray


def _after_write():
    """Context for the O(C) NumPy math that runs after a kernel wrote y or dx: it must not raise.

    An exception there would leave the caller's arrays half-updated (seen: under
    ``np.errstate(all="raise")``, float16 running arrays and a batch variance above 65504 raised
    "overflow encountered in cast" after ``out`` was written). Its only floating-point events are
    overflow to inf (rounding into a narrower dtype, or a float64 variance near 1.8e308) and NaN
    from a NaN channel: the IEEE results, as the kernels and PyTorch give them. So a call either
    completes or raises before its first write.
    """
    return np.errstate(all="ignore")


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def moments(x, *, axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance over every axis but ``axis``, in one read of x.

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2
    axis : int, default 1
        The channel axis (negative counts from the end).

    Returns
    -------
    mean, var : ndarray
        Shape ``(C,)``, x's dtype. Accumulated in float64 around a per-channel shift, so a
        float32 channel with mean 1e4 and unit spread gets its variance to ~1e-12 relative.
        A channel holding NaN or inf gets NaN.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> mean, var = bnfast.moments(x)
    >>> mean, var
    (array([ 2., 20.]), array([  1., 100.]))
    """
    x = chk.data_array(x, "x")
    layout = chk.Layout.of(x, chk.channel_axis(axis, x.ndim))
    if layout.count == 0:
        raise ValueError(f"x has shape {x.shape}: no values per channel along axis {axis}; "
                         "moments need at least one")
    x3 = layout.view3(x)
    mean = np.empty(layout.channels)
    var = np.empty(layout.channels)
    _threading.kernels_for(x3).moments(chk.readonly(x3), mean, var)
    return mean.astype(x.dtype), var.astype(x.dtype)


def forward(x, gamma=None, beta=None, *, axis: int = 1, training: bool = True,
            running_mean=None, running_var=None, momentum: float = 0.1, eps: float = 1e-5,
            out=None) -> tuple[np.ndarray, BatchNormCache]:
    """Batch-normalize ``x`` over every axis but ``axis``: ``y = gamma * xhat + beta``.

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2
        Any layout: (N, C), (N, C, L), NCHW, NHWC with ``axis=-1``, 5-D; strided, transposed,
        negative-stride, read-only and broadcast views too. Contiguous input of every layout is
        processed without a copy; a view whose non-channel axes cannot be merged into one
        (outer, C, inner) view without copying (e.g. a broadcast or a sliced non-channel axis
        next to another) is copied once. float16 raises ``TypeError``: convert explicitly.
    gamma, beta : array of shape (C,), optional
        Scale and shift, any float dtype, used in x's precision. None means 1 and 0.
    axis : int, default 1
        The channel axis.
    training : bool, default True
        True: normalize with the batch's mean and biased variance and, when running arrays are
        given, update them in place with PyTorch's rule ``new = (1 - momentum) * old +
        momentum * batch`` (running variance unbiased, ``var * m / (m - 1)``). Needs more than
        one value per channel. False: normalize with the running arrays, which are required.
    running_mean, running_var : ndarray of shape (C,), optional
        Any float dtype; updated in their own dtype. Both or neither.
    momentum : float in [0, 1], default 0.1
        Weight of the new batch (PyTorch's convention; Keras' ``momentum=0.99`` is 0.01 here).
    eps : float > 0, default 1e-5
    out : ndarray, optional
        Where to write y: x's shape and dtype, writeable. In training it must not overlap x
        (backward reads x); in inference ``out=x`` normalizes in place.

    Returns
    -------
    y : ndarray
        x's shape and dtype; laid out in memory like x's canonical view.
    cache : BatchNormCache
        For :func:`backward`.

    Notes
    -----
    All arithmetic is float64 (statistics and the normalization of each element) with one
    rounding to x's dtype at the end. A channel holding NaN or +-inf gets NaN statistics and an
    all-NaN output while training (as in PyTorch); the other channels are unaffected. Every
    argument is checked before anything is written.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> rm, rv = np.zeros(2), np.ones(2)
    >>> y, cache = bnfast.forward(x, running_mean=rm, running_var=rv, eps=0.0001)
    >>> y.round(4)
    array([[-1., -1.],
           [ 1.,  1.]])
    >>> rm, rv
    (array([0.2, 2. ]), array([ 1.1, 20.9]))
    """
    x = chk.data_array(x, "x")
    axis = chk.channel_axis(axis, x.ndim)
    layout = chk.Layout.of(x, axis)
    channels, count = layout.channels, layout.count
    eps = chk.positive_eps(eps)
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be True or False, got {training!r}")
    training = bool(training)
    if gamma is not None:
        gamma = chk.channel_vector(gamma, "gamma", channels)
    if beta is not None:
        beta = chk.channel_vector(beta, "beta", channels)
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    tracking = running_mean is not None
    if tracking:
        running_mean = chk.channel_vector(running_mean, "running_mean", channels,
                                          writeable=training)
        running_var = chk.channel_vector(running_var, "running_var", channels,
                                         writeable=training)
    if training:
        momentum = chk.unit_momentum(momentum)
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"of shape {x.shape} with channel axis {axis} ({count} per channel)")
    elif not tracking:
        raise ValueError("training=False normalizes with running statistics: pass "
                         "running_mean and running_var")
    if out is not None:
        out = chk.output_array(out, "out", x.shape, x.dtype)
    if training:  # x is also kept for backward, so even out=x is refused
        chk.disjoint({"out": out, "running_mean": running_mean, "running_var": running_var},
                     {"x": x, "gamma": gamma, "beta": beta})
    else:
        chk.disjoint({"out": out}, {"x": x, "gamma": gamma, "beta": beta,
                                    "running_mean": running_mean, "running_var": running_var},
                     in_place=(("out", "x"),))

    x3 = layout.view3(x)
    x3 = chk.readonly(x3)
    gamma64 = chk.in_precision(gamma, x.dtype, 1.0, channels)
    beta64 = chk.in_precision(beta, x.dtype, 0.0, channels)
    y, y3 = layout.output(out, x.dtype)
    run = _threading.kernels_for(x3, y3)
    if training:  # statistics and normalization in one kernel call
        mean = np.empty(channels)
        var = np.empty(channels)
        invstd = np.empty(channels)
        run.forward_train(x3, chk.readonly(gamma64), chk.readonly(beta64), eps, mean, var,
                          invstd, y3)
    else:
        mean = chk.in_precision(running_mean, x.dtype, 0.0, channels)
        invstd = 1.0 / np.sqrt(chk.in_precision(running_var, x.dtype, 1.0, channels) + eps)
        run.normalize(x3, chk.readonly(mean), chk.readonly(gamma64 * invstd),
                      chk.readonly(beta64), y3)
    layout.finish_output(y, y3)

    if training and tracking:
        with _after_write():  # in float64, rounded once into the running arrays' own dtype
            running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
            running_var[...] = ((1.0 - momentum) * running_var.astype(np.float64)
                                + (momentum * count / (count - 1)) * var)
    cache = BatchNormCache(x, _frozen(mean), _frozen(invstd), _frozen(gamma64), axis, training,
                           layout, x3)
    return y, cache


def backward(dy, cache: BatchNormCache, *, out=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`forward` with respect to x, gamma and beta.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to y: the forward input's shape and dtype.
    cache : BatchNormCache
        From the :func:`forward` call that produced y. A training cache gives the full
        batch-norm gradient (batch statistics depend on x); an inference cache the frozen-BN
        gradient ``dx = dy * gamma * invstd``.
    out : ndarray, optional
        Where to write dx: x's shape and dtype, writeable, not overlapping x; ``out=dy``
        computes dx in place.

    Returns
    -------
    dx : ndarray
        x's shape and dtype.
    dgamma, dbeta : ndarray
        Shape ``(C,)``, x's dtype: ``sum(dy * xhat)`` and ``sum(dy)`` per channel (returned
        whether or not forward had gamma and beta).

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, cache = bnfast.forward(x)
    >>> dx, dgamma, dbeta = bnfast.backward(np.ones_like(x), cache)
    >>> np.abs(dx).max() < 1e-12, dbeta
    (np.True_, array([2., 2.]))
    """
    if not isinstance(cache, BatchNormCache):
        raise TypeError(f"cache must be the BatchNormCache returned by bnfast.forward, got "
                        f"{type(cache).__name__}")
    x, layout = cache.x, cache._layout
    if not isinstance(dy, np.ndarray):
        dy = np.asarray(dy)
    if dy.dtype != x.dtype:
        raise TypeError(f"dy has dtype {dy.dtype}; expected {x.dtype}, the forward input's dtype")
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape}, but the cache is from a forward call on "
                         f"shape {x.shape}; pass the gradient of that call's output")
    if out is not None:
        out = chk.output_array(out, "out", x.shape, x.dtype)
        chk.disjoint({"out": out}, {"dy": dy, "x": x}, in_place=(("out", "dy"),))

    channels = layout.channels
    dy3 = layout.view3(dy)
    dy3 = chk.readonly(dy3)
    mean, invstd = cache.mean, cache.invstd
    sum_dy = np.empty(channels)
    sum_dy_xmu = np.empty(channels)
    dx, dx3 = layout.output(out, x.dtype)
    run = _threading.kernels_for(cache._x3, dy3, dx3)
    if cache.training:  # sums, coefficients and dx in one kernel call
        run.backward_train(cache._x3, dy3, mean, invstd, cache.gamma, sum_dy, sum_dy_xmu, dx3)
    else:  # frozen statistics: dx = gamma * invstd * dy
        run.grad_sums(cache._x3, dy3, mean, sum_dy, sum_dy_xmu)
        zeros = chk.readonly(np.zeros(channels))
        run.grad_input(cache._x3, dy3, mean, chk.readonly(cache.gamma * invstd), zeros, zeros,
                       dx3)
    layout.finish_output(dx, dx3)
    with _after_write():
        return dx, (sum_dy_xmu * invstd).astype(x.dtype), sum_dy.astype(x.dtype)
