"""``python -m bnfast``: check bnfast against the NumPy reference on random data and time it
beside the reference and PyTorch (when installed): one table per operation and thread count,
with this machine (CPU, caches) and its memory bandwidth measured first.

``--grid`` times the shapes NumPy trainers use (``_compare.GRID``: MLP activations N x C,
conv activations NCHW and NHWC, arrays beyond the last-level cache) and prints, per operation
and thread count, the ratio PyTorch time / bnfast time with the issue-7 targets counted;
``--plot`` then draws heat maps of those ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import numba
import numpy as np

from . import _compare as cmp
from . import _machine, _threading
from .kernels import probe

# Largest error (relative to the output's magnitude) tolerated against the float64 reference:
# bnfast rounds once from float64, so float32 results sit within ~1e-7; 1e-5 leaves room for
# the reference's own float64 summation order. PyTorch's float32 is checked at 1e-3.
TOLERANCE = {"bnfast": 1e-5, "numpy": 1e-5, "pytorch": 1e-3}
# Issue 7's targets: PyTorch time / bnfast time per operation (layer step: STEP_SHAPES only).
TARGETS = {"forward": 1.5, "backward": 1.2, "inference": 1.1, "step": 4.0}


def bandwidth(threads: int, nbytes: int = 256 * 2**20) -> dict:
    """Read and copy GB/s of this machine with ``threads`` threads over an ``nbytes`` array
    (median of 5 samples, each of enough back-to-back calls to move 16 MiB)."""
    numba.set_num_threads(threads)
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    k = max(1, 2**24 // nbytes)  # calls per sample: a cache-sized call is microseconds long

    def reads():
        for _ in range(k):
            probe.read(a)

    def copies():
        for _ in range(k):
            probe.copy(a, b)

    read = cmp.median_ms(reads, min_repeats=5, max_repeats=5) / k
    copy = cmp.median_ms(copies, min_repeats=5, max_repeats=5) / k
    return {"read": a.nbytes / read / 1e6, "copy": 2 * a.nbytes / copy / 1e6}


# Arrays an operation touches (x and its output; backward x, dy and dx; a layer step x, y, dy,
# dx): a case's working set, which decides the level of the memory hierarchy it runs from.
ARRAYS = {"forward": 2, "backward": 3, "inference": 2, "step": 4}


def levels(threads: int) -> dict:
    """``{level: {"read", "copy", "capacity"}}`` for "L3" and "memory": the bandwidths measured
    on a copy whose two arrays fill half the last-level cache, or 256 MiB, and how many bytes
    of working set the level holds. A case is reported against the smallest level that holds
    its working set (issue 16: cache-resident cases showed 2-3x "of read" when everything was
    compared with memory). No L2 level: with two threads the probe's halves move between the
    cores' L2s (TBB schedules without affinity), and one core's float32-to-float64 sum is
    compute-bound at L2 speed (72 GB/s "read" here, against 90 from L3), so an L2 figure
    would not be a limit."""
    l3 = _machine.cache_sizes()["L3"]
    return {
        "L3": {**bandwidth(threads, l3 // 4), "capacity": l3},
        "memory": {**bandwidth(threads), "capacity": None},
    }


def level_of(op: str, nbytes: int, bws: dict) -> str:
    """The smallest level of ``bws`` holding the working set of ``op`` on an nbytes array."""
    capacity = bws["L3"]["capacity"]
    return "L3" if ARRAYS[op] * nbytes <= capacity else "memory"


def _set_threads(n: int, impls: dict) -> None:
    numba.set_num_threads(n)
    if "pytorch" in impls:
        import torch

        torch.set_num_threads(n)


@contextlib.contextmanager
def _threads_kept(impls: dict):
    """Restore numba's (and PyTorch's) thread counts on exit: a measurement sets them per
    sample, and a caller (a test, a notebook) keeps running after it."""
    numba_threads = numba.get_num_threads()
    torch = sys.modules.get("torch") if "pytorch" in impls else None
    torch_threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        numba.set_num_threads(numba_threads)
        if torch is not None:
            torch.set_num_threads(torch_threads)


def measure(ops, cases, threads, impls, budget, progress) -> tuple[list, list]:
    """Time every (op, case, thread count, implementation); check outputs against NumPy.

    bnfast and PyTorch at every thread count of a case are timed in the same interleaved
    rounds (``_compare.interleaved_ms``, the thread count set before each sample and settled
    by its untimed calls), so that the 1- and 2-thread times of a cell are measured side by
    side as bnfast's and PyTorch's are: in separate passes minutes apart, a slow spell of a
    shared machine flipped "2 threads slower than 1" on dozens of cells (Zen 4 VM, 24-43 of
    132, where the same cells measured side by side ran 1.3-1.9x faster on two threads). The
    single-threaded NumPy reference once per (op, case), on its own.
    """
    with _threads_kept(impls):
        return _measure(ops, cases, threads, impls, budget, progress)


def _measure(ops, cases, threads, impls, budget, progress) -> tuple[list, list]:
    records, failures = [], []
    total = len(ops) * len(cases)
    done = 0
    bws = {}
    for n in threads:
        _set_threads(n, impls)
        bws[n] = levels(n)
    for op in ops:
        for case in cases:
            done += 1
            progress(f"[{done}/{total}] {op} {case.label}")
            inp = cmp.make_inputs(case)
            want = cmp.IMPLEMENTATIONS["numpy"].prepare(op, inp)()
            errors, fns, setup = {}, {}, {}
            for n in threads:
                _set_threads(n, impls)
                for name, impl in impls.items():
                    if name == "numpy" and n != threads[0]:
                        continue
                    fn = impl.prepare(op, inp)
                    errors[name, n] = cmp.max_error(fn(), want)
                    err = errors[name, n]
                    if not err <= TOLERANCE[name]:
                        failures.append(f"{op} {case.label} {name} ({n} threads): error {err:.2e}")
                    if name != "numpy":
                        fns[name, n] = fn
                        setup[name, n] = lambda n=n: _set_threads(n, impls)
            times = cmp.interleaved_ms(fns, budget_s=budget * len(threads), setup=setup)
            numpy_ms = cmp.median_ms(
                impls["numpy"].prepare(op, inp), min_repeats=1, max_repeats=3, budget_s=budget
            )
            for n in threads:
                level = level_of(op, case.nbytes, bws[n])
                bw = bws[n][level]
                for name in impls:
                    ms = numpy_ms if name == "numpy" else times[name, n]
                    gbs = cmp.TRAFFIC[op] * case.nbytes / ms / 1e6
                    records.append(
                        dict(
                            op=op,
                            case=case.label,
                            dtype=np.dtype(case.dtype).name,
                            threads=n,
                            impl=name,
                            ms=ms,
                            gbs=gbs,
                            fraction=gbs / bw["read"],
                            copy_fraction=gbs / bw["copy"],
                            err=errors[name, threads[0] if name == "numpy" else n],
                            nbytes=case.nbytes,
                            level=level,
                            read_gbs=bw["read"],
                            copy_gbs=bw["copy"],
                            memory_read_gbs=bws[n]["memory"]["read"],
                            memory_copy_gbs=bws[n]["memory"]["copy"],
                        )
                    )
    return records, failures


def table(records: list, op: str, n: int, impls: dict) -> str:
    rows = {(r["case"], r["impl"]): r for r in records if r["op"] == op and r["threads"] == n}
    cases = list(dict.fromkeys(r["case"] for r in records if r["op"] == op))
    torch = "pytorch" in impls
    head = f"{'case':<24}{'bnfast ms':>10}{'NumPy ms':>10}" + (
        f"{'PyTorch ms':>11}" if torch else ""
    )
    head += f"{'vs NumPy':>9}" + (f"{'vs PyTorch':>11}" if torch else "")
    head += f"{'GB/s':>7}{'from':>7}{'of read':>8}{'of copy':>8}{'err':>9}"
    lines = [head]
    for case in cases:
        b, np_ = rows[(case, "bnfast")], rows[(case, "numpy")]
        line = f"{case:<24}{b['ms']:>10.3f}{np_['ms']:>10.3f}"
        if torch:
            line += f"{rows[(case, 'pytorch')]['ms']:>11.3f}"
        line += f"{np_['ms'] / b['ms']:>8.1f}x"
        if torch:
            line += f"{rows[(case, 'pytorch')]['ms'] / b['ms']:>10.2f}x"
        line += f"{b['gbs']:>7.1f}{b['level']:>7}{b['fraction']:>8.2f}{b['copy_fraction']:>8.2f}"
        line += f"{b['err']:>9.1e}"
        lines.append(line)
    return "\n".join(lines)


def ratios(records: list) -> dict:
    """``{(op, case, threads): PyTorch ms / bnfast ms}``."""
    by = {(r["op"], r["case"], r["threads"], r["impl"]): r["ms"] for r in records}
    return {
        (op, case, n): by[(op, case, n, "pytorch")] / ms
        for (op, case, n, impl), ms in by.items()
        if impl == "bnfast" and (op, case, n, "pytorch") in by
    }


def target_summary(records: list) -> str:
    """How many grid cells meet issue 7's ratio targets, per operation and thread count, and
    the cells that fall short."""
    r = ratios(records)
    if not r:
        return "(PyTorch not installed: no ratios)"
    steps = {cmp._2d(*s).label for s in cmp.STEP_SHAPES}
    lines = []
    for op, goal in TARGETS.items():
        for n in sorted({k[2] for k in r}):
            cells = {
                c: v
                for (o, c, t), v in r.items()
                if o == op and t == n and (op != "step" or c in steps)
            }
            if not cells:
                continue
            short = sorted((v, c) for c, v in cells.items() if v < goal)
            lines.append(
                f"{op} at {n} thread(s): {len(cells) - len(short)}/{len(cells)} cells "
                f">= {goal}x"
                + ("; short: " + ", ".join(f"{c} {v:.2f}x" for v, c in short) if short else "")
            )
    lines.append(thread_summary(records))
    return "\n".join(lines)


def thread_summary(records: list) -> str:
    """Issue 16's "2 threads never slower than 1": bnfast's cells slower on 2 threads than on
    1 (measured side by side, see ``measure``), those whose arrays are below
    ``_machine.SERIAL_BELOW`` named apart: they run the same serial code at both counts."""
    by = {(r["op"], r["case"], r["threads"]): r for r in records if r["impl"] == "bnfast"}
    pairs = [(o, c) for (o, c, t) in by if t == 1 and (o, c, 2) in by]
    if not pairs:
        return ""
    slower = [(o, c) for o, c in pairs if by[o, c, 2]["ms"] > by[o, c, 1]["ms"]]
    serial = [(o, c) for o, c in slower if by[o, c, 1]["nbytes"] < _machine.SERIAL_BELOW]
    parallel = ", ".join(
        f"{o} {c} {by[o, c, 1]['ms'] / by[o, c, 2]['ms']:.2f}x"
        for o, c in slower
        if (o, c) not in serial
    )
    return (
        f"2 threads slower than 1 on {len(slower)}/{len(pairs)} cells: {len(serial)} below "
        f"{_machine.SERIAL_BELOW // 1024} KiB (the same serial code at both counts)"
        + (f"; parallel: {parallel}" if parallel else "")
    )


def plot(records: list, path: str) -> None:
    """Heat maps of PyTorch/bnfast (or NumPy/bnfast without PyTorch): the 2-D N x C grid per
    operation and thread count, and a strip with every other case."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib: pip install 'bnfast[plot]' (or matplotlib)")
    rival = "pytorch" if any(r["impl"] == "pytorch" for r in records) else "numpy"
    by = {(r["op"], r["case"], r["threads"], r["impl"]): r["ms"] for r in records}
    ops = list(dict.fromkeys(r["op"] for r in records))
    threads = sorted({r["threads"] for r in records})
    cases = list(dict.fromkeys(r["case"] for r in records))
    grid_n = sorted({int(c.split()[1].split("x")[0]) for c in cases if c.startswith("2-D")})
    grid_c = sorted({int(c.split()[1].split("x")[1]) for c in cases if c.startswith("2-D")})
    others = [c for c in cases if not c.startswith("2-D")]
    panels = (["grid"] if grid_n else []) + (["others"] if others else [])
    fig, axes = plt.subplots(
        len(ops),
        len(panels) * len(threads),
        squeeze=False,
        figsize=(5.5 * len(panels) * len(threads), 3.4 * len(ops)),
        gridspec_kw={"width_ratios": [1 if p == "grid" else 2 for p in panels] * len(threads)},
    )
    norm = matplotlib.colors.TwoSlopeNorm(vmin=0.25, vcenter=1.0, vmax=4.0)
    for i, op in enumerate(ops):
        for j, n in enumerate(threads):

            def ratio(case, op=op, n=n):
                b, o = by.get((op, case, n, "bnfast")), by.get((op, case, n, rival))
                return np.nan if b is None or o is None else o / b

            for k, panel in enumerate(panels):
                ax = axes[i, len(panels) * j + k]
                if panel == "grid":
                    m = np.array([[ratio(f"2-D {nn}x{cc}") for cc in grid_c] for nn in grid_n])
                    ax.imshow(m, cmap="RdYlGn", norm=norm, aspect="auto")
                    for (a, b), v in np.ndenumerate(m):
                        if np.isfinite(v):
                            ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=7)
                    ax.set_xticks(range(len(grid_c)), grid_c, fontsize=7)
                    ax.set_yticks(range(len(grid_n)), grid_n, fontsize=7)
                    ax.set_xlabel("C", fontsize=7)
                    ax.set_ylabel("N", fontsize=7)
                    ax.set_title(f"{op}, 2-D, {n} thread(s)", fontsize=8)
                else:
                    strip = np.array([[ratio(c) for c in others]])
                    ax.imshow(strip, cmap="RdYlGn", norm=norm, aspect="auto")
                    for b, v in enumerate(strip[0]):
                        if np.isfinite(v):
                            ax.text(
                                b, 0, f"{v:.2f}", ha="center", va="center", fontsize=6, rotation=90
                            )
                    ax.set_xticks(range(len(others)), others, rotation=90, fontsize=6)
                    ax.set_yticks([])
                    ax.set_title(f"{op}, other cases, {n} thread(s)", fontsize=8)
    fig.suptitle(
        f"{rival} time / bnfast time (green: bnfast faster); {_machine.cpu_model()}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bnfast",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--threads",
        default=None,
        help="comma-separated thread counts, e.g. 1,2 (default: all cores; with "
        "--grid: 1 and all cores)",
    )
    p.add_argument(
        "--grid",
        action="store_true",
        help="time the benchmark grid (MLP and conv activations, beyond-cache sizes)",
    )
    p.add_argument(
        "--ops",
        default=",".join(cmp.OPERATIONS),
        help=f"comma-separated operations (default: {','.join(cmp.OPERATIONS)})",
    )
    p.add_argument(
        "--match",
        default="",
        help="only the cases whose label contains this text (e.g. '2-D 512x')",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=0.2,
        help="seconds of interleaved timing per case (default 0.2)",
    )
    p.add_argument(
        "--step",
        action="store_true",
        help="batch norm inside a NumPy MLP training step (784-H-H-10, Linear -> BN -> ReLU "
        "twice): step time and BN+ReLU share, bnfast's layer against NumPy's BN, per thread "
        "count; nothing else",
    )
    p.add_argument("--json", metavar="PATH", help="write every measurement as JSON records")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the ratios (needs matplotlib)")
    args = p.parse_args(argv)
    most = numba.config.NUMBA_NUM_THREADS
    default = f"1,{most}" if args.grid and most > 1 else str(most)
    try:
        threads = [int(t) for t in (args.threads or default).split(",")]
    except ValueError:
        p.error(f"--threads takes comma-separated integers, got {args.threads!r}")
    if not all(1 <= t <= most for t in threads):
        p.error(f"--threads must be between 1 and {most} (NUMBA_NUM_THREADS)")
    ops = [o for o in args.ops.split(",") if o]
    if not set(ops) <= set(cmp.OPERATIONS):
        p.error(f"--ops takes some of {','.join(cmp.OPERATIONS)}, got {args.ops!r}")

    if args.step:
        print(f"bnfast on {_machine.describe()}")
        print(
            "NumPy MLP step 784-H-H-10 (Linear -> BN -> ReLU twice, softmax cross-entropy, "
            "forward + backward, no update), float32; medians of steps interleaved in blocks of "
            f"{cmp.STEP_BLOCK} (the first of each not counted); BN share = "
            "time in BN+ReLU / step time (NumPy's matmuls use its BLAS threads throughout)"
        )
        head = f"{'threads':>7}{'batch':>7}{'H':>6}{'bnfast ms':>11}{'BN share':>10}"
        print(head + f"{'NumPy BN ms':>13}{'BN share':>10}{'speed-up':>10}")
        for n in threads:
            numba.set_num_threads(n)
            for r in cmp.step_table(n):
                print(
                    f"{n:>7}{r['batch']:>7}{r['hidden']:>6}{r['bnfast ms']:>11.3f}"
                    f"{r['bnfast BN share']:>9.1%}{r['numpy ms']:>13.3f}{r['numpy BN share']:>9.1%}"
                    f"{r['numpy ms'] / r['bnfast ms']:>9.2f}x"
                )
        return 0
    impls = cmp.available()
    versions = [f"numpy {np.__version__}", f"numba {numba.__version__}"]
    if "pytorch" in impls:
        import torch

        versions.append(f"torch {torch.__version__}")
    layer = "tbb" if _threading.TBB_LOADED else "numba default"
    print(f"bnfast on {_machine.describe()}\n{', '.join(versions)}; threading layer: {layer}")
    start = time.perf_counter()
    progress = (
        (lambda msg: print(f"\r{msg:<78}", end="", file=sys.stderr, flush=True))
        if sys.stderr.isatty()
        else (lambda msg: None)
    )
    cases = [c for c in (cmp.GRID if args.grid else cmp.CASES) if args.match in c.label]
    if not cases:
        p.error(f"no case label contains {args.match!r}")
    records, failures = measure(ops, cases, threads, impls, args.budget, progress)
    progress("")
    print(
        "float32; ms = median wall time, bnfast and PyTorch in interleaved rounds; GB/s = "
        "minimum traffic (forward 3x, backward 5x, inference 2x, layer step 8x the array's "
        "bytes) / time; from = where the arrays the call touches fit (L3: the last-level cache, "
        "or memory); of read / of copy = that GB/s over the read / copy bandwidth measured at "
        "that level; err = max |out - reference| / max |reference|"
    )
    for n in threads:
        seen = {r["level"]: r for r in records if r["threads"] == n}
        r = next(r for r in records if r["threads"] == n)
        bws = ", ".join(
            f"{lv} read {seen[lv]['read_gbs']:.1f} / copy {seen[lv]['copy_gbs']:.1f}"
            for lv in ("L3", "memory")
            if lv in seen
        )
        print(
            f"\n### {n} thread(s): memory read {r['memory_read_gbs']:.1f} GB/s, copy "
            f"{r['memory_copy_gbs']:.1f} GB/s (read + write); at the levels these cases ran "
            f"from: {bws}"
        )
        for op in ops:
            print(f"== {op}\n{table(records, op, n, impls)}")
    if args.grid:
        print(
            "\nTargets (PyTorch time / bnfast time; layer step at "
            f"{', '.join('x'.join(map(str, s)) for s in cmp.STEP_SHAPES)} only):"
        )
        print(target_summary(records))
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _machine.describe(), "records": records}, f, indent=1)
    if args.plot:
        plot(records, args.plot)
    if failures:
        print("FAILED checks:\n  " + "\n  ".join(failures))
        return 1
    print("all outputs match the NumPy reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
