"""Helpers shared by the kernel families: the shift, and turning shifted sums into moments."""

from __future__ import annotations

from ._jit import helper


@helper
def finish_moments(shift, s1, s2, n, mean, var):
    """``mean = k + s1/n``, ``var = (s2 - s1**2/n)/n`` per channel, from sums around ``k``.

    Rounding can leave var a few ulps below zero for a constant channel: clamp without touching
    NaN (a NaN compares false), so a channel holding NaN or inf stays NaN.
    """
    for c in range(mean.shape[0]):
        mean[c] = shift[c] + s1[c] / n
        v = (s2[c] - s1[c] * (s1[c] / n)) / n
        var[c] = 0.0 if v < 0.0 else v
