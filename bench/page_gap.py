"""Where in a page the output starts, relative to x: the write pass's time at each offset.

    python bench/page_gap.py [--shapes 2048x1024,512x4096,1024x2048] [--threads 1,2]

``bnfast._checks.placed`` makes a fresh forward output again when glibc would start it fewer
than ``PLACE_NEAR`` bytes after x within a page, and starts it ``PLACE_AT`` bytes after x
(512 before it); both numbers come from this table (README, "Where in a page the output
starts"). For each shape (float32, rows of a page or more, beyond the strip budget: the
four-row write) and thread count it times inference into a caller's buffer starting d bytes
after x within a page, d every 256 bytes, in interleaved samples, and prints the 10th
percentile of each in us (medians of this VM moved 20-40% between runs of the same code; the
low percentile drops the spells of stolen time). On another CPU, run it before trusting the
two constants. Run it alone on the machine; name the CPU.
"""

from __future__ import annotations

import argparse

import numba
import numpy as np

import bnfast
from bnfast import _compare as cmp
from bnfast import _machine
from bnfast._checks import PLACE_AT, PLACE_NEAR

PAGE = 4096


def buffer_at(shape: tuple, dtype, ref: np.ndarray, gap: int) -> np.ndarray:
    """An empty C-contiguous array starting ``gap`` bytes after ``ref`` within a page."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    room = np.empty(nbytes + PAGE, np.uint8)
    return np.ndarray(shape, dtype, room, (ref.ctypes.data + gap - room.ctypes.data) % PAGE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="2048x1024,512x4096,1024x2048")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--budget", type=float, default=0.7, help="seconds per offset")
    args = p.parse_args()
    gaps = list(range(0, PAGE, 256))
    print("bnfast inference, float32, y d bytes after x within a page, us (10th percentiles)")
    print(f"on {_machine.describe()}; PLACE_NEAR {PLACE_NEAR}, PLACE_AT {PLACE_AT}")
    print(f"{'shape':<12}{'threads':>8}" + "".join(f"{d:>7}" for d in gaps))
    for spec in args.shapes.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        c = shape[-1]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        fns = {}
        for d in gaps:
            y = buffer_at(shape, np.float32, x, d)
            fns[d] = lambda x=x, y=y, rm=rm, rv=rv: bnfast.forward(
                x, training=False, running_mean=rm, running_var=rv, out=y
            )
        for threads in (int(t) for t in args.threads.split(",")):
            numba.set_num_threads(threads)
            t = cmp.interleaved_ms(fns, budget_s=args.budget * len(fns), percentile=10)
            line = "".join(f"{1e3 * t[d]:>7.0f}" for d in gaps)
            print(f"{spec:<12}{threads:>8}" + line, flush=True)


if __name__ == "__main__":
    main()
