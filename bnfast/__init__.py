"""bnfast: fused batch-normalization kernels for the CPU behind a PyTorch-compatible NumPy API.

Public surface::

    y, cache = bnfast.forward(x, gamma, beta, *, axis=1, training=True,
                              running_mean=None, running_var=None, momentum=0.1, eps=1e-5,
                              out=None, activation=None, renorm=None,
                              virtual_batch_size=None, unbiased=True)
    dx, dgamma, dbeta = bnfast.backward(dy, cache, *, out=None)
    dx, dgamma, dbeta = bnfast.backward_from_input(dy, x, gamma=None, *, axis=1, eps=1e-5,
                                                   out=None)
    mean, var = bnfast.moments(x, *, axis=1)
    layer = bnfast.BatchNorm(num_features, *, axis=1, eps=1e-5, momentum=0.1, affine=True,
                             track_running_stats=True, dtype=np.float32, center=True,
                             scale=True, activation=None, renorm=None,
                             virtual_batch_size=None, unbiased=True)
    momentum = bnfast.momentum_from_decay(decay)          # Keras/Flax momentum=0.99 -> 0.01
    W2, b2 = bnfast.fold_into_linear(W, b, layer)          # inference folding
    W2, b2 = bnfast.fold_into_conv(W, b, layer)

``bnfast.reference`` holds a pure-NumPy twin of each function (the math, and the test oracle);
``bnfast.kernels`` the jitted loops. ``python -m bnfast`` checks and times them on this machine.
"""

from . import _tbb  # noqa: F401  (first: makes the TBB threading layer loadable)
from ._core import (
    BatchNormCache,
    backward,
    backward_from_input,
    forward,
    moments,
    momentum_from_decay,
)
from ._fold import fold_into_conv, fold_into_linear
from ._layer import BatchNorm

__version__ = "0.2.0"
__all__ = [
    "BatchNorm",
    "BatchNormCache",
    "backward",
    "backward_from_input",
    "fold_into_conv",
    "fold_into_linear",
    "forward",
    "moments",
    "momentum_from_decay",
]
