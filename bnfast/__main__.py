"""``python -m bnfast``: check bnfast against the NumPy reference on random data and time it
beside the reference and PyTorch (when installed), one table per operation."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numba
import numpy as np

from . import _compare as cmp

# Largest error (relative to the output's magnitude) tolerated against the float64 reference:
# bnfast rounds once from float64, so float32 results sit within ~1e-7; 1e-5 leaves room for
# the reference's own float64 summation order. PyTorch's float32 is checked at 1e-3.
TOLERANCE = {"bnfast": 1e-5, "numpy": 1e-5, "pytorch": 1e-3}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnfast", description=__doc__)
    p.add_argument("--budget", type=float, default=0.25,
                   help="seconds of timing per implementation and case (default 0.25)")
    args = p.parse_args(argv)

    impls = cmp.available()
    versions = [f"numpy {np.__version__}", f"numba {numba.__version__}"]
    if "pytorch" in impls:
        import torch
        versions.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"bnfast on {platform.machine()}, {os.cpu_count()} cores; {', '.join(versions)}")
    print("float32; ms = median wall time; GB/s = minimum traffic (forward 3x, backward 5x, "
          "inference 2x the array's bytes) / bnfast's time; err = max |out - reference| / "
          "max |reference|\n")
    failures = []
    start = time.perf_counter()
    for op in cmp.OPERATIONS:
        print(f"== {op}")
        head = f"{'case':<22}{'bnfast ms':>10}{'NumPy ms':>10}"
        if "pytorch" in impls:
            head += f"{'PyTorch ms':>11}"
        head += f"{'vs NumPy':>9}"
        if "pytorch" in impls:
            head += f"{'vs PyTorch':>11}"
        head += f"{'GB/s':>7}{'err':>9}  check"
        print(head)
        for case in cmp.CASES:
            inp = cmp.make_inputs(case)
            want = cmp.IMPLEMENTATIONS["numpy"].prepare(op, inp)()
            ms, ok, errs = {}, True, {}
            for name, impl in impls.items():
                fn = impl.prepare(op, inp)
                errs[name] = cmp.max_error(fn(), want)
                if not errs[name] <= TOLERANCE[name]:
                    ok = False
                    failures.append(f"{op} {case.label} {name}: error {errs[name]:.2e}")
                ms[name] = cmp.median_ms(impl.prepare(op, inp), budget_s=args.budget)
            gbs = cmp.TRAFFIC[op] * case.nbytes / ms["bnfast"] / 1e6
            row = f"{case.label:<22}{ms['bnfast']:>10.3f}{ms['numpy']:>10.3f}"
            if "pytorch" in impls:
                row += f"{ms['pytorch']:>11.3f}"
            row += f"{ms['numpy'] / ms['bnfast']:>8.1f}x"
            if "pytorch" in impls:
                row += f"{ms['pytorch'] / ms['bnfast']:>10.2f}x"
            row += f"{gbs:>7.1f}{errs['bnfast']:>9.1e}  {'ok' if ok else 'FAIL'}"
            print(row, flush=True)
        print()
    print(f"done in {time.perf_counter() - start:.1f} s")
    if failures:
        print("FAILED checks:\n  " + "\n  ".join(failures))
        return 1
    print("all outputs match the NumPy reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
