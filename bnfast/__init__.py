"""bnfast: fused batch-normalization kernels for the CPU behind a PyTorch-compatible NumPy API.

Public surface::

    y, cache = bnfast.forward(x, gamma, beta, *, axis=1, training=True,
                              running_mean=None, running_var=None, momentum=0.1, eps=1e-5,
                              out=None)
    dx, dgamma, dbeta = bnfast.backward(dy, cache, *, out=None)
    mean, var = bnfast.moments(x, *, axis=1)
    layer = bnfast.BatchNorm(num_features, *, axis=1, eps=1e-5, momentum=0.1, affine=True,
                             track_running_stats=True, dtype=np.float32)

``bnfast.reference`` holds a pure-NumPy twin of each function (the math, and the test oracle);
``bnfast.kernels`` the jitted loops. ``python -m bnfast`` checks and times them on this machine.
"""

from . import _tbb  # noqa: F401  (first: makes the TBB threading layer loadable)
from ._core import BatchNormCache, backward, forward, moments
from ._layer import BatchNorm

__version__ = "0.1.0"
__all__ = ["BatchNorm", "BatchNormCache", "backward", "forward", "moments"]
