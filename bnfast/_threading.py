"""Which kernels run a call: the layout family, and parallel or serial. Thread and fork safety.

- Family: the ``rows``/``lanes`` kernels need every data array C-contiguous in the canonical
  view; anything else runs the serial ``strided`` kernels.
- Parallel or serial: the serial twin of a parallel kernel is the same code, so both give
  bitwise identical results; serial is used below ``SERIAL_BELOW`` elements (launching the
  thread pool costs more than it saves there) and in a forked child whose parent had started
  numba's GNU OpenMP pool (not fork-safe: numba aborts such a child).
- TBB: numba's TBB layer is thread- and fork-safe. When the ``tbb`` wheel is installed
  (``pip install bnfast[tbb]``) its ``libtbb.so.12`` lives in the environment's ``lib/``, where
  the dynamic loader does not look; ``bnfast._tbb`` loads it before any kernel is compiled
  (numba starts its pool while compiling a parallel kernel), so that numba's default layer order
  (tbb, omp, workqueue) finds it. ``NUMBA_THREADING_LAYER`` set by the user is respected.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numba
import numpy as np

from . import kernels
from .kernels._jit import ROWS_MIN
from ._tbb import TBB_LOADED  # noqa: F401  (re-exported for tests and the main job)

# Below this many elements a call runs serially. Measured, lanes forward_train, float32, C = 64,
# 2 threads (TBB): 1024 elements 16.0 us parallel / 3.9 us serial; 65536: 48 / 38 us;
# 131072: 69 / 73 us; 262144: 110 / 151 us. The launch costs ~12 us; break-even near 2**17.
SERIAL_BELOW = 2**17



def _family(module, serial: bool) -> SimpleNamespace:
    return SimpleNamespace(**{name: getattr(module, name).serial if serial
                              else getattr(module, name) for name in kernels.KERNELS})


_PARALLEL = {name: _family(kernels.FAMILIES[name], False) for name in ("rows", "lanes")}
_SERIAL = {name: _family(kernels.FAMILIES[name], True) for name in ("rows", "lanes")}
_STRIDED = _family(kernels.strided, False)

_serial_only = False  # set in a forked child whose parent had started GNU OpenMP
_layer_at_fork = None


def _before_fork() -> None:
    global _layer_at_fork
    try:
        _layer_at_fork = numba.threading_layer()
    except ValueError:  # no parallel region ran yet: the child may start any layer afresh
        _layer_at_fork = None


def _after_fork_in_child() -> None:
    global _serial_only
    _serial_only = _serial_only or _layer_at_fork == "omp"


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def kernels_for(*arrays: np.ndarray) -> SimpleNamespace:
    """The family's six kernels for a call on these canonical (outer, C, inner) arrays."""
    x = arrays[0]
    if not all(a.flags.c_contiguous for a in arrays):
        return _STRIDED
    name = "rows" if x.shape[2] >= ROWS_MIN else "lanes"
    if _serial_only or x.size < SERIAL_BELOW:
        return _SERIAL[name]
    return _PARALLEL[name]
