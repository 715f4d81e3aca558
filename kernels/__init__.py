"""Jitted loops of bnfast: two layout families with the same four kernels each, and a cold
rescue kernel.

Every kernel works on the canonical C-contiguous 3-D view ``(outer, C, inner)`` that ``bnfast``
makes of any array (the channel axis in the middle, every other axis merged before or after it;
a view that is not C-contiguous is copied once), takes its outputs as the last parameters
(before ``tune``) and raises nothing. No argument checking, no allocation policy: that is
``bnfast``'s job. Data arrays are float32 or float64.

Families (chosen by ``bnfast`` from the view's shape, not from a layout name):

- ``rows``: ``inner >= ROWS_MIN`` (NCHW and the like); parallel.
- ``lanes``: ``inner < ROWS_MIN`` (2-D, NHWC, small spatial sizes); parallel.

Kernels in each family: one per operation, its mode and every scalar option in the float64
parameter block ``params`` (``_jit.P_*``; ``bnfast._plan`` builds it); the per-channel
arithmetic, the running-average update included, happens inside the call (``common``):

- ``moments(x, mean, var, tune) -> bad``: per-channel float64 mean and biased variance, one
  read of x (also the synchronized forward's local statistics).
- ``forward(x, gamma, beta, running_mean, running_var, params, stats, y, tune) -> bad``:
  ``P_MODE`` picks batch statistics (training; the running averages updated when the running
  arrays have length C), running statistics (inference) or given MEAN and VAR rows (a
  synchronized forward); writes y (the fused ReLU when ``P_RELU``; Batch Renormalization when
  ``P_RMAX > 0``) and the statistics a cache keeps into ``stats`` (``common.KEPT``: MEAN and
  INVSTD, and ``R`` and ``D`` under renorm; none when it has no columns; a synchronized
  forward gives its mean and variance in rows 0 and 1). The rest of the
  per-channel work block (``common.MEAN`` ... ``SHIFT``) lives in the call: per tile on the
  lanes family's fused route.
- ``backward(x, dy, gamma, beta, stats, params, sums, dgamma, dbeta, dx, tune)``: ``P_MODE``
  picks the training gradient, the frozen-statistics gradient, the two float64 gradient sums
  alone (``sums``, for a synchronized backward) or dx from given sums; the work block is
  rebuilt from the kept rows, gamma and beta (a training cache that kept none: the statistics
  taken again from x per tile, with ``P_EPS``); the sums are written to ``sums`` in every mode (a
  virtual batch's dgamma is formed from them in float64).
- ``backward_input(x, dy, gamma, params, dgamma, dbeta, dx, tune)``: the training gradient
  without a cache: statistics and both sums from one read of x and dy, then dx.

``bad`` is how many channels' float64 sums overflowed or hold inf/NaN; the caller then runs
``common.rescue`` (after ``forward``: recomputes them from rescaled values, rewrites their y,
updates the running averages) or ``common.rescue_moments``. Per-channel vectors are in the
data's dtype (gamma, beta, running statistics, dgamma, dbeta) or float64 (``moments``'
outputs, ``stats``, ``sums``); ``tune`` is the machine's tuning vector (``_jit.TUNE_*``).
"""

from . import lanes, rows
from ._jit import compile_declared
from .common import rescue, rescue_moments

FAMILIES = {"rows": rows, "lanes": lanes}
KERNELS = ("moments", "forward", "backward", "backward_input")
RESCUE = (rescue, rescue_moments)


def compile_all() -> int:
    """Compile (or load from the cache) every declared signature of every kernel, serial and
    small twins and the rescue kernels included; returns how many. Kernels otherwise compile
    on first use."""
    count = 0
    for family in FAMILIES.values():
        for name in KERNELS:
            dispatcher = getattr(family, name)
            count += compile_declared(dispatcher) + compile_declared(dispatcher.serial)
            if hasattr(dispatcher, "small"):
                count += compile_declared(dispatcher.small)
    for dispatcher in RESCUE:
        count += compile_declared(dispatcher)
    return count


__all__ = ["FAMILIES", "KERNELS", "RESCUE", "compile_all", "lanes", "rows"]
