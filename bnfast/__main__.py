"""``python -m bnfast``: check bnfast against the NumPy reference on random data and time it
beside the reference and PyTorch (when installed): one table per operation and thread count,
with this machine's memory bandwidth measured first."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numba
import numpy as np

from . import _compare as cmp
from . import _threading
from .kernels import probe

# Largest error (relative to the output's magnitude) tolerated against the float64 reference:
# bnfast rounds once from float64, so float32 results sit within ~1e-7; 1e-5 leaves room for
# the reference's own float64 summation order. PyTorch's float32 is checked at 1e-3.
TOLERANCE = {"bnfast": 1e-5, "numpy": 1e-5, "pytorch": 1e-3}


def bandwidth(threads: int, nbytes: int = 256 * 2**20) -> dict:
    """Read and copy GB/s of this machine with ``threads`` threads (median of 5)."""
    numba.set_num_threads(threads)
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    read = cmp.median_ms(lambda: probe.read(a), min_repeats=5, max_repeats=5)
    copy = cmp.median_ms(lambda: probe.copy(a, b), min_repeats=5, max_repeats=5)
    return {"read": a.nbytes / read / 1e6, "copy": 2 * a.nbytes / copy / 1e6}


def _set_threads(n: int, impls: dict) -> None:
    numba.set_num_threads(n)
    if "pytorch" in impls:
        import torch
        torch.set_num_threads(n)


def measure(ops, cases, threads, impls, budget, progress) -> tuple[list, list]:
    """Time every (op, case, thread count, implementation); check outputs against NumPy."""
    records, failures = [], []
    numpy_ms = {}  # the reference is single-threaded: timed once per (op, case)
    total = len(ops) * len(cases) * len(threads)
    done = 0
    for n in threads:
        _set_threads(n, impls)
        bw = bandwidth(n)
        for op in ops:
            for case in cases:
                done += 1
                progress(f"[{done}/{total}] {op} {case.label} at {n} thread(s)")
                inp = cmp.make_inputs(case)
                want = cmp.IMPLEMENTATIONS["numpy"].prepare(op, inp)()
                for name, impl in impls.items():
                    err = cmp.max_error(impl.prepare(op, inp)(), want)
                    if not err <= TOLERANCE[name]:
                        failures.append(f"{op} {case.label} {name}: error {err:.2e}")
                    if name == "numpy" and (op, case.label) in numpy_ms:
                        ms = numpy_ms[(op, case.label)]
                    else:
                        ms = cmp.median_ms(impl.prepare(op, inp), budget_s=budget)
                        if name == "numpy":
                            numpy_ms[(op, case.label)] = ms
                    gbs = cmp.TRAFFIC[op] * case.nbytes / ms / 1e6
                    records.append(dict(op=op, case=case.label, dtype=np.dtype(case.dtype).name,
                                        threads=n, impl=name, ms=ms, gbs=gbs,
                                        fraction=gbs / bw["read"], err=err,
                                        read_gbs=bw["read"], copy_gbs=bw["copy"]))
    return records, failures


def table(records: list, op: str, n: int, impls: dict) -> str:
    rows = {(r["case"], r["impl"]): r for r in records if r["op"] == op and r["threads"] == n}
    cases = list(dict.fromkeys(r["case"] for r in records if r["op"] == op))
    torch = "pytorch" in impls
    head = f"{'case':<22}{'bnfast ms':>10}{'NumPy ms':>10}" + (f"{'PyTorch ms':>11}" if torch
                                                                 else "")
    head += f"{'vs NumPy':>9}" + (f"{'vs PyTorch':>11}" if torch else "")
    head += f"{'GB/s':>7}{'of read bw':>11}{'err':>9}"
    lines = [head]
    for case in cases:
        b, np_ = rows[(case, "bnfast")], rows[(case, "numpy")]
        line = f"{case:<22}{b['ms']:>10.3f}{np_['ms']:>10.3f}"
        if torch:
            line += f"{rows[(case, 'pytorch')]['ms']:>11.3f}"
        line += f"{np_['ms'] / b['ms']:>8.1f}x"
        if torch:
            line += f"{rows[(case, 'pytorch')]['ms'] / b['ms']:>10.2f}x"
        line += f"{b['gbs']:>7.1f}{b['fraction']:>11.2f}{b['err']:>9.1e}"
        lines.append(line)
    return "\n".join(lines)


def plot(records: list, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib: pip install 'bnfast[plot]' (or matplotlib)")
    ops = list(dict.fromkeys(r["op"] for r in records))
    threads = sorted({r["threads"] for r in records})
    rival = "pytorch" if any(r["impl"] == "pytorch" for r in records) else "numpy"
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        cases = list(dict.fromkeys(r["case"] for r in records if r["op"] == op))
        width = 0.8 / len(threads)
        for j, n in enumerate(threads):
            by = {(r["case"], r["impl"]): r["ms"] for r in records
                  if r["op"] == op and r["threads"] == n}
            speedup = [by[(c, rival)] / by[(c, "bnfast")] for c in cases]
            ax.bar(np.arange(len(cases)) + j * width, speedup, width, label=f"{n} thread(s)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2, cases, rotation=20, fontsize=7)
        ax.set_ylabel(f"speed-up vs {rival}")
        ax.set_title(f"bnfast {op}, float32")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnfast", description=__doc__)
    p.add_argument("--threads", default=str(numba.config.NUMBA_NUM_THREADS),
                   help="comma-separated thread counts, e.g. 1,2 (default: all cores)")
    p.add_argument("--budget", type=float, default=0.2,
                   help="seconds of timing per implementation and case (default 0.2)")
    p.add_argument("--json", metavar="PATH", help="write every measurement as JSON records")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        p.error(f"--threads takes comma-separated integers, got {args.threads!r}")
    if not all(1 <= t <= numba.config.NUMBA_NUM_THREADS for t in threads):
        p.error(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} "
                "(NUMBA_NUM_THREADS)")

    impls = cmp.available()
    versions = [f"numpy {np.__version__}", f"numba {numba.__version__}"]
    if "pytorch" in impls:
        import torch
        versions.append(f"torch {torch.__version__}")
    print(f"bnfast on {platform.machine()}, {os.cpu_count()} cores; {', '.join(versions)}; "
          f"threading layer: {'tbb' if _threading.TBB_LOADED else 'numba default'}")
    start = time.perf_counter()
    progress = (lambda msg: print(f"\r{msg:<70}", end="", file=sys.stderr, flush=True)) \
        if sys.stderr.isatty() else (lambda msg: None)
    records, failures = measure(cmp.OPERATIONS, cmp.CASES, threads, impls, args.budget,
                                progress)
    progress("")
    print("float32; ms = median wall time; GB/s = minimum traffic (forward 3x, backward 5x, "
          "inference 2x the array's bytes) / time; of read bw = that GB/s / the measured read "
          "bandwidth; err = max |out - reference| / max |reference|")
    for n in threads:
        r = next(r for r in records if r["threads"] == n)
        print(f"\n### {n} thread(s): read {r['read_gbs']:.1f} GB/s, copy {r['copy_gbs']:.1f} "
              "GB/s (read + write)")
        for op in cmp.OPERATIONS:
            print(f"== {op}\n{table(records, op, n, impls)}")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.plot:
        plot(records, args.plot)
    if failures:
        print("FAILED checks:\n  " + "\n  ".join(failures))
        return 1
    print("all outputs match the NumPy reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
