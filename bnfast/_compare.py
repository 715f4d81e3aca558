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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from . import _core, reference

OPERATIONS = ("forward", "backward", "inference", "step")
# Minimum memory traffic of an unfused-in-cache kernel, in multiples of x's bytes: forward reads
# x twice and writes y; backward reads x and dy twice and writes dx; inference reads x, writes y;
# a layer step (forward + backward) both.
TRAFFIC = {"forward": 3, "backward": 5, "inference": 2, "step": 8}
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


def _2d(n, c):
    return Case(f"2-D {n}x{c}", (n, c))


def _nchw(n, c, h, w):
    return Case(f"NCHW {n}x{c}x{h}x{w}", (n, c, h, w))


def _nhwc(n, c, h, w):
    return Case(f"NHWC {n}x{h}x{w}x{c}", (n, h, w, c), -1)


CASES = (  # python -m bnfast: one case per kind of layout and size
    _2d(32, 64),
    _2d(8192, 1024),
    _2d(65536, 64),
    _nchw(32, 64, 56, 56),
    _nchw(128, 256, 14, 14),
    _nchw(8, 3, 224, 224),
    _nhwc(32, 64, 56, 56),
    _nhwc(128, 256, 14, 14),
    _nhwc(8, 3, 224, 224),
)

# python -m bnfast --grid, and bench/: the shapes NumPy trainers use. MLP activations (batch x
# width), the shapes of issue 7's table, conv activations in both layouts (C 16-256, spatial
# 7-112), and arrays beyond a 32 MiB last-level cache.
_CONV = (
    (32, 16, 112, 112),
    (8, 64, 28, 28),
    (32, 32, 56, 56),
    (64, 32, 32, 32),
    (32, 64, 56, 56),
    (32, 128, 28, 28),
    (64, 256, 14, 14),
    (128, 256, 7, 7),
)
GRID = (
    tuple(_2d(n, c) for n in (32, 128, 512, 2048, 8192) for c in (64, 256, 1024, 4096))
    + (_2d(64, 256), _2d(128, 512), _2d(512, 2048), _2d(1024, 4096))
    + tuple(_nchw(*s) for s in _CONV)
    + tuple(_nhwc(*s) for s in _CONV)
    + (_nhwc(8, 3, 224, 224), _2d(16384, 4096), _nchw(32, 64, 112, 112), _nhwc(32, 64, 112, 112))
)
STEP_SHAPES = ((32, 64), (64, 256))  # the layer-step targets of issue 7 (PyTorch BatchNorm1d)


# The batch-norm family's options, by name: one registry for the tests (every variant x every
# route x both dtypes against the reference, tests/test_matrix.py and test_family.py) and the
# family benchmarks. ``virtual_batch_size`` is given as a number of groups (``"ghost"``: the
# batch split in 4), since the size depends on the batch.
VARIANTS: dict[str, dict] = {
    "plain": {},
    "relu": dict(activation="relu"),
    "renorm": dict(renorm=(1.5, 0.5)),
    "renorm+relu": dict(renorm=(1.2, 0.1), activation="relu"),
    "biased running var": dict(unbiased=False),
    "ghost": dict(groups=4),
    "ghost+relu+renorm": dict(groups=4, activation="relu", renorm=(2.0, 1.0)),
}


def variant_kwargs(name: str, batch: int) -> dict:
    """``forward``'s keyword arguments of variant ``name`` for a batch of ``batch`` samples."""
    kwargs = dict(VARIANTS[name])
    groups = kwargs.pop("groups", None)
    if groups is not None:
        kwargs["virtual_batch_size"] = batch // groups
    return kwargs


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


class Implementation(Protocol):
    """What the registry holds: a name, whether it runs here, and ``prepare``."""

    name: str

    def available(self) -> bool: ...

    def prepare(self, op: str, inp: dict) -> Callable[[], tuple]: ...


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
            return lambda: (
                f.forward(
                    x, g, b, axis=axis, running_mean=rm, running_var=rv, momentum=MOMENTUM, eps=EPS
                )[0],
            )
        if op == "inference":
            return lambda: (
                f.forward(
                    x, g, b, axis=axis, training=False, running_mean=rm, running_var=rv, eps=EPS
                )[0],
            )
        if op == "backward":
            _, cache = f.forward(x, g, b, axis=axis, eps=EPS)
            dy = inp["dy"]
            return lambda: f.backward(dy, cache)
        if op == "step":
            return self._step(inp)
        raise ValueError(f"unknown operation {op!r}; expected one of {OPERATIONS}")

    def _step(self, inp: dict) -> Callable[[], tuple]:
        """A layer's forward and backward in training mode, as a trainer calls them."""
        x, dy, case = inp["x"], inp["dy"], inp["case"]
        if self.module is _core:
            from ._layer import BatchNorm

            bn = BatchNorm(case.channels, axis=case.axis, eps=EPS, momentum=MOMENTUM, dtype=x.dtype)
            bn.load_state_dict({**bn.state_dict(), "weight": inp["gamma"], "bias": inp["beta"]})

            def run():
                y = bn(x)
                return y, bn.backward(dy), bn.dgamma, bn.dbeta

            return run
        f = self.module
        rm, rv = np.zeros(case.channels), np.ones(case.channels)

        def run_reference():
            y, cache = f.forward(
                x,
                inp["gamma"],
                inp["beta"],
                axis=case.axis,
                running_mean=rm,
                running_var=rv,
                momentum=MOMENTUM,
                eps=EPS,
            )
            return (y, *f.backward(dy, cache))

        return run_reference


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
                x, g, b, None, None, True, MOMENTUM, EPS
            )

            def run():
                dx, dg, db = torch.ops.aten.native_batch_norm_backward(
                    dy, x, g, None, None, save_mean, save_invstd, True, EPS, [True, True, True]
                )
                return array(dx), dg.numpy(), db.numpy()

            return run
        if op == "step":  # nn.BatchNorm1d/2d/3d with autograd, as a PyTorch trainer runs it
            module = {
                2: torch.nn.BatchNorm1d,
                3: torch.nn.BatchNorm1d,
                4: torch.nn.BatchNorm2d,
                5: torch.nn.BatchNorm3d,
            }[x.ndim](inp["case"].channels, eps=EPS, momentum=MOMENTUM)
            module = module.to(x.dtype)
            with torch.no_grad():
                module.weight.copy_(g)
                module.bias.copy_(b)
            xg = x.detach().requires_grad_(True)

            def run():
                xg.grad = None
                module.zero_grad(set_to_none=True)
                y = module(xg)
                y.backward(dy)
                return (
                    array(y),
                    array(xg.grad),
                    module.weight.grad.numpy(),
                    module.bias.grad.numpy(),
                )

            return run
        raise ValueError(f"unknown operation {op!r}; expected one of {OPERATIONS}")


IMPLEMENTATIONS: dict[str, Implementation] = {
    "bnfast": _FunctionalImpl("bnfast", _core),
    "numpy": _FunctionalImpl("numpy", reference),
    "pytorch": _TorchImpl(),
}


def available() -> dict[str, Implementation]:
    """The implementations that can run here (PyTorch only when it imports)."""
    return {k: v for k, v in IMPLEMENTATIONS.items() if v.available()}


def max_error(got: tuple, want: tuple) -> float:
    """Largest error over the outputs, each relative to that output's largest magnitude."""
    worst = 0.0
    for a, r in zip(got, want, strict=True):
        r64 = np.asarray(r, np.float64)
        scale = max(float(np.max(np.abs(r64), initial=0.0)), np.finfo(np.float64).tiny)
        worst = max(
            worst, float(np.max(np.abs(np.asarray(a, np.float64) - r64), initial=0.0)) / scale
        )
    return worst


def median_ms(
    fn: Callable, *, min_repeats: int = 3, max_repeats: int = 50, budget_s: float = 0.25
) -> float:
    """Median wall time of ``fn()`` in ms after one warm-up call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or (
        len(times) < max_repeats and time.perf_counter() - start < budget_s
    ):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def interleaved_ms(
    fns: dict,
    *,
    budget_s: float = 0.5,
    min_rounds: int = 3,
    max_rounds: int = 100,
    sample_s: float = 0.02,
    settle_s: float = 0.015,
    setup: dict | None = None,
    percentile: float = 50.0,
) -> dict:
    """Median ms per call of each callable, measured in interleaved rounds (one sample of each
    per round), so that a slow spell of a shared machine hits every implementation alike.
    ``setup``: for some names, a callable run (untimed) before each of their samples, e.g. to
    set the thread count the sample runs at. ``percentile``: another percentile of the samples
    instead of the median (a low one drops a shared machine's spells of stolen time: on the
    Zen 4 VM medians of unchanged code moved 20-40% between runs where 10th percentiles moved
    a few percent; ``bench/page_gap.py`` takes the 10th).

    A sample is untimed calls for ``settle_s``, then enough timed calls to last about
    ``sample_s``. The untimed calls absorb the switch from another implementation: PyTorch's
    OpenMP (libgomp) workers keep spinning on the cores after its last call, and bnfast's
    2-thread calls share those cores until they stop. Measured on Zen 5 (2 cores), bnfast's
    2-thread inference on (512, 1024) right after PyTorch's calls: 85 us per call for the
    first 8 ms, then 61 us; with a single untimed call per sample the grid reported 74-82 us
    against 52 us alone, while PyTorch's own time did not move (bnfast's TBB workers stop
    spinning within microseconds). Each implementation gets the same settling time.
    """
    setup = setup or {}
    repeats = {}
    for name, fn in fns.items():
        if name in setup:
            setup[name]()
        fn()
        t = time.perf_counter()
        fn()
        repeats[name] = max(1, int(sample_s / max(time.perf_counter() - t, 1e-7)))
    samples: dict = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() - start < budget_s):
        for name, fn in fns.items():
            k = repeats[name]
            if name in setup:
                setup[name]()
            t = time.perf_counter()
            fn()
            while time.perf_counter() - t < settle_s:
                fn()
            t = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t) / k)
        rounds += 1
    if percentile == 50.0:
        return {name: 1e3 * statistics.median(v) for name, v in samples.items()}
    return {name: 1e3 * float(np.percentile(v, percentile)) for name, v in samples.items()}


# --- Batch norm inside a training step (issue 16): a NumPy MLP 784-H-H-10, Linear -> BN -> ReLU
# twice, softmax cross-entropy, forward and backward, float32, the way a NumPy trainer runs it;
# BN+ReLU through bnfast's layer (fused ReLU, reused buffers) or through plain NumPy.

STEP_CASES = ((64, 256), (256, 1024), (1024, 1024))  # (batch, hidden)
# Steps of one layer in a row, the first not counted: a step right after another layer's runs
# with that one's code and data in the caches, which a trainer never does. Timed one step each
# in turn, bnfast's layer (after NumPy's step) took 106-155 us of BN+ReLU per batch-64 step
# where two more copies of it, each after the one before, took 103-143; in blocks of 4 all
# three took 85-93 us (float32, one thread, Zen 4).
STEP_BLOCK = 4


class _NumpyBNReLU:
    """Batch norm and ReLU as a NumPy trainer writes them (float32 throughout)."""

    def __init__(self, c: int, eps: float = EPS) -> None:
        self.gamma = np.ones(c, np.float32)
        self.beta = np.zeros(c, np.float32)
        self.eps = eps

    def forward(self, z):
        mu = z.mean(axis=0)
        self.inv = 1.0 / np.sqrt(z.var(axis=0) + self.eps)
        self.xhat = (z - mu) * self.inv
        y = self.gamma * self.xhat + self.beta
        self.mask = y > 0
        return y * self.mask

    def backward(self, da):
        dy = da * self.mask
        n = dy.shape[0]
        dbeta = dy.sum(axis=0)
        dgamma = (dy * self.xhat).sum(axis=0)
        return (self.gamma * self.inv / n) * (n * dy - dbeta - self.xhat * dgamma)


class _BnfastBNReLU:
    def __init__(self, c: int) -> None:
        from ._layer import BatchNorm

        self.bn = BatchNorm(c, activation="relu", reuse_buffers=True)

    def forward(self, z):
        return self.bn(z)

    def backward(self, da):
        return self.bn.backward(da)


STEP_LAYERS: dict = {"bnfast": _BnfastBNReLU, "numpy": _NumpyBNReLU}


def mlp_step(batch: int, hidden: int, impl, seed: int = 0) -> Callable[[], tuple]:
    """One training step of the MLP (forward, loss gradient, backward, no update): a callable
    returning ``(step seconds, BN+ReLU seconds)`` of that step. ``impl``: a name in
    ``STEP_LAYERS`` or a class of the same two methods (``bench/floors.py`` times bare loops
    in the step this way)."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    x = rng.standard_normal((batch, 784)).astype(f32)
    labels = rng.integers(0, 10, batch)
    w1 = (rng.standard_normal((784, hidden)) * 0.05).astype(f32)
    w2 = (rng.standard_normal((hidden, hidden)) * 0.05).astype(f32)
    w3 = (rng.standard_normal((hidden, 10)) * 0.05).astype(f32)
    make = STEP_LAYERS[impl] if isinstance(impl, str) else impl
    bn1, bn2 = make(hidden), make(hidden)
    clock = time.perf_counter

    def step() -> tuple:
        t0 = clock()
        z1 = x @ w1
        t = clock()
        a1 = bn1.forward(z1)
        bn_time = clock() - t
        z2 = a1 @ w2
        t = clock()
        a2 = bn2.forward(z2)
        bn_time += clock() - t
        logits = a2 @ w3
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(batch), labels] -= 1.0
        g = p / batch
        dw3 = a2.T @ g
        da2 = g @ w3.T
        t = clock()
        dz2 = bn2.backward(da2)
        bn_time += clock() - t
        dw2 = a1.T @ dz2
        da1 = dz2 @ w2.T
        t = clock()
        dz1 = bn1.backward(da1)
        bn_time += clock() - t
        dw1 = x.T @ dz1
        del dw1, dw2, dw3
        return clock() - t0, bn_time

    return step


def step_table(threads: int, rounds: int = 60, layers: dict | None = None) -> list[dict]:
    """Median step time and BN+ReLU share of the MLP step per case, for each of ``layers``
    (name: ``mlp_step``'s impl; default bnfast and NumPy); ``rounds`` steps of each,
    interleaved in blocks of ``STEP_BLOCK`` steps of one layer whose first is not counted."""
    layers = layers or {name: name for name in STEP_LAYERS}
    out = []
    for batch, hidden in STEP_CASES:
        steps = {name: mlp_step(batch, hidden, impl) for name, impl in layers.items()}
        samples: dict = {name: [] for name in steps}
        for _ in range(5):  # warm-up (compilation, buffers)
            for fn in steps.values():
                fn()
        for _ in range(-(-rounds // (STEP_BLOCK - 1))):  # blocks: rounds samples or more
            for name, fn in steps.items():
                fn()  # (the step after another layer's: see STEP_BLOCK)
                for _ in range(STEP_BLOCK - 1):
                    samples[name].append(fn())
        row = dict(batch=batch, hidden=hidden, threads=threads)
        for name, s in samples.items():
            total = statistics.median(t for t, _ in s)
            share = statistics.median(b / t for t, b in s)
            row[f"{name} ms"] = 1e3 * total
            row[f"{name} BN share"] = share
            row[f"{name} BN ms"] = 1e3 * statistics.median(b for _, b in s)
        out.append(row)
    return out
