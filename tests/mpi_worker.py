"""Run by tests/test_sync.py on real MPI ranks (``mpiexec.gforker -n P python -m mpi4py``).

Every rank builds the same global batch, takes its uneven shard (rank 0 holds a single
sample; with 4 ranks one rank holds none), runs synchronized batch norm and checks it against
single-process bnfast on the whole batch; it prints one ``OK`` line per check group, and any
failure raises (mpi4py's ``-m mpi4py`` then aborts every rank, so the test sees it)."""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

import bnfast

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
SIZES = {2: [1, 22], 3: [1, 9, 13], 4: [1, 12, 0, 10]}[size]
START = np.cumsum([0] + SIZES)
SHARD = slice(START[rank], START[rank + 1])


def close(a, b, rtol, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0)) if a.size else 0.0
    assert err <= rtol, f"rank {rank}: {what} off by {err:.3g} (tolerance {rtol:.1g})"


def same_on_every_rank(a, what):
    blobs = comm.allgather(np.ascontiguousarray(a).tobytes())
    assert all(b == blobs[0] for b in blobs), f"rank {rank}: {what} differs between ranks"


def check(shape, axis, dtype):
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    rng = np.random.default_rng(7)  # the same global batch on every rank
    n = sum(SIZES)
    x = rng.normal(3.0, 2.0, (n,) + shape[1:]).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    c = shape[axis]
    gamma = rng.uniform(0.5, 1.5, c).astype(dtype)
    beta = rng.normal(size=c).astype(dtype)

    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    y, cache = bnfast.forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv)
    dx, dgamma, dbeta = bnfast.backward(dy, cache)

    srm, srv = np.zeros(c, dtype), np.ones(c, dtype)
    sy, scache = bnfast.forward(
        x[SHARD], gamma, beta, axis=axis, running_mean=srm, running_var=srv, comm=comm
    )
    sdx, sdgamma, sdbeta = bnfast.backward(dy[SHARD], scache)
    close(sy, y[SHARD], rtol, "y")
    close(srm, rm, rtol, "running_mean")
    close(srv, rv, rtol, "running_var")
    close(sdx, dx[SHARD], rtol, "dx")
    close(comm.allreduce(sdgamma.astype(np.float64)), dgamma, rtol * 10, "sum of dgamma")
    close(comm.allreduce(sdbeta.astype(np.float64)), dbeta, rtol * 10, "sum of dbeta")
    same_on_every_rank(srm, "running_mean")
    same_on_every_rank(srv, "running_var")
    print(f"OK rank {rank} {np.dtype(dtype).name} {shape} axis {axis}", flush=True)


for dtype in (np.float64, np.float32):
    check((0, 5), 1, dtype)
    check((0, 4, 3, 5), 1, dtype)
    check((0, 3, 2, 6), -1, dtype)

# The layer: three training steps, then eval (no collective: ranks may evaluate alone).
for dtype in (np.float64, np.float32):
    rng = np.random.default_rng(11)
    whole, synced = bnfast.BatchNorm(6, dtype=dtype), bnfast.BatchNorm(6, dtype=dtype, comm=comm)
    for step in range(3):
        x = rng.normal(1.0, 3.0, (sum(SIZES), 6)).astype(dtype)
        dy = rng.normal(size=x.shape).astype(dtype)
        y, ys = whole(x), synced(x[SHARD])
        dx, dxs = whole.backward(dy), synced.backward(dy[SHARD])
        rtol = 1e-12 if dtype == np.float64 else 2e-6
        close(ys, y[SHARD], rtol, "layer y")
        close(dxs, dx[SHARD], rtol, "layer dx")
        close(synced.running_var, whole.running_var, rtol, "layer running_var")
        same_on_every_rank(synced.running_mean, "layer running_mean")
        same_on_every_rank(synced.running_var, "layer running_var")
        assert synced.num_batches_tracked == whole.num_batches_tracked == step + 1
    if rank == 0:  # evaluation on one rank only must not wait for the others
        synced.eval()
        close(synced(x[:3]), whole.eval()(x[:3]), rtol, "layer eval")
    comm.Barrier()
    print(f"OK rank {rank} layer {np.dtype(dtype).name}", flush=True)

# A rank with another eps: every rank raises the same error after the one collective.
try:
    bnfast.forward(
        np.ones((3, 4)) * rank + np.arange(12.0).reshape(3, 4),
        eps=1e-5 * (1 + (rank == 1)),
        comm=comm,
    )
except ValueError as e:
    assert "disagree" in str(e), e
    print(f"OK rank {rank} mismatch raised", flush=True)
else:
    raise AssertionError(f"rank {rank}: a mismatched eps was not detected")

# A user's own communicator class (a subclass of Intracomm that counts its collectives) works
# wherever MPI.COMM_WORLD does (issue 14 item 12: it was refused by mpi4py's operator check).


class CountingComm(MPI.Intracomm):
    calls = 0

    def Allreduce(self, *args, **kwargs):  # noqa: N802 (mpi4py's name)
        type(self).calls += 1
        return super().Allreduce(*args, **kwargs)


counting = CountingComm(comm)
x = np.random.default_rng(5).normal(2.0, 1.0, (sum(SIZES), 4))[SHARD]
y_plain, c_plain = bnfast.forward(x, comm=comm)
y_sub, c_sub = bnfast.forward(x, comm=counting)
np.testing.assert_array_equal(y_sub, y_plain)
dy = np.ones_like(x)
np.testing.assert_array_equal(bnfast.backward(dy, c_sub)[0], bnfast.backward(dy, c_plain)[0])
assert CountingComm.calls == 2, CountingComm.calls  # one collective forward, one backward
print(f"OK rank {rank} subclass communicator", flush=True)
