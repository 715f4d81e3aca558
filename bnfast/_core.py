"""The functional API: validate, map to the canonical (outer, C, inner) view, call one kernel.

The kernel behind each function, in the family ``_threading.kernels_for`` picks from the view's
memory layout (``kernels.rows``, ``kernels.lanes`` or ``kernels.strided``): ``moments`` ->
``moments``; ``forward`` -> ``forward_train`` (training) or ``normalize`` (inference);
``backward`` -> ``backward_train`` (training cache) or ``backward_frozen`` (inference cache).
Each kernel also does the per-channel arithmetic (``kernels/common.py``: statistics, running
averages, gradient coefficients, dgamma and dbeta), so a call allocates its outputs and makes
one kernel call. The math they implement is written out in ``bnfast.reference``.
"""

from __future__ import annotations

import operator

import numpy as np

from . import _checks as chk
from . import _threading
from ._machine import TUNE
from .kernels.common import GAMMA, INVSTD, MEAN, VAR

_NO_RUNNING = {
    np.dtype(np.float32): np.empty(0, np.float32),
    np.dtype(np.float64): np.empty(0, np.float64),
}  # "no running arrays" to a kernel


class BatchNormCache(tuple):
    """What :func:`backward` needs from one :func:`forward` call. Immutable (a tuple: building
    one costs 0.2 us, against 0.6 us for a frozen class with six attributes).

    Attributes
    ----------
    x : ndarray
        The forward input (a reference, not a copy: do not modify it before backward).
    mean, invstd : ndarray
        float64, shape ``(C,)``, read-only: the statistics that normalized ``x`` (the batch's
        when ``training``, the running ones otherwise); ``invstd = 1/sqrt(var + eps)``.
    gamma : ndarray
        float64, shape ``(C,)``, read-only: the scale, rounded to x's dtype (ones when none was
        given).
    axis : int
        The channel axis, non-negative.
    training : bool
        True: batch statistics, full gradient. False: running statistics, frozen-BN gradient.
    """

    __slots__ = ()

    def __new__(cls, x, stats, axis, training, layout, x3):
        return tuple.__new__(cls, (x, stats, axis, training, layout, x3))

    x = property(operator.itemgetter(0))
    _stats = property(operator.itemgetter(1))
    axis = property(operator.itemgetter(2))
    training = property(operator.itemgetter(3))
    _layout = property(operator.itemgetter(4))
    _x3 = property(operator.itemgetter(5))

    @property
    def mean(self) -> np.ndarray:
        return self._stats[MEAN]

    @property
    def invstd(self) -> np.ndarray:
        return self._stats[INVSTD]

    @property
    def gamma(self) -> np.ndarray:
        return self._stats[GAMMA]

    def __repr__(self) -> str:
        mode = "training" if self.training else "inference"
        return f"BatchNormCache({mode}, x shape {self.x.shape} {self.x.dtype}, axis={self.axis})"


def _after_write():
    """Context for the O(C) NumPy math that runs after a kernel wrote y or dx: it must not raise.

    Only the rare paths use it (running arrays of another dtype than x). An exception there
    would leave the caller's arrays half-updated (seen: under ``np.errstate(all="raise")``,
    float16 running arrays and a batch variance above 65504 raised "overflow encountered in
    cast" after ``out`` was written). Its only floating-point events are overflow to inf
    (rounding into a narrower dtype) and NaN from a NaN channel: the IEEE results, as the kernels
    and PyTorch give them. So a call either completes or raises before its first write.
    """
    return np.errstate(all="ignore")


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
        raise ValueError(
            f"x has shape {x.shape}: no values per channel along axis {axis}; "
            "moments need at least one"
        )
    mean = np.empty(layout.channels, x.dtype)
    var = np.empty(layout.channels, x.dtype)
    if layout.channels:
        x3 = layout.view3(x)
        _threading.kernels_for(x3).moments(x3, mean, var, TUNE)
    return mean, var


def forward(
    x,
    gamma=None,
    beta=None,
    *,
    axis: int = 1,
    training: bool = True,
    running_mean=None,
    running_var=None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    out=None,
) -> tuple[np.ndarray, BatchNormCache]:
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
        one value per channel, or none (an empty batch: empty y, running arrays untouched, as
        PyTorch). False: normalize with the running arrays, which are required.
    running_mean, running_var : ndarray of shape (C,), optional
        Any float dtype; updated in their own dtype. Both or neither.
    momentum : float in [0, 1], default 0.1
        Weight of the new batch (PyTorch's convention; Keras' ``momentum=0.99`` is 0.01 here).
    eps : float, default 1e-5
        > 0 while training, >= 0 in inference (PyTorch's rules).
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
    channels, count, dtype = layout.channels, layout.count, x.dtype
    training = chk.flag(training, "training")
    eps = chk.checked_eps(eps, training)
    gamma = chk.parameter(gamma, "gamma", channels, dtype, 1.0)
    beta = chk.parameter(beta, "beta", channels, dtype, 0.0)
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    tracking = running_mean is not None
    if tracking:
        running_mean = chk.channel_vector(
            running_mean, "running_mean", channels, writeable=training
        )
        running_var = chk.channel_vector(running_var, "running_var", channels, writeable=training)
    if training:
        momentum = chk.unit_momentum(momentum)
        if count == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input "
                f"of shape {x.shape} with channel axis {axis} ({count} per channel)"
            )
    elif not tracking:
        raise ValueError(
            "training=False normalizes with running statistics: pass running_mean and running_var"
        )
    if out is not None:
        out = chk.output_array(out, "out", x.shape, dtype)
    if training:  # x is also kept for backward, so even out=x is refused
        chk.disjoint(
            {"out": out, "running_mean": running_mean, "running_var": running_var},
            {"x": x, "gamma": gamma, "beta": beta},
        )
    else:
        chk.disjoint(
            {"out": out},
            {
                "x": x,
                "gamma": gamma,
                "beta": beta,
                "running_mean": running_mean,
                "running_var": running_var,
            },
            in_place=(("out", "x"),),
        )

    x3 = layout.view3(x)
    y, y3 = layout.output(out, dtype)
    stats = np.empty((4, channels))
    if count == 0 or channels == 0:  # nothing to normalize; running arrays untouched
        stats[...] = np.nan
    elif training:
        direct = tracking and running_mean.dtype == dtype and running_var.dtype == dtype
        rm = running_mean if direct else _NO_RUNNING[dtype]
        rv = running_var if direct else _NO_RUNNING[dtype]
        _threading.kernels_for(x3, y3).forward_train(
            x3, gamma, beta, eps, momentum, rm, rv, stats, y3, TUNE
        )
        if tracking and not direct:  # another dtype: float64 math, rounded once into it
            with _after_write():
                running_mean[...] = (1.0 - momentum) * running_mean.astype(
                    np.float64
                ) + momentum * stats[MEAN]
                running_var[...] = (1.0 - momentum) * running_var.astype(np.float64) + (
                    momentum * count / (count - 1)
                ) * stats[VAR]
    else:
        rm = running_mean if running_mean.dtype == dtype else running_mean.astype(dtype)
        rv = running_var if running_var.dtype == dtype else running_var.astype(dtype)
        _threading.kernels_for(x3, y3).normalize(x3, rm, rv, gamma, beta, eps, stats, y3, TUNE)
    layout.finish_output(y, y3)
    stats.flags.writeable = False
    return y, BatchNormCache(x, stats, axis, training, layout, x3)


def backward(dy, cache: BatchNormCache, *, out=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`forward` with respect to x, gamma and beta.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to y: the forward input's shape and dtype.
    cache : BatchNormCache
        From the :func:`forward` call that produced y. A training cache gives the full
        batch-norm gradient (batch statistics depend on x); an inference cache the frozen-BN
        gradient ``dx = dy * gamma * invstd``, which does not read x (an inf in x does not
        make dx NaN; dgamma reads it).
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
        raise TypeError(
            f"cache must be the BatchNormCache returned by bnfast.forward, got "
            f"{type(cache).__name__}"
        )
    x, layout = cache.x, cache._layout
    dy = chk.as_array(dy, "dy")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy has dtype {dy.dtype}; expected {x.dtype}, the forward input's dtype")
    if dy.shape != x.shape:
        raise ValueError(
            f"dy has shape {dy.shape}, but the cache is from a forward call on "
            f"shape {x.shape}; pass the gradient of that call's output"
        )
    if out is not None:
        out = chk.output_array(out, "out", x.shape, x.dtype)
        chk.disjoint({"out": out}, {"dy": dy, "x": x}, in_place=(("out", "dy"),))

    channels = layout.channels
    dgamma = np.empty(channels, x.dtype)
    dbeta = np.empty(channels, x.dtype)
    dx, dx3 = layout.output(out, x.dtype)
    if layout.count == 0 or channels == 0:
        dgamma[...] = 0.0
        dbeta[...] = 0.0
    else:
        dy3 = layout.view3(dy)
        run = _threading.kernels_for(cache._x3, dy3, dx3)
        if cache.training:
            run.backward_train(cache._x3, dy3, cache._stats, dgamma, dbeta, dx3, TUNE)
        else:
            run.backward_frozen(cache._x3, dy3, cache._stats, dgamma, dbeta, dx3, TUNE)
    layout.finish_output(dx, dx3)
    return dx, dgamma, dbeta
