"""Jitted loops of bnfast: three layout families with the same four kernels each.

Every kernel works on the canonical 3-D view ``(outer, C, inner)`` that ``bnfast`` makes of any
array (the channel axis in the middle, every other axis merged before or after it), takes its
outputs as the last parameters and returns nothing. No argument checking, no allocation policy:
that is ``bnfast``'s job. Per-channel vectors are float64; data arrays are float32 or float64.

Families (chosen by ``bnfast`` from the view's memory layout, not from a layout name):

- ``rows``: C-contiguous, ``inner >= ROWS_MIN`` (NCHW and the like); parallel.
- ``lanes``: C-contiguous, ``inner < ROWS_MIN`` (2-D, NHWC, small spatial sizes); parallel.
- ``strided``: any other view (sliced, negative-stride, broadcast); serial.

Kernels in each family:

- ``moments(x, mean, var)``: per-channel mean and biased variance, one read of x.
- ``normalize(x, mean, scale, shift, y)``: ``y = (x - mean) * scale + shift``, one read, one write.
- ``grad_sums(x, dy, mean, sum_dy, sum_dy_xmu)``: ``sum(dy)``, ``sum(dy * (x - mean))``, one read.
- ``grad_input(x, dy, mean, k, c1, c0, dx)``: ``dx = k*dy - c1*(x - mean) + c0``, one pass.
"""

from . import lanes, rows, strided

FAMILIES = {"rows": rows, "lanes": lanes, "strided": strided}
KERNELS = ("moments", "normalize", "grad_sums", "grad_input", "forward_train", "backward_train")


def compile_all() -> int:
    """Compile (or load from the cache) every declared signature of every kernel, serial twins
    included; returns how many. Kernels otherwise compile on first use."""
    count = 0
    for family in FAMILIES.values():
        for name in KERNELS:
            dispatcher = getattr(family, name)
            for d in (dispatcher, getattr(dispatcher, "serial", None)):
                if d is not None:
                    for sig in d.declared:
                        d.compile(sig)
                        count += 1
    return count


__all__ = ["FAMILIES", "KERNELS", "compile_all", "lanes", "rows", "strided"]
