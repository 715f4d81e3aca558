"""One registry of implementations of the same operations, shared by ``python -m bnfast``,
``bench/`` and ``tests/``: bnfast, the NumPy reference, and PyTorch when it imports.

``IMPLEMENTATIONS[name].prepare(op, inputs)`` returns a zero-argument callable that runs one
operation on prepared data (setup, e.g. a forward pass before a timed backward, or conversion
to torch tensors, happens in ``prepare``) and returns NumPy arrays: ``(y,)`` for "forward" and
"inference", ``(dx, dgamma, dbeta)`` for "backward". Every implementation normalizes the same
data the same way, so outputs can be compared against the reference's.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import _core, reference

OPERATIONS = ("forward", "backward", "inference")
# Minimum memory traffic of an unfused-in-cache kernel, in multiples of x's bytes: forward reads
# x twice and writes y; backward reads x and dy twice and writes dx; inference reads x, writes y.
TRAFFIC = {"forward": 3, "backward": 5, "inference": 2}
EPS = 1e-5
MOMENTUM = 0.1


@dataclass(frozen=True)
class Case:
    """A benchmark shape: ``shape`` with the channel axis ``axis``."""

    label: str
    shape: tuple
    axis: int = 1
    dtype: type = np.float32

    @property
    def channels(self) -> int:
        return self.shape[self.axis]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _nhwc(n, c, h, w):
    return Case(f"NHWC {n}x{h}x{w}x{c}", (n, h, w, c), -1)


CASES = (
    Case("2-D 32x64", (32, 64)),
    Case("2-D 8192x1024", (8192, 1024)),
    Case("2-D 65536x64", (65536, 64)),
    Case("NCHW 32x64x56x56", (32, 64, 56, 56)),
    Case("NCHW 128x256x14x14", (128, 256, 14, 14)),
    Case("NCHW 8x3x224x224", (8, 3, 224, 224)),
    _nhwc(32, 64, 56, 56),
    _nhwc(128, 256, 14, 14),
    _nhwc(8, 3, 224, 224),
)


def make_inputs(case: Case, seed: int = 0) -> dict:
    """Random data for a case: x (mean 3, spread 2), dy, gamma, beta, running stats."""
    rng = np.random.default_rng(seed)
    c, dt = case.channels, case.dtype
    return dict(
        case=case,
        x=(3.0 + 2.0 * rng.standard_normal(case.shape)).astype(dt),
        dy=rng.standard_normal(case.shape).astype(dt),
        gamma=rng.uniform(0.5, 1.5, c).astype(dt),
        beta=rng.uniform(-0.5, 0.5, c).astype(dt),
        running_mean=rng.uniform(2.0, 4.0, c).astype(dt),
        running_var=rng.uniform(3.0, 5.0, c).astype(dt),
    )


class _FunctionalImpl:
    """bnfast and the reference share a signature, so one adapter serves both."""

    def __init__(self, name: str, module) -> None:
        self.name = name
        self.module = module

    def available(self) -> bool:
        return True

    def prepare(self, op: str, inp: dict) -> Callable[[], tuple]:
        f = self.module
        x, g, b, axis = inp["x"], inp["gamma"], inp["beta"], inp["case"].axis
        rm, rv = inp["running_mean"].copy(), inp["running_var"].copy()
        if op == "forward":
            return lambda: (f.forward(x, g, b, axis=axis, running_mean=rm, running_var=rv,
                                      momentum=MOMENTUM, eps=EPS)[0],)
        if op == "inference":
            return lambda: (f.forward(x, g, b, axis=axis, training=False, running_mean=rm,
                                      running_var=rv, eps=EPS)[0],)
        if op == "backward":
            _, cache = f.forward(x, g, b, axis=axis, eps=EPS)
            dy = inp["dy"]
            return lambda: f.backward(dy, cache)
        raise ValueError(f"unknown operation {op!r}; expected one of {OPERATIONS}")


class _TorchImpl:
    name = "pytorch"

    def available(self) -> bool:
        try:
            import torch  # noqa: F401
        except ImportError:
            return False
        return True

    def prepare(self, op: str, inp: dict) -> Callable[[], tuple]:
        import torch
        import torch.nn.functional as F

        axis = inp["case"].axis % inp["x"].ndim

        def tensor(a):  # channel axis to dim 1 as a view: NHWC becomes channels_last
            return torch.from_numpy(np.moveaxis(a, axis, 1))

        def array(t):
            return np.moveaxis(t.detach().numpy(), 1, axis)

        x, dy = tensor(inp["x"]), tensor(inp["dy"])
        g, b = torch.from_numpy(inp["gamma"]), torch.from_numpy(inp["beta"])
        rm = torch.from_numpy(inp["running_mean"].copy())
        rv = torch.from_numpy(inp["running_var"].copy())
        if op in ("forward", "inference"):
            training = op == "forward"

            def run():
                with torch.no_grad():
                    return (array(F.batch_norm(x, rm, rv, g, b, training, MOMENTUM, EPS)),)
            return run
        if op == "backward":
            _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
                x, g, b, None, None, True, MOMENTUM, EPS)

            def run():
                dx, dg, db = torch.ops.aten.native_batch_norm_backward(
                    dy, x, g, None, None, save_mean, save_invstd, True, EPS, [True, True, True])
                return array(dx), dg.numpy(), db.numpy()
            return run
        raise ValueError(f"unknown operation {op!r}; expected one of {OPERATIONS}")


IMPLEMENTATIONS = {
    "bnfast": _FunctionalImpl("bnfast", _core),
    "numpy": _FunctionalImpl("numpy", reference),
    "pytorch": _TorchImpl(),
}


def available() -> dict:
    """The implementations that can run here (PyTorch only when it imports)."""
    return {k: v for k, v in IMPLEMENTATIONS.items() if v.available()}


def max_error(got: tuple, want: tuple) -> float:
    """Largest error over the outputs, each relative to that output's largest magnitude."""
    worst = 0.0
    for a, r in zip(got, want):
        r64 = np.asarray(r, np.float64)
        scale = max(float(np.max(np.abs(r64), initial=0.0)), np.finfo(np.float64).tiny)
        worst = max(worst, float(np.max(np.abs(np.asarray(a, np.float64) - r64),
                                        initial=0.0)) / scale)
    return worst


def median_ms(fn: Callable, *, min_repeats: int = 3, max_repeats: int = 50,
              budget_s: float = 0.25) -> float:
    """Median wall time of ``fn()`` in ms after one warm-up call."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or (len(times) < max_repeats
                                       and time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)
