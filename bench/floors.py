"""What the arithmetic alone costs: bare loops of bnfast's float64 passes, and of a float32
design, beside bnfast and PyTorch, per grid case, one thread, interleaved rounds.

    python bench/floors.py [--match TEXT] [--ops forward,backward,inference] [--budget 0.5]
    python bench/floors.py --step [--threads 1,2] [--rounds 60]

Issue 16 asks for each grid cell still short of its target "with its measured reason", and
what the 1-ulp outputs really cost. For each case this times, in the same interleaved rounds:

- bnfast and PyTorch (as ``python -m bnfast --grid`` does);
- ``f64``: the bare float64 loops of the operation's passes, without partition, per-channel
  work or call overhead (forward: shifted moment sums eight rows at a time, then the write
  ``y = float32((float64(x) - m) * s + b)``; inference: that write;
  backward: the two gradient sums four rows at a time, then ``dx = s*dy - c1*(x - m) + c0``;
  the write four rows and dx two rows per pass over rows of 7/8 of a page or more, which the
  kernels do for the write only beyond the strip budget). The same arithmetic as the kernels
  (``kernels/lanes.py``, ``kernels/rows.py``), over the array's own rows: where the kernels
  view narrow rows several at a time (``lanes.replicas``, NHWC with C < 64) or take the other
  family (NCHW maps below 7x7 run in the lanes family), bnfast can run below its floor;
- ``f32``: the same passes in float32 arithmetic (plain float32 sums, ``y = x * s + t``),
  what a PyTorch-like design would cost; its outputs are not within 1 ulp (see the README).

Then ``need`` = PyTorch time / target: a cell whose ``f64`` floor is above ``need`` cannot
reach its target with float64 arithmetic on this CPU at one thread. Layouts: 2-D and NHWC as
(rows, C) lanes, NCHW as (N, C, H*W) rows. Run it alone on the machine; name the CPU.

``--step``: the same for the issue's MLP-step shares (``python -m bnfast --step``): the step
with BN+ReLU as bnfast's layer, as its kernels alone (``StepKernels``: no checks or cache), as
the bare float64 and float32 loops (``StepFloor``, a lower bound: no ReLU, no per-channel
work) and as NumPy's, interleaved in blocks of steps (``_compare.STEP_BLOCK``). Inside the step
every pass runs slower than back to back (its data comes cold after the matmuls), the floors'
passes alike, so only a floor timed there says whether a share is reachable.
"""

from __future__ import annotations

import argparse

import numba
import numpy as np
from numba import njit

import bnfast
from bnfast import _compare as cmp
from bnfast import _core, _machine, _threading
from bnfast.__main__ import TARGETS
from bnfast.kernels.lanes import NEAR_PAGE

OPTS = dict(cache=True, error_model="numpy", fastmath={"contract"})
ROW_OPTS = dict(cache=True, error_model="numpy", fastmath={"contract", "reassoc"})


@njit(**OPTS)
def lane_moments(x, k, a1, a2):
    """Per-lane float64 sums of (x - k) and (x - k)**2, eight rows at a time (fixed tree)."""
    n, w = x.shape
    a1[:] = 0.0
    a2[:] = 0.0
    r = 0
    while r + 8 <= n:
        x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
        x4, x5, x6, x7 = x[r + 4], x[r + 5], x[r + 6], x[r + 7]
        for j in range(w):
            kj = k[j]
            d0, d1, d2, d3 = x0[j] - kj, x1[j] - kj, x2[j] - kj, x3[j] - kj
            d4, d5, d6, d7 = x4[j] - kj, x5[j] - kj, x6[j] - kj, x7[j] - kj
            a1[j] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            a2[j] += ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)) + (
                (d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)
            )
        r += 8
    for i in range(r, n):
        for j in range(w):
            d = x[i, j] - k[j]
            a1[j] += d
            a2[j] += d * d


@njit(**OPTS)
def lane_write(x, y, m, s, b):
    """Four rows per pass for rows of ``NEAR_PAGE`` bytes or more (``lanes.affine_rows``)."""
    n, w = x.shape
    uw = np.uint64(w)
    i = 0
    while w * x.itemsize >= NEAR_PAGE and i + 4 <= n:
        for j in range(uw):
            mj, sj, bj = m[j], s[j], b[j]
            y[i, j] = (x[i, j] - mj) * sj + bj
            y[i + 1, j] = (x[i + 1, j] - mj) * sj + bj
            y[i + 2, j] = (x[i + 2, j] - mj) * sj + bj
            y[i + 3, j] = (x[i + 3, j] - mj) * sj + bj
        i += 4
    for r in range(i, n):
        for j in range(uw):
            y[r, j] = (x[r, j] - m[j]) * s[j] + b[j]


@njit(**OPTS)
def lane_gradient_sums(x, g, m, a1, a2):
    """Per-lane float64 sums of dy and dy * (x - m), four rows at a time."""
    n, w = x.shape
    a1[:] = 0.0
    a2[:] = 0.0
    r = 0
    while r + 4 <= n:
        for j in range(w):
            mj = m[j]
            e0, e1 = np.float64(g[r, j]), np.float64(g[r + 1, j])
            e2, e3 = np.float64(g[r + 2, j]), np.float64(g[r + 3, j])
            a1[j] += (e0 + e1) + (e2 + e3)
            a2[j] += (e0 * (x[r, j] - mj) + e1 * (x[r + 1, j] - mj)) + (
                e2 * (x[r + 2, j] - mj) + e3 * (x[r + 3, j] - mj)
            )
        r += 4
    for i in range(r, n):
        for j in range(w):
            e = np.float64(g[i, j])
            a1[j] += e
            a2[j] += e * (x[i, j] - m[j])


@njit(**OPTS)
def lane_dx(x, g, d, m, s, c1, c0):
    """Two rows per pass for rows of ``NEAR_PAGE`` bytes or more (``lanes.gradient_pairs``)."""
    n, w = x.shape
    uw = np.uint64(w)
    i = 0
    while w * x.itemsize >= NEAR_PAGE and i + 2 <= n:
        for j in range(uw):
            mj, sj, pj, qj = m[j], s[j], c1[j], c0[j]
            d[i, j] = sj * np.float64(g[i, j]) - pj * (x[i, j] - mj) + qj
            d[i + 1, j] = sj * np.float64(g[i + 1, j]) - pj * (x[i + 1, j] - mj) + qj
        i += 2
    for r in range(i, n):
        for j in range(uw):
            d[r, j] = s[j] * np.float64(g[r, j]) - c1[j] * (x[r, j] - m[j]) + c0[j]


@njit(**OPTS)
def lane_sums32(x, a1, a2):
    """Per-lane float32 sums of x and x**2 (a float32 design's statistics)."""
    n, w = x.shape
    a1[:] = 0.0
    a2[:] = 0.0
    for i in range(n):
        for j in range(w):
            v = x[i, j]
            a1[j] += v
            a2[j] += v * v


@njit(**OPTS)
def lane_write32(x, y, s, t):
    n, w = x.shape
    uw = np.uint64(w)
    for i in range(n):
        for j in range(uw):
            y[i, j] = x[i, j] * s[j] + t[j]


@njit(**OPTS)
def lane_gradient_sums32(x, g, a1, a2):
    n, w = x.shape
    a1[:] = 0.0
    a2[:] = 0.0
    for i in range(n):
        for j in range(w):
            e = g[i, j]
            a1[j] += e
            a2[j] += e * x[i, j]


@njit(**OPTS)
def lane_dx32(x, g, d, s, c1, c0):
    n, w = x.shape
    uw = np.uint64(w)
    for i in range(n):
        for j in range(uw):
            d[i, j] = s[j] * g[i, j] - c1[j] * x[i, j] + c0[j]


@njit(**ROW_OPTS)
def row_moments(x, k, a1, a2):
    """Per-channel float64 shifted sums over contiguous rows (N, C, L)."""
    n, c, L = x.shape
    a1[:] = 0.0
    a2[:] = 0.0
    for i in range(n):
        for ch in range(c):
            kc, s1, s2 = k[ch], 0.0, 0.0
            row = x[i, ch]
            for t in range(L):
                dd = row[t] - kc
                s1 += dd
                s2 += dd * dd
            a1[ch] += s1
            a2[ch] += s2


@njit(**OPTS)
def row_write(x, y, m, s, b):
    n, c, L = x.shape
    for i in range(n):
        for ch in range(c):
            mc, sc, bc = m[ch], s[ch], b[ch]
            xr, yr = x[i, ch], y[i, ch]
            for t in range(L):
                yr[t] = (xr[t] - mc) * sc + bc


@njit(**ROW_OPTS)
def row_gradient_sums(x, g, m, a1, a2):
    n, c, L = x.shape
    a1[:] = 0.0
    a2[:] = 0.0
    for i in range(n):
        for ch in range(c):
            mc, s1, s2 = m[ch], 0.0, 0.0
            xr, gr = x[i, ch], g[i, ch]
            for t in range(L):
                e = np.float64(gr[t])
                s1 += e
                s2 += e * (xr[t] - mc)
            a1[ch] += s1
            a2[ch] += s2


@njit(**OPTS)
def row_dx(x, g, d, m, s, c1, c0):
    n, c, L = x.shape
    for i in range(n):
        for ch in range(c):
            mc, sc, p, q = m[ch], s[ch], c1[ch], c0[ch]
            xr, gr, dr = x[i, ch], g[i, ch], d[i, ch]
            for t in range(L):
                dr[t] = sc * np.float64(gr[t]) - p * (xr[t] - mc) + q


@njit(**ROW_OPTS)
def row_sums32(x, a1, a2):
    n, c, L = x.shape
    a1[:] = 0.0
    a2[:] = 0.0
    for i in range(n):
        for ch in range(c):
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            row = x[i, ch]
            for t in range(L):
                s1 += row[t]
                s2 += row[t] * row[t]
            a1[ch] += s1
            a2[ch] += s2


@njit(**OPTS)
def row_write32(x, y, s, t):
    n, c, L = x.shape
    for i in range(n):
        for ch in range(c):
            sc, tc = s[ch], t[ch]
            xr, yr = x[i, ch], y[i, ch]
            for u in range(L):
                yr[u] = xr[u] * sc + tc


@njit(**ROW_OPTS)
def row_gradient_sums32(x, g, a1, a2):
    n, c, L = x.shape
    a1[:] = 0.0
    a2[:] = 0.0
    for i in range(n):
        for ch in range(c):
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            xr, gr = x[i, ch], g[i, ch]
            for t in range(L):
                s1 += gr[t]
                s2 += gr[t] * xr[t]
            a1[ch] += s1
            a2[ch] += s2


@njit(**OPTS)
def row_dx32(x, g, d, s, c1, c0):
    n, c, L = x.shape
    for i in range(n):
        for ch in range(c):
            sc, p, q = s[ch], c1[ch], c0[ch]
            xr, gr, dr = x[i, ch], g[i, ch], d[i, ch]
            for t in range(L):
                dr[t] = sc * gr[t] - p * xr[t] + q


# The loops of each layout, in the order floors() calls them: float64 moments, write, gradient
# sums, dx; float32 sums, write, gradient sums, dx.
LOOPS = {
    "rows": (row_moments, row_write, row_gradient_sums, row_dx)
    + (row_sums32, row_write32, row_gradient_sums32, row_dx32),
    "lanes": (lane_moments, lane_write, lane_gradient_sums, lane_dx)
    + (lane_sums32, lane_write32, lane_gradient_sums32, lane_dx32),
}


def floors(case: cmp.Case, inp: dict) -> dict:
    """``{op: (f64 loops, f32 loops)}`` callables for a case (C-contiguous float32 x): NCHW as
    rows of H*W values per (n, c), 2-D and NHWC as rows of C lanes (per-lane vectors)."""
    x, dy = inp["x"], inp["dy"]
    c = case.channels
    rows = case.axis == 1 and x.ndim == 4
    shape = (x.shape[0], c, -1) if rows else (-1, c)
    xv, gv = x.reshape(shape), dy.reshape(shape)
    mom, wr, gs, dx, sums32, wr32, gs32, dx32 = LOOPS["rows" if rows else "lanes"]
    rng = np.random.default_rng(1)
    m, s, b, c1, c0 = (rng.uniform(0.5, 1.5, c) for _ in range(5))
    s32, t32, p32, q32 = (v.astype(np.float32) for v in (s, b, c1, c0))
    k = (xv[0, :, 0] if rows else xv[0]).astype(np.float64)
    a1, a2 = np.empty(c), np.empty(c)
    f1, f2 = np.empty(c, np.float32), np.empty(c, np.float32)

    def out():  # a new output per call, as the grid's calls (and PyTorch's) allocate
        return np.empty_like(xv)

    return {
        "forward": (
            lambda: (mom(xv, k, a1, a2), wr(xv, out(), m, s, b)),
            lambda: (sums32(xv, f1, f2), wr32(xv, out(), s32, t32)),
        ),
        "inference": (lambda: wr(xv, out(), m, s, b), lambda: wr32(xv, out(), s32, t32)),
        "backward": (
            lambda: (gs(xv, gv, m, a1, a2), dx(xv, gv, out(), m, s, c1, c0)),
            lambda: (gs32(xv, gv, f1, f2), dx32(xv, gv, out(), s32, p32, q32)),
        ),
    }


class StepFloor:
    """BN+ReLU in the MLP step (``_compare.mlp_step``) as the bare lane loops alone: forward
    moments then the write, backward the gradient sums then dx, into buffers kept across
    steps (as the bnfast layer's ``reuse_buffers``); no per-channel work, no ReLU (random
    per-channel vectors), no Python beyond the loop calls: below what any BN+ReLU with those
    passes can cost in the step. ``f32``: the float32 loops."""

    f32 = False

    def __init__(self, c: int) -> None:
        rng = np.random.default_rng(1)
        self.v64 = [rng.uniform(0.5, 1.5, c) for _ in range(5)]  # m, s, b, c1, c0
        self.v32 = [v.astype(np.float32) for v in self.v64[1:]]  # s, t, c1, c0
        self.a = (np.empty(c), np.empty(c))
        self.f = (np.empty(c, np.float32), np.empty(c, np.float32))
        self.y = self.dx = self.z = None

    def forward(self, z):
        if self.y is None:
            self.y, self.dx = np.empty_like(z), np.empty_like(z)
        self.z = z
        if self.f32:
            lane_sums32(z, *self.f)
            lane_write32(z, self.y, *self.v32[:2])
        else:
            m, s, b = self.v64[:3]
            lane_moments(z, z[0].astype(np.float64), *self.a)
            lane_write(z, self.y, m, s, b)
        return self.y

    def backward(self, g):
        if self.f32:
            lane_gradient_sums32(self.z, g, *self.f)
            s, _, c1, c0 = self.v32
            lane_dx32(self.z, g, self.dx, s, c1, c0)
        else:
            m, s, _, c1, c0 = self.v64
            lane_gradient_sums(self.z, g, m, *self.a)
            lane_dx(self.z, g, self.dx, m, s, c1, c0)
        return self.dx


class StepFloor32(StepFloor):
    f32 = True


class StepKernels:
    """BN+ReLU in the MLP step as bnfast's own kernels alone: the layer's forward and backward
    kernels (those its calls run: the planned small-call entry, else the family's kernels for
    this thread count) called with arguments prepared at the first step, without the layer's
    checks, plan tests or cache; what the layer's Python costs inside the step is the
    difference from its column."""

    def __init__(self, c: int) -> None:
        self.bn = bnfast.BatchNorm(c, activation="relu", reuse_buffers=True)
        self.fwd = None

    def _prepare(self, z) -> None:
        bn = self.bn
        for _ in range(2):  # compiled, planned
            bn(z)
            bn.backward(np.ones_like(z))
        p, cache = bn._plan, bn._cache
        self.canon = p.layout.canon
        x3 = z.reshape(self.canon)
        fused = _threading.kernels_for(x3, fused=True)
        _, self.bblock, launch = _core._backward_plan(p.layout, z.dtype, True, "relu", bn.eps)
        self.fwd = p.launch or (fused[0].forward, fused[1])
        self.bwd = launch or (fused[0].backward, fused[1])
        self.block = p.block
        self.rows, self.stats = bn._rows, np.empty(cache.stats.shape)
        self.y, self.dx = np.empty_like(z), np.empty_like(z)

    def forward(self, z):
        if self.fwd is None:
            self._prepare(z)
        self.z3 = z.reshape(self.canon)
        kernel, tune = self.fwd
        g, b, rm, rv = self.rows[:4]
        kernel(self.z3, g, b, rm, rv, self.block, self.stats, self.y.reshape(self.canon), tune)
        return self.y

    def backward(self, g):
        kernel, tune = self.bwd
        rows, canon = self.rows, self.canon
        kernel(
            self.z3,
            g.reshape(canon),
            rows[0],
            rows[1],
            self.stats,
            self.bblock,
            _core.NO_SUMS,
            rows[4],
            rows[5],
            self.dx.reshape(canon),
            tune,
        )
        return self.dx


def step_floors(threads: list[int], rounds: int) -> None:
    """The ``--step`` table: BN+ReLU time in the MLP step for bnfast's layer, its kernels
    alone, the float64 and float32 floors and NumPy's BN, interleaved in blocks of steps, per
    thread count."""
    print(
        f"MLP step 784-H-H-10 floors on {_machine.describe()}; BN+ReLU us per step (its "
        "share of that step), medians of steps interleaved in blocks; targets: share <= 10% "
        "at batch 64, <= 5% at 256 and 1024"
    )
    layers = {
        "bnfast": "bnfast",
        "kernels": StepKernels,
        "f64": StepFloor,
        "f32": StepFloor32,
        "numpy": "numpy",
    }
    print(f"{'threads':>7}{'batch':>7}{'H':>6}" + "".join(f"{n:>17}" for n in layers))
    for n in threads:
        numba.set_num_threads(n)
        for r in cmp.step_table(n, rounds, layers):
            cells = "".join(
                f"{1e3 * r[f'{k} BN ms']:>9.0f} ({r[f'{k} BN share']:>4.1%})" for k in layers
            )
            print(f"{n:>7}{r['batch']:>7}{r['hidden']:>6}{cells}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step", action="store_true", help="the MLP step's floors instead")
    p.add_argument("--threads", default="1", help="thread counts for --step, e.g. 1,2")
    p.add_argument("--rounds", type=int, default=60, help="steps of each per case (--step)")
    p.add_argument("--match", default="", help="cases whose label contains this")
    p.add_argument("--ops", default="forward,backward,inference", help="of those three")
    p.add_argument("--budget", type=float, default=0.5, help="seconds per case and op")
    args = p.parse_args()
    if args.step:
        step_floors([int(t) for t in args.threads.split(",")], args.rounds)
        return
    numba.set_num_threads(1)
    impls = cmp.available()
    torch = "pytorch" in impls
    if torch:
        import torch as _torch

        _torch.set_num_threads(1)
    ops = args.ops.split(",")
    print(f"bnfast floors on {_machine.describe()}; one thread, float32 arrays, ms")
    head = f"{'case':<24}{'bnfast':>9}{'f64':>9}{'f32':>9}"
    head += f"{'PyTorch':>9}{'need':>9}{'bnfast/f64':>11}{'reachable':>10}" if torch else ""
    for op in ops:
        print(f"== {op} (target {TARGETS[op]}x PyTorch)\n{head}")
        for case in (c for c in cmp.GRID if args.match in c.label):
            inp = cmp.make_inputs(case)
            f64, f32 = floors(case, inp)[op]
            fns = {"bnfast": impls["bnfast"].prepare(op, inp), "f64": f64, "f32": f32}
            if torch:
                fns["pytorch"] = impls["pytorch"].prepare(op, inp)
            t = cmp.interleaved_ms(fns, budget_s=args.budget)
            line = f"{case.label:<24}{t['bnfast']:>9.3f}{t['f64']:>9.3f}{t['f32']:>9.3f}"
            if torch:
                need = t["pytorch"] / TARGETS[op]
                line += f"{t['pytorch']:>9.3f}{need:>9.3f}{t['bnfast'] / t['f64']:>10.2f}x"
                line += f"{'yes' if t['f64'] <= need else 'no':>10}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
