"""Data-parallel training of the demo's MLP with synchronized batch norm over MPI.

    UCX_TLS=self,sm mpiexec.gforker -n 2 python -m mpi4py examples/data_parallel.py

(``pip install -e ".[mpi,examples]"``; mpiexec.gforker comes with the mpich wheel, beside
python.) Every minibatch of 32 digits is split unevenly across the ranks (rank 0 takes fewer);
each rank runs the MLP on its shard with ``BatchNorm(comm=...)``, so every BN layer normalizes
with the statistics of the whole minibatch; the loss gradient is scaled to the global mean
loss, and every parameter's gradient (the Linear weights' and BN's gamma and beta, each
rank's share) is summed over the ranks with one Allreduce per step. Rank 0 then trains the same
network in one process on the full minibatches and prints how far the weights are apart: they
agree to rounding (float64).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mlp  # noqa: E402

BATCH, EPOCHS, LR = 32, 2, 0.05


def shard_bounds(n: int, size: int) -> np.ndarray:
    """Uneven shards: rank r's share grows with r (rank 0 holds the fewest)."""
    weights = np.arange(1, size + 1)
    cuts = np.floor(np.cumsum(weights) / weights.sum() * n).astype(int)
    return np.concatenate([[0], cuts])


def train(net, data, comm=None):
    """EPOCHS of SGD on minibatches of BATCH; with comm, on this rank's shard of each."""
    xtr, ytr = data[0]
    params = net.params()
    opt = mlp.SGD(params, LR)
    order_rng = np.random.default_rng(1)
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm else (0, 1)
    bounds = shard_bounds(BATCH, size)
    flat = np.empty(sum(g.size for _, g in params))
    for _ in range(EPOCHS):
        order = order_rng.permutation(len(ytr))  # the same order on every rank
        for i in range(0, len(order) - BATCH + 1, BATCH):
            j = order[i : i + BATCH][bounds[rank] : bounds[rank + 1]]
            _, dlogits = net.loss(xtr[j], ytr[j])
            net.backward(dlogits * (len(j) / BATCH))  # the gradient of the global mean loss
            if comm:  # sum every gradient over the ranks: one Allreduce
                np.concatenate([g.ravel() for _, g in params], out=flat)
                comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
                k = 0
                for _, g in params:
                    g.ravel()[...] = flat[k : k + g.size]
                    k += g.size
            opt.step()
    return net


def main() -> None:
    comm = MPI.COMM_WORLD
    data = mlp.load_digits_split()
    net = train(mlp.MLP(64, 10, width=64, depth=2, seed=0, comm=comm), data, comm)
    acc = net.accuracy(*data[1])
    if comm.Get_rank() == 0:
        alone = train(mlp.MLP(64, 10, width=64, depth=2, seed=0), data)
        diff = max(
            float(np.max(np.abs(p - q)))
            for (p, _), (q, _) in zip(net.params(), alone.params(), strict=True)
        )
        bn_diff = max(
            float(np.max(np.abs(a.bn.running_var - b.bn.running_var)))
            for a, b in zip(net.layers, alone.layers, strict=True)
            if isinstance(a, mlp.BatchNorm)
        )
        print(
            f"{comm.Get_size()} ranks: validation accuracy {acc:.3f}; largest difference from "
            f"one process on the full batches: weights {diff:.2e}, BN running_var {bn_diff:.2e}"
        )
        assert diff < 1e-9 and bn_diff < 1e-9, "data-parallel training diverged from 1 rank"


if __name__ == "__main__":
    main()
