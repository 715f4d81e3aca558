"""Cold compilation, measured: a new user's first training step, and every operation.

    python bench/compile_time.py [first|everything]

Runs in a fresh ``NUMBA_CACHE_DIR`` (a temporary folder) and prints seconds beyond
``import numpy, numba``: ``first`` is the first ``BatchNorm(256)`` training step (forward,
backward) and an inference call at float32 (64, 256), what the design issue targets at
<= 3 s; ``everything`` is every public operation and family option on both dtypes, 2-D /
NCHW / NHWC / a strided view, serial and parallel sizes (both routes of the lanes family), in
one process (target <= 60 s). Numba's compile events give the seconds per compiled function
(``--top N``). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", nargs="?", default="first", choices=("first", "everything"))
    p.add_argument("--top", type=int, default=0, help="print the N costliest compiled functions")
    args = p.parse_args()
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="bnfast-cold-")
    os.environ["BNFAST_QUIET"] = "1"
    start = time.perf_counter()
    import numba  # noqa: F401
    import numpy as np
    from numba.core import event

    recorder = event.RecordingListener()
    event.register("numba:compile", recorder)
    base = time.perf_counter()
    import bnfast

    rng = np.random.default_rng(0)
    if args.what == "first":
        x = rng.normal(size=(64, 256)).astype(np.float32)
        bn = bnfast.BatchNorm(256)
        bn(x)
        bn.backward(np.ones_like(x))
        bn.eval()(x)
    else:
        small = [((64, 256), 1), ((4, 8, 9, 9), 1), ((4, 9, 9, 8), -1), ((64, 512), 1, "strided")]
        large = [
            ((2048, 1024), 1),
            ((16384, 256), 1),
            ((32, 64, 28, 28), 1),
            ((32, 28, 28, 64), -1),
        ]
        for dtype in (np.float32, np.float64):
            for case in small + large:
                shape, axis = case[0], case[1]
                x = rng.normal(size=shape).astype(dtype)
                if len(case) > 2:
                    x = x[:, ::2]
                c = x.shape[axis]
                dy = np.ones_like(x)
                for kw in ({}, {"activation": "relu"}, {"unbiased": False}):
                    y, cache = bnfast.forward(
                        x, axis=axis, running_mean=np.zeros(c), running_var=np.ones(c), **kw
                    )
                    bnfast.backward(dy, cache)
                rm, rv = np.zeros(c), np.ones(c)
                bnfast.forward(x, axis=axis, running_mean=rm, running_var=rv, renorm=(3.0, 5.0))
                if axis != 0 and x.shape[0] % 2 == 0:
                    _, cache = bnfast.forward(x, axis=axis, virtual_batch_size=x.shape[0] // 2)
                    bnfast.backward(dy, cache)
                _, cache = bnfast.forward(
                    x, axis=axis, training=False, running_mean=rm, running_var=rv
                )
                bnfast.backward(dy, cache)
                bnfast.backward_from_input(dy, x, axis=axis)
                bnfast.moments(x, axis=axis)
                bn = bnfast.BatchNorm(c, axis=axis, dtype=dtype)
                bn(x)
                bn.backward(dy)
    end = time.perf_counter()
    compiled = sum(1 for _, e in recorder.buffer if e.is_start)
    print(
        f"{args.what}: {end - base:.2f} s beyond import numpy, numba "
        f"({base - start:.2f} s for those imports); {compiled} functions compiled"
    )
    if args.top:
        stack, own = [], collections.Counter()
        for ts, ev in sorted(recorder.buffer, key=lambda e: e[0]):
            name = ev.data["dispatcher"].py_func.__qualname__
            if ev.is_start:
                stack.append([name, ts, 0.0])
            else:
                name, t0, inner = stack.pop()
                own[name] += ts - t0 - inner
                if stack:
                    stack[-1][2] += ts - t0
        for name, s in own.most_common(args.top):
            print(f"{s:7.2f} s  {name}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
