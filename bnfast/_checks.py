"""Argument checks and the canonical (outer, C, inner) view. Nothing here writes user data.

Every public function runs all of its checks before it allocates or writes anything, so a
``ValueError``/``TypeError`` leaves running statistics and ``out`` buffers untouched.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ._machine import TUNE
from .kernels._jit import PAGE_BYTES, ROWS_MIN, TUNE_STRIP
from .kernels.lanes import NEAR_PAGE

DATA_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
VECTOR_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


class FlagError(TypeError, ValueError):
    """A mode flag that is not a bool: a ``TypeError`` by bnfast's convention, and the
    ``ValueError`` PyTorch raises for ``train("False")``, so code ported from either catches it."""


def as_array(v, name: str) -> np.ndarray:
    """``v`` as a base-class ndarray (a view for ndarray subclasses such as ``np.matrix`` or
    ``np.memmap``, so no subclass reaches a kernel). Masked arrays are refused: bnfast would
    ignore the mask, and statistics that silently include masked values are worse than an
    error. A tensor that requires grad is refused with the conversion to use."""
    if type(v) is np.ndarray:
        return v
    if isinstance(v, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy.ma.MaskedArray; bnfast does not honour masks: pass "
            f"{name}.filled(fill_value) or a plain ndarray"
        )
    if getattr(v, "requires_grad", False):
        raise TypeError(f"{name} is a tensor that requires grad; pass {name}.detach().numpy()")
    try:
        return np.asarray(v)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{name} cannot be converted to an array: {exc}") from None


def data_array(x, name: str) -> np.ndarray:
    """``x`` as an ndarray of a supported dtype with ndim >= 2 (no copy for an ndarray)."""
    x = as_array(x, name)
    if x.dtype not in DATA_DTYPES:
        hint = " (convert with .astype(np.float32))" if x.dtype.kind in "fiub" else ""
        raise TypeError(
            f"{name} has dtype {x.dtype}; bnfast accepts float32 or float64 arrays{hint}"
        )
    if x.ndim < 2:
        raise ValueError(
            f"{name} has shape {x.shape}; batch norm needs an array with ndim >= 2 "
            "(a batch axis and a channel axis)"
        )
    return x


def channel_axis(axis, ndim: int) -> int:
    """The channel axis as a non-negative int; any single axis, negative counts from the end."""
    if type(axis) is int and -ndim <= axis < ndim:  # the common case, without the ABC check
        return axis % ndim
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {axis!r} of type {type(axis).__name__}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis={axis} is out of range for an array with ndim={ndim}; "
            f"accepted: {-ndim} to {ndim - 1}"
        )
    return axis % ndim


def flag(v, name: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise FlagError(f"{name} must be True or False, got {v!r}")
    return bool(v)


def real(v, name: str, accepted: str) -> float:
    if type(v) is float:  # the common case, without the ABC check (0.4 -> 0.1 us)
        return v
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number ({accepted}), got {v!r}")
    try:
        return float(v)
    except OverflowError:  # a Python int beyond float's range, e.g. 10**400
        raise ValueError(
            f"{name} is too large (an int of {len(str(abs(v)))} digits); accepted: {accepted}"
        ) from None


def checked_eps(eps, training: bool) -> float:
    """eps > 0 while training, eps >= 0 otherwise (PyTorch's rules: a model saved with eps=0
    can be evaluated), finite."""
    accepted = "finite and > 0 while training" if training else "finite and >= 0"
    e = real(eps, "eps", accepted)
    if not (math.isfinite(e) and (e > 0.0 or (e == 0.0 and not training))):
        raise ValueError(f"eps must be {accepted}, got {eps!r}")
    return e


def unit_momentum(momentum) -> float:
    if momentum is None:
        raise TypeError(
            "momentum=None (cumulative average) needs a batch count: use "
            "BatchNorm(momentum=None), or pass momentum=1/k for the k-th batch"
        )
    m = real(momentum, "momentum", "in [0, 1]")
    if not (math.isfinite(m) and 0.0 <= m <= 1.0):
        raise ValueError(f"momentum must be a finite number in [0, 1], got {momentum!r}")
    return m


def channel_vector(v, name: str, channels: int, *, writeable: bool = False) -> np.ndarray:
    """A per-channel array: floating dtype, shape ``(channels,)``; writeable if asked (then it
    must be a NumPy array already: it is updated in place)."""
    if (
        type(v) is np.ndarray
        and (v.dtype is DATA_DTYPES[0] or v.dtype is DATA_DTYPES[1])
        and v.shape == (channels,)
        and (not writeable or v.flags.writeable)
    ):
        return v  # the common case, in four tests (0.28 -> 0.12 us)
    if writeable and (not isinstance(v, np.ndarray) or isinstance(v, np.ma.MaskedArray)):
        raise TypeError(
            f"{name} must be a NumPy array (it is updated in place), got {type(v).__name__}"
        )
    v = as_array(v, name)
    if v.dtype not in VECTOR_DTYPES:
        raise TypeError(f"{name} has dtype {v.dtype}; accepted: float16, float32 or float64")
    if v.shape != (channels,):
        raise ValueError(
            f"{name} has shape {v.shape}; expected ({channels},), one value per channel"
        )
    if writeable and not v.flags.writeable:
        raise ValueError(f"{name} is read-only; it is updated in place, so it must be writeable")
    return v


_CONSTANTS: dict = {}


def constant(value: float, channels: int, dtype: np.dtype) -> np.ndarray:
    """A read-only vector of ``value`` (gamma=None is ones, beta=None zeros), kept per
    (value, C, dtype): a trainer asks for the same few every step."""
    key = (value, channels, dtype)
    v = _CONSTANTS.get(key)
    if v is None:
        if len(_CONSTANTS) >= 64:
            _CONSTANTS.clear()
        v = _CONSTANTS[key] = np.full(channels, value, dtype)
        v.flags.writeable = False
    return v


def parameter(v, name: str, channels: int, dtype: np.dtype, default: float) -> np.ndarray:
    """gamma or beta for the kernels: in the data's dtype, contiguous (a copy only when it has
    another dtype, which rounds it to the data's precision, as documented, or is strided)."""
    if v is None:
        return constant(default, channels, dtype)
    if (
        type(v) is np.ndarray
        and v.dtype is dtype
        and v.shape == (channels,)
        and v.flags.c_contiguous
    ):
        return v  # the common case: x's dtype, shape and contiguous (0.22 us; 0.18 before the
        # contiguity test, Zen 4: a trainer's training call skips this, see taken_as_is)
    v = channel_vector(v, name, channels)
    return np.ascontiguousarray(v, dtype)  # (the kernels take contiguous vectors: ``_jit``)


def output_array(out, name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A caller's output buffer, checked; returned as a base-class view of the same memory."""
    if not isinstance(out, np.ndarray) or isinstance(out, np.ma.MaskedArray):
        raise TypeError(
            f"{name} must be a NumPy array (not a masked array), got {type(out).__name__}"
        )
    if out.dtype != dtype:
        raise TypeError(f"{name} has dtype {out.dtype}; expected {dtype}, the input's dtype")
    if out.shape != shape:
        raise ValueError(f"{name} has shape {out.shape}; expected {shape}, the input's shape")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only; it must be writeable")
    return np.asarray(out)


def same_view(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``a`` and ``b`` are the same elements in the same places."""
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape
        and a.strides == b.strides
    )


def overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    if not np.may_share_memory(a, b):
        return False
    try:
        # NumPy's stubs allow only -1 and 0, but any bound is documented and supported
        return bool(np.shares_memory(a, b, max_work=100_000))  # type: ignore[arg-type]
    except np.exceptions.TooHardError:
        return True


def self_overlapping(a: np.ndarray) -> bool:
    """True when two elements of ``a`` share bytes (a writeable ``as_strided`` view can)."""
    if a.size <= 1 or a.flags.c_contiguous or a.flags.f_contiguous:
        return False
    extent = a.itemsize  # sufficient test: each stride clears the extent of the smaller ones
    for stride, n in sorted((abs(s), n) for s, n in zip(a.strides, a.shape, strict=True) if n > 1):
        if stride < extent:
            break
        extent += stride * (n - 1)
    else:
        return False
    offsets = np.zeros(1, np.int64)  # exact test, only for unusual strides: O(size)
    for stride, n in zip(a.strides, a.shape, strict=True):
        offsets = (offsets[:, None] + stride * np.arange(n, dtype=np.int64)).ravel()
    return bool(np.any(np.diff(np.sort(offsets)) < a.itemsize))


def _owner(a: np.ndarray):
    """The ndarray that owns ``a``'s memory (following ``.base``), or None when the chain ends in
    another kind of buffer (``np.frombuffer``, ``as_strided``, a memory map, an array wrapping
    memory it does not own)."""
    while True:
        base = a.base
        if base is None:  # the end of the chain: the owner, unless it wraps foreign memory
            return a if a.flags.owndata else None
        if not isinstance(base, np.ndarray):
            return None
        a = base


def apart(a: np.ndarray, owned: np.ndarray) -> bool:
    """True when ``a`` cannot share memory with ``owned``, an array that owns its memory or a
    view of memory bnfast allocated (a layer's parameter block, its kept output buffers; never
    a view of a caller's array): ``a`` owns other memory, or NumPy's bounds test says so. A
    trainer's fresh activations take the first test (0.07 us; ``np.may_share_memory`` 0.18 us;
    through a generator over the arrays to avoid, as the layer's kept buffers had it, 0.47 us
    for one array, Zen 4: :func:`apart_from_all` instead)."""
    if a.base is None and a is not owned and a.flags.owndata:
        return True
    return not np.may_share_memory(a, owned)


def apart_from_all(owned: np.ndarray, arrays: tuple) -> bool:
    """:func:`apart` for each of ``arrays`` (a loop: a generator cost 0.3 us more)."""
    for a in arrays:
        if not apart(a, owned):
            return False
    return True


def separate(written: tuple, read: tuple) -> bool:
    """True when every array (None skipped) owns its memory, no two are the same array, and each
    written one is contiguous (so free of self-overlap): then none overlaps another, and
    :func:`disjoint` has nothing to find. A trainer's call with fresh activations and its own
    parameter arrays: 0.57 us for a training forward's five arrays, where :func:`disjoint`
    with its dicts and owner loop took 1.04 us (Zen 5). (An array that owns its memory shares
    it only through views, whose ``base`` leads to it, so ``owndata`` alone says it is apart
    from another owner.)"""
    ids = set()
    n = 0
    for a in written:
        if a is not None:
            f = a.flags
            if not (f.owndata and f.forc):
                return False
            ids.add(id(a))
            n += 1
    for a in read:
        if a is not None:
            if not a.flags.owndata:
                return False
            ids.add(id(a))
            n += 1
    return len(ids) == n


def taken_as_is(x, gamma, beta, running_mean, running_var, channels: int, training: bool) -> bool:
    """A forward's per-channel arrays as a trainer passes them, checked in one go: gamma, beta
    and the running arrays ndarrays of x's dtype and shape ``(channels,)``, and, while
    training (the running arrays are written), the running arrays writeable and distinct from
    each other and from gamma and beta (x has another ndim), all five owning their memory (so
    none overlaps another, see :func:`separate`; a 1-D array that owns its memory is
    contiguous, as the kernels take them), in inference all four contiguous. True: the four
    vector checks and the overlap check have nothing to find. False: the caller runs them
    (they raise or convert). Float32 (32, 64), Zen 5, training:
    0.56 us where the separate checks took 1.17 us (gamma and beta 0.28, the running arrays
    0.35, the overlap 0.54)."""
    shape, dtype, rm, rv = (channels,), x.dtype, running_mean, running_var
    if not (
        type(gamma) is type(beta) is type(rm) is type(rv) is np.ndarray
        and gamma.dtype is dtype
        and beta.dtype is dtype
        and rm.dtype is dtype
        and rv.dtype is dtype
        and gamma.shape == beta.shape == rm.shape == rv.shape == shape
    ):
        return False
    if not training:  # (read only: any two may be the same array)
        return (
            gamma.flags.c_contiguous
            and beta.flags.c_contiguous
            and rm.flags.c_contiguous
            and rv.flags.c_contiguous
        )
    return (
        rm is not rv
        and rm is not gamma
        and rm is not beta
        and rv is not gamma
        and rv is not beta
        and (f := rm.flags).writeable
        and f.owndata
        and (f := rv.flags).writeable
        and f.owndata
        and x.flags.owndata
        and gamma.flags.owndata
        and beta.flags.owndata
    )


def disjoint(written: dict, read: dict, *, in_place: tuple = ()) -> None:
    """Raise ``ValueError`` unless every written array is free of self-overlap and disjoint from
    every other written array and from every array read. ``in_place`` names (written, read) pairs
    that may instead be the very same view (``out=x`` in inference, ``out=dy`` in backward).
    None entries are skipped. Runs before anything is written.

    Two arrays whose memory belongs to different owning ndarrays cannot overlap, so only pairs
    with a common owner (or an unknown one) are checked by address: a trainer's call with
    separate arrays costs ~1 us here instead of ~4.6 us for NumPy's check on every pair.
    """
    if separate(tuple(written.values()), tuple(read.values())):
        return
    seen: set[int] = set()
    for a in (*written.values(), *read.values()):
        if a is None:
            continue
        if a.base is None:  # (``_owner``'s first step, inline: 0.06 us a call saved)
            if not a.flags.owndata:
                break
            key = id(a)
        else:
            o = _owner(a)
            if o is None:
                break
            key = id(o)
        if key in seen:
            break
        seen.add(key)
    else:
        # the common case, every array its own memory: only self-overlap can remain (a
        # contiguous array is checked by its flags). A training forward's five arrays at
        # (32, 64): 2.5 us for NumPy's pairwise check, 1.6 us for this test built from
        # comprehensions, 0.8 us as this loop (Zen 5).
        for w, a in written.items():
            if a is not None and not a.flags.forc and self_overlapping(a):
                raise ValueError(
                    f"{w} has elements that share memory (strides {a.strides}); "
                    "pass an array whose elements are distinct"
                )
        return
    written = {k: v for k, v in written.items() if v is not None}
    read = {k: v for k, v in read.items() if v is not None}
    owners = {id(v): _owner(v) for v in (*written.values(), *read.values())}
    names = list(written)
    for i, w in enumerate(names):
        a = written[w]
        if self_overlapping(a):
            raise ValueError(
                f"{w} has elements that share memory (strides {a.strides}); "
                "pass an array whose elements are distinct"
            )
        oa = owners[id(a)]
        for other in names[i + 1 :]:
            b = written[other]
            ob = owners[id(b)]
            if (oa is None or oa is ob or ob is None) and overlaps(a, b):
                raise ValueError(
                    f"{w} and {other} share memory; both are written, so pass separate arrays"
                )
        for r, b in read.items():
            ob = owners[id(b)]
            if not (oa is None or oa is ob or ob is None) or not overlaps(a, b):
                continue
            if (w, r) in in_place:
                if same_view(a, b):
                    continue
                raise ValueError(
                    f"{w} partly overlaps {r}; pass {w}={r} itself or a separate array"
                )
            raise ValueError(
                f"{w} overlaps {r}, which this call reads; writing {w} would "
                f"change {r}: pass separate arrays"
            )


# Where a fresh forward output starts within a page, relative to x, matters to the lanes
# family's four-row write (rows of 7/8 of a page or more, arrays beyond the strip budget:
# ``lanes.affine_rows``): it reads four rows of x and writes the same columns of four rows of
# y, rows a multiple of 4 KiB apart, so x's lines of a step share one L1 set (address bits
# 6-11) and y's another; when y starts shortly after x, x's lines reach the set of y's lines
# just written (dirty) and they evict each other. Inference kernel, float32, one / two
# threads, y a caller's buffer starting d bytes after x within a page, 10th percentiles of
# interleaved samples (us), Zen 4: (2048, 1024) d = 0: 575 / 273, d = 512: 491 / 238, d =
# 1024-3840: 460-483 / 228-233; (512, 4096) 617 / 326, 570 / 293, 505-554 / 281-311; (1024,
# 2048) 621 / 318, 581 / 275, 494-553 / 245-258. A fresh array above glibc's mmap threshold
# starts 16 bytes into a page, as x then does (d = 0: every array of 32 MiB or more, and the
# first calls of a process); below it glibc's heap puts it anywhere (d < 1024 for a quarter
# of the offsets). So a fresh output that starts fewer than ``PLACE_NEAR`` bytes after x is
# made again ``PLACE_AT`` bytes after it (512 before it: the best or near it on all three
# shapes), as a view of an allocation 4 KiB larger. Placing every such output instead measured
# 0.94-1.00x against an output where glibc put it (three runs, 10th percentiles); the test
# costs two addresses through ``ctypes`` (~3 us, under 1% of a call beyond the strip budget).
PLACE_NEAR = 1024
PLACE_AT = 4096 - 512
_STRIP = int(TUNE[TUNE_STRIP])


def page_gap(a: np.ndarray, b: np.ndarray) -> int:
    """Where b starts within a page, counted in bytes from a's start."""
    return (b.ctypes.data - a.ctypes.data) % PAGE_BYTES


def placed(shape: tuple, dtype: np.dtype, near: np.ndarray) -> np.ndarray:
    """A new C-contiguous array of ``shape`` starting ``PLACE_AT`` bytes (less up to 63)
    after ``near`` within a page: a view of a slightly larger allocation."""
    nbytes = math.prod(shape) * dtype.itemsize
    buf = np.empty(nbytes + PAGE_BYTES, np.uint8)
    at = (PLACE_AT - page_gap(near, buf)) % PAGE_BYTES
    return np.ndarray(shape, dtype, buf, at - at % 64)


@dataclass(frozen=True, eq=False)
class Layout:
    """How an array with channel axis ``axis`` maps to the canonical ``(outer, C, inner)``.

    The reduction is over every axis but the channel axis and its order is free, so the other
    axes are sorted by decreasing stride: those with a larger stride than the channel axis are
    merged into ``outer``, the rest into ``inner``. Contiguous arrays of every layout (NCHW,
    NHWC, a transposed NCHW view, ...) then become a contiguous 3-D view without a copy.

    Compared and hashed by identity (``Layout.of`` memoizes them): the memo of ``is_view``
    keys on the layout, and hashing a frozen dataclass's seven fields took 0.15 us per call.
    """

    shape: tuple
    axis: int
    order: tuple  # a transpose of the array to (outer axes..., channel, inner axes...)
    canon: tuple  # (outer, C, inner)
    inverse: tuple  # the transpose back
    ordered_shape: tuple  # the shape in ``order``
    transposed: bool  # does ``order`` move any axis (2-D, NCHW and NHWC arrays: no)

    @classmethod
    def of(cls, x: np.ndarray, axis: int) -> Layout:
        key = (x.shape, x.strides, axis)
        layout = _LAYOUTS.get(key)
        if layout is None:  # memoized: a trainer calls with the same few layouts every step
            if len(_LAYOUTS) >= 1024:
                _LAYOUTS.clear()
            layout = _LAYOUTS[key] = cls._of(x.shape, x.strides, axis)
        return layout

    @classmethod
    def _of(cls, shape: tuple, strides: tuple, axis: int) -> Layout:
        others = [a for a in range(len(shape)) if a != axis]
        ones = [a for a in others if shape[a] == 1]
        rest = sorted((a for a in others if shape[a] != 1), key=lambda a: -abs(strides[a]))
        if shape[axis] == 1:
            outer, inner = [], rest  # one channel: make its rows as long as possible
        else:
            cs = abs(strides[axis])
            outer = [a for a in rest if abs(strides[a]) > cs]
            inner = [a for a in rest if abs(strides[a]) <= cs]
        order = tuple(ones + outer + [axis] + inner)
        n_outer = math.prod(shape[a] for a in ones + outer)
        n_inner = math.prod(shape[a] for a in inner)
        return cls(
            shape,
            axis,
            order,
            (n_outer, shape[axis], n_inner),
            tuple(int(i) for i in np.argsort(order)),
            tuple(shape[a] for a in order),
            order != tuple(range(len(shape))),
        )

    @property
    def channels(self) -> int:
        return self.canon[1]

    @property
    def count(self) -> int:
        """Values per channel."""
        return self.canon[0] * self.canon[2]

    def view3(self, a: np.ndarray) -> np.ndarray:
        """``a`` (of this layout's shape) as a C-contiguous (outer, C, inner) array, the form
        every kernel takes: a view for contiguous arrays of every layout (a transposed NCHW
        too), else one copy (sliced, negative-stride, broadcast or Fortran-ordered views).

        One copy and the C-contiguous kernels replace 0.2's serial strided family, faster on
        every sliced input measured (Zen 5, float32, ms, median, 1 thread; strided kernels ->
        copy + kernel): NCHW (512, 64, 28, 28)[::2] forward 20.8 -> 11.8, backward 24.0 ->
        15.1; 2-D (8192, 2048)[:, ::2] forward 18.0 -> 12.1, backward 213 -> 16.8; (64,
        512)[:, ::2] forward 0.038 -> 0.020, backward 0.41 -> 0.017. Its kernels were a third
        of all compilation."""
        if not self.transposed and a.flags.c_contiguous:
            return a.reshape(self.canon)  # the common case (0.38 -> 0.15 us at (32, 64))
        v = a.transpose(self.order) if self.transposed else a
        try:
            v = v.reshape(self.canon, copy=False)
        except ValueError:
            return np.ascontiguousarray(v).reshape(self.canon)
        return v if v.flags.c_contiguous else np.ascontiguousarray(v)

    def is_view(self, a: np.ndarray) -> bool:
        """Is :meth:`view3` of ``a`` a view (no copy)? Its strides and itemsize decide it."""
        key = (self, a.strides, a.itemsize)
        view = _VIEWS.get(key)
        if view is None:  # a probe with a's strides over one element: reshape reads no memory
            probe = np.lib.stride_tricks.as_strided(np.empty(1, a.dtype), self.shape, a.strides)
            v = probe.transpose(self.order) if self.transposed else probe
            try:
                view = v.reshape(self.canon, copy=False).flags.c_contiguous
            except ValueError:
                view = False
            if len(_VIEWS) >= 1024:
                _VIEWS.clear()
            _VIEWS[key] = view
        return view

    def output(
        self, out: np.ndarray | None, dtype: np.dtype, near: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(array, its 3-D view)`` for a kernel to write; pass both to :meth:`finish_output`.

        Without ``out``, a new array laid out canonically (its 3-D view is always a view),
        made again :func:`placed` where it starts fewer than ``PLACE_NEAR`` bytes after
        ``near`` (the canonical x the kernel reads) within a page and :meth:`placed_apart`
        says so. With an ``out`` that has no C-contiguous 3-D view, the kernel writes a
        temporary copied into ``out``.
        """
        if out is not None:
            if self.is_view(out):
                v = out.transpose(self.order) if self.transposed else out
                return out, v.reshape(self.canon)
            return out, np.empty(self.canon, dtype)
        t = np.empty(self.ordered_shape, dtype)
        if near is not None and self.placed_apart(dtype) and page_gap(near, t) < PLACE_NEAR:
            del t  # (freed first: a call's extra memory stays bounded, tests/test_reliability)
            t = placed(self.ordered_shape, dtype, near)
        return (t.transpose(self.inverse) if self.transposed else t), t.reshape(self.canon)

    def placed_apart(self, dtype: np.dtype) -> bool:
        """Does it matter where a fresh output of this layout starts relative to x (see
        ``PLACE_NEAR``)? Where the lanes family's write takes four rows per pass (rows of
        ``NEAR_PAGE`` bytes or more, arrays beyond the strip budget: ``lanes.affine_rows``)."""
        outer, channels, inner = self.canon
        row = channels * inner * dtype.itemsize
        return inner < ROWS_MIN and row >= NEAR_PAGE and outer * row > _STRIP

    def finish_output(self, a: np.ndarray, a3: np.ndarray) -> None:
        """Copy the kernel's result into ``a`` when ``a3`` was a temporary, not a view of it."""
        if a3.base is None:  # :meth:`output`'s temporary (its views have a base): the test
            # costs 0.03 us where ``np.may_share_memory`` took 0.36 us
            a[...] = a3.reshape(self.ordered_shape).transpose(self.inverse)


_LAYOUTS: dict = {}
_VIEWS: dict = {}
