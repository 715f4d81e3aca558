"""Make the ``tbb`` wheel's library visible to numba; imported before any kernel.

pip puts ``libtbb.so.12`` in the environment's ``lib/``, outside the loader's search path, so
numba's TBB layer fails to import and numba falls back to GNU OpenMP (not fork-safe). Loading
the library by its full path first makes numba's own ``CDLL("libtbb.so.12")`` find it. Numba
starts its thread pool when it compiles (or loads) a parallel kernel, so this must run before
``bnfast.kernels`` is imported.
"""

from __future__ import annotations

import ctypes
import sys
from importlib import metadata


def _preload_tbb() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        files = metadata.files("tbb") or []
    except metadata.PackageNotFoundError:
        return False
    for f in files:
        if f.name == "libtbb.so.12":
            try:
                ctypes.CDLL(str(f.locate()), mode=ctypes.RTLD_GLOBAL)
                return True
            except OSError:
                return False
    return False


TBB_LOADED = _preload_tbb()
