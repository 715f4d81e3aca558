"""Synchronized batch norm across processes (data parallelism over MPI): the two reductions.

A training forward with ``comm=`` normalizes every rank's shard with the statistics of the
global batch (all ranks' values together); its backward uses the global gradient sums.

- Forward: each rank's per-channel ``(count, mean, M2)`` in float64 (``M2 = count * var``,
  from the ``moments`` kernel: shifted sums, never ``E[x^2] - E[x]^2``), ONE ``Allreduce``
  whose operator merges pairs exactly enough (Chan, Golub, LeVeque 1979):
  ``mean = (na*ma + nb*mb) / n``, ``M2 = M2a + M2b + (mb - ma)**2 * (na*nb/n)``. Both are
  symmetric in a and b bit for bit (every product and sum commutes), so the reduction tree's
  pairing order cannot make ranks differ; a rank with no values is the identity. Counts are
  per rank, so shards may differ in size by any amount. Two check rows ride along: the channel
  count and dtype, and eps and momentum; a rank that disagrees turns them into NaN and every
  rank raises the same ``ValueError`` after the same collective.
- Backward: ONE ``Allreduce`` (sum) of the two per-channel float64 sums ``sum(dy)`` and
  ``sum(dy * (x - mean))``.
- Wire: ``3 * (C + 2)`` doubles forward (an MPI contiguous type of 3 doubles, so no
  implementation can split a triple), ``2 * C`` backward.

What one collective cannot detect: ranks whose channel counts differ send messages of different
lengths, which MPI leaves undefined (MPICH reports a truncation error on some ranks and may
leave others waiting); a rank that skips the call (e.g. trains while the others evaluate)
leaves the others waiting, as any collective does. Inference and the frozen-statistics
backward make no collective, so evaluation on a subset of ranks cannot hang.

``comm`` is an mpi4py communicator (``MPI.COMM_WORLD``, or a sub-communicator from
``comm.Split`` to synchronize within groups of ranks). Any other object with an mpi4py-style
``Allreduce(sendbuf, recvbuf, op)`` works too: it receives float64 arrays and, as ``op``, a
Python function ``op(inbuf, inoutbuf)`` that folds ``inbuf`` into ``inoutbuf`` (the tests'
in-process communicator does this).
"""

from __future__ import annotations

import numpy as np

_CHECK = -1.0  # the count column of a check row (a data row's count is >= 0)
_DTYPE_CODE = {np.dtype(np.float32): 32.0, np.dtype(np.float64): 64.0}


def checked(comm):
    """``comm`` if it can reduce (has ``Allreduce``), else a ``TypeError``."""
    if not callable(getattr(comm, "Allreduce", None)):
        raise TypeError(
            f"comm must be an mpi4py communicator (an object with Allreduce), "
            f"got {type(comm).__name__}"
        )
    return comm


def merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows ``(count, mean, M2)`` of two sets of values merged (check rows, count -1: equal
    values stay, differing ones become NaN)."""
    na, ma, qa = a[:, 0], a[:, 1], a[:, 2]
    nb, mb, qb = b[:, 0], b[:, 1], b[:, 2]
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(na == 0, mb, np.where(nb == 0, ma, (na * ma + nb * mb) / n))
        m2 = np.where(na == 0, qb, np.where(nb == 0, qa, qa + qb + (mb - ma) ** 2 * (na * nb / n)))
    out = np.stack([n, mean, m2], axis=1)
    check = (na == _CHECK) | (nb == _CHECK)
    if check.any():
        both = (na == _CHECK) & (nb == _CHECK)
        out[check, 0] = _CHECK
        out[check, 1] = np.where(both & (ma == mb), ma, np.nan)[check]
        out[check, 2] = np.where(both & (qa == qb), qa, np.nan)[check]
    return out


def merge_into(inbuf, inoutbuf) -> None:
    """The forward's reduction operator: ``inoutbuf = merge(inbuf, inoutbuf)`` (rows of 3)."""
    b = np.frombuffer(inoutbuf, np.float64).reshape(-1, 3)
    b[...] = merge(np.frombuffer(inbuf, np.float64).reshape(-1, 3), b)


def sum_into(inbuf, inoutbuf) -> None:
    """The backward's reduction operator (for communicators other than mpi4py's)."""
    b = np.frombuffer(inoutbuf, np.float64)
    b += np.frombuffer(inbuf, np.float64)


_MPI: dict = {}  # mpi4py's operator and datatype, made on first use (MPI is initialized then)


def _mpi_ops():
    if not _MPI:
        from mpi4py import MPI

        _MPI["merge"] = MPI.Op.Create(lambda i, o, _t: merge_into(i, o), commute=True)
        _MPI["triple"] = MPI.DOUBLE.Create_contiguous(3).Commit()
        _MPI["sum"] = MPI.SUM
    return _MPI


def _allreduce(comm, send: np.ndarray, merged: bool) -> np.ndarray:
    recv = np.empty_like(send)
    if type(comm).__module__.startswith("mpi4py"):
        ops = _mpi_ops()
        if merged:
            comm.Allreduce([send, ops["triple"]], [recv, ops["triple"]], op=ops["merge"])
        else:
            comm.Allreduce(send, recv, op=ops["sum"])
    else:
        comm.Allreduce(send, recv, op=merge_into if merged else sum_into)
    return recv


def global_moments(comm, count: int, mean, var, dtype, eps: float, momentum: float):
    """``(total, mean, var)`` of the global batch (float64; var biased) from this rank's
    ``count`` values per channel and their float64 ``mean`` and biased ``var``; one collective.
    Raises ``ValueError`` on every rank when ranks disagree on C, dtype, eps or momentum."""
    channels = len(mean)
    msg = np.empty((channels + 2, 3))
    msg[:channels, 0] = count
    msg[:channels, 1] = mean if count else 0.0
    msg[:channels, 2] = var * count if count else 0.0
    msg[channels] = (_CHECK, channels, _DTYPE_CODE[np.dtype(dtype)])
    msg[channels + 1] = (_CHECK, eps, momentum)
    out = _allreduce(comm, msg, merged=True)
    if np.isnan(out[channels:, 1:]).any():
        raise ValueError(
            f"synchronized batch norm: the ranks of comm disagree on the channel count, dtype, "
            f"eps or momentum (this rank: C={channels}, {np.dtype(dtype).name}, eps={eps}, "
            f"momentum={momentum}); every rank must call with the same settings"
        )
    total = int(out[0, 0]) if channels else 0
    return total, out[:channels, 1].copy(), out[:channels, 2] / max(total, 1)


def global_sums(comm, sums: np.ndarray) -> np.ndarray:
    """The backward's per-channel sums (a (2, C) float64 block) summed over the ranks."""
    return _allreduce(comm, sums, merged=False)
