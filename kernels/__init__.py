"""Jitted loops of bnfast: three layout families with the same kernels each.

Every kernel works on the canonical 3-D view ``(outer, C, inner)`` that ``bnfast`` makes of any
array (the channel axis in the middle, every other axis merged before or after it), takes its
outputs as the last parameters (before ``tune``) and returns nothing. No argument checking, no
allocation policy: that is ``bnfast``'s job. Data arrays are float32 or float64.

Families (chosen by ``bnfast`` from the view's memory layout, not from a layout name):

- ``rows``: C-contiguous, ``inner >= ROWS_MIN`` (NCHW and the like); parallel.
- ``lanes``: C-contiguous, ``inner < ROWS_MIN`` (2-D, NHWC, small spatial sizes); parallel.
- ``strided``: any other view (sliced, negative-stride, broadcast); serial.

Kernels in each family (one call per public operation; the per-channel arithmetic, the
running-average update included, happens inside the call, in ``common``; parameter kinds in
``_jit``):

- ``moments(x, mean, var, tune)``: per-channel mean and biased variance (float64), one read of
  x.
- ``forward_train(x, gamma, beta, eps, momentum, unbiased, rmax, dmax, relu, thr,
  running_mean, running_var, stats, y, tune)``: batch statistics, the (8, C) float64
  statistics block (``common.MEAN`` ... ``D``; Batch Renormalization when ``rmax > 0``), y with
  the fused ReLU when ``relu``, and the running averages when running arrays are given
  (length C, else 0).
- ``normalize(x, running_mean, running_var, gamma, beta, eps, relu, thr, stats, y, tune)``:
  inference.
- ``backward_train(x, dy, stats, relu, thr, dgamma, dbeta, dx, tune)``: the training gradient
  (the ReLU's mask recomputed from x and the block).
- ``backward_frozen(...)``, same parameters: the frozen-statistics gradient ``dx = scale * dy``,
  which reads x only for the mask, with dgamma and dbeta, in one pass.
- ``backward_input(x, dy, gamma, eps, dgamma, dbeta, dx, tune)``: the training gradient without
  a cache: statistics and both sums from one read of x and dy, then dx.
- ``normalize_block(x, stats, relu, thr, y, tune)``: y from a given statistics block (the
  synchronized forward's, from the global batch's statistics).
- ``backward_sums(x, dy, stats, relu, thr, s1, s2, tune)`` and ``backward_apply(x, dy, stats,
  relu, thr, s1, s2, n, dgamma, dbeta, dx, tune)``: ``backward_train`` in two calls, for the
  synchronized backward (``bnfast._sync``), which reduces the float64 sums across processes
  between them; n is the global count.

Per-channel vectors are in the data's dtype (gamma, beta, running statistics, dgamma, dbeta)
or float64 (``moments``' outputs, the gradient sums);
``tune`` is the machine's tuning vector (``_jit.TUNE_*``).
"""

from . import lanes, rows, strided
from ._jit import compile_declared

FAMILIES = {"rows": rows, "lanes": lanes, "strided": strided}
KERNELS = (
    "moments",
    "forward_train",
    "normalize",
    "backward_train",
    "backward_frozen",
    "backward_input",
    "normalize_block",
    "backward_sums",
    "backward_apply",
)


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
