"""Jitted loops of bnfast, one module per kernel family.

Every kernel works on the canonical 3-D view ``(outer, C, inner)`` that ``bnfast`` makes of any
array (the channel axis in the middle, every other axis merged before or after it), takes its
outputs as the last parameters and returns nothing. No argument checking, no allocation policy:
that is ``bnfast``'s job. Per-channel vectors are float64; data arrays are float32 or float64.

- ``stats.moments``: per-channel mean and biased variance, one read of x.
- ``normalize.normalize``: y = (x - mean) * scale + shift, one read and one write.
- ``backward.grad_sums``: sum(dy) and sum(dy * (x - mean)), one read of x and dy.
- ``backward.grad_input``: dx = k * dy - c1 * (x - mean) + c0, one read of x and dy, one write.
"""

from .backward import grad_input, grad_sums
from .normalize import normalize
from .stats import moments

__all__ = ["grad_input", "grad_sums", "moments", "normalize"]
