"""The one place where the JIT options of every kernel are chosen.

``kernel("x", "x", "vec", "out")`` declares a kernel's signatures from its parameter kinds:
data arrays in float32 and in float64, each in two memory layouts (all 'C' for the contiguous
canonical view, all 'A' for strided, negative-stride and broadcast views). Parameter kinds:

- ``"x"``: a 3-D data array the kernel only reads. Typed read-only, so writeable, read-only and
  broadcast arrays all match it (numba converts a writeable array to a read-only type safely).
- ``"out"``: a 3-D data array the kernel writes, same dtype and layout as the inputs.
- ``"vec"``: a float64 per-channel vector the kernel reads; ``"vec_out"``: one it writes.
- ``"scalar"``: a float64 number (eps).

Options, and why:

- ``cache=True``: compiled code is written next to the module (or to ``NUMBA_CACHE_DIR``), so
  only the first process on a machine pays for compilation.
- compiled on first use, not at import: ``bnfast`` passes exactly the declared types (inputs
  as read-only views), so a call compiles (or, with a warm cache, loads) only the signatures it
  needs. Eager compilation of every declared signature made ``import bnfast`` take 0.8-1.0 s
  with a warm cache (loading 40 compiled kernels) and 64 s with a cold one; the first float32
  training step needs a handful. ``bnfast.kernels.compile_all()`` compiles every declared
  signature (tests check that they all compile; a deployment can warm its cache with it).
- ``nogil=True``: kernels release the GIL, so Python threads can run them side by side.
- ``error_model="numpy"``: a division by zero gives inf/nan as in NumPy instead of a Python
  exception, and costs no branch in the loops.
- ``fastmath=False`` for kernels: every operation in the order written, NaN and inf as IEEE says.
  The one exception is ``reduction``: the helpers that sum one contiguous row get
  ``fastmath={"reassoc"}`` and nothing else (no ``nnan``/``ninf``: NaN and inf still propagate),
  which lets LLVM split the sum into vector lanes. Measured on float32 (32, 64, 3136), serial:
  2.5 ms for the shifted moments sums against 5.2 ms with 8 hand-unrolled accumulator pairs and
  6.8 ms with one pair, error unchanged (float64 accumulation around a shift; the lanes only
  change which values are added first). The order is fixed by the compiled code, so results do
  not depend on the thread count.
- ``parallel``: the ``rows`` and ``lanes`` families are parallel (``prange`` over a fixed
  partition into blocks, see below); every parallel kernel also has a ``.serial`` twin compiled
  from the same code with ``parallel=False`` (lazily, cached), for small arrays, for callers
  already inside a thread pool, and for a process forked from one whose threading layer is not
  fork-safe. Serial and parallel runs give bitwise identical results: the partition and the order
  in which partials are combined depend on the shape only, never on the thread count.
"""

from __future__ import annotations

import types as types_module

import numba
from numba import types

DATA_DTYPES = (types.float32, types.float64)
LAYOUTS = ("C", "A")

JIT_OPTIONS = dict(cache=True, nogil=True, error_model="numpy", fastmath=False)

# The fixed partition of the parallel families (depends on the shape only):
BLOCK = 16384  # target elements per block: 64 KiB of float32 stays in L1/L2 while reduced
MAX_BLOCKS = 64  # at most this many blocks per reduction (bounds the partials' memory)
MIN_STRIPES = 16  # lanes family: at least 16 stripes per block, so partials <= 1/4 of x's bytes
LANES_MIN = 64  # lanes family: at least 64 lanes per stripe, so SIMD lanes stay full
ROWS_MIN = 64  # inner >= ROWS_MIN: the rows family (each (o, c) row contiguous and long)
# rows family: a channel whose slice of x is at most FUSE_BYTES is reduced and then normalized
# (or its dx written) by one task while the slice is still in this core's 1 MiB L2, so x (and
# dy) are read from memory once instead of twice.
FUSE_BYTES = 512 * 1024


def _param(kind: str, dtype: types.Type, layout: str) -> types.Type:
    if kind == "x":
        return types.Array(dtype, 3, layout, readonly=True)
    if kind == "out":
        return types.Array(dtype, 3, layout)
    if kind == "vec":
        return types.Array(types.float64, 1, "C", readonly=True)
    if kind == "vec_out":
        return types.Array(types.float64, 1, "C")
    if kind == "scalar":
        return types.float64
    raise ValueError(f"unknown kernel parameter kind {kind!r}")


def signatures(*kinds: str, layouts=LAYOUTS) -> list:
    """Every declared signature of a kernel whose parameters are of the given kinds."""
    return [
        types.void(*(_param(kind, dtype, layout) for kind in kinds))
        for dtype in DATA_DTYPES
        for layout in layouts
    ]


def kernel(*kinds: str):
    """Decorator: a serial kernel; its declared signatures are ``.declared``."""
    def wrap(func):
        dispatcher = numba.njit(parallel=False, **JIT_OPTIONS)(func)
        dispatcher.declared = signatures(*kinds)
        return dispatcher
    return wrap


def _renamed(func, suffix: str):
    """The same code under another qualified name. Numba's cache keys an entry on the function's
    qualified name, bytecode and signature, not on ``parallel``: compiled from the very same
    function, the serial twin would load the parallel machine code from the cache (seen here: a
    forked child then started GNU OpenMP and was killed)."""
    twin = types_module.FunctionType(func.__code__, func.__globals__, func.__name__ + suffix,
                                     func.__defaults__, func.__closure__)
    twin.__qualname__ = func.__qualname__ + suffix
    twin.__doc__ = func.__doc__
    return twin


def parallel_kernel(*kinds: str):
    """Decorator: a parallel kernel for C-contiguous data (float32 and float64 declared), with a
    ``.serial`` twin of the same code."""
    def wrap(func):
        dispatcher = numba.njit(parallel=True, **JIT_OPTIONS)(func)
        dispatcher.serial = numba.njit(parallel=False, **JIT_OPTIONS)(_renamed(func, "_serial"))
        dispatcher.declared = dispatcher.serial.declared = signatures(*kinds, layouts=("C",))
        return dispatcher
    return wrap


def phase(func):
    """Decorator for a ``prange`` loop that several kernels share. Inlined into each caller at
    Numba-IR level (``inline="always"``), so its ``prange`` runs in parallel inside a parallel
    kernel and as a plain loop inside the serial twin (checked: 1.95x on 2 threads)."""
    return numba.njit(inline="always", **JIT_OPTIONS)(func)


REDUCTION_FASTMATH = {"reassoc"}


def reduction(func):
    """Decorator for a helper that sums one contiguous row (see the fastmath note above)."""
    return numba.njit(parallel=False, **{**JIT_OPTIONS, "fastmath": REDUCTION_FASTMATH})(func)


def helper(func):
    """Decorator for a jitted function called only from kernels (compiled with their options)."""
    return numba.njit(parallel=False, **JIT_OPTIONS)(func)
