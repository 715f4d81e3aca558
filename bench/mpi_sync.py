"""Cost of synchronized batch norm on this machine (the README's Scale section).

    UCX_TLS=self,sm NUMBA_NUM_THREADS=1 mpiexec.gforker -n 2 python -m mpi4py bench/mpi_sync.py

Per rank, medians of barrier-aligned repetitions: the latency of bnfast's two collectives (the
forward's merge of 3 (C + 2) doubles through the Python-level MPI operator, the backward's sum
of 2C doubles) against a plain 8-byte sum, and a BatchNorm layer's training step (forward and
backward) on each rank's shard with ``comm=`` against the same step without it. Rank 0 prints
the table. Every rank runs one numba thread (more ranks than cores oversubscribe them).
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

import bnfast
from bnfast import _machine, _sync

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
REPS = 300


def median_us(fn) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(REPS):
        comm.Barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    # every rank's median, then the slowest rank's (a step waits for it)
    return comm.allreduce(float(np.median(times)) * 1e6, op=MPI.MAX)


rows = []
one = np.ones(1)
rows.append(("Allreduce of 1 double (sum)", median_us(lambda: comm.Allreduce(MPI.IN_PLACE, one))))
for c in (64, 1024):
    mean, var = np.zeros(c), np.ones(c)
    rows.append(
        (
            f"forward merge, C={c} ({3 * (c + 4) * 8} B)",
            median_us(
                lambda m=mean, v=var: _sync.global_moments(comm, 16, m, v, np.float32, 1e-5, 0.1)
            ),
        )
    )
    sums = np.zeros((2, c))
    rows.append(
        (
            f"backward sum, C={c} ({2 * c * 8} B)",
            median_us(lambda s=sums: _sync.global_sums(comm, s)),
        )
    )
raw = {}
for c in (256, 1024):  # two plain sums of the sizes a synchronized step sends (the bar)
    fwd, bwd = np.zeros(3 * (c + 4)), np.zeros(2 * c)
    raw[c] = median_us(
        lambda f=fwd, b=bwd: (
            comm.Allreduce(MPI.IN_PLACE, f, op=MPI.SUM),
            comm.Allreduce(MPI.IN_PLACE, b, op=MPI.SUM),
        )
    )
    rows.append((f"two raw sums of {3 * (c + 4)} and {2 * c} doubles (C={c})", raw[c]))
steps = {}
for n, c in ((32, 256), (128, 1024)):
    rng = np.random.default_rng(rank)
    x = rng.normal(size=(n, c)).astype(np.float32)
    dy = rng.normal(size=(n, c)).astype(np.float32)
    for label, layer in (
        ("unsynchronized", bnfast.BatchNorm(c)),
        ("comm=", bnfast.BatchNorm(c, comm=comm)),
    ):
        steps[(n, c, label)] = median_us(lambda bn=layer, x=x, dy=dy: (bn(x), bn.backward(dy)))
        rows.append((f"layer step {n}x{c} float32 per rank, {label}", steps[(n, c, label)]))
    bar = 1.2 * (steps[(n, c, "unsynchronized")] + raw[c])
    rows.append(("  target for comm=: 1.2 x (unsynchronized + raw sums)", bar))

if rank == 0:
    print(
        f"{size} ranks on {_machine.cpu_model()}, MPI: {MPI.Get_library_version().splitlines()[0]}"
    )
    for label, us in rows:
        print(f"  {label:52s} {us:9.1f} us")
