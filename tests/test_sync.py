"""Synchronized batch norm (``comm=``): the reductions simulated in one process (threads sharing
an in-process communicator), the merge operator's algebra, and real MPI ranks
(``mpiexec.gforker -n 2`` and ``-n 4``; skipped with a reason where mpi4py or mpiexec is
missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import bnfast
from bnfast import _sync, _threading
from bnfast import reference as ref
from bnfast.kernels import _jit


class _World:
    """Ranks as threads: ``Allreduce`` gathers every rank's buffer, folds them in rank order
    with the operator bnfast passes, and gives each rank the result."""

    def __init__(self, size: int) -> None:
        self.size, self.calls = size, 0
        self.barrier = threading.Barrier(size, timeout=60)
        self.buffers: list = [None] * size

    def comm(self, rank: int) -> _Comm:
        return _Comm(self, rank)


class _Comm:
    def __init__(self, world: _World, rank: int) -> None:
        self.world, self.rank = world, rank

    def Allreduce(self, send, recv, op) -> None:  # noqa: N802 (mpi4py's name)
        w = self.world
        w.buffers[self.rank] = np.array(send, copy=True)
        w.barrier.wait()
        acc = w.buffers[0].copy()
        for b in w.buffers[1:]:
            op(b, acc)
        recv[...] = acc
        w.barrier.wait()
        if self.rank == 0:
            w.calls += 1


def _run_ranks(sizes, work):
    """``work(rank, comm, shard)`` on a thread per rank; returns their results in rank order."""
    world = _World(len(sizes))
    bounds = np.cumsum([0, *sizes])
    results: list = [None] * len(sizes)
    errors: list = []

    def run(r):
        try:
            results[r] = work(r, world.comm(r), slice(bounds[r], bounds[r + 1]))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
            world.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors, world


SHARDINGS = [[1, 20, 0, 16], [5, 7], [1, 1], [30, 1, 2]]
LAYOUTS = [((37, 5), 1), ((12, 4, 9), 1), ((20, 3, 3, 6), -1), ((16, 6, 2, 3), 1)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("sizes", SHARDINGS, ids=str)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=str)
def test_synced_step_equals_the_whole_batch(shape, axis, sizes, dtype):
    """Every rank's y, dx and running statistics equal single-process BN on the concatenated
    batch (float64: 1e-12 relative; float32: the same bits here, asserted to 1 ulp of y's
    scale), dgamma and dbeta sum to the whole batch's, running statistics are the same bits
    on every rank, and a step makes exactly two collectives."""
    _check_synced_step((sum(sizes), *shape[1:]), axis, sizes, dtype)


def _check_synced_step(shape, axis, sizes, dtype):
    """The synced step on ranks of ``sizes`` rows against single-process BN on the whole batch
    (see the test above)."""
    rng = np.random.default_rng(sum(sizes))
    x = rng.normal(3.0, 2.0, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    c = shape[axis]
    gamma, beta = rng.uniform(0.5, 2, c).astype(dtype), rng.normal(size=c).astype(dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    y, cache = bnfast.forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv)
    dx, dgamma, dbeta = bnfast.backward(dy, cache)

    def work(rank, comm, shard):
        srm, srv = np.zeros(c, dtype), np.ones(c, dtype)
        sy, sc = bnfast.forward(
            x[shard], gamma, beta, axis=axis, running_mean=srm, running_var=srv, comm=comm
        )
        return (sy, srm, srv, *bnfast.backward(dy[shard], sc))

    results, errors, world = _run_ranks(sizes, work)
    assert not errors, errors
    assert world.calls == 2
    tol = 1e-12 if dtype == np.float64 else 2.4e-7  # float32: 2 ulp of values near 1
    for got, want, scale in (
        (np.concatenate([r[0] for r in results]), y, np.abs(y)),
        (np.concatenate([r[3] for r in results]), dx, np.abs(dx)),
        # sums of per-rank values, each rounded to the dtype once
        (sum(r[4].astype(np.float64) for r in results), dgamma, sum(abs(r[4]) for r in results)),
        (sum(r[5].astype(np.float64) for r in results), dbeta, sum(abs(r[5]) for r in results)),
    ):
        want = want.astype(np.float64)
        assert np.all(np.abs(got - want) <= tol * np.maximum(scale, 1.0))
    for r in results:
        np.testing.assert_allclose(r[1], rm, rtol=tol * 4, atol=tol)
        np.testing.assert_allclose(r[2], rv, rtol=tol * 4, atol=tol)
        assert r[1].tobytes() == results[0][1].tobytes()
        assert r[2].tobytes() == results[0][2].tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("route", ["fused tiles", "two-pass"])
def test_synced_step_at_parallel_sizes_equals_the_whole_batch(route, dtype):
    """Shards above the serial threshold (the parallel kernels, more than one task): a rank's
    two gradient sums come from the fused tiles of a strip that fits ``TUNE_STRIP`` (or the
    two-pass route's partials beyond it), dx from the given global sums; the step equals the
    whole batch's as at small sizes. Shapes derived from this machine's tuning vector."""
    itemsize = np.dtype(dtype).itemsize
    if route == "fused tiles":
        c = 1024
        rows = _threading.SERIAL_BELOW // (c * itemsize) + 8
    else:
        c = 256
        rows = int(_threading.TUNE[_jit.TUNE_STRIP]) // (c * itemsize) + 64
    _check_synced_step((2 * rows, c), 1, [rows, rows], dtype)


def test_synced_statistics_at_a_large_offset_match_float64():
    """float32 shards with mean 1e4 and unit spread: the merged variance is float64-exact to
    ~1e-12 (the merge adds no E[x^2] - E[x]^2 cancellation)."""
    rng = np.random.default_rng(3)
    x = (1e4 + rng.normal(size=(300, 4))).astype(np.float32)
    want = x.astype(np.float64).var(axis=0)

    def work(rank, comm, shard):
        return bnfast.forward(x[shard], comm=comm)[1]

    caches, errors, _ = _run_ranks([1, 150, 0, 149], work)
    assert not errors, errors
    var = 1.0 / caches[0].invstd ** 2 - 1e-5
    np.testing.assert_allclose(var, want, rtol=1e-9)


def test_merge_is_symmetric_bit_for_bit_and_exact_in_any_tree():
    rng = np.random.default_rng(5)
    shards = [rng.normal(7.0, 0.5, (k, 3)) for k in (1, 4, 0, 9, 2, 31)]
    rows = [
        np.stack([np.full(3, len(s)), s.mean(0), ((s - s.mean(0)) ** 2).sum(0)], 1)
        if len(s)
        else np.zeros((3, 3))
        for s in shards
    ]
    for a in rows:
        for b in rows:
            assert _sync.merge(a, b).tobytes() == _sync.merge(b, a).tobytes()
    whole = np.concatenate(shards)
    for order in (range(6), [5, 0, 3, 1, 4, 2]):
        acc = rows[order[0]]
        for i in order[1:]:
            acc = _sync.merge(rows[i], acc)
        np.testing.assert_allclose(acc[:, 0], len(whole))
        np.testing.assert_allclose(acc[:, 1], whole.mean(0), rtol=1e-14)
        np.testing.assert_allclose(acc[:, 2] / len(whole), whole.var(0), rtol=1e-12)
    pairs = _sync.merge(_sync.merge(rows[0], rows[1]), _sync.merge(rows[3], rows[5]))
    some = np.concatenate([shards[i] for i in (0, 1, 3, 5)])
    np.testing.assert_allclose(pairs[:, 1], some.mean(0), rtol=1e-14)
    np.testing.assert_allclose(pairs[:, 2] / len(some), some.var(0), rtol=1e-12)


@pytest.mark.parametrize(
    "field,values",
    [("eps", (1e-5, 2e-5)), ("momentum", (0.1, 0.2)), ("dtype", (np.float64, np.float32))],
)
def test_ranks_that_disagree_raise_on_every_rank_before_writing(field, values):
    x = np.arange(24.0).reshape(6, 4)

    def work(rank, comm, shard):
        kw = {"eps": 1e-5, "momentum": 0.1, "dtype": np.float64}
        kw[field] = values[rank]
        rm, rv = np.zeros(4, kw["dtype"]), np.ones(4, kw["dtype"])
        before = rm.copy(), rv.copy()
        with pytest.raises(ValueError, match="disagree"):
            bnfast.forward(
                x[shard].astype(kw["dtype"]),
                running_mean=rm,
                running_var=rv,
                eps=kw["eps"],
                momentum=kw["momentum"],
                comm=comm,
            )
        assert (rm == before[0]).all() and (rv == before[1]).all()
        return True

    results, errors, _ = _run_ranks([3, 3], work)
    assert not errors, errors
    assert results == [True, True]


def test_one_value_over_all_ranks_raises_on_every_rank():
    def work(rank, comm, shard):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bnfast.forward(np.ones((1 - rank, 3)), comm=comm)
        return True

    results, errors, _ = _run_ranks([1, 0], work)
    assert not errors and results == [True, True]


def test_inference_and_eval_mode_make_no_collective():
    class NoCalls:
        def Allreduce(self, *a, **k):  # noqa: N802
            raise AssertionError("a collective in inference")

    x = np.random.default_rng(0).normal(size=(8, 3))
    rm, rv = np.zeros(3), np.ones(3)
    y, cache = bnfast.forward(x, training=False, running_mean=rm, running_var=rv, comm=NoCalls())
    np.testing.assert_allclose(
        y, ref.forward(x, training=False, running_mean=rm, running_var=rv)[0]
    )
    bnfast.backward(np.ones_like(x), cache)  # frozen backward: no collective either
    bn = bnfast.BatchNorm(3, dtype=np.float64, comm=NoCalls()).eval()
    bn.backward(bn(x) * 0 + 1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kwargs", [{}, {"activation": "relu", "unbiased": False}], ids=str)
def test_synced_layer_steps_equal_the_whole_batch(kwargs, dtype):
    """BatchNorm(comm=) over several steps (from the second on, the layer's planned path with
    the small calls' kernels): each rank's y and dx, and the running statistics, equal one
    layer's on the whole batch; dgamma and dbeta sum to its. Ranks' shards of 5 and 7 rows."""
    c, sizes = 6, [5, 7]
    rng = np.random.default_rng(5)
    steps = [
        (rng.normal(1.0, 3.0, (12, c)).astype(dtype), rng.normal(size=(12, c)).astype(dtype))
        for _ in range(3)
    ]
    whole = bnfast.BatchNorm(c, dtype=dtype, **kwargs)
    want = []
    for x, dy in steps:
        want.append((whole(x), whole.backward(dy), whole.dgamma.copy(), whole.dbeta.copy()))

    def work(rank, comm, shard):
        bn = bnfast.BatchNorm(c, dtype=dtype, comm=comm, **kwargs)
        got = [
            (bn(x[shard]), bn.backward(dy[shard]), bn.dgamma.copy(), bn.dbeta.copy())
            for x, dy in steps
        ]
        assert bn._plan.synced is not None  # small shards: the plan's compiled kernels ran
        return got, bn.running_mean, bn.running_var

    results, errors, world = _run_ranks(sizes, work)
    assert not errors, errors
    assert world.calls == 2 * len(steps)
    tol = 1e-12 if dtype == np.float64 else 2.4e-7
    for k, (y, dx, dgamma, dbeta) in enumerate(want):
        for got, wanted in (
            (np.concatenate([r[0][k][0] for r in results]), y),
            (np.concatenate([r[0][k][1] for r in results]), dx),
            (sum(r[0][k][2].astype(np.float64) for r in results), dgamma),
            (sum(r[0][k][3].astype(np.float64) for r in results), dbeta),
        ):
            wanted = wanted.astype(np.float64)
            assert np.all(np.abs(got - wanted) <= 4 * tol * np.maximum(np.abs(wanted), 1.0))
    for r in results:
        np.testing.assert_allclose(r[1], whole.running_mean, rtol=4 * tol, atol=tol)
        np.testing.assert_allclose(r[2], whole.running_var, rtol=4 * tol, atol=tol)


def test_a_synced_layer_keeps_its_plan_kernels_in_a_process_of_its_own():
    """In a process that only trains with comm= (so the small-call forward twin never
    compiles), the layer's planned synced step still carries its compiled kernels (moments and
    the given-statistics forward): the plan asks for those, not for the twin it does not run."""
    code = (
        "import numpy as np, bnfast\n"
        "class Comm:\n"
        "    def Allreduce(self, send, recv, op):\n"
        "        recv[...] = send\n"
        "bn = bnfast.BatchNorm(8, comm=Comm())\n"
        "x = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)\n"
        "for _ in range(3):\n"
        "    bn.backward(bn(x))\n"
        "print(bn._plan.synced is not None)\n"
    )
    env = {**os.environ, "BNFAST_QUIET": "1"}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "True", r.stdout + r.stderr


def test_bad_comm_and_unsupported_combinations_are_refused():
    x = np.ones((4, 3))
    with pytest.raises(TypeError, match="Allreduce"):
        bnfast.forward(x, comm=object())
    with pytest.raises(TypeError, match="Allreduce"):
        bnfast.BatchNorm(3, comm="world")
    comm = _World(1).comm(0)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bnfast.forward(x, virtual_batch_size=2, comm=comm)
    with pytest.raises(ValueError, match="renorm"):
        bnfast.BatchNorm(3, renorm=(3.0, 5.0), comm=comm)


# --- Real ranks.

_MPIEXEC = shutil.which("mpiexec.gforker", path=os.path.dirname(sys.executable))


def _mpi_missing() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[mpi]')"
    if _MPIEXEC is None:
        return "mpiexec.gforker is not beside this Python (the mpich wheel provides it)"
    return None


@pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))
@pytest.mark.parametrize("ranks", [2, 4])
def test_real_mpi_ranks_match_the_whole_batch(ranks):
    """tests/mpi_worker.py on real ranks: uneven shards (one rank holds a single sample; with 4
    ranks one holds none), y, dx, running statistics and the summed dgamma and dbeta against
    single-process bnfast on the whole batch, running statistics the same bits on every rank,
    the layer, evaluation on one rank alone, and a mismatched eps raised on every rank."""
    env = {**os.environ, "UCX_TLS": "self,sm", "NUMBA_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("mpi_worker.py")
    r = subprocess.run(
        [_MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py", str(worker)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # ranks share stdout, so lines may interleave: count the reports, not the lines
    assert r.stdout.count("OK rank") == ranks * (6 + 2 + 1 + 1), r.stdout + r.stderr


@pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))
def test_data_parallel_example_matches_one_process():
    """examples/data_parallel.py over 2 ranks (uneven shards of each minibatch) ends with the
    weights and running statistics of one process on the full minibatches (the example
    asserts 1e-9 and prints the differences)."""
    pytest.importorskip("sklearn")
    example = Path(__file__).resolve().parents[1] / "examples" / "data_parallel.py"
    env = {**os.environ, "UCX_TLS": "self,sm", "NUMBA_NUM_THREADS": "1"}
    r = subprocess.run(
        [_MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", str(example)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 ranks: validation accuracy" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_synced_fused_relu_equals_the_whole_batch(dtype):
    """activation="relu" under comm=: the mask is recomputed from each rank's x and the global
    statistics, so y and dx equal the whole batch's."""
    rng = np.random.default_rng(9)
    x = rng.normal(1.0, 2.0, (14, 6, 5)).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    y, cache = bnfast.forward(x, activation="relu")
    dx, _, _ = bnfast.backward(dy, cache)

    def work(rank, comm, shard):
        sy, sc = bnfast.forward(x[shard], activation="relu", comm=comm)
        return sy, bnfast.backward(dy[shard], sc)[0]

    results, errors, _ = _run_ranks([3, 11], work)
    assert not errors, errors
    tol = 1e-12 if dtype == np.float64 else 2.4e-7
    for got, want in (
        (np.concatenate([r[0] for r in results]), y),
        (np.concatenate([r[1] for r in results]), dx),
    ):
        assert np.all(np.abs(got - want) <= tol * np.maximum(np.abs(want), 1.0))
