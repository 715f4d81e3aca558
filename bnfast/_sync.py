"""Synchronized batch norm across processes (data parallelism over MPI): the two reductions.

A training forward with ``comm=`` normalizes every rank's shard with the statistics of the
global batch (all ranks' values together); its backward uses the global gradient sums.

- Forward: each rank's per-channel ``(count, mean, M2)`` in float64 (``M2 = count * var``,
  from the ``moments`` kernel: shifted sums, never ``E[x^2] - E[x]^2``), ONE ``Allreduce``
  whose operator merges pairs exactly enough (Chan, Golub, LeVeque 1979):
  ``mean = (na*ma + nb*mb) / n``, ``M2 = M2a + M2b + (mb - ma)**2 * (na*nb/n)``. Both are
  symmetric in a and b bit for bit (every product and sum commutes), so the reduction tree's
  pairing order cannot make ranks differ; a rank with no values is the identity (it sends
  mean 0, M2 0). Counts are per rank, so shards may differ in size by any amount. Four check
  rows ride along as ordinary rows ``(1, value, 0)`` of the channel count, the dtype, eps and
  momentum: merged, their M2 is exactly 0 when every rank sent the same value and positive
  otherwise (a difference below ~1e-154 would underflow), so every rank raises the same
  ``ValueError`` after the same collective.
- Backward: ONE ``Allreduce`` (sum) of the two per-channel float64 sums ``sum(dy)`` and
  ``sum(dy * (x - mean))``.
- Wire: ``3 * (C + 4)`` doubles forward (an MPI contiguous type of 3 doubles, so no
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

import sys

import numpy as np

from .kernels.common import merge_moments, pack_moments, unpack_moments

_DTYPE_CODE = {np.dtype(np.float32): 32.0, np.dtype(np.float64): 64.0}
_CHECKS = 4  # rows after the channels: C, dtype, eps, momentum


def checked(comm):
    """``comm`` if it can reduce (has ``Allreduce``), else a ``TypeError``."""
    if not callable(getattr(comm, "Allreduce", None)):
        raise TypeError(
            f"comm must be an mpi4py communicator (an object with Allreduce), "
            f"got {type(comm).__name__}"
        )
    return comm


def merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows ``(count, mean, M2)`` of two sets of values merged (a new array)."""
    out = b.copy()
    merge_into(a, out)
    return out


def merge_into(inbuf, inoutbuf) -> None:
    """The forward's reduction operator: ``inoutbuf = merge(inbuf, inoutbuf)`` on rows of 3
    doubles (``kernels.common.merge_moments``: jitted, the operator runs on every rank at
    every step)."""
    a = np.frombuffer(inbuf, np.float64).reshape(-1, 3)
    b = np.frombuffer(inoutbuf, np.float64).reshape(-1, 3)
    merge_moments(a, b)


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


def _is_mpi4py(comm) -> bool:
    """Is ``comm`` an mpi4py communicator, a user's subclass of one included? (An mpi4py
    communicator means mpi4py.MPI is imported already; nothing is imported here.)"""
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and isinstance(comm, mpi.Comm)


def _allreduce(comm, send: np.ndarray, merged: bool) -> np.ndarray:
    recv = np.empty_like(send)
    if _is_mpi4py(comm):
        ops = _mpi_ops()
        if merged:
            comm.Allreduce([send, ops["triple"]], [recv, ops["triple"]], op=ops["merge"])
        else:
            comm.Allreduce(send, recv, op=ops["sum"])
    else:
        comm.Allreduce(send, recv, op=merge_into if merged else sum_into)
    return recv


def global_moments(comm, count: int, mean, var, dtype, eps: float, momentum: float) -> int:
    """The global batch's count per channel; ``mean`` and ``var`` (this rank's float64 mean
    and biased variance over its ``count`` values) are overwritten with the global batch's.
    One collective. Raises ``ValueError`` on every rank when ranks disagree on C, dtype, eps
    or momentum."""
    channels = len(mean)
    msg = np.empty((channels + _CHECKS, 3))
    pack_moments(count, mean, var, _check_rows(channels, dtype, eps, momentum), msg)
    total = unpack_moments(_allreduce(comm, msg, merged=True), mean, var)
    if total < 0:
        raise ValueError(
            f"synchronized batch norm: the ranks of comm disagree on the channel count, dtype, "
            f"eps or momentum (this rank: C={channels}, {np.dtype(dtype).name}, eps={eps}, "
            f"momentum={momentum}); every rank must call with the same settings"
        )
    return total


def _check_rows(channels: int, dtype, eps: float, momentum: float) -> np.ndarray:
    """The message's check rows ``(1, value, 0)``: the channel count, the dtype, eps and
    momentum (made once per setting: a trainer repeats the same few)."""
    key = (channels, np.dtype(dtype), eps, momentum)
    rows = _CHECK_ROWS.get(key)
    if rows is None:
        if len(_CHECK_ROWS) >= 64:
            _CHECK_ROWS.clear()
        rows = np.zeros((_CHECKS, 3))
        rows[:, 0] = 1.0
        rows[:, 1] = (channels, _DTYPE_CODE[np.dtype(dtype)], eps, momentum)
        _CHECK_ROWS[key] = rows
    return rows


_CHECK_ROWS: dict = {}


def global_sums(comm, sums: np.ndarray) -> np.ndarray:
    """The backward's per-channel sums (a (2, C) float64 block) summed over the ranks."""
    return _allreduce(comm, sums, merged=False)
