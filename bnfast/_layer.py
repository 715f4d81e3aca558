"""``BatchNorm``: a stateful layer for NumPy trainers, with PyTorch's semantics and state keys.

Repeated calls take a planned path: the layer keeps its six per-channel arrays as rows of one
block, and after a checked call it keeps what that call established about its input (a
*plan*: the layout, whether x's canonical view is a view, the forward kernel's parameter
block; the backward's comes from the functional backward's memo, ``_core._backward_plan``).
A later call whose input has the same type, shape, strides and dtype and does not overlap
the block, with no public attribute assigned a new value since (assigning one drops the plan:
``BatchNorm.__setattr__``; so does a replaced array, no longer a row), goes straight to the
run path the functional API uses
(``_core.run_forward`` / ``run_backward``, or the synchronized ones with ``comm=``), so it
gives the same bits. Every configuration takes it (fused ReLU, ``reuse_buffers``, renorm,
center/scale, biased running variance, ``comm=``); ``out=``, virtual batches, another layout,
replaced arrays and mixed dtypes take the checked path through :func:`bnfast.forward` /
:func:`bnfast.backward`. Measured at float32 (32, 64), one thread (Zen 5): a training step
(forward + backward) 11.3 us planned (12.0 us with fused ReLU and reused buffers), against
33.7 us for PyTorch's ``BatchNorm1d`` with autograd (``bench/small_calls.py``).

A planned training forward runs the small-call entry or, above the serial threshold, the
kernel held for the current thread count (``_Plan.kernel``: one ``get_num_threads`` test a
call, not ``kernels_for``'s lookups), and with ``reuse_buffers`` writes its statistics into a
block the plan keeps (the layer keeps one cache: only the last forward's statistics are ever
read). Without a collective and with an input that reshapes to its canonical view it records
the cache it made (``made``); the backward of that cache (an identity test) runs from the
backward arguments kept at its first call (``bfast``), with no mode or layout test. Inside a
NumPy MLP step every line of a layer call runs with its code and objects cold, so the fewer
the better: float32 Zen 4, BN+ReLU per step against the previous planned path (blocks of
steps, one process), batch 64 1.00-1.06x, batch 256 1.02-1.07x; a (32, 64) layer step back to
back 1.05-1.12x.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from numba import get_num_threads

from . import _checks as chk
from . import _sync, _threading
from ._core import (
    NO_KEPT,
    NO_SUMS,
    RELU_THRESHOLD,
    BatchNormCache,
    _activation,
    _after_write,
    _backward_plan,
    _backward_plan_kept,
    _backward_synced,
    _forward_synced,
    _renorm,
    backward,
    forward,
    kept_block,
    params,
    run_backward,
    run_forward,
)
from .kernels._jit import (
    FORWARD_BATCH,
    FORWARD_RUNNING,
    P_MOMENTUM,
    P_RMAX,
)
from .kernels.common import KEPT


class BatchNorm:
    """Batch normalization layer over channel axis ``axis`` (PyTorch's ``BatchNorm1d/2d/3d``).

    Parameters
    ----------
    num_features : int
        Number of channels C.
    axis : int, default 1
        Channel axis of the inputs (1 for (N, C), (N, C, L), NCHW; -1 for NHWC).
    eps : float, default 1e-5
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch in the running averages; None gives the cumulative average
        ``1 / num_batches_tracked`` (PyTorch's ``momentum=None``). Keras/Flax/numpy-ml's
        ``momentum`` is a decay: :func:`bnfast.momentum_from_decay`.
    affine : bool, default True
        Learn ``gamma`` (ones) and ``beta`` (zeros); False turns both off (PyTorch's name).
    track_running_stats : bool, default True
        Keep ``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked``, and
        use them in eval mode. Without them, eval mode normalizes with batch statistics.
    dtype : float32 or float64, default float32
        dtype of the parameters and running statistics.
    reuse_buffers : bool, default False
        Write each forward's y and each backward's dx into buffers the layer keeps (one per
        shape), instead of fresh arrays; a returned array is then overwritten by the next call
        of the same kind: copy it if you keep it. ``out=`` does the same per call. It pays
        where every fresh array is new pages: glibc maps blocks above 32 MiB afresh each time.
        Measured here, float32 2-D 8192x1024 (33.5 MB), 2 threads: inference 5.8-7.2 ms new
        vs 3.6-3.7 ms with ``out=``, training forward 10.4-10.8 vs 7.2-7.5 ms, a layer's
        forward + backward 20.3-22.6 vs 17.7-20.0 ms with ``reuse_buffers``; at NCHW
        32x64x56x56 (25.7 MB, reused by malloc) the layer step gains 4%.
    center, scale : bool, default True
        Keras' names: learn beta (the shift) and gamma (the scale) separately. A layer with
        scale and no shift keeps ``weight`` and no ``bias`` in its state, as a PyTorch module
        whose bias is None.
    activation : None or "relu"
        A fused ReLU after the normalization (``bnfast.forward``'s ``activation``).
    renorm : None or (rmax, dmax)
        Batch Renormalization while training (``bnfast.forward``'s ``renorm``; needs
        ``track_running_stats``).
    virtual_batch_size : int, optional
        Ghost batches while training (``bnfast.forward``'s ``virtual_batch_size``).
    unbiased : bool, default True
        The running variance unbiased (PyTorch) or biased (Keras, Flax, numpy-ml).
    comm : mpi4py communicator, optional
        Synchronized batch norm (PyTorch's ``SyncBatchNorm``): in training mode each forward
        normalizes this rank's shard with the global batch's statistics and each backward
        reduces over ``comm`` (``bnfast.forward``'s ``comm``); eval mode makes no collective.
        ``dgamma``/``dbeta`` are this rank's share: the gradient Allreduce done for the other
        parameters (a sum or an average, the same as for them) completes them.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> bn = bnfast.BatchNorm(3)
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, (16, 3)).astype(np.float32)
    >>> y = bn(x)                        # training mode: batch statistics
    >>> dx = bn.backward(np.ones_like(y))
    >>> sorted(bn.grads())
    ['beta', 'gamma']
    >>> for name, p in bn.params().items():  # an SGD step, in place
    ...     p -= 0.1 * bn.grads()[name]
    >>> bn.eval()(x).shape               # eval mode: running statistics
    (16, 3)
    """

    num_features: int
    axis: int
    eps: float
    momentum: float | None
    comm: Any
    affine: bool
    center: bool
    scale: bool
    track_running_stats: bool
    dtype: np.dtype
    training: bool
    gamma: np.ndarray | None
    beta: np.ndarray | None
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    dgamma: np.ndarray | None
    dbeta: np.ndarray | None
    num_batches_tracked: int
    reuse_buffers: bool
    activation: str | None
    renorm: tuple[float, float] | None
    virtual_batch_size: int | None
    unbiased: bool
    _block: np.ndarray
    _rows: tuple[np.ndarray, ...]

    def __init__(
        self,
        num_features: int,
        *,
        axis: int = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype=np.float32,
        reuse_buffers: bool = False,
        center: bool = True,
        scale: bool = True,
        activation: str | None = None,
        renorm: tuple[float, float] | None = None,
        virtual_batch_size: int | None = None,
        unbiased: bool = True,
        comm=None,
    ) -> None:
        if isinstance(num_features, (bool, np.bool_)) or not isinstance(
            num_features, numbers.Integral
        ):
            raise TypeError(f"num_features must be an int, got {num_features!r}")
        if not 1 <= num_features <= _MAX_FEATURES:
            raise ValueError(
                f"num_features must be between 1 and {_MAX_FEATURES}, got {num_features}"
            )
        dtype = np.dtype(dtype)
        if dtype not in chk.DATA_DTYPES:
            raise TypeError(f"dtype {dtype} is not supported; accepted: float32 or float64")
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an int, got {axis!r}")
        self.num_features = int(num_features)
        self.axis = int(axis)
        self.eps = chk.checked_eps(eps, training=False)  # > 0 is checked when training
        self.momentum = None if momentum is None else chk.unit_momentum(momentum)
        self.affine = chk.flag(affine, "affine")
        center, scale = chk.flag(center, "center"), chk.flag(scale, "scale")  # checked always
        self.center = self.affine and center
        self.scale = self.affine and scale
        self.track_running_stats = chk.flag(track_running_stats, "track_running_stats")
        self.activation = "relu" if _activation(activation) else None
        pair = _renorm(renorm)
        if renorm is not None and not self.track_running_stats:
            raise ValueError(
                "renorm needs track_running_stats=True (r and d use the running statistics)"
            )
        self.renorm = None if renorm is None else pair  # the checked pair, as floats
        if virtual_batch_size is not None and (
            isinstance(virtual_batch_size, (bool, np.bool_))
            or not isinstance(virtual_batch_size, numbers.Integral)
            or virtual_batch_size < 1
        ):
            raise ValueError(f"virtual_batch_size must be an int >= 1, got {virtual_batch_size!r}")
        self.virtual_batch_size = virtual_batch_size
        self.unbiased = chk.flag(unbiased, "unbiased")
        if comm is not None:
            comm = _sync.checked(comm)
            if renorm is not None or virtual_batch_size is not None:
                raise ValueError(
                    "comm= (synchronized batch norm) does not combine with renorm or "
                    "virtual_batch_size"
                )
        self.comm = comm
        self.dtype = dtype
        self.training = True
        c = self.num_features
        # rows: gamma, beta, running_mean, running_var, dgamma, dbeta (see the module docstring)
        self._block = np.zeros((6, c), dtype)
        self._block[[0, 3]] = 1.0
        self._rows = tuple(self._block)
        self.gamma = self._rows[0] if self.scale else None
        self.beta = self._rows[1] if self.center else None
        self.running_mean = self._rows[2] if self.track_running_stats else None
        self.running_var = self._rows[3] if self.track_running_stats else None
        self.dgamma = self._rows[4] if self.scale else None
        self.dbeta = self._rows[5] if self.center else None
        self.num_batches_tracked = 0
        self.reuse_buffers = chk.flag(reuse_buffers, "reuse_buffers")
        self._buffers: dict[str, np.ndarray] = {}
        self._kept: dict[str, tuple] = {}  # the planned path's buffers: (layout, array, view)
        self._cache: BatchNormCache | None = None
        self._plan: _Plan | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        """Assigning a public attribute drops the plan (a trainer's schedules and evaluations
        change ``momentum``, ``eps``, ``training``, ``activation``; a replaced ``gamma`` is no
        longer a row of the block; ``axis`` decides the layout), unless the value is the one
        already there or an equal number or string (``train()`` every step, a schedule's
        constant momentum). So a planned call tests only its input and the plan cannot miss a
        setting (a list of them read back each call had missed ``axis``: a layer kept
        normalizing over its old channel axis). ``num_batches_tracked`` and ``reuse_buffers``
        are read per call, not planned. Speed: the same inside the MLP step (batch 64 and
        256, Zen 4: 0.97-1.05x); the planned forward writes its two attributes through
        ``__dict__``, past this method."""
        if name[0] != "_" and name not in _PER_CALL:
            d = self.__dict__
            old = d.get(name)
            if old is not value and not (
                type(old) is type(value) and type(value) in _SCALARS and old == value
            ):
                d["_plan"] = None
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        extra = "".join(
            f", {k}={v!r}"
            for k, v in (
                ("center", self.center),
                ("scale", self.scale),
                ("activation", self.activation),
                ("renorm", self.renorm),
                ("virtual_batch_size", self.virtual_batch_size),
                ("unbiased", self.unbiased),
            )
            if v != _DEFAULTS[k]
        )
        return (
            f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, dtype={self.dtype.name}{extra})"
        )

    def __getstate__(self) -> dict:
        """Pickle and ``copy.deepcopy``: the block once, which public arrays are its rows (a
        replaced one travels as itself), no plan or kept buffers (rebuilt on the next call)."""
        state = self.__dict__.copy()
        rows = state.pop("_rows")
        state["_row_names"] = tuple(
            name
            for name, i in _ROW_OF.items()
            if state[name] is not None and state[name] is rows[i]
        )
        for name in state["_row_names"]:
            state[name] = None
        state["_plan"] = None
        state["_buffers"] = {}
        state["_kept"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        names = state.pop("_row_names")
        self.__dict__.update(state)
        self._rows = tuple(self._block)
        for name in names:
            setattr(self, name, self._rows[_ROW_OF[name]])

    def train(self, mode: bool = True) -> BatchNorm:
        """Training mode (batch statistics, running averages updated); returns self. ``mode``
        must be a bool (a ``FlagError``, both ``TypeError`` and PyTorch's ``ValueError``)."""
        self.training = chk.flag(mode, "mode")
        return self

    def eval(self) -> BatchNorm:
        """Eval mode (running statistics when tracked); returns self."""
        return self.train(False)

    def _buffer(self, kind: str, like: np.ndarray, *avoid: np.ndarray) -> np.ndarray | None:
        """The kept output buffer for ``like`` (laid out like its canonical view), or None."""
        if not (
            self.reuse_buffers
            and isinstance(like, np.ndarray)
            and like.dtype in chk.DATA_DTYPES
            and like.ndim >= 2
        ):
            return None
        try:
            layout = chk.Layout.of(like, chk.channel_axis(self.axis, like.ndim))
        except (TypeError, ValueError):
            return None  # forward reports the problem
        buf = self._buffers.get(kind)
        if (
            buf is None
            or buf.shape != like.shape
            or buf.dtype != like.dtype
            or chk.Layout.of(buf, layout.axis).order != layout.order
            or not chk.apart_from_all(buf, avoid)
        ):
            # a kept y does not start just after this x within a page (``Layout.output``); a
            # trainer's next activations usually sit where this one does
            near = layout.view3(like) if kind == "y" and layout.is_view(like) else None
            buf = self._buffers[kind] = layout.output(None, like.dtype, near)[0]
        return buf

    def _planned_output(self, kind: str, p: _Plan, x: np.ndarray, dy, near):
        """``(array, its canonical view)`` for a planned call to write: with ``reuse_buffers``
        the kept buffer of this kind while it has the plan's layout and overlaps neither x nor
        ``dy`` (None for y; else :meth:`_buffer` picks or makes one), otherwise a fresh array
        laid out canonically (``near``: x's canonical view where it matters where the array
        starts relative to it, see ``Layout.output``). Positional and tested array by array, no
        helper loop: every call costs inside a training step (``_backward_planned``)."""
        layout = p.layout
        if self.reuse_buffers:
            kept = self._kept.get(kind)
            if (
                kept is None
                or kept[0] is not layout
                or kept[1].dtype is not p.dtype
                or not chk.apart(x, kept[1])
                or (dy is not None and not chk.apart(dy, kept[1]))
            ):
                avoid = (x,) if dy is None else (x, dy)
                buf = self._buffer(kind, x, *avoid)  # the checked path's rule
                assert buf is not None  # reuse_buffers, and x passed the plan's checks
                kept = self._kept[kind] = (layout, buf, layout.view3(buf))
            return kept[1], kept[2]
        if layout.transposed or near is not None:
            return layout.output(None, p.dtype, near)
        out = np.empty(p.shape, p.dtype)  # no transposes: a fresh array is canonical
        return out, out.reshape(layout.canon)

    def _plan_of(self, cache: BatchNormCache) -> _Plan:
        """A plan for the backward of ``cache`` (its input's layout and dtype) where the
        layer's own is not one (``_backward_planned`` tests that first)."""
        q = _Plan()
        q.layout, q.dtype, q.shape = cache.layout, cache.x.dtype, cache.x.shape
        q.backward = q.made = q.bfast = None
        q.stats = NO_KEPT
        q.marks = False
        q.held = {}
        q.view = cache.layout.is_view(cache.x)
        q.reshapes = q.view and not cache.layout.transposed
        return q

    def _own_rows(self) -> bool:
        """Are the layer's arrays still the rows of its block (none replaced by assignment)?"""
        rows = self._rows
        return (
            (
                self.gamma is rows[0] and self.dgamma is rows[4]
                if self.scale
                else self.gamma is None and self.dgamma is None
            )
            and (
                self.beta is rows[1] and self.dbeta is rows[5]
                if self.center
                else self.beta is None and self.dbeta is None
            )
            and (
                self.running_mean is rows[2] and self.running_var is rows[3]
                if self.track_running_stats
                else self.running_mean is None
            )
        )

    def _running(self) -> tuple[np.ndarray, np.ndarray]:
        """running_mean and running_var of a layer that tracks them."""
        rm, rv = self.running_mean, self.running_var
        if rm is None or rv is None:
            raise RuntimeError("a BatchNorm tracking running statistics needs both arrays")
        return rm, rv

    def _present(self, names: tuple[str, str]) -> dict[str, np.ndarray]:
        """``{"gamma": self.<names[0]>, "beta": self.<names[1]>}`` for the parameters this layer
        learns (scale: gamma, center: beta)."""
        out = {}
        for key, name, on in (("gamma", names[0], self.scale), ("beta", names[1], self.center)):
            if on:
                v = getattr(self, name)
                if v is None:
                    raise RuntimeError(f"this BatchNorm learns {key}, but {name} is None")
                out[key] = v
        return out

    def _momentum(self) -> float:
        if self.momentum is None:  # PyTorch's cumulative average
            return 1.0 / (self.num_batches_tracked + 1)
        return self.momentum

    def forward(self, x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """Normalize ``x``; keeps what :meth:`backward` needs. See :func:`bnfast.forward`."""
        p = self._plan
        if (
            out is None
            and p is not None
            and type(x) is np.ndarray
            and x.shape == p.shape
            and x.strides == p.strides
            and x.dtype is p.dtype
            and chk.apart(x, self._block)
        ):  # (assigning any public attribute a new value drops the plan: __setattr__)
            return self._forward_planned(x, p)
        if out is None:
            out = self._buffer("y", x, x)
        use_batch_stats = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        y, cache = forward(
            x,
            self.gamma,
            self.beta,
            axis=self.axis,
            training=use_batch_stats,
            running_mean=self.running_mean if update or not use_batch_stats else None,
            running_var=self.running_var if update or not use_batch_stats else None,
            momentum=self._momentum() if update else 0.0,
            eps=self.eps,
            out=out,
            activation=self.activation,
            renorm=self.renorm if update else None,
            virtual_batch_size=self.virtual_batch_size if use_batch_stats else None,
            unbiased=self.unbiased,
            comm=self.comm if self.training else None,  # eval: no collective (as PyTorch)
        )
        if update:
            self.num_batches_tracked += 1
        self._cache = cache
        self._plan = _Plan.after(self, x, cache)
        return y

    __call__ = forward

    def _forward_planned(self, x: np.ndarray, p: _Plan) -> np.ndarray:
        """The planned call: what :func:`bnfast.forward` does once its checks have passed, on
        the same run path (``_core.run_forward``) with the plan's parameter block."""
        state = self.__dict__  # (the writes below skip __setattr__: neither drops the plan)
        layout = p.layout
        x3 = x.reshape(layout.canon) if p.reshapes else layout.view3(x)
        y, y3 = self._planned_output("y", p, x, None, x3 if p.placed else None)
        rows = self._rows
        block = p.block
        total = 0
        if p.comm is not None:  # synchronized: the global batch's statistics, one collective
            rm, rv = (rows[2], rows[3]) if self.track_running_stats else (None, None)
            stats, total = _forward_synced(
                p.comm,
                x,
                layout,
                y3,
                p.gamma,
                p.beta,
                rm,
                rv,
                self._momentum(),
                self.eps,
                p.relu_thr,
                self.unbiased,
                x3,
                p.synced,
            )
            if self.track_running_stats:
                state["num_batches_tracked"] += 1
        elif p.batch_stats:
            # with reuse_buffers the plan's statistics block: the layer keeps one cache, so
            # only the last forward's statistics are ever read
            stats = p.stats if self.reuse_buffers else np.empty(p.kept)
            if self.momentum is None:  # the cumulative average's weight changes every call
                block[P_MOMENTUM] = self._momentum()  # (else set in the plan)
            rm, rv = (rows[2], rows[3]) if self.track_running_stats else (None, None)
            launch = p.launch  # the small-call entry, else this thread count's kernel
            if launch is None:
                launch = p.kernel(x3, "forward")
            stats = run_forward(x3, y3, p.gamma, p.beta, rm, rv, block, stats, launch)
            if self.track_running_stats:
                state["num_batches_tracked"] += 1
        else:
            stats = NO_KEPT
            run_forward(x3, y3, p.gamma, p.beta, rows[2], rows[3], block, stats, p.launch)
        cache = state["_cache"] = BatchNormCache.of(
            x,
            stats,
            layout.axis,
            p.batch_stats,
            layout,
            x3 if p.view else None,
            self.activation,
            p.gamma,
            p.beta,
            self.eps,
            None if p.batch_stats else (rows[2], rows[3]),
            p.comm,
            total,
        )
        if p.marks:  # the backward of this cache may run from the plan (``bfast``)
            p.made = cache
        return y

    def backward(self, dy: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """Gradient with respect to the last forward's input; stores ``dgamma``/``dbeta``."""
        cache = self._cache
        p = self._plan
        if (
            p is not None
            and cache is p.made
            and p.bfast is not None
            and out is None
            and type(dy) is np.ndarray
            and dy.shape == p.shape
            and dy.strides == p.strides
            and dy.dtype is p.dtype
            and chk.apart(dy, self._block)
        ):  # the backward of the planned forward's cache: its plan's arguments, no tests
            launch, block = p.bfast
            dx, dx3 = self._planned_output("dx", p, cache.x, dy, None)
            dy3 = dy.reshape(p.layout.canon)
            if launch is None:  # as in the forward
                launch = p.kernel(cache.view, "backward")
            rows = self._rows
            run_backward(
                cache.view,
                dy3,
                p.gamma,
                p.beta,
                cache.stats,
                block,
                NO_SUMS,
                rows[4],
                rows[5],
                dx3,
                launch,
            )
            return dx
        if cache is None:
            raise RuntimeError("backward() needs a forward() call first")
        x = cache.x
        if (
            out is None
            and not cache.parts
            and type(dy) is np.ndarray
            and dy.shape == x.shape
            and dy.strides == x.strides
            and dy.dtype is x.dtype
            and (self._plan is not None or (x.dtype is self.dtype and self._own_rows()))
            and chk.apart(dy, self._block)
        ):
            return self._backward_planned(dy, cache)
        if out is None:
            out = self._buffer("dx", x, x, dy)
        if isinstance(dy, np.ndarray):  # the layer also writes its gradients
            chk.disjoint(
                {"out": out, "dgamma": self.dgamma, "dbeta": self.dbeta},
                {"dy": dy, "x": x},
                in_place=(("out", "dy"),),
            )
        dx, dgamma, dbeta = backward(dy, cache, out=out)
        grads = self._present(("dgamma", "dbeta"))
        with _after_write():
            if "gamma" in grads:
                grads["gamma"][...] = dgamma
            if "beta" in grads:
                grads["beta"][...] = dbeta
        return dx

    def _backward_planned(self, dy: np.ndarray, cache: BatchNormCache) -> np.ndarray:
        """The planned call: what :func:`bnfast.backward` does once its checks have passed
        (``_core.run_backward``), dgamma and dbeta written straight into the layer's rows."""
        layout = cache.layout
        x = cache.x
        x3 = cache.view if cache.view is not None else layout.view3(x)
        p = self._plan
        if p is None or p.layout is not layout or p.dtype is not x.dtype:
            p = self._plan_of(cache)
        dy3 = dy.reshape(layout.canon) if p.reshapes else layout.view3(dy)
        dx, dx3 = self._planned_output("dx", p, x, dy, None)
        # ``_backward_plan``'s answer kept in the plan: inside a NumPy MLP step every Python
        # call of a layer call runs cold (its code and objects come from memory after the
        # matmuls; ``bench/floors.py --step``), so the planned paths make as few as they can
        memo = p.backward
        if (
            memo is not None
            and memo[0] is cache.training
            and memo[1] is cache.activation
            and memo[2] == cache.eps
        ):
            relu_thr, block, launch = memo[3]
        else:
            mode = (layout, x3.dtype, cache.training, cache.activation, cache.eps)
            plan = _backward_plan(*mode)
            if _backward_plan_kept(*mode) is plan:  # (not while its kernel is being compiled)
                p.backward = (cache.training, cache.activation, cache.eps, plan)
            relu_thr, block, launch = plan
        if p.backward is not None and cache is p.made:  # the next backwards of fast forwards
            p.bfast = (launch, block)
        if cache.comm is not None:  # synchronized: one collective of the two sums
            _backward_synced(cache, dy3, relu_thr, self._rows[4], self._rows[5], dx3)
            return dx
        run_backward(
            x3,
            dy3,
            cache.gamma,
            cache.beta,
            cache.stats if cache.training else cache.frozen_stats(),
            block,
            NO_SUMS,
            self._rows[4],
            self._rows[5],
            dx3,
            launch,
        )
        return dx

    def params(self) -> dict[str, np.ndarray]:
        """``{"gamma": ..., "beta": ...}`` (those this layer learns); update them in place."""
        return self._present(("gamma", "beta"))

    def grads(self) -> dict[str, np.ndarray]:
        """``{"gamma": dgamma, "beta": dbeta}`` from the last backward, keyed like params()."""
        return self._present(("dgamma", "dbeta"))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the state under PyTorch's keys (``weight``, ``bias``, ``running_mean``,
        ``running_var``, ``num_batches_tracked``), loadable by ``torch.nn.BatchNorm*d``
        (without ``bias`` when the layer has no shift, as a module whose bias is None)."""
        params = self.params()
        state = {}
        if "gamma" in params:
            state["weight"] = params["gamma"].copy()
        if "beta" in params:
            state["bias"] = params["beta"].copy()
        if self.track_running_stats:
            rm, rv = self._running()
            state["running_mean"] = rm.copy()
            state["running_var"] = rv.copy()
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, np.int64)
        return state

    def load_state_dict(self, state) -> None:
        """Load a state (this layer's or a PyTorch BatchNorm's: arrays or tensors, tensors that
        require grad included, e.g. ``module.state_dict(keep_vars=True)``: they are detached).

        Every key is checked (missing, unexpected, shape, dtype) before anything is copied.
        Values are converted to the layer's dtype.
        """
        if not isinstance(state, Mapping):
            raise TypeError(
                f"load_state_dict takes a mapping of names to arrays (a state_dict), "
                f"got {type(state).__name__}"
            )
        expected = set(self.state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected, key=str)
        if missing or unexpected:
            raise ValueError(
                f"load_state_dict: missing keys {missing}, unexpected keys "
                f"{unexpected}; expected exactly {sorted(expected)}"
            )
        arrays = {}
        for key in expected:
            v = state[key]
            if hasattr(v, "detach") and hasattr(v, "numpy"):  # a torch tensor, Parameter too
                v = v.detach().cpu().numpy()
            v = chk.as_array(v, f"state[{key!r}]")
            if key == "num_batches_tracked":
                if v.shape != () or v.dtype.kind not in "iu" or v < 0:
                    raise ValueError(
                        f"load_state_dict: num_batches_tracked must be a "
                        f"non-negative integer scalar, got {state[key]!r}"
                    )
            else:
                v = chk.channel_vector(v, f"state[{key!r}]", self.num_features)
            arrays[key] = v
        params = self.params()
        if "gamma" in params:
            params["gamma"][...] = arrays["weight"]
        if "beta" in params:
            params["beta"][...] = arrays["bias"]
        if self.track_running_stats:
            rm, rv = self._running()
            rm[...] = arrays["running_mean"]
            rv[...] = arrays["running_var"]
            self.num_batches_tracked = int(arrays["num_batches_tracked"])


# public attributes a planned call reads each time (assigning any other drops the plan)
_PER_CALL = frozenset({"num_batches_tracked", "reuse_buffers"})
_SCALARS = (bool, int, float, str)  # values compared by ==, not identity, in __setattr__
# the layer's public arrays that are rows of its block, and their row
_ROW_OF = {
    "gamma": 0,
    "beta": 1,
    "running_mean": 2,
    "running_var": 3,
    "dgamma": 4,
    "dbeta": 5,
}
_MAX_FEATURES = 2**40  # 8 TiB of float64 per vector: any larger request is a mistake
_DEFAULTS = {
    "center": True,
    "scale": True,
    "activation": None,
    "renorm": None,
    "virtual_batch_size": None,
    "unbiased": True,
}


class _Plan:
    """What a checked call established about its input, reused while inputs keep that type,
    shape, strides and dtype (see the module docstring): the layout, whether x's canonical view
    is a view and a plain reshape, the parameter block of the forward kernel."""

    __slots__ = (
        "shape",
        "strides",
        "dtype",
        "batch_stats",
        "layout",
        "view",
        "reshapes",
        "gamma",
        "beta",
        "block",
        "comm",
        "relu_thr",
        "launch",
        "synced",
        "kept",
        "placed",
        "backward",
        "marks",
        "stats",
        "made",
        "bfast",
        "held",
    )
    shape: tuple
    strides: tuple
    dtype: np.dtype
    batch_stats: bool
    layout: chk.Layout
    view: bool
    reshapes: bool
    gamma: np.ndarray
    beta: np.ndarray
    block: np.ndarray
    comm: Any
    relu_thr: tuple[float, float]
    launch: tuple | None  # (kernel, tune) of a call below the serial threshold, else None
    synced: tuple | None  # with comm: the moments and given-statistics forward launches
    kept: tuple  # the shape of the block a forward keeps (``_core.kept_block``)
    placed: bool  # where a fresh y starts relative to x matters (``chk.Layout.placed_apart``)
    backward: tuple | None  # (training, activation, eps, ``_core._backward_plan``'s answer)
    marks: bool  # a training plan without comm= whose x reshapes to its canonical view
    stats: np.ndarray  # a training plan's kept block, which reuse_buffers reuses
    made: Any  # with marks: the cache of the last planned forward, else None
    bfast: tuple | None  # the backward of a cache it made: (launch, block), once one asked
    held: dict  # above the serial threshold: ``_threading.held``'s answer per kernel

    def kernel(self, x3: np.ndarray, op: str) -> tuple | None:
        """The ``(kernel, tune)`` of ``op`` for x3 at this thread count, kept while the count
        stays (``_threading.held``; None where the threading layer chooses per call: the run
        path then asks ``kernels_for`` itself)."""
        held = self.held.get(op)
        if held is None or held[0] != get_num_threads():
            held = self.held[op] = _threading.held(x3, op, fused=True)
        return held[1]

    @classmethod
    def after(cls, bn: BatchNorm, x, cache: BatchNormCache) -> _Plan | None:
        """The plan for inputs like ``x``, or None where only the checked path applies."""
        if (
            type(x) is not np.ndarray
            or cache.parts
            or x.dtype is not bn.dtype
            or not bn._own_rows()
            or cache.layout.count < 2
            or cache.layout.channels == 0
        ):
            return None
        p = cls()
        p.shape, p.strides, p.dtype = x.shape, x.strides, x.dtype
        p.backward = None
        p.batch_stats = bn.training or not bn.track_running_stats
        p.layout = cache.layout
        p.view = cache.view is not None
        p.reshapes = p.view and not p.layout.transposed
        p.placed = p.layout.placed_apart(x.dtype)
        c = bn.num_features
        p.gamma = bn._rows[0] if bn.scale else chk.constant(1.0, c, bn.dtype)
        p.beta = bn._rows[1] if bn.center else chk.constant(0.0, c, bn.dtype)
        relu = bn.activation == "relu"
        thr = RELU_THRESHOLD[bn.dtype] if relu else 0.0
        p.comm = bn.comm if bn.training else None  # eval: no collective
        p.relu_thr = (1.0, thr) if relu else (0.0, 0.0)
        # the small calls' kernels, compiled by the checked call before (else none: PENDING)
        canon, pending = cache.layout.canon, _threading.PENDING
        launch = _threading.small_launch(canon, bn.dtype, "forward")
        p.launch = None if launch is pending else launch
        p.synced = None
        if p.comm is not None:  # (see _core._forward_synced; the checked call compiled them)
            synced = (
                _threading.small_launch(canon, bn.dtype, "moments"),
                _threading.small_launch(canon, bn.dtype, "forward", general=True),
            )
            if pending not in synced and None not in synced:
                p.synced = synced
        p.made = p.bfast = None
        p.held = {}
        p.marks = p.batch_stats and p.comm is None and p.reshapes
        if p.batch_stats:
            renorm = bn.renorm if bn.track_running_stats else None
            rmax, dmax = _renorm(renorm)
            p.block = params(  # a copy: with momentum=None the plan sets P_MOMENTUM per call
                FORWARD_BATCH,
                bn.eps,
                bn._momentum() if bn.track_running_stats else 0.0,
                bn.unbiased,
                rmax,
                dmax,
                float(relu),
                thr,
                cache.layout.count,
            ).copy()
            p.kept = kept_block(cache.layout, bn.dtype, p.block[P_RMAX] > 0.0).shape
            p.stats = np.empty(p.kept)
        else:
            p.kept = (KEPT, 0)  # (an inference cache keeps the running arrays)
            p.stats = NO_KEPT
            p.block = params(
                FORWARD_RUNNING,
                bn.eps,
                0.0,
                bn.unbiased,
                0.0,
                0.0,
                float(relu),
                thr,
                cache.layout.count,
            )
        return p
