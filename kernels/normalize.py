"""Normalization: one read of x, one write of y.

``y = (x - mean[c]) * scale[c] + shift[c]`` with the per-channel ``scale = gamma * invstd`` and
``shift = beta`` precomputed by the caller. Arithmetic is float64 for float32 data too, and
``x - mean`` is formed before scaling: the folded form ``x*scale + (beta - mean*scale)``
loses the digits that cancel, e.g. 6e-4 absolute on float32 x = 1e4 + N(0, 1) (PyTorch's error
there), against one rounding of the result here. The same kernel serves training (batch
statistics) and inference (running statistics).
"""

from __future__ import annotations

from ._jit import kernel


@kernel("x", "vec", "vec", "vec", "out")
def normalize(x, mean, scale, shift, y):
    """Write ``y[o, c, i] = (x[o, c, i] - mean[c]) * scale[c] + shift[c]``; y may be x itself."""
    outer, channels, inner = x.shape
    if inner == 1:
        for o in range(outer):
            for c in range(channels):
                y[o, c, 0] = (x[o, c, 0] - mean[c]) * scale[c] + shift[c]
    else:
        for o in range(outer):
            for c in range(channels):
                m = mean[c]
                s = scale[c]
                b = shift[c]
                for i in range(inner):
                    y[o, c, i] = (x[o, c, i] - m) * s + b
