"""Jitted loops of bnfast: three layout families with the same five kernels each.

Every kernel works on the canonical 3-D view ``(outer, C, inner)`` that ``bnfast`` makes of any
array (the channel axis in the middle, every other axis merged before or after it), takes its
outputs as the last parameters (before ``tune``) and returns nothing. No argument checking, no
allocation policy: that is ``bnfast``'s job. Data arrays are float32 or float64.

Families (chosen by ``bnfast`` from the view's memory layout, not from a layout name):

- ``rows``: C-contiguous, ``inner >= ROWS_MIN`` (NCHW and the like); parallel.
- ``lanes``: C-contiguous, ``inner < ROWS_MIN`` (2-D, NHWC, small spatial sizes); parallel.
- ``strided``: any other view (sliced, negative-stride, broadcast); serial.

Kernels in each family (one call per public operation; the per-channel arithmetic, the
running-average update included, happens inside the call, in ``common``):

- ``moments(x, mean, var, tune)``: per-channel mean and biased variance, one read of x.
- ``forward_train(x, gamma, beta, eps, momentum, running_mean, running_var, stats, y, tune)``:
  batch statistics, the (4, C) float64 statistics block (mean, inverse std, gamma, var), the running
  averages when running arrays are given (length C, else 0), and y.
- ``normalize(x, running_mean, running_var, gamma, beta, eps, stats, y, tune)``: inference.
- ``backward_train(x, dy, stats, dgamma, dbeta, dx, tune)``: the training gradient.
- ``backward_frozen(x, dy, stats, dgamma, dbeta, dx, tune)``: the frozen-statistics gradient
  ``dx = gamma * invstd * dy``, which never reads x, with dgamma and dbeta, in one pass.

Per-channel vectors (gamma, beta, running statistics, dgamma, dbeta) are in the data's dtype;
``tune`` is the machine's tuning vector (``_jit.TUNE_*``).
"""

from . import lanes, rows, strided
from ._jit import compile_declared

FAMILIES = {"rows": rows, "lanes": lanes, "strided": strided}
KERNELS = ("moments", "forward_train", "normalize", "backward_train", "backward_frozen")


def compile_all() -> int:
    """Compile (or load from the cache) every declared signature of every kernel, serial twins
    included; returns how many. Kernels otherwise compile on first use."""
    count = 0
    for family in FAMILIES.values():
        for name in KERNELS:
            dispatcher = getattr(family, name)
            for d in (dispatcher, getattr(dispatcher, "serial", None)):
                if d is not None:
                    count += compile_declared(d)
    return count


__all__ = ["FAMILIES", "KERNELS", "compile_all", "lanes", "rows", "strided"]
