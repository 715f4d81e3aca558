"""pytest-benchmark cases: forward, backward and inference on the bench shapes, float32, each
grouped with the NumPy reference and PyTorch (when importable) from the shared registry.

``pytest bench --benchmark-only`` (or ``--benchmark-enable``) times them side by side; the default
test run executes each once (``--benchmark-disable``) so they cannot rot. Benchmarks never
assert a time. Kernels compile eagerly at import, and each case is called once before timing.
"""

from __future__ import annotations

import pytest

from bnfast import _compare as cmp


@pytest.mark.parametrize("impl", list(cmp.IMPLEMENTATIONS))
@pytest.mark.parametrize("case", cmp.CASES, ids=[c.label for c in cmp.CASES])
@pytest.mark.parametrize("op", cmp.OPERATIONS)
def test_bench(benchmark, op, case, impl):
    implementation = cmp.IMPLEMENTATIONS[impl]
    if not implementation.available():
        pytest.skip(f"{impl} is not installed")
    inp = cmp.make_inputs(case)
    fn = implementation.prepare(op, inp)
    fn()  # warm-up, outside timing
    benchmark.group = f"{op} {case.label} float32"
    benchmark.extra_info["minimum traffic bytes"] = cmp.TRAFFIC[op] * case.nbytes
    benchmark(fn)
