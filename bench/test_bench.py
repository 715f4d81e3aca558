"""pytest-benchmark cases from the shared registry (``bnfast._compare``): the benchmark grid
(``GRID``: MLP activations N x C, issue 7's shapes, conv activations NCHW and NHWC, arrays beyond
the last-level cache) in float32 and the main job's cases (``CASES``) in float64; forward,
backward, inference and the layer step; at 1 and all threads; bnfast beside the NumPy
reference and PyTorch (when importable) in one group per (operation, shape, dtype, threads);
plus start-up and compile time, each in a fresh subprocess.

``pytest --benchmark`` times them side by side; the default test run executes each once
(``--benchmark-disable``) so they cannot rot, except the NumPy reference on arrays beyond the
last-level cache (seconds and gigabytes of temporaries each; timed runs include it).
Benchmarks never assert a time. Each case is called once before timing, so compilation is
never timed (except where it is the subject).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

import bnfast
from bnfast import _compare as cmp
from bnfast import _machine

THREADS = sorted({1, numba.config.NUMBA_NUM_THREADS})
CASES = list(cmp.GRID) + [dataclasses.replace(c, dtype=np.float64) for c in cmp.CASES]
LLC = _machine.CACHES["L3"]


@functools.lru_cache(maxsize=4)
def _inputs(case):
    return cmp.make_inputs(case)


@pytest.mark.parametrize("impl", list(cmp.IMPLEMENTATIONS))
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.label}-{np.dtype(c.dtype).name}" for c in CASES])
@pytest.mark.parametrize("op", cmp.OPERATIONS)
def test_bench(benchmark, op, case, threads, impl):
    implementation = cmp.IMPLEMENTATIONS[impl]
    if not implementation.available():
        pytest.skip(f"{impl} is not installed")
    if impl == "numpy" and benchmark.disabled and case.nbytes > LLC:
        pytest.skip("the NumPy reference beyond the last-level cache runs in timed runs only")
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    if impl == "pytorch":
        import torch

        torch_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        fn = implementation.prepare(op, _inputs(case))
        fn()  # warm-up (and compilation), outside timing
        benchmark.group = f"{op} {case.label} {np.dtype(case.dtype).name} {threads} thread(s)"
        benchmark.extra_info["minimum traffic bytes"] = cmp.TRAFFIC[op] * case.nbytes
        benchmark(fn)
    finally:
        numba.set_num_threads(previous)
        if impl == "pytorch":
            torch.set_num_threads(torch_threads)


# The batch-norm family beside plain batch norm (issue 9): one group per (shape, pass,
# threads), so pytest-benchmark's table shows each feature's cost against plain BN.
FAMILY_CASES = [cmp._2d(512, 1024), cmp._nchw(32, 64, 56, 56), cmp._nhwc(32, 64, 56, 56)]
FAMILY = {
    "forward": {
        "plain": {},
        "relu": dict(activation="relu"),
        "renorm": dict(renorm=(3.0, 5.0)),
        "ghost": dict(virtual_batch_size=8),
    },
    "backward": {
        "plain": {},
        "relu": dict(activation="relu"),
        "from_input": None,
        "frozen": dict(out="new"),
        "frozen, in place": dict(out="dy"),
    },
    "inference": {"plain": {}, "in place": dict(out="x")},
}


def _family_call(case, kind, variant):
    inp = _inputs(case)
    x, dy, g, b, axis = inp["x"], inp["dy"], inp["gamma"], inp["beta"], case.axis
    kwargs = FAMILY[kind][variant]
    rm, rv = inp["running_mean"].copy(), inp["running_var"].copy()
    if kind == "inference":  # y = x exactly (gamma 1, beta 0, mean 0, var + eps 1): in place,
        # every call sees the same values
        x = x.copy()
        rm, rv = np.zeros_like(rm), np.full_like(rv, 1.0 - cmp.EPS)
        out = x if kwargs else np.empty_like(x)
        return lambda: bnfast.forward(
            x, axis=axis, training=False, running_mean=rm, running_var=rv, eps=cmp.EPS, out=out
        )
    if kind == "forward":
        return lambda: bnfast.forward(x, g, b, axis=axis, running_mean=rm, running_var=rv, **kwargs)
    if kwargs is None:
        return lambda: bnfast.backward_from_input(dy, x, g, axis=axis)
    if "out" in kwargs:  # the frozen statistics with scale 1, dx into a new array or into dy
        # (then dx = dy exactly: every call sees the same values)
        x, dy = x.copy(), dy.copy()
        rm, rv = np.zeros_like(rm), np.full_like(rv, 1.0 - cmp.EPS)
        _, cache = bnfast.forward(
            x, axis=axis, training=False, running_mean=rm, running_var=rv, eps=cmp.EPS
        )
        out = dy if kwargs["out"] == "dy" else np.empty_like(dy)
        return lambda: bnfast.backward(dy, cache, out=out)
    _, cache = bnfast.forward(x, g, b, axis=axis, **kwargs)
    return lambda: bnfast.backward(dy, cache)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("case", FAMILY_CASES, ids=[c.label for c in FAMILY_CASES])
@pytest.mark.parametrize("kind,variant", [(k, v) for k in FAMILY for v in FAMILY[k]])
def test_bench_family(benchmark, kind, variant, case, threads):
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        fn = _family_call(case, kind, variant)
        fn()
        benchmark.group = f"family {kind} {case.label} float32 {threads} thread(s)"
        benchmark(fn)
    finally:
        numba.set_num_threads(previous)


STEP = textwrap.dedent("""
    import time
    t0 = time.perf_counter()
    import numba
    import numpy as np
    import bnfast
    x = np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32)
    bn = bnfast.BatchNorm(64)
    y = bn(x)
    bn.backward(np.ones_like(y))
    bn.eval()(x)
    print(time.perf_counter() - t0)
""")


def _step_seconds(cache_dir) -> float:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    r = subprocess.run(
        [sys.executable, "-c", STEP], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    return float(r.stdout.split()[-1])


def test_bench_cold_compile_first_training_step(benchmark, tmp_path):
    """A fresh process and an empty cache: import numba, bnfast, one float32 training step and
    an inference call, compiling what they need. Seconds, one round."""
    benchmark.group = "start-up"
    counter = iter(range(10**6))
    inner = benchmark.pedantic(
        lambda: _step_seconds(tmp_path / f"cold{next(counter)}"), rounds=1, iterations=1
    )
    benchmark.extra_info["seconds from import numba"] = inner


def test_bench_warm_start_first_training_step(benchmark, tmp_path):
    """A fresh process with a warm cache: from ``import numba`` to the end of the first step."""
    benchmark.group = "start-up"
    _step_seconds(tmp_path)  # fill the cache
    inner = benchmark.pedantic(lambda: _step_seconds(tmp_path), rounds=3, iterations=1)
    benchmark.extra_info["seconds from import numba"] = inner


@pytest.mark.parametrize("impl", ["bnfast", "numpy"])
@pytest.mark.parametrize("batch,hidden", cmp.STEP_CASES)
def test_bench_mlp_step(benchmark, batch, hidden, impl):
    """Batch norm inside a training step: a NumPy MLP 784-H-H-10 step (Linear -> BN -> ReLU
    twice, forward and backward) with bnfast's layer or NumPy's BN; the BN+ReLU share of the
    step is recorded (``python -m bnfast --step`` prints it as a table)."""
    step = cmp.mlp_step(batch, hidden, impl)
    step()
    benchmark.group = f"MLP step batch {batch} H {hidden} float32"
    total, bn = benchmark(step)
    benchmark.extra_info["BN+ReLU share of the step"] = bn / total
