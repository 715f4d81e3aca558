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
    torch = "pytorch" in impls
    columns = [  # (title, width, cell from the row's values); PyTorch columns only when installed
        ("case", -22, lambda r: r["case"]),
        ("bnfast ms", 10, lambda r: f"{r['bnfast']:.3f}"),
        ("NumPy ms", 10, lambda r: f"{r['numpy']:.3f}"),
        *([("PyTorch ms", 11, lambda r: f"{r['pytorch']:.3f}")] if torch else []),
        ("vs NumPy", 9, lambda r: f"{r['numpy'] / r['bnfast']:.1f}x"),
        *([("vs PyTorch", 11, lambda r: f"{r['pytorch'] / r['bnfast']:.2f}x")] if torch else []),
        ("GB/s", 7, lambda r: f"{r['gbs']:.1f}"),
        ("err", 9, lambda r: f"{r['err']:.1e}"),
        ("check", 7, lambda r: r["check"]),
    ]

    def line(cells):
        return "".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, (_, w, _) in zip(cells, columns))

    for op in cmp.OPERATIONS:
        print(f"== {op}")
        print(line([title for title, _, _ in columns]))
        for case in cmp.CASES:
            inp = cmp.make_inputs(case)
            want = cmp.IMPLEMENTATIONS["numpy"].prepare(op, inp)()
            row, ok = {"case": case.label}, True
            for name, impl in impls.items():
                err = cmp.max_error(impl.prepare(op, inp)(), want)
                if not err <= TOLERANCE[name]:
                    ok = False
                    failures.append(f"{op} {case.label} {name}: error {err:.2e}")
                if name == "bnfast":
                    row["err"] = err
                row[name] = cmp.median_ms(impl.prepare(op, inp), budget_s=args.budget)
            row["gbs"] = cmp.TRAFFIC[op] * case.nbytes / row["bnfast"] / 1e6
            row["check"] = "ok" if ok else "FAIL"
            print(line([cell(row) for _, _, cell in columns]), flush=True)
        print()
    print(f"done in {time.perf_counter() - start:.1f} s")
    if failures:
        print("FAILED checks:\n  " + "\n  ".join(failures))
        return 1
    print("all outputs match the NumPy reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
