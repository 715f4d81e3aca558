"""The functional API and the one run path: checks -> canonical view -> parameter block ->
one kernel call.

The kernel behind each function, in the family ``_threading.kernels_for`` picks from the
canonical view's shape (``kernels.rows`` or ``kernels.lanes``): ``moments`` -> ``moments``;
``forward`` -> ``forward`` (mode: batch statistics while training, running statistics in
inference, given statistics for a synchronized forward; once per virtual batch with
``virtual_batch_size``); ``backward`` -> ``backward`` (mode: train, frozen, or the sums and the
given-sums pass of a synchronized backward); ``backward_from_input`` -> ``backward_input``.
:func:`run_forward` and :func:`run_backward` are the run path the layer's planned calls share;
what a functional call's checks establish from its scalar arguments and x's shape, strides
and dtype is memoized per call signature (``_ForwardPlan``, ``_backward_plan``), as the layer
keeps its plan.
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
from .kernels._jit import (
    BACKWARD_FROZEN,
    BACKWARD_GIVEN,
    BACKWARD_SUMS,
    BACKWARD_TRAIN,
    FORWARD_BATCH,
    FORWARD_GIVEN,
    FORWARD_RUNNING,
    P_EPS,
    P_MODE,
    P_MOMENTUM,
    P_RELU,
    P_RMAX,
)
from .kernels.common import (
    INVSTD,
    KEPT,
    KEPT_RENORM,
    KEPT_VAR,
    MEAN,
    STATS_ROWS,
    VAR,
    D,
    R,
    parameter_gradients,
    update_running,
)

_NO_RUNNING = {
    np.dtype(np.float32): np.empty(0, np.float32),
    np.dtype(np.float64): np.empty(0, np.float64),
}  # "no running arrays" to a kernel
NO_SUMS = np.empty((2, 0))  # "the sums are not wanted" to the backward kernel (O(T) buffers)
NO_KEPT = np.empty((KEPT, 0))  # "keep no statistics" to the forward kernel (inference)
# The fused ReLU's threshold: half the smallest subnormal of the data's dtype, so that a value
# counts as positive exactly when it rounds to a positive number (PyTorch applies ReLU to the
# rounded output). As a float64, float64's half-subnormal is 0.
RELU_THRESHOLD = {
    np.dtype(np.float32): float(np.finfo(np.float32).smallest_subnormal) / 2,
    np.dtype(np.float64): 0.0,
}


class BatchNormCache(NamedTuple):
    """What :func:`backward` needs from one :func:`forward` call: an immutable named tuple,
    built by keyword, that pickles and deep-copies (a trainer checkpoints a layer mid-training
    or keeps an EMA copy of it with ``copy.deepcopy``); backward on a copy gives the same bits.

    Attributes
    ----------
    x : ndarray
        The forward input (a reference, not a copy: do not modify it before backward).
    stats : ndarray
        The float64 statistics a training forward kept for backward: rows ``MEAN`` and
        ``INVSTD`` (the batch mean and ``1/sqrt(var + eps)`` that normalized x) and under
        renorm ``R`` and ``D`` (of ``bnfast.kernels.common``); shape ``(2, C)`` or ``(4, C)``,
        16 or 32 bytes per channel (an inference cache keeps none: ``running``). A training
        forward of fewer than 32 values per channel (16 in float64) over more than 32768
        channels keeps none (shape ``(2, 0)``: 16 bytes per channel would exceed x/8) and
        backward takes the statistics again from x with the forward's own arithmetic (the same
        bits). The backward kernel takes it as it
        is; do not modify it.
    axis : int
        The channel axis, non-negative.
    training : bool
        True: batch statistics, full gradient. False: running statistics, frozen-BN gradient.
    layout : Layout
        How x maps to the canonical ``(outer, C, inner)`` view.
    view : ndarray or None
        That view of x, C-contiguous, when x has one; None where it would be a copy (backward
        copies x again rather than the cache holding x twice). Rebuilt from x when a cache is
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
    gamma, beta : ndarray
        The scale and shift the forward used, in x's dtype (references: the caller's arrays
        when they had x's dtype; do not modify them before backward, as with x).
    eps : float
        The forward's eps.
    running : tuple or None
        An inference cache's ``(running_mean, running_var)``: the caller's arrays the forward
        normalized with (references, read in x's dtype; the frozen-statistics backward reads
        them, so do not modify them before it). None while training.

    ``mean`` and ``invstd`` (``1/sqrt(var + eps)``) are float64 vectors: the statistics that
    normalized x (with ``virtual_batch_size``, those of the first virtual batch; ``parts`` has
    all).

    :func:`backward` takes the arrays of a cache as :func:`forward` made them (below the serial
    threshold its kernel unboxes them without numba's type checks, 0.3 us of a 3.6 us call):
    a cache built by hand or with ``_replace`` must keep their shapes, dtypes and contiguity.
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
    gamma: Any = None  # ndarrays; None only in a cache built by hand without them
    beta: Any = None
    eps: float = 0.0
    running: Any = None

    @property
    def mean(self) -> np.ndarray:
        return self._rows()[0]

    @property
    def invstd(self) -> np.ndarray:
        return self._rows()[1]

    def _rows(self) -> np.ndarray:
        """MEAN and INVSTD: kept, from the running arrays, or (none kept) taken again by the
        kernel that made them (read-only)."""
        if self.running is not None:
            rows = self.frozen_stats()
        elif self.stats.shape[1] or self.layout.channels == 0:
            rows = self.stats[:KEPT]
        else:
            x3 = self.view if self.view is not None else self.layout.view3(self.x)
            rows = np.empty((KEPT, x3.shape[1]))
            kernels, tune = _threading.kernels_for(x3, fused=True)
            kernels.moments(x3, rows[MEAN], rows[INVSTD], tune)  # (no rescue: none was needed)
            _invstd_in_place(rows[INVSTD], self.eps)
        return _read_only(rows)

    def __repr__(self) -> str:
        mode = "training" if self.training else "inference"
        return f"BatchNormCache({mode}, x shape {self.x.shape} {self.x.dtype}, axis={self.axis})"

    @classmethod
    def of(
        cls,
        x,
        stats,
        axis,
        training,
        layout,
        view,
        activation,
        gamma,
        beta,
        eps,
        running,
        comm=None,
        total=0,
    ) -> BatchNormCache:
        """A cache without virtual batches (synchronized with ``comm`` and ``total``), built
        positionally: the run path's constructor (0.14 us where the keyword call took 0.43
        us)."""
        return tuple.__new__(
            cls,
            (
                x,
                stats,
                axis,
                training,
                layout,
                view,
                activation,
                (),
                comm,
                total,
                gamma,
                beta,
                eps,
                running,
            ),
        )

    def frozen_stats(self) -> np.ndarray:
        """An inference cache's MEAN and INVSTD rows for the backward kernel: the running
        arrays as the forward kernel read them (in x's dtype) in float64, and ``1/sqrt(var +
        eps)`` (the kernel's arithmetic)."""
        rows = np.empty((KEPT, self.layout.channels))
        rows[MEAN] = self.running[0].astype(self.x.dtype, copy=False)
        rows[INVSTD] = self.running[1].astype(self.x.dtype, copy=False)
        _invstd_in_place(rows[INVSTD], self.eps)  # (16 bytes per channel in all)
        return rows

    def __reduce__(self):
        """Pickle and copy without the view of x (rebuilt from x, so x is stored once)."""
        fields = self._asdict()
        fields["view"] = None
        return _rebuild_cache, (fields, self.view is not None)


def _invstd_in_place(v: np.ndarray, eps: float) -> None:
    """``v = 1 / sqrt(v + eps)`` in place on a float64 row of variances: the kernels'
    arithmetic (``common.finish_channels``), for the rows Python builds (an inference cache's,
    a cache that kept none, a synchronized rank without values): the same bits."""
    v += eps
    np.sqrt(v, out=v)
    np.divide(1.0, v, out=v)


def _read_only(rows: np.ndarray) -> np.ndarray:
    rows = rows.view()
    rows.flags.writeable = False  # a fresh view: the block itself stays writeable
    return rows


def _rebuild_cache(fields: dict, has_view: bool) -> BatchNormCache:
    if has_view:
        fields["view"] = fields["layout"].view3(fields["x"])  # a view, as before pickling
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
    mean, var = _moments64(layout.view3(x))
    return mean.astype(x.dtype), var.astype(x.dtype)  # one rounding of the float64 results


def _moments64(x3, mean=None, var=None, launch=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance in float64 of a canonical view (the ``moments``
    kernel, then the rescue kernel if it reports overflowed channels; needs a value per
    channel), into ``mean`` and ``var`` when given (C-contiguous float64). ``launch``: a
    plan's ``(kernel, tune)`` (see ``run_forward``)."""
    mean = np.empty(x3.shape[1]) if mean is None else mean
    var = np.empty(x3.shape[1]) if var is None else var
    if launch is not None:
        bad = launch[0](x3, mean, var, launch[1])
    elif x3.shape[1]:
        kernels, tune = _threading.kernels_for(x3, fused=True)
        bad = kernels.moments(x3, mean, var, tune)
    else:
        bad = 0
    if bad:
        _threading.rescue_moments(x3, mean, var)
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
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    tracking = running_mean is not None
    if comm is not None:
        comm = _sync.checked(comm)
    plan = _forward_plan(
        x,
        axis,
        training,
        tracking,
        momentum,
        eps,
        activation,
        renorm,
        virtual_batch_size,
        unbiased,
        comm is not None,
    )
    layout, dtype, training = plan.layout, x.dtype, plan.training
    channels = layout.channels
    # a trainer's call: every vector as the kernels take it, and nothing can overlap
    as_is = (
        tracking
        and out is None
        and chk.taken_as_is(x, gamma, beta, running_mean, running_var, channels, training)
    )
    if not as_is:
        gamma = chk.parameter(gamma, "gamma", channels, dtype, 1.0)
        beta = chk.parameter(beta, "beta", channels, dtype, 0.0)
        if tracking:
            running_mean = chk.channel_vector(
                running_mean, "running_mean", channels, writeable=training
            )
            running_var = chk.channel_vector(
                running_var, "running_var", channels, writeable=training
            )
    if not training:
        comm = None  # inference makes no collective
    if out is not None:
        given = out
        out = chk.output_array(out, "out", x.shape, dtype)
    # The caller's arrays a call writes: out, and the running arrays while training; where it
    # writes none, nothing can alias (0.8 us of a 6 us call saved).
    if as_is:
        pass  # (no out; while training nothing overlaps)
    elif (
        training
        and (out is not None or tracking)  # x is kept for backward: out=x refused
        and not chk.separate((out, running_mean, running_var), (x, gamma, beta))
    ):
        chk.disjoint(
            {"out": out, "running_mean": running_mean, "running_var": running_var},
            {"x": x, "gamma": gamma, "beta": beta},
        )
    elif not training and out is not None:
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

    if comm is not None:
        y, y3 = layout.output(out, dtype)
        stats, total = _forward_synced(
            comm,
            x,
            layout,
            y3,
            gamma,
            beta,
            running_mean,
            running_var,
            plan.momentum,
            plan.eps,
            plan.relu_thr,
            plan.unbiased,
        )
        layout.finish_output(y, y3)
        cache = BatchNormCache(
            x=x,
            stats=stats,
            axis=plan.axis,
            training=True,
            layout=layout,
            view=_kept_view(x, layout),
            activation=plan.activation,
            comm=comm,
            total=total,
            gamma=gamma,
            beta=beta,
            eps=plan.eps,
        )
    elif plan.groups > 1 and layout.count > 0 and channels > 0:  # else: nothing to normalize
        y = layout.output(out, dtype)[0]
        cache = _ghost_forward(
            x,
            y,
            plan.axis,
            gamma,
            beta,
            running_mean,
            running_var,
            plan.momentum,
            plan.groups,
            plan.block,
        )
    else:
        x3 = x.reshape(layout.canon) if plan.reshapes else layout.view3(x)
        y, y3 = layout.output(out, dtype, x3 if plan.placed else None)
        launch = plan.launch
        if (
            tracking
            and launch is not None
            and not (kernel_ready(running_mean, dtype) and kernel_ready(running_var, dtype))
        ):
            launch = None  # (the kernels take running arrays as they are only when ready)
        stats = run_forward(
            x3,
            y3,
            gamma,
            beta,
            running_mean,
            running_var,
            plan.block,
            np.empty(plan.kept) if training else NO_KEPT,
            launch,
        )
        if out is not None:  # (without out, y3 is a view of y)
            layout.finish_output(y, y3)
        cache = BatchNormCache.of(
            x,
            stats,
            plan.axis,
            training,
            layout,
            x3 if plan.view else None,
            plan.activation,
            gamma,
            beta,
            plan.eps,
            None if training else (running_mean, running_var),
        )
    return (y if out is None else given), cache


class _ForwardPlan:
    """What :func:`forward`'s checks establish from its scalar arguments and x's shape,
    strides and dtype: the layout, the kernel's parameter block, the kept block's shape, the
    small-call kernels. Memoized (``_forward_plan``): a trainer repeats the same few calls,
    and these checks and lookups took ~1.5 us of a 7.9 us call at float32 (32, 64) (Zen 5)."""

    __slots__ = (
        "layout",
        "axis",
        "training",
        "eps",
        "momentum",
        "activation",
        "relu_thr",
        "unbiased",
        "groups",
        "block",
        "kept",
        "view",
        "placed",
        "reshapes",
        "launch",
        "pending",
    )

    def __init__(
        self,
        x,
        axis,
        training,
        tracking,
        momentum,
        eps,
        activation,
        renorm,
        vbs,
        unbiased,
        synced,
    ) -> None:
        axis = chk.channel_axis(axis, x.ndim)
        layout = chk.Layout.of(x, axis)
        count, dtype = layout.count, x.dtype
        training = chk.flag(training, "training")
        eps = chk.checked_eps(eps, training)
        relu = _activation(activation)
        rmax, dmax = _renorm(renorm)
        unbiased = chk.flag(unbiased, "unbiased")
        groups = 1
        if vbs is not None:  # checked in inference too, where it is not used
            _virtual_batch_size(vbs)
        if synced and training and (renorm is not None or vbs is not None):
            raise ValueError(
                "comm= (synchronized batch norm) does not combine with renorm or virtual_batch_size"
            )
        if training:
            momentum = chk.unit_momentum(momentum)
            if renorm is not None and not tracking:
                raise ValueError(
                    "renorm needs running_mean and running_var (r and d compare the batch with "
                    "them)"
                )
            if vbs is not None:
                groups = _virtual_groups(vbs, x.shape, axis)
            if count and count // groups == 1 and not synced:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input of shape "
                    f"{x.shape} with channel axis {axis} (1 per channel"
                    + (f" in each of {groups} virtual batches)" if groups > 1 else ")")
                )
        elif not tracking:
            raise ValueError(
                "training=False normalizes with running statistics: pass running_mean and "
                "running_var"
            )
        self.layout, self.axis, self.training, self.eps = layout, axis, training, eps
        self.momentum = momentum if training else 0.0
        self.activation = "relu" if relu else None
        self.relu_thr = (1.0, RELU_THRESHOLD[dtype]) if relu else (0.0, 0.0)
        self.unbiased, self.groups = unbiased, groups
        if not training:
            self.block = params(
                FORWARD_RUNNING, eps, 0.0, unbiased, 0.0, 0.0, *self.relu_thr, count
            )
        elif groups > 1:
            self.block = params(
                FORWARD_BATCH, eps, 0.0, unbiased, rmax, dmax, *self.relu_thr, count // groups
            )
        else:
            self.block = params(
                FORWARD_BATCH, eps, self.momentum, unbiased, rmax, dmax, *self.relu_thr, count
            )
        self.kept = kept_block(layout, dtype, rmax > 0.0).shape if training else (KEPT, 0)
        self.view = layout.is_view(x)
        self.placed = layout.placed_apart(dtype)  # where a fresh y starts matters (chk.placed)
        self.reshapes = self.view and not layout.transposed
        nothing = count == 0 or layout.channels == 0  # (run_forward's own path handles it)
        launch = None if nothing else _threading.small_launch(layout.canon, dtype, "forward")
        self.pending = launch is _threading.PENDING  # (then not kept: see small_launch)
        self.launch = None if self.pending else launch


def _forward_plan(
    x, axis, training, tracking, momentum, eps, activation, renorm, vbs, unbiased, synced
) -> _ForwardPlan:
    """The checked plan of a forward call: from the memo when its arguments are of the types a
    trainer passes (a bool never stands for an int there, nor an int for a float: ``True ==
    1`` as a key, and ``axis=True`` must raise), else checked afresh."""
    args = (x, axis, training, tracking, momentum, eps, activation, renorm, vbs, unbiased, synced)
    if not (
        type(axis) is int
        and (training is True or training is False)
        and (unbiased is True or unbiased is False)
        and type(eps) is float is type(momentum)
        and (activation is None or type(activation) is str)
        and vbs is None
        and (renorm is None or _float_pair(renorm))
    ):
        return _ForwardPlan(*args)
    key = (
        x.shape,
        x.strides,
        x.dtype,
        axis,
        training,
        tracking,
        momentum,
        eps,
        activation,
        renorm,
        unbiased,
        synced,
    )
    plan = _FORWARD_PLANS.get(key)
    if plan is None:
        plan = _ForwardPlan(*args)
        if plan.pending:  # its kernel compiles in this call: the next call plans again
            return plan
        if len(_FORWARD_PLANS) >= 256:
            _FORWARD_PLANS.clear()
        _FORWARD_PLANS[key] = plan
    return plan


def _float_pair(v) -> bool:
    return type(v) is tuple and len(v) == 2 and type(v[0]) is float and type(v[1]) is float


_FORWARD_PLANS: dict = {}


def params(mode, eps, momentum, unbiased, rmax, dmax, relu, thr, count) -> np.ndarray:
    """The kernels' float64 parameter block (``kernels._jit.P_*``) for one call: read-only and
    shared between calls with the same values (a trainer repeats the same few every step;
    building the array took 0.5 us of a 6 us call, a lookup takes 0.15 us)."""
    key = (mode, eps, momentum, unbiased, rmax, dmax, relu, thr, count)
    block = _BLOCKS.get(key)
    if block is None:
        if len(_BLOCKS) >= 256:
            _BLOCKS.clear()
        block = np.array(
            (mode, eps, momentum, float(unbiased), rmax, dmax, relu, thr, 0.0, count), np.float64
        )
        block.flags.writeable = False
        _BLOCKS[key] = block
    return block


_BLOCKS: dict = {}


# A training forward keeps MEAN and INVSTD (16 bytes per channel) when that is at most x/8 or
# 512 KiB (C <= 32768), so that with the call's other memory (per-tile buffers; the two-pass
# partials, <= x/16) it stays within the README's bound of x/4 (float32; x/8 for float64) plus
# 1 MiB; else none (the lanes family's fused route, certainly: fewer than 32 values per
# channel), and backward takes the statistics again from x. Float32 (2, 2_000_000) kept 128 MB
# (the whole (8, C) block) for x of 16 MB.
KEEP_ALWAYS = 2**19
KEEP_CHANNELS = KEEP_ALWAYS // (8 * KEPT)  # up to this many channels, always kept


def kept_block(layout, dtype, renorm: bool) -> np.ndarray:
    """The block a training forward writes the statistics a cache keeps into: ``(4, C)`` under
    renorm (MEAN, INVSTD, R, D: r and d depend on the running statistics before the update, so
    they are always kept), else ``(2, C)``, or ``(2, 0)`` (none kept, see ``KEEP_ALWAYS``)."""
    channels = layout.channels
    if renorm:
        return np.empty((KEPT_RENORM, channels))
    # (the first test decides the common case without the product)
    keep = (
        channels <= KEEP_CHANNELS
        or 8 * KEPT * channels <= layout.count * channels * dtype.itemsize // 8
    )
    return np.empty((KEPT, channels if keep else 0))


def _kept_view(x, layout):
    """The canonical view a cache keeps of x: the view itself, or None where it would be a copy
    (backward then copies again rather than the cache holding a second x)."""
    return layout.view3(x) if layout.is_view(x) else None


def _running_for_kernel(running_mean, running_var, dtype):
    """The running arrays as the kernels take them: themselves when both are
    :func:`kernel_ready` (the kernel updates them in place), else copies in x's dtype (renorm
    reads them; the update is then :func:`update_running_of`'s, in the arrays' own dtype)."""
    if running_mean is None:
        return _NO_RUNNING[dtype], _NO_RUNNING[dtype]
    if kernel_ready(running_mean, dtype) and kernel_ready(running_var, dtype):
        return running_mean, running_var
    return running_mean.astype(dtype), running_var.astype(dtype)


def kernel_ready(v, dtype) -> bool:
    """Can the kernels take running array ``v`` for data of ``dtype`` as it is (and update it
    in place)? Of that dtype, writeable and contiguous (``kernels._jit``: per-channel vectors
    are contiguous; a strided one is updated from a copy, as one of another dtype)."""
    return v.dtype is dtype and (f := v.flags).writeable and f.c_contiguous


def run_forward(
    x3, y3, gamma, beta, running_mean, running_var, block, stats, launch=None
) -> np.ndarray:
    """The forward kernel on checked arguments (the layer's planned path too): one call, and
    the rescue kernel when it reports channels whose float64 sums overflowed or ran around an
    ill-placed shift. Running arrays of another dtype than x's are updated afterwards from the
    same statistics (:func:`update_running_of`; the kernel then keeps VAR too, in a block of
    ``KEPT_VAR`` rows: an O(C) path beyond the memory bound). Returns the kept block:
    ``stats``, or a new one where ``stats`` kept none and backward cannot take the statistics
    again (after a rescue, or running arrays of another dtype). ``launch``: a plan's
    ``(kernel, tune)`` for a small call in the batch or running mode (``_threading.small_launch``:
    the compiled kernel, called without numba's type dispatch), whose checks fixed every
    argument's type: x3, y3 and ``stats`` C-contiguous, values per channel 1-D in x's dtype,
    running arrays in x's dtype and writeable (or none) (0.5 us of checks and lookups and 0.3 us
    of dispatch saved per call, float32 (32, 64), Zen 5)."""
    if launch is not None:
        kernel, tune = launch
        rm, rv = running_mean, running_var
        if rm is None:
            rm = rv = _NO_RUNNING[x3.dtype]
        kept, foreign = stats, False
        bad = kernel(x3, gamma, beta, rm, rv, block, stats, y3, tune)
    else:
        dtype, channels = x3.dtype, x3.shape[1]
        if x3.shape[0] * x3.shape[2] == 0 or channels == 0:  # nothing to normalize (PyTorch)
            stats[...] = np.nan
            return stats
        rm, rv = _running_for_kernel(running_mean, running_var, dtype)
        mode = block[P_MODE]
        kernels, tune = _threading.kernels_for(
            x3, mode == FORWARD_GIVEN, fused=mode == FORWARD_BATCH
        )
        foreign = rm is not running_mean and running_mean is not None and mode != FORWARD_RUNNING
        kept = stats
        if foreign:  # the update below needs VAR
            stats = np.empty((KEPT_VAR, x3.shape[1]))
            stats[: kept.shape[0], : kept.shape[1]] = kept  # (a synchronized forward's given rows)
        bad = kernels.forward(x3, gamma, beta, rm, rv, block, stats, y3, tune)
    if bad < 0:  # the fused-only small twin's routes do not apply
        bad = _threading.fallback(x3).forward(x3, gamma, beta, rm, rv, block, stats, y3, tune)
    if bad:
        stats = _rescued(x3, y3, gamma, beta, rm, rv, block, stats, tune)
    if foreign:
        update_running_of(running_mean, running_var, stats[MEAN], stats[VAR], block)
    if stats is not kept:
        if kept.shape[1] == 0:
            return np.ascontiguousarray(stats[:KEPT])
        kept[...] = stats[: kept.shape[0]]
    return kept


def _rescued(x3, y3, gamma, beta, rm, rv, block, stats, tune) -> np.ndarray:
    """The rescue after a forward that counted bad channels (the cold path): the whole work
    block from the first pass's kept rows (the mean, and minus the variance in place of the
    inverse std of each channel of a tile that counted bad ones: ``common.settle_channels``;
    where none were kept, from the forward kernel again without running arrays: the same sums,
    the same y), the rescue kernel on it (it finishes the marked channels and updates their
    running averages: the forward updated the others'), and the kept rows from it (a new block
    where none were kept)."""
    if stats.shape[1] == 0:
        stats = np.empty((KEPT, x3.shape[1]))
        none = _NO_RUNNING[x3.dtype]
        _threading.fallback(x3).forward(x3, gamma, beta, none, none, block, stats, y3, tune)
    work = np.empty((STATS_ROWS, x3.shape[1]))
    work[: stats.shape[0]] = stats
    _threading.rescue(x3, gamma, beta, rm, rv, block, work, y3)
    stats[...] = work[: stats.shape[0]]
    return stats


def update_running_of(running_mean, running_var, mean, var, block) -> None:
    """The running averages of arrays of any float dtype (another than x's; ghost batches'
    combined statistics): the kernels' own ``update_running`` on float64 copies (exact), rounded
    once into the arrays. Runs after a kernel's write, so it must not raise
    (:func:`_after_write`)."""
    rm64 = running_mean.astype(np.float64)
    rv64 = running_var.astype(np.float64)
    update_running.python(mean, var, block, rm64, rv64)
    with _after_write():
        running_mean[...] = rm64
        running_var[...] = rv64


def _forward_synced(
    comm,
    x,
    layout,
    y3,
    gamma,
    beta,
    running_mean,
    running_var,
    momentum,
    eps,
    relu_thr: tuple[float, float],
    unbiased,
    x3=None,
    launches=None,
) -> tuple[np.ndarray, int]:
    """A synchronized training forward on checked arguments: this rank's float64 moments (the
    ``moments`` kernel), the global ones (``_sync``: one collective), then the ``forward``
    kernel with those statistics given (``FORWARD_GIVEN``: the block, y and the running
    averages over all ranks' values); returns the block and the global count. Raises on every
    rank, before any write, when the ranks disagree or the global batch has one value per
    channel. A layer's plan passes x's canonical view ``x3`` and ``launches``, the small
    ``moments`` and general ``forward`` kernels (its ``synced``), for arguments whose types it
    fixed (running arrays in x's dtype, writeable, or none)."""
    dtype, channels, count = x.dtype, layout.channels, layout.count
    local = count > 0 and channels > 0
    if x3 is None:
        x3 = layout.view3(x)
    moments_launch, forward_launch = launches if launches is not None else (None, None)
    # Kept (the global statistics cannot be taken again); the kernel is given the mean and the
    # variance in rows 0 and 1 and leaves MEAN and INVSTD there.
    stats = np.empty((KEPT, channels))
    mean, var = stats[0], stats[1]  # this rank's, then (in place) the global batch's
    if local:
        _moments64(x3, mean, var, moments_launch)
    total = _sync.global_moments(comm, count, mean, var, dtype, eps, momentum)
    if total == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got 1 over all ranks of "
            f"comm (this rank's input has shape {x.shape}, channel axis {layout.axis})"
        )
    if total == 0 or channels == 0:
        stats[...] = np.nan
        return stats, total
    block = params(FORWARD_GIVEN, eps, momentum, unbiased, 0.0, 0.0, *relu_thr, total)
    if local:
        run_forward(x3, y3, gamma, beta, running_mean, running_var, block, stats, forward_launch)
    else:  # this rank holds no values: the running averages, and the kept rows
        if running_mean is not None:
            update_running_of(running_mean, running_var, mean, var, block)
        _invstd_in_place(var, eps)  # (var is the row INVSTD)
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


def _ghost_forward(
    x, y, axis, gamma, beta, running_mean, running_var, momentum, groups, block
) -> BatchNormCache:
    """Ghost batches: each virtual batch is one ``forward`` kernel call on its views of x and y
    (batch statistics, so it is exactly the batch split by hand; renorm reads copies of the
    running arrays in x's dtype), then one running update from the mean of the groups' means
    and of their variances (tf-keras 2's rule; README) by the kernels' ``update_running``."""
    k = x.shape[0] // groups
    tracking = running_mean is not None
    rm = running_mean.astype(x.dtype) if tracking else None  # read by renorm, never updated
    rv = running_var.astype(x.dtype) if tracking else None
    parts = []
    means: list = []  # each group's, for the running update
    variances: list = []
    for g in range(groups):
        xg, yg = x[g * k : (g + 1) * k], y[g * k : (g + 1) * k]
        layout = chk.Layout.of(xg, axis)
        yg3 = layout.output(yg, x.dtype)[1]
        xg3 = layout.view3(xg)
        # VAR too (the combined running update reads every group's); momentum 0: rm, rv kept
        full = np.empty((KEPT_VAR, layout.channels))
        run_forward(xg3, yg3, gamma, beta, rm, rv, block, full)
        means.append(full[MEAN])
        variances.append(full[VAR])
        stats = np.ascontiguousarray(full[: KEPT_RENORM if block[P_RMAX] > 0.0 else KEPT])
        layout.finish_output(yg, yg3)
        part = BatchNormCache(
            x=xg,
            stats=stats,
            axis=axis,
            training=True,
            layout=layout,
            view=_kept_view(xg, layout),
            activation="relu" if block[P_RELU] else None,
            gamma=gamma,
            beta=beta,
            eps=block[P_EPS],
        )
        parts.append((g * k, (g + 1) * k, part))
    if tracking:
        update = block.copy()  # (the block is shared, read-only)
        update[P_MOMENTUM] = momentum  # P_COUNT is the group's count: each unbiased over it
        mean, var = np.mean(means, axis=0), np.mean(variances, axis=0)
        update_running_of(running_mean, running_var, mean, var, update)
    first = parts[0][2]
    return BatchNormCache(
        x=x,
        stats=first.stats,
        axis=axis,
        training=True,
        layout=chk.Layout.of(x, axis),
        activation=first.activation,
        parts=tuple(parts),
        gamma=gamma,
        beta=beta,
        eps=first.eps,
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
    if dy.dtype is not x.dtype and dy.dtype != x.dtype:  # (the identity test first: 0.04 us)
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
    relu_thr, block, launch = _backward_plan(
        layout, x.dtype, cache.training, cache.activation, cache.eps
    )
    if cache.parts:  # virtual batches: each part's gradient; dgamma, dbeta summed in float64
        total = np.zeros((2, channels))
        share = np.empty((2, channels))
        sums = np.empty((2, channels))
        for start, stop, part in cache.parts:
            dxg = dx[start:stop]
            dxg3 = part.layout.output(dxg, x.dtype)[1]
            block = params(BACKWARD_TRAIN, part.eps, 0.0, 0, 0.0, 0.0, *relu_thr, part.layout.count)
            x3 = part.view if part.view is not None else part.layout.view3(part.x)
            run_backward(
                x3,
                part.layout.view3(dy[start:stop]),
                part.gamma,
                part.beta,
                part.stats,
                block,
                sums,
                dgamma,
                dbeta,
                dxg3,
            )
            part.layout.finish_output(dxg, dxg3)
            _kept_gradients(sums, part.stats, share[0], share[1])
            total += share  # each part's float64 dgamma, dbeta; rounded once below
        with _after_write():
            dgamma[...] = total[0]
            dbeta[...] = total[1]
    elif cache.comm is not None:
        _backward_synced(cache, layout.view3(dy), relu_thr, dgamma, dbeta, dx3)
        layout.finish_output(dx, dx3)
    else:
        x3 = cache.view if cache.view is not None else layout.view3(x)
        run_backward(
            x3,
            layout.view3(dy),
            cache.gamma,
            cache.beta,
            cache.stats if cache.training else cache.frozen_stats(),
            block,
            NO_SUMS,
            dgamma,
            dbeta,
            dx3,
            launch,
        )
        if out is not None:  # (without out, dx3 is a view of dx)
            layout.finish_output(dx, dx3)
    return (dx if out is None else given), dgamma, dbeta


def _backward_plan(
    layout, dtype, training: bool, activation, eps: float
) -> tuple[tuple[float, float], np.ndarray, Any]:
    """``(relu_thr, block, launch)`` of a backward call on a cache of this layout, dtype, mode,
    activation and eps: the activation's threshold, the kernel's parameter block (the training
    or the frozen gradient) and the small-call kernels (None above the serial threshold or for
    an empty array). Memoized like the forward's plan (0.4 us of a 4.6 us call at float32 (32,
    64), Zen 5)."""
    key = (layout, dtype, training, activation, eps)
    plan = _BACKWARD_PLANS.get(key)
    if plan is None:
        relu_thr = (1.0, RELU_THRESHOLD[dtype]) if activation == "relu" else (0.0, 0.0)
        mode = BACKWARD_TRAIN if training else BACKWARD_FROZEN
        block = params(mode, eps, 0.0, 0, 0.0, 0.0, *relu_thr, layout.count)
        launch = None
        if layout.count and layout.channels:
            launch = _threading.small_launch(layout.canon, dtype, "backward", not training)
        if launch is _threading.PENDING:  # its kernel compiles in this call: not kept
            return relu_thr, block, None
        plan = relu_thr, block, launch
        if len(_BACKWARD_PLANS) >= 256:
            _BACKWARD_PLANS.clear()
        _BACKWARD_PLANS[key] = plan
    return plan


_BACKWARD_PLANS: dict = {}


def _backward_plan_kept(layout, dtype, training: bool, activation, eps: float):
    """The plan ``_backward_plan`` keeps for these arguments, or None (not asked yet, or its
    kernel was still being compiled): a caller may keep it too (the layer's planned path)."""
    return _BACKWARD_PLANS.get((layout, dtype, training, activation, eps))


def _kept_gradients(sums, kept, dgamma, dbeta) -> None:
    """dgamma and dbeta of every channel from the two sums and the rows a cache kept (the
    kernels' ``parameter_gradients`` on those rows, r = 1 and d = 0 without renorm): a virtual
    batch's float64 share, a synchronized rank without values."""
    rows = np.empty((KEPT_RENORM, kept.shape[1]))
    rows[: kept.shape[0]] = kept
    if kept.shape[0] < KEPT_RENORM:
        rows[R] = 1.0
        rows[D] = 0.0
    parameter_gradients.python(sums, 0, rows, 0, kept.shape[1], dgamma, dbeta)


def run_backward(x3, dy3, gamma, beta, stats, block, sums, dgamma, dbeta, dx3, launch=None) -> None:
    """The backward kernel on checked arguments (the layer's planned path too), from a cache's
    gamma, beta, kept statistics and (in ``block``) eps; ``launch``: a plan's ``(kernel,
    tune)`` for a small call (see ``run_forward``): the cache is one forward made, so its x,
    gamma, beta and ``stats`` are of the kernel's types, and dy3, dx3 C-contiguous in x's
    dtype."""
    if launch is not None:
        kernel, tune = launch
        done = kernel(x3, dy3, gamma, beta, stats, block, sums, dgamma, dbeta, dx3, tune)
    elif x3.shape[0] * x3.shape[2] == 0 or x3.shape[1] == 0:
        dgamma[...] = 0.0
        dbeta[...] = 0.0
        sums[...] = 0.0  # (nothing when NO_SUMS)
        return
    else:
        kernels, tune = _threading.kernels_for(x3, block[P_MODE] != BACKWARD_TRAIN, fused=True)
        done = kernels.backward(x3, dy3, gamma, beta, stats, block, sums, dgamma, dbeta, dx3, tune)
    if done == -1:  # the fused-only small twin's route does not apply
        done = _threading.fallback(x3).backward(
            x3, dy3, gamma, beta, stats, block, sums, dgamma, dbeta, dx3, tune
        )
    if done:  # (-2: none kept off the fused route; kept_block never lets that happen)
        raise RuntimeError(f"bnfast internal error: backward kernel returned {done}")


def _backward_synced(
    cache: BatchNormCache, dy3, relu_thr: tuple[float, float], dgamma, dbeta, dx3
) -> None:
    """A synchronized training backward: this rank's two float64 sums (``BACKWARD_SUMS``),
    summed over the ranks (one collective), dx from the global sums and count
    (``BACKWARD_GIVEN``). dgamma and dbeta are this rank's share (its own sums), as every
    other parameter's gradient in data parallelism: averaging or summing them over the ranks
    with the rest gives the global batch's."""
    layout, stats, eps = cache.layout, cache.stats, cache.eps
    gamma, beta = cache.gamma, cache.beta
    x3 = cache.view if cache.view is not None else layout.view3(cache.x)
    local = layout.count > 0 and layout.channels > 0
    # the general kernels take both modes (the cache's arrays as forward made them, see
    # run_backward); None above the serial threshold or for an empty shard
    launch = _threading.small_launch(layout.canon, x3.dtype, "backward", True) if local else None
    if launch is _threading.PENDING:
        launch = None
    sums = np.zeros((2, layout.channels))
    if local:
        run_backward(
            x3,
            dy3,
            gamma,
            beta,
            stats,
            params(BACKWARD_SUMS, eps, 0.0, 0, 0.0, 0.0, *relu_thr, 0),
            sums,
            dgamma,
            dbeta,
            dx3,
            launch,
        )
    else:  # this rank's share of dgamma and dbeta (written by the kernel's BACKWARD_SUMS)
        _kept_gradients(sums, stats, dgamma, dbeta)
    total = _sync.global_sums(cache.comm, sums)
    if local:  # dgamma and dbeta not wanted again (length 0): the kernel keeps the share
        block = params(BACKWARD_GIVEN, eps, 0.0, 0, 0.0, 0.0, *relu_thr, cache.total)
        none = _NO_RUNNING[x3.dtype]
        run_backward(x3, dy3, gamma, beta, stats, block, total, none, none, dx3, launch)


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
        block = params(0, eps, 0.0, 0, 0.0, 0.0, 0.0, 0.0, layout.count)
        kernels, tune = _threading.kernels_for(x3, fused=True)
        kernels.backward_input(x3, dy3, gamma, block, dgamma, dbeta, dx3, tune)
    layout.finish_output(dx, dx3)
    return (dx if out is None else given), dgamma, dbeta
