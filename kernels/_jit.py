"""The one place where the JIT options of every kernel are chosen.

``kernel("x", "x", "vec", "out")`` compiles a function eagerly for each of its signatures:
data arrays in float32 and in float64, each in two memory layouts (all 'C' for the contiguous
canonical view, all 'A' for strided, negative-stride and broadcast views). Parameter kinds:

- ``"x"``: a 3-D data array the kernel only reads. Typed read-only, so writeable, read-only and
  broadcast arrays all match it (numba converts a writeable array to a read-only type safely).
- ``"out"``: a 3-D data array the kernel writes, same dtype and layout as the inputs.
- ``"vec"``: a float64 per-channel vector the kernel reads; ``"vec_out"``: one it writes.

Options, and why:

- ``cache=True``: compiled code is written next to the module (or to ``NUMBA_CACHE_DIR``), so
  only the first process on a machine pays for compilation.
- eager signatures: the dispatcher never compiles on a call, a call with an unsupported type
  fails with a ``TypeError`` instead of compiling, and the cache is complete after one import.
- ``nogil=True``: kernels release the GIL, so Python threads can run them side by side.
- ``error_model="numpy"``: a division by zero gives inf/nan as in NumPy instead of a Python
  exception, and costs no branch in the loops.
- ``fastmath=False``: no reassociation, so a sum is computed in the order written and a NaN or
  inf propagates as IEEE says. The reductions get their speed from their structure instead
  (float64 accumulators over a per-channel shift; see ``stats.py``).
- ``parallel=False``: serial for now; a serial path stays for callers already inside a pool.
"""

from __future__ import annotations

import numba
from numba import types

DATA_DTYPES = (types.float32, types.float64)
LAYOUTS = ("C", "A")

JIT_OPTIONS = dict(cache=True, nogil=True, error_model="numpy", fastmath=False, parallel=False)


def _param(kind: str, dtype: types.Type, layout: str) -> types.Type:
    if kind == "x":
        return types.Array(dtype, 3, layout, readonly=True)
    if kind == "out":
        return types.Array(dtype, 3, layout)
    if kind == "vec":
        return types.Array(types.float64, 1, "C", readonly=True)
    if kind == "vec_out":
        return types.Array(types.float64, 1, "C")
    raise ValueError(f"unknown kernel parameter kind {kind!r}")


def signatures(*kinds: str) -> list:
    """Every eager signature of a kernel whose parameters are of the given kinds."""
    return [
        types.void(*(_param(kind, dtype, layout) for kind in kinds))
        for dtype in DATA_DTYPES
        for layout in LAYOUTS
    ]


def kernel(*kinds: str):
    """Decorator: compile the function eagerly for every signature of ``kinds``."""
    return numba.njit(signatures(*kinds), **JIT_OPTIONS)


def helper(func):
    """Decorator for a jitted function called only from kernels (compiled with their options)."""
    return numba.njit(**JIT_OPTIONS)(func)
