"""Folding a ``BatchNorm`` in eval mode into the linear layer before it (for inference).

In eval mode batch norm is an affine map per channel, ``y = s * z + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``, so a layer
``z = x @ W + b`` followed by it equals ``x @ (W * s) + (b * s + t)``. NumPy only, no kernel:
this runs once per model, not per batch. Computed in float64, rounded once into W's dtype.
"""

from __future__ import annotations

import numpy as np

from . import _checks as chk
from ._layer import BatchNorm


def _affine_of(bn) -> tuple[np.ndarray, np.ndarray]:
    """``(s, t)`` in float64: the eval-mode map of ``bn`` (gamma 1 without scale, beta 0
    without a shift)."""
    if not isinstance(bn, BatchNorm):
        raise TypeError(f"bn must be a bnfast.BatchNorm, got {type(bn).__name__}")
    if not bn.track_running_stats:
        raise ValueError(
            "bn does not track running statistics: in eval mode it normalizes with each batch's "
            "own, which no fixed linear layer can reproduce"
        )
    if bn.training:
        raise ValueError(
            "bn is in training mode, where it normalizes with each batch's statistics; folding "
            "is for inference only: call bn.eval() first"
        )
    rm, rv = bn._running()
    gamma = np.ones(bn.num_features) if bn.gamma is None else bn.gamma.astype(np.float64)
    beta = np.zeros(bn.num_features) if bn.beta is None else bn.beta.astype(np.float64)
    s = gamma / np.sqrt(rv.astype(np.float64) + bn.eps)
    return s, beta - rm.astype(np.float64) * s


def _bias(b, channels: int, name: str) -> np.ndarray:
    if b is None:
        return np.zeros(channels)
    b = chk.as_array(b, name)
    if b.dtype.kind not in "fiu":
        raise TypeError(
            f"{name} has dtype {b.dtype}; expected real numbers (a float or integer dtype)"
        )
    if b.shape != (channels,):
        raise ValueError(f"{name} has shape {b.shape}; expected ({channels},)")
    return b.astype(np.float64)


def _weights(W, name: str) -> np.ndarray:
    W = chk.as_array(W, name)
    if W.dtype.kind != "f":
        raise TypeError(f"{name} has dtype {W.dtype}; expected a floating dtype")
    return W


def fold_into_linear(W, b, bn) -> tuple[np.ndarray, np.ndarray]:
    """``(W2, b2)`` with ``x @ W2 + b2 == bn(x @ W + b)`` for ``bn`` in eval mode.

    Parameters
    ----------
    W : ndarray of shape (in, out)
        The NumPy-trainer convention ``z = x @ W + b`` (PyTorch's ``nn.Linear`` stores
        ``W.T``).
    b : ndarray of shape (out,) or None
    bn : BatchNorm
        Over ``out`` channels, tracking running statistics, in eval mode (a layer in training
        mode is refused, as PyTorch's fusion refuses it). Its activation, if any, is not
        folded: apply it after the folded layer.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> rng = np.random.default_rng(0)
    >>> W, b, x = rng.normal(size=(4, 3)), rng.normal(size=3), rng.normal(size=(5, 4))
    >>> bn = bnfast.BatchNorm(3, dtype=np.float64)
    >>> _ = bn(rng.normal(2.0, 3.0, (64, 3)))        # some running statistics
    >>> W2, b2 = bnfast.fold_into_linear(W, b, bn.eval())
    >>> np.allclose(x @ W2 + b2, bn(x @ W + b), rtol=1e-12, atol=1e-12)
    True
    """
    s, t = _affine_of(bn)
    W = _weights(W, "W")
    if W.ndim != 2 or W.shape[1] != bn.num_features:
        raise ValueError(f"W has shape {W.shape}; expected (in, {bn.num_features}) for bn")
    b64 = _bias(b, bn.num_features, "b")
    return (W.astype(np.float64) * s).astype(W.dtype), (b64 * s + t).astype(W.dtype)


def fold_into_conv(W, b, bn) -> tuple[np.ndarray, np.ndarray]:
    """``(W2, b2)`` for a convolution with weights ``W`` of shape ``(out_channels,
    in_channels, *kernel)`` and bias ``b`` (or None), followed by ``bn`` over its output
    channels in eval mode: the folded convolution equals the pair.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> bn = bnfast.BatchNorm(2, dtype=np.float64).eval()
    >>> W2, b2 = bnfast.fold_into_conv(np.ones((2, 1, 3, 3)), None, bn)
    >>> b2.shape, W2.shape
    ((2,), (2, 1, 3, 3))
    """
    s, t = _affine_of(bn)
    W = _weights(W, "W")
    if W.ndim < 2 or W.shape[0] != bn.num_features:
        raise ValueError(
            f"W has shape {W.shape}; expected ({bn.num_features}, in_channels, *kernel) for bn"
        )
    b64 = _bias(b, bn.num_features, "b")
    scale = s.reshape((-1,) + (1,) * (W.ndim - 1))
    return (W.astype(np.float64) * scale).astype(W.dtype), (b64 * s + t).astype(W.dtype)
