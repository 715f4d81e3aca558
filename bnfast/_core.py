"""The functional API: validate, map to the canonical (outer, C, inner) view, call one kernel.

The kernel behind each function, in the family ``_threading.kernels_for`` picks from the view's
memory layout (``kernels.rows``, ``kernels.lanes`` or ``kernels.strided``): ``moments`` ->
``moments``; ``forward`` -> ``forward_train`` (training) or ``normalize`` (inference), once
per virtual batch with ``virtual_batch_size``; ``backward`` -> ``backward_train`` (training
cache) or ``backward_frozen`` (inference cache); ``backward_from_input`` ->
``backward_input``.
Each kernel also does the per-channel arithmetic (``kernels/common.py``: statistics, running
averages, gradient coefficients, dgamma and dbeta), so a call allocates its outputs and makes
one kernel call. The math they implement is written out in ``bnfast.reference``.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import numpy as np

from . import _checks as chk
from . import _sync, _threading
from .kernels.common import (
    GAMMA,
    INVSTD,
    MEAN,
    STATS_ROWS,
    VAR,
    frozen_channels,
    inference_channels,
)

_NO_RUNNING = {
    np.dtype(np.float32): np.empty(0, np.float32),
    np.dtype(np.float64): np.empty(0, np.float64),
}  # "no running arrays" to a kernel
# The fused ReLU's threshold: half the smallest subnormal of the data's dtype, so that a value
# counts as positive exactly when it rounds to a positive number (PyTorch applies ReLU to the
# rounded output). As a float64, float64's half-subnormal is 0.
RELU_THRESHOLD = {
    np.dtype(np.float32): float(np.finfo(np.float32).smallest_subnormal) / 2,
    np.dtype(np.float64): 0.0,
}
ACTIVATIONS = (None, "relu")


class BatchNormCache(NamedTuple):
    """What :func:`backward` needs from one :func:`forward` call: an immutable named tuple,
    built by keyword, that pickles and deep-copies (a trainer checkpoints a layer mid-training
    or keeps an EMA copy of it with ``copy.deepcopy``); backward on a copy gives the same bits.

    Attributes
    ----------
    x : ndarray
        The forward input (a reference, not a copy: do not modify it before backward).
    stats : ndarray
        The float64 ``(8, C)`` statistics block the forward wrote (rows ``MEAN``, ``INVSTD``,
        ``GAMMA``, ``VAR``, ``SCALE``, ``SHIFT``, ``R``, ``D`` of ``bnfast.kernels.common``),
        read-only.
    axis : int
        The channel axis, non-negative.
    training : bool
        True: batch statistics, full gradient. False: running statistics, frozen-BN gradient.
    layout : Layout
        How x maps to the canonical ``(outer, C, inner)`` view.
    view : ndarray or None
        That view of x (a view, or a copy where none exists); rebuilt from x when a cache is
        unpickled or copied, so a copy holds x once.
    activation : str or None
        The fused activation (``"relu"``), whose mask backward recomputes from x.
    parts : tuple
        With ``virtual_batch_size``: ``(start, stop, cache)`` of each virtual batch along axis
        0; empty otherwise.
    comm : communicator or None
        The communicator of a synchronized training forward (backward reduces over it too).
    total : int
        With ``comm``: the values per channel over all ranks.

    ``mean``, ``invstd`` (``1/sqrt(var + eps)``) and ``gamma`` (rounded to x's dtype) are
    float64 rows of ``stats``: the statistics that normalized x (with ``virtual_batch_size``,
    those of the first virtual batch; ``parts`` has all).
    """

    x: np.ndarray
    stats: np.ndarray
    axis: int
    training: bool
    layout: chk.Layout
    view: Any = None  # an ndarray; None only in the outer cache of virtual batches
    activation: str | None = None
    parts: tuple = ()
    comm: Any = None
    total: int = 0

    @property
    def mean(self) -> np.ndarray:
        return self.stats[MEAN]

    @property
    def invstd(self) -> np.ndarray:
        return self.stats[INVSTD]

    @property
    def gamma(self) -> np.ndarray:
        return self.stats[GAMMA]

    def __repr__(self) -> str:
        mode = "training" if self.training else "inference"
        return f"BatchNormCache({mode}, x shape {self.x.shape} {self.x.dtype}, axis={self.axis})"

    def __reduce__(self):
        """Pickle and copy without the view of x (rebuilt from x, so x is stored once)."""
        fields = self._asdict()
        fields["view"] = None
        return _rebuild_cache, (fields, self.view is not None)


def _rebuild_cache(fields: dict, has_view: bool) -> BatchNormCache:
    if has_view:
        fields["view"] = fields["layout"].view3(fields["x"])
    if isinstance(fields["stats"], np.ndarray):
        fields["stats"].flags.writeable = False
    return BatchNormCache(**fields)


def _after_write():
    """Context for the O(C) NumPy math that runs after a kernel wrote y or dx: it must not raise.

    Only the rare paths use it (running arrays of another dtype than x; the sums of virtual
    batches). An exception there would leave the caller's arrays half-updated (seen: under
    ``np.errstate(all="raise")``, float16 running arrays and a batch variance above 65504 raised
    "overflow encountered in cast" after ``out`` was written). Its only floating-point events
    are overflow to inf (rounding into a narrower dtype) and NaN from a NaN channel: the IEEE
    results, as the kernels and PyTorch give them. So a call either completes or raises before
    its first write.
    """
    return np.errstate(all="ignore")


def _activation(activation) -> bool:
    """Is the fused activation ReLU? None and "relu" are accepted (an array, even of "relu"
    strings, is a TypeError naming the argument, not NumPy's truth-value error)."""
    if activation is None:
        return False
    if not isinstance(activation, str):
        raise TypeError(
            f"activation must be None or 'relu', got {activation!r} of type "
            f"{type(activation).__name__}"
        )
    if activation != "relu":
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return True


def _renorm(renorm) -> tuple[float, float]:
    """``(rmax, dmax)`` of Batch Renormalization, or ``(0.0, 0.0)`` for none. Accepted: a tuple
    or list of two real numbers, or an ndarray of shape (2,); anything else (a set, whose
    order is arbitrary; a dict, which iterates over its keys; a string) is refused."""
    if renorm is None:
        return 0.0, 0.0
    accepted = (
        "None or a pair (rmax, dmax): a tuple or list of two real numbers, "
        "or an array of shape (2,)"
    )
    if isinstance(renorm, np.ndarray):
        if renorm.shape != (2,):
            raise ValueError(f"renorm has shape {renorm.shape}; accepted: {accepted}")
        pair = renorm.tolist()
    elif isinstance(renorm, (tuple, list)):
        if len(renorm) != 2:
            raise ValueError(
                f"renorm has {len(renorm)} entries, got {renorm!r}; accepted: {accepted}"
            )
        pair = renorm
    else:
        raise TypeError(
            f"renorm must be {accepted}; got {renorm!r} of type {type(renorm).__name__}"
        )
    rmax = chk.real(pair[0], "renorm's rmax", "finite and >= 1")
    dmax = chk.real(pair[1], "renorm's dmax", "finite and >= 0")
    if not (np.isfinite(rmax) and rmax >= 1.0):
        raise ValueError(f"renorm's rmax must be finite and >= 1, got {rmax!r}")
    if not (np.isfinite(dmax) and dmax >= 0.0):
        raise ValueError(f"renorm's dmax must be finite and >= 0, got {dmax!r}")
    return rmax, dmax


def momentum_from_decay(decay: float) -> float:
    """bnfast's (PyTorch's) momentum from a decay: Keras, Flax and numpy-ml call the weight of
    the *old* running value ``momentum`` (e.g. 0.99); bnfast's momentum is the weight of the new
    batch, ``1 - decay``.

    Examples
    --------
    >>> import bnfast
    >>> round(bnfast.momentum_from_decay(0.99), 12)
    0.01
    """
    d = chk.real(decay, "decay", "in [0, 1]")
    if not (np.isfinite(d) and 0.0 <= d <= 1.0):
        raise ValueError(f"decay must be a finite number in [0, 1], got {decay!r}")
    return 1.0 - d


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
    mean, var = _moments64(x, layout)
    return mean.astype(x.dtype), var.astype(x.dtype)  # one rounding of the float64 results


def _moments64(x, layout) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance in float64 (the ``moments`` kernel; needs a value
    per channel)."""
    mean = np.empty(layout.channels)
    var = np.empty(layout.channels)
    if layout.channels:
        x3 = layout.view3(x)
        _threading.kernels_for(x3).moments(x3, mean, var, _threading.tune(x3))
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
    activation: str | None = None,
    renorm: tuple[float, float] | None = None,
    virtual_batch_size: int | None = None,
    unbiased: bool = True,
    comm=None,
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
        momentum * batch`` (running variance unbiased, ``var * m / (m - 1)``, unless
        ``unbiased=False``). Needs more than one value per channel, or none (an empty batch:
        empty y, running arrays untouched, as PyTorch). False: normalize with the running
        arrays, which are required.
    running_mean, running_var : ndarray of shape (C,), optional
        Any float dtype; updated in their own dtype. Both or neither.
    momentum : float in [0, 1], default 0.1
        Weight of the new batch (PyTorch's convention; Keras' ``momentum=0.99`` is 0.01 here:
        :func:`momentum_from_decay`).
    eps : float, default 1e-5
        > 0 while training, >= 0 in inference (PyTorch's rules).
    out : ndarray, optional
        Where to write y: x's shape and dtype, writeable. In training it must not overlap x
        (backward reads x); in inference ``out=x`` normalizes in place.
    activation : None or "relu", default None
        ``"relu"``: ``y = relu(gamma * xhat + beta)`` in the same pass; backward recomputes the
        mask from x and the statistics (no array of x's size is kept).
    renorm : None or (rmax, dmax), optional
        Batch Renormalization (Ioffe 2017), while training: ``y = gamma * (xhat * r + d) +
        beta`` with ``r = clip(sigma_B / sigma_run, 1/rmax, rmax)`` and ``d = clip((mu_B -
        mu_run) / sigma_run, -dmax, dmax)`` from the running statistics before this batch
        (``sigma = sqrt(var + eps)``); r and d are constants in backward. Needs running
        arrays; ``(1, 0)`` is plain batch norm. Inference is unchanged.
    virtual_batch_size : int, optional
        Ghost batches, while training: each group of this many consecutive samples along axis 0
        is normalized with its own statistics (gamma and beta shared); the running arrays are
        updated once per call from the mean of the groups' means and the mean of their
        variances (each unbiased over its group unless ``unbiased=False``). Axis 0 must be the
        batch axis (not ``axis``) and divisible by it.
    unbiased : bool, default True
        The running variance is unbiased (PyTorch) or biased (Keras, Flax, numpy-ml).
    comm : mpi4py communicator, optional
        Synchronized batch norm (data parallelism): while training, x is this rank's shard of
        the global batch and is normalized with the global batch's statistics (one
        ``Allreduce`` of 3 float64 per channel; shards may differ in size, a rank may hold a
        single sample or none), the running arrays get the same bits on every rank, and
        :func:`backward` reduces over the same communicator. Every rank of ``comm`` must make
        the call. Ignored in inference (no collective). Not combined with ``renorm`` or
        ``virtual_batch_size``. See ``bnfast._sync`` for what mismatches are detected.

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
    >>> bnfast.forward(x, beta=np.array([0.5, -2.0]), activation="relu", eps=0.0001)[0].round(4)
    array([[0. , 0. ],
           [1.5, 0. ]])
    """
    x = chk.data_array(x, "x")
    axis = chk.channel_axis(axis, x.ndim)
    layout = chk.Layout.of(x, axis)
    channels, count, dtype = layout.channels, layout.count, x.dtype
    training = chk.flag(training, "training")
    eps = chk.checked_eps(eps, training)
    relu = _activation(activation)
    rmax, dmax = _renorm(renorm)
    unbiased = chk.flag(unbiased, "unbiased")
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
    groups = 1
    if virtual_batch_size is not None:  # checked in inference too, where it is not used
        _virtual_batch_size(virtual_batch_size)
    if comm is not None:
        comm = _sync.checked(comm)
        if not training:
            comm = None  # inference makes no collective
        elif renorm is not None or virtual_batch_size is not None:
            raise ValueError(
                "comm= (synchronized batch norm) does not combine with renorm or virtual_batch_size"
            )
    if training:
        momentum = chk.unit_momentum(momentum)
        if renorm is not None and not tracking:
            raise ValueError(
                "renorm needs running_mean and running_var (r and d compare the batch with them)"
            )
        if virtual_batch_size is not None:
            groups = _virtual_groups(virtual_batch_size, x.shape, axis)
        if count and count // groups == 1 and comm is None:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input of shape "
                f"{x.shape} with channel axis {axis} (1 per channel"
                + (f" in each of {groups} virtual batches)" if groups > 1 else ")")
            )
    elif not tracking:
        raise ValueError(
            "training=False normalizes with running statistics: pass running_mean and running_var"
        )
    if out is not None:
        given = out
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

    y, y3 = layout.output(out, dtype)
    settings = (eps, relu, RELU_THRESHOLD[dtype], rmax, dmax, unbiased)
    if comm is not None:
        stats, total = _run_forward_synced(
            comm, x, layout, y3, gamma, beta, running_mean, running_var, momentum, settings
        )
        layout.finish_output(y, y3)
        cache = BatchNormCache(
            x=x,
            stats=stats,
            axis=axis,
            training=True,
            layout=layout,
            view=layout.view3(x),
            activation="relu" if relu else None,
            comm=comm,
            total=total,
        )
    elif groups > 1 and count > 0 and channels > 0:  # else: nothing to normalize, as below
        cache = _ghost_forward(
            x, y, axis, gamma, beta, running_mean, running_var, momentum, groups, settings
        )
    else:
        stats = _run_forward(
            x, layout, y3, gamma, beta, training, running_mean, running_var, momentum, settings
        )
        layout.finish_output(y, y3)
        cache = BatchNormCache(
            x=x,
            stats=stats,
            axis=axis,
            training=training,
            layout=layout,
            view=layout.view3(x),
            activation="relu" if relu else None,
        )
    return (y if out is None else given), cache


def _update_running(running_mean, running_var, momentum, stats, count, unbiased) -> None:
    """The running averages in float64 NumPy math, rounded once into the running arrays (their
    dtype differs from x's, or the statistics are a synchronized forward's)."""
    unbias = count / (count - 1) if unbiased else 1.0
    with _after_write():
        running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * stats[
            MEAN
        ]
        running_var[...] = (1.0 - momentum) * running_var.astype(np.float64) + (
            momentum * unbias
        ) * stats[VAR]


def _run_forward_synced(
    comm, x, layout, y3, gamma, beta, running_mean, running_var, momentum, settings
) -> tuple[np.ndarray, int]:
    """A synchronized training forward on checked arguments: this rank's float64 moments, the
    global ones (``_sync``: one collective), their statistics block (``inference_channels``,
    the kernels' own helper), y from it (``normalize_block``) and the running averages;
    returns the block and the global count. Raises on every rank, before any write, when the
    ranks disagree or the global batch has one value per channel."""
    eps, relu, thr, _, _, unbiased = settings
    dtype, channels, count = x.dtype, layout.channels, layout.count
    local = count > 0 and channels > 0
    mean, var = _moments64(x, layout) if local else (np.zeros(channels), np.zeros(channels))
    total, mean, var = _sync.global_moments(comm, count, mean, var, dtype, eps, momentum)
    if total == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got 1 over all ranks of "
            f"comm (this rank's input has shape {x.shape}, channel axis {layout.axis})"
        )
    stats = np.empty((STATS_ROWS, channels))
    if total == 0 or channels == 0:
        stats[...] = np.nan
        return stats, total
    inference_channels(mean, var, eps, gamma, beta, stats)  # the kernels' per-channel math
    if local:
        x3 = layout.view3(x)
        _threading.kernels_for(x3, y3).normalize_block(
            x3, stats, int(relu), thr, y3, _threading.tune(x3)
        )
    if running_mean is not None:
        _update_running(running_mean, running_var, momentum, stats, total, unbiased)
    stats.flags.writeable = False
    return stats, total


def _virtual_batch_size(k) -> int:
    """A virtual batch size: an int >= 1."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
        raise TypeError(f"virtual_batch_size must be an int, got {k!r}")
    if k < 1:
        raise ValueError(f"virtual_batch_size must be >= 1, got {k}")
    return int(k)


def _virtual_groups(k, shape, axis) -> int:
    """How many virtual batches of k samples axis 0 holds (checked)."""
    k = _virtual_batch_size(k)
    if axis == 0:
        raise ValueError(
            "virtual_batch_size splits axis 0, the batch axis: the channel axis must be another"
        )
    if shape[0] % k:
        raise ValueError(
            f"virtual_batch_size={k} does not divide the batch of {shape[0]} samples "
            f"(axis 0 of shape {shape})"
        )
    return shape[0] // k


def _run_forward(
    x, layout, y3, gamma, beta, training, running_mean, running_var, momentum, settings
) -> np.ndarray:
    """One kernel call on checked arguments; returns the frozen (8, C) statistics block."""
    eps, relu, thr, rmax, dmax, unbiased = settings
    dtype, channels, count = x.dtype, layout.channels, layout.count
    stats = np.empty((STATS_ROWS, channels))
    if count == 0 or channels == 0:  # nothing to normalize; running arrays untouched
        stats[...] = np.nan
    elif training:
        tracking = running_mean is not None
        direct = tracking and running_mean.dtype == dtype and running_var.dtype == dtype
        if direct or not tracking:
            rm = running_mean if direct else _NO_RUNNING[dtype]
            rv = running_var if direct else _NO_RUNNING[dtype]
        else:  # another dtype: the kernel reads copies in x's precision (renorm), NumPy updates
            rm, rv = running_mean.astype(dtype), running_var.astype(dtype)
        x3 = layout.view3(x)
        _threading.kernels_for(x3, y3).forward_train(
            x3,
            gamma,
            beta,
            eps,
            momentum,
            int(unbiased),
            rmax,
            dmax,
            int(relu),
            thr,
            rm,
            rv,
            stats,
            y3,
            _threading.tune(x3),
        )
        if tracking and not direct:
            _update_running(running_mean, running_var, momentum, stats, count, unbiased)
    else:
        rm = running_mean if running_mean.dtype == dtype else running_mean.astype(dtype)
        rv = running_var if running_var.dtype == dtype else running_var.astype(dtype)
        x3 = layout.view3(x)
        _threading.kernels_for(x3, y3).normalize(
            x3, rm, rv, gamma, beta, eps, int(relu), thr, stats, y3, _threading.tune(x3)
        )
    stats.flags.writeable = False
    return stats


def _ghost_forward(
    x, y, axis, gamma, beta, running_mean, running_var, momentum, groups, settings
) -> BatchNormCache:
    """Ghost batches: each virtual batch is one training call on its views of x and y (so it is
    exactly the batch split by hand); renorm reads copies of the running arrays, which this
    call updates once, from the mean of the groups' statistics (tf-keras 2's rule; README)."""
    eps, relu, thr, rmax, dmax, unbiased = settings
    k = x.shape[0] // groups
    tracking = running_mean is not None
    parts = []
    for g in range(groups):
        xg, yg = x[g * k : (g + 1) * k], y[g * k : (g + 1) * k]
        layout = chk.Layout.of(xg, axis)
        yg3 = layout.output(yg, x.dtype)[1]
        rm = running_mean.astype(x.dtype) if tracking else None
        rv = running_var.astype(x.dtype) if tracking else None
        stats = _run_forward(xg, layout, yg3, gamma, beta, True, rm, rv, 0.0, settings)
        layout.finish_output(yg, yg3)
        part = BatchNormCache(
            x=xg,
            stats=stats,
            axis=axis,
            training=True,
            layout=layout,
            view=layout.view3(xg),
            activation="relu" if relu else None,
        )
        parts.append((g * k, (g + 1) * k, part))
    if tracking:
        per_group = parts[0][2].layout.count
        unbias = per_group / (per_group - 1) if unbiased else 1.0
        means = np.mean([p[2].stats[MEAN] for p in parts], axis=0)
        variances = np.mean([p[2].stats[VAR] for p in parts], axis=0) * unbias
        with _after_write():
            running_mean[...] = (1.0 - momentum) * running_mean.astype(
                np.float64
            ) + momentum * means
            running_var[...] = (1.0 - momentum) * running_var.astype(
                np.float64
            ) + momentum * variances
    first = parts[0][2]
    return BatchNormCache(
        x=x,
        stats=first.stats,
        axis=axis,
        training=True,
        layout=chk.Layout.of(x, axis),
        activation=first.activation,
        parts=tuple(parts),
    )


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
        make dx NaN; dgamma reads it). A fused activation's mask is recomputed from x; Batch
        Renormalization's r and d are constants; virtual batches are differentiated each with
        its own statistics.
    out : ndarray, optional
        Where to write dx: x's shape and dtype, writeable, not overlapping x; ``out=dy``
        computes dx in place.

    Returns
    -------
    dx : ndarray
        x's shape and dtype.
    dgamma, dbeta : ndarray
        Shape ``(C,)``, x's dtype: ``sum(dy * xhat)`` (``sum(dy * (r * xhat + d))`` under
        renorm) and ``sum(dy)`` per channel, dy behind the activation's mask (returned whether
        or not forward had gamma and beta).

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
    x, layout = cache.x, cache.layout
    dy = chk.as_array(dy, "dy")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy has dtype {dy.dtype}; expected {x.dtype}, the forward input's dtype")
    if dy.shape != x.shape:
        raise ValueError(
            f"dy has shape {dy.shape}, but the cache is from a forward call on "
            f"shape {x.shape}; pass the gradient of that call's output"
        )
    if out is not None:
        given = out
        out = chk.output_array(out, "out", x.shape, x.dtype)
        chk.disjoint({"out": out}, {"dy": dy, "x": x}, in_place=(("out", "dy"),))

    dx, dx3 = layout.output(out, x.dtype)
    channels = layout.channels
    dgamma = np.empty(channels, x.dtype)
    dbeta = np.empty(channels, x.dtype)
    if cache.parts:  # virtual batches: each part's gradient; dgamma, dbeta summed in float64
        sums64 = np.zeros((2, channels))
        for start, stop, part in cache.parts:
            dxg = dx[start:stop]
            dxg3 = part.layout.output(dxg, x.dtype)[1]
            _run_backward_part(part, part.layout.view3(dy[start:stop]), sums64, dxg3)
            part.layout.finish_output(dxg, dxg3)
        with _after_write():
            dgamma[...] = sums64[0]
            dbeta[...] = sums64[1]
    else:
        _run_backward(cache, layout.view3(dy), dgamma, dbeta, dx3)
        layout.finish_output(dx, dx3)
    return (dx if out is None else given), dgamma, dbeta


def _run_backward_synced(cache: BatchNormCache, dy3, dgamma, dbeta, dx3) -> None:
    """A synchronized training backward: this rank's two float64 sums (``backward_sums``),
    summed over the ranks (one collective), dx from the global sums and count
    (``backward_apply``). dgamma and dbeta are this rank's share (its own sums), as every
    other parameter's gradient in data parallelism: averaging or summing them over the ranks
    with the rest gives the global batch's."""
    layout, x3, stats = cache.layout, cache.view, cache.stats
    local = layout.count > 0 and layout.channels > 0
    sums = np.zeros((2, layout.channels))
    relu, thr = int(cache.activation == "relu"), RELU_THRESHOLD[x3.dtype]
    if local:
        run = _threading.kernels_for(x3, dy3, dx3)
        run.backward_sums(x3, dy3, stats, relu, thr, sums[0], sums[1], _threading.tune(x3))
    total = _sync.global_sums(cache.comm, sums)
    if local:
        run.backward_apply(
            x3,
            dy3,
            stats,
            relu,
            thr,
            total[0],
            total[1],
            float(cache.total),
            dgamma,
            dbeta,
            dx3,
            _threading.tune(x3),
        )
    # this rank's share, by the kernels' own rule (frozen_channels: dgamma_of, dbeta = s1)
    frozen_channels(sums[0], sums[1], stats, dgamma, dbeta)


def _run_backward_part(part: BatchNormCache, dy3, sums64, dx3) -> None:
    """One virtual batch's training gradient: its two float64 sums (``backward_sums``), dx from
    them (``backward_apply``), and its float64 dgamma and dbeta added to ``sums64`` (rows
    dgamma, dbeta) by the kernels' own rule (``frozen_channels``), so that the sum over the
    parts is rounded once (rounding each part's first left float32 dgamma 127 ulps off at
    (4096, 96) in 8 parts)."""
    x3, stats = part.view, part.stats
    channels = stats.shape[1]
    s = np.zeros((2, channels))
    relu, thr = int(part.activation == "relu"), RELU_THRESHOLD[x3.dtype]
    run = _threading.kernels_for(x3, dy3, dx3)
    tune = _threading.tune(x3)
    run.backward_sums(x3, dy3, stats, relu, thr, s[0], s[1], tune)
    scratch = np.empty((2, channels), x3.dtype)
    run.backward_apply(
        x3,
        dy3,
        stats,
        relu,
        thr,
        s[0],
        s[1],
        float(part.layout.count),
        scratch[0],
        scratch[1],
        dx3,
        tune,
    )
    g = np.empty((2, channels))
    frozen_channels(s[0], s[1], stats, g[0], g[1])
    sums64 += g


def _run_backward(cache: BatchNormCache, dy3, dgamma, dbeta, dx3) -> None:
    """The backward kernel of one (not ghost) cache on checked arguments."""
    layout = cache.layout
    if cache.comm is not None:
        _run_backward_synced(cache, dy3, dgamma, dbeta, dx3)
        return
    if layout.count == 0 or layout.channels == 0:
        dgamma[...] = 0.0
        dbeta[...] = 0.0
        return
    x3 = cache.view
    run = _threading.kernels_for(x3, dy3, dx3)
    kernel = run.backward_train if cache.training else run.backward_frozen
    relu = int(cache.activation == "relu")
    kernel(
        x3,
        dy3,
        cache.stats,
        relu,
        RELU_THRESHOLD[x3.dtype],
        dgamma,
        dbeta,
        dx3,
        _threading.tune(x3),
    )


def backward_from_input(
    dy, x, gamma=None, *, axis: int = 1, eps: float = 1e-5, out=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training gradient of batch norm from x itself, without a cache (numpy-ml's
    ``_bwd(dLdy, X)`` and course-style layers): equal to ``backward(dy, forward(x, gamma,
    axis=axis, eps=eps)[1])``.

    The batch statistics and both gradient sums come from ONE read of x and dy (sums around a
    shift: ``sum(dy * (x - mean)) = sum(dy * (x - k)) - (mean - k) * sum(dy)`` with k a value
    of the channel), then one pass writes dx.

    Parameters
    ----------
    dy, x : ndarray
        The gradient of the loss with respect to the output, and the forward input: same shape
        and dtype (float32 or float64).
    gamma : array of shape (C,), optional
        The scale (None: 1), used in x's precision.
    axis, eps : as in :func:`forward` (eps > 0).
    out : ndarray, optional
        Where to write dx (``out=dy`` computes it in place).

    Returns
    -------
    dx, dgamma, dbeta : ndarray

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0], [2.0, 25.0]])
    >>> dy = np.array([[0.5, 1.0], [0.0, -1.0], [1.0, 2.0]])
    >>> got = bnfast.backward_from_input(dy, x)
    >>> want = bnfast.backward(dy, bnfast.forward(x)[1])
    >>> all(np.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(got, want))
    True
    """
    x = chk.data_array(x, "x")
    axis = chk.channel_axis(axis, x.ndim)
    layout = chk.Layout.of(x, axis)
    dy = chk.as_array(dy, "dy")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy has dtype {dy.dtype}; expected {x.dtype}, x's dtype")
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape}; expected {x.shape}, x's shape")
    eps = chk.checked_eps(eps, True)
    gamma = chk.parameter(gamma, "gamma", layout.channels, x.dtype, 1.0)
    if layout.count == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input of shape "
            f"{x.shape} with channel axis {axis} (1 per channel)"
        )
    if out is not None:
        given = out
        out = chk.output_array(out, "out", x.shape, x.dtype)
        chk.disjoint({"out": out}, {"dy": dy, "x": x, "gamma": gamma}, in_place=(("out", "dy"),))
    dx, dx3 = layout.output(out, x.dtype)
    dgamma = np.empty(layout.channels, x.dtype)
    dbeta = np.empty(layout.channels, x.dtype)
    if layout.count == 0 or layout.channels == 0:
        dgamma[...] = 0.0
        dbeta[...] = 0.0
    else:
        x3, dy3 = layout.view3(x), layout.view3(dy)
        _threading.kernels_for(x3, dy3, dx3).backward_input(
            x3, dy3, gamma, eps, dgamma, dbeta, dx3, _threading.tune(x3)
        )
    layout.finish_output(dx, dx3)
    return (dx if out is None else given), dgamma, dbeta
