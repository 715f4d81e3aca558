"""The parallel path: correct on every family, bitwise independent of the thread count, safe
under concurrent calls from Python threads and in a forked child."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from types import SimpleNamespace

import numba
import numpy as np
import pytest

import bnfast
from bnfast import _core, _threading
from bnfast import reference as ref
from bnfast._machine import TUNE
from bnfast.kernels._jit import TUNE_L2, TUNE_STREAM, TUNE_STRIP, TUNE_WIDE
from conftest import assert_channels_close, backward_tolerance, describe, forward_tolerance


def _parallel_size(shape, axis):
    """``shape`` with its first non-channel axis scaled so that float32 data is at least
    SERIAL_BELOW bytes (which follows this machine's L2), so the parallel kernels run."""
    a = 1 if axis % len(shape) == 0 else 0
    k = -(-_threading.SERIAL_BELOW // (4 * int(np.prod(shape))))
    return tuple(n * max(1, k) if i == a else n for i, n in enumerate(shape))


def _two_pass_rows(lanes):
    """Rows of ``lanes`` float32 lanes making x twice the lanes family's fused strip budget
    (``TUNE_STRIP``, from this machine's L2), a multiple of 60, so the two-pass route runs."""
    rows = 2 * int(TUNE[TUNE_STRIP]) // (4 * lanes)
    return rows // 60 * 60 + 60


def _beyond_l2(per_outer):
    """Outer indices making float32 x (``per_outer`` values each) about twice one core's L2:
    the rows family then takes the memory-order route (``rows.fused``), an odd count."""
    return 2 * int(TUNE[TUNE_L2]) // (4 * per_outer) // 2 * 2 + 1


def _cached_rows(lanes):
    """Rows of ``lanes`` float32 lanes making x half the fused strip budget (twice L2): one fused
    tile that threads cannot split when lanes < 512, so ``lanes.geometry`` takes the two-pass
    partition with grouped row blocks (at every thread count)."""
    return int(TUNE[TUNE_STRIP]) // (2 * 4 * lanes)


def _streaming_rows(lanes):
    """An odd count of rows of ``lanes`` float32 lanes making x at least ``TUNE_STREAM`` bytes
    (half this machine's last-level cache): the lanes family's wide tiles (``TUNE_WIDE``)."""
    return -(-int(TUNE[TUNE_STREAM]) // (4 * lanes)) // 2 * 2 + 1


_WIDE = int(TUNE[TUNE_WIDE])

# One per family and layout kind, scaled above SERIAL_BELOW. (Below one core's L2 an array
# with fewer than 512 lanes per row is a single task and runs the serial twin, the same code:
# ``_threading.kernels_for``; the two-pass cases are beyond L2 and run in parallel.)
CASES = [
    (label, _parallel_size(shape, axis), axis)
    for label, shape, axis in [
        # Rows narrower than WIDE_LANES, read k at a time (lanes.replicas): fused and two-pass,
        # with inner > 1, and with a prime row count (no k divides it: rows stay narrow).
        ("lanes narrow rows, fused", (6000, 5), 1),
        ("lanes narrow rows, two-pass", (_two_pass_rows(5), 5), 1),
        ("lanes narrow rows, inner > 1", (_two_pass_rows(15), 3, 5), 1),
        ("lanes narrow rows, prime count", (104729, 5), 1),
        ("rows NCHW", (8, 8, 48, 50), 1),
        ("rows NCHW beyond L2, memory order", (_beyond_l2(8 * 48 * 50), 8, 48, 50), 1),
        ("rows 3-D", (3, 5, 12000), 1),
        ("rows, unfused (C < 4)", (2, 3, 40000), 1),
        ("lanes 2-D", (4096, 40), 1),
        ("lanes NHWC C=3", (16, 60, 60, 3), -1),
        ("lanes small inner", (1700, 16, 5), 1),
        ("lanes wide C", (80, 2000), 1),
        ("lanes one unsplittable tile in cache", (_cached_rows(256), 256), 1),
        # The strip budget would cut 2 KiB rows into 1 KiB segments over a strip beyond L2:
        # two-pass (lanes.geometry's page rule).
        ("lanes strips shorter than a page", (_two_pass_rows(512), 512), 1),
        # Rows of a page take several rows per pass in the write pass (beyond the strip
        # budget) and the dx pass (lanes.affine_rows, gradient_pairs): an odd row count leaves
        # a last row (and row blocks) to the one-row loop; NCHW 6x6 tiles of 1008 lanes
        # (lanes.NEAR_PAGE) and a 288-lane last tile that keeps one row.
        ("lanes page rows in cache, odd count", (257, 1024), 1),
        ("lanes page rows, two-pass, odd count", (_two_pass_rows(1024) + 1, 1024), 1),
        ("lanes tiles of 1008 lanes (6x6)", (_two_pass_rows(2304) + 1, 64, 6, 6), 1),
        # Streaming from memory: wide tiles, and a last tile of 4 lanes.
        ("lanes wide tiles", (_streaming_rows(_WIDE + 4), _WIDE + 4), 1),
    ]
]


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(3, 2, shape).astype(dtype), rng.normal(size=shape).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("label,shape,axis", CASES, ids=[c[0] for c in CASES])
def test_parallel_families_match_reference(label, shape, axis, dtype):
    x, dy = _data(shape, dtype)
    assert x.nbytes >= _threading.SERIAL_BELOW
    c = shape[axis]
    g, b = np.linspace(0.5, 1.5, c).astype(dtype), np.linspace(-1, 1, c).astype(dtype)
    for training in (True, False):
        rm, rv = np.linspace(2, 4, c), np.linspace(3, 5, c)
        y, cache = bnfast.forward(
            x, g, b, axis=axis, training=training, running_mean=rm.copy(), running_var=rv.copy()
        )
        y_ref, cache_ref = ref.forward(
            x, g, b, axis=axis, training=training, running_mean=rm.copy(), running_var=rv.copy()
        )
        what = describe(x, axis, f"{label} training={training}")
        assert_channels_close(y, y_ref, forward_tolerance(x, axis, cache_ref), axis, what)
        got, want = bnfast.backward(dy, cache), ref.backward(dy, cache_ref)
        for name, gg, w, t in zip(
            ("dx", "dgamma", "dbeta"),
            got,
            want,
            backward_tolerance(x, dy, axis, cache_ref),
            strict=True,
        ):
            assert_channels_close(gg, w, t, axis, f"{what} {name}")


IN_PLACE_CASES = [("lanes small", (64, 48), 1), ("rows small", (4, 6, 9, 10), 1), *CASES]


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("label,shape,axis", IN_PLACE_CASES, ids=[c[0] for c in IN_PLACE_CASES])
def test_in_place_calls_give_the_same_bits(label, shape, axis, dtype, activation):
    """Inference with ``out=x`` and backward with ``out=dy`` (training and frozen) write the
    bits of the out-of-place calls: every write loop reads its input through the output when
    they are the same array (``kernels.common.same``: the vectorized in-place loops)."""
    x, dy = _data(shape, dtype)
    c = shape[axis]
    rm, rv = np.linspace(2, 4, c).astype(dtype), np.linspace(3, 5, c).astype(dtype)
    kw = dict(axis=axis, activation=activation)
    y, _ = bnfast.forward(x, training=False, running_mean=rm, running_var=rv, **kw)
    xi = x.copy()
    assert (
        bnfast.forward(xi, training=False, running_mean=rm, running_var=rv, out=xi, **kw)[0] is xi
    )
    np.testing.assert_array_equal(xi, y, err_msg=f"{label}: inference out=x")
    for training in (True, False):
        _, cache = bnfast.forward(
            x, training=training, running_mean=rm.copy(), running_var=rv.copy(), **kw
        )
        want = bnfast.backward(dy, cache)
        dyi = dy.copy()
        got = bnfast.backward(dyi, cache, out=dyi)
        assert got[0] is dyi
        for name, a, b in zip(("dx", "dgamma", "dbeta"), got, want, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{label}: {name}, training={training}")


def _page_gap(a, b):
    """Where b starts within a page, in bytes after a's start."""
    return (b.ctypes.data - a.ctypes.data) % 4096


@pytest.mark.parametrize("activation", [None, "relu"])
def test_fresh_outputs_never_start_just_after_x(activation):
    """Beyond the strip budget, with rows of a page (written four rows per pass), a fresh
    forward output never starts fewer than ``_checks.PLACE_NEAR`` bytes after x within a page,
    wherever x starts (every line of a page tried), nor does a layer's kept buffer; a re-placed
    output holds the bits written into a caller's array at x's own offset; within the budget a
    fresh output is an ordinary array."""
    from bnfast._checks import PLACE_NEAR

    shape = (_two_pass_rows(1024) + 1, 1024)
    x0 = _data(shape, np.float32)[0]
    c = shape[1]
    rm, rv = np.linspace(2, 4, c).astype(np.float32), np.linspace(3, 5, c).astype(np.float32)
    buf = np.empty(x0.nbytes + 4096, np.uint8)
    buf[: x0.nbytes] = x0.view(np.uint8).ravel()
    for at in range(0, 4096, 64):  # x at every line of a page
        x = np.ndarray(shape, np.float32, buf, at)
        y, _ = bnfast.forward(x, training=False, running_mean=rm, running_var=rv)
        assert _page_gap(x, y) >= PLACE_NEAR, at
    for training in (True, False):
        kw = dict(training=training, activation=activation)
        for out_at in (0, 16, 512):  # a caller's out= at a near offset is used as given
            room = np.empty(x0.nbytes + 8192, np.uint8)
            lead = (x0.ctypes.data + out_at - room.ctypes.data) % 4096
            out = np.ndarray(shape, np.float32, room, lead)
            got = bnfast.forward(x0, running_mean=rm.copy(), running_var=rv.copy(), out=out, **kw)
            assert got[0] is out and _page_gap(x0, out) == out_at
        y, _ = bnfast.forward(x0, running_mean=rm.copy(), running_var=rv.copy(), **kw)
        assert _page_gap(x0, y) >= PLACE_NEAR
        assert y.flags.c_contiguous and y.flags.writeable and not np.shares_memory(x0, y)
        np.testing.assert_array_equal(y, out)
    layer = bnfast.BatchNorm(c, activation=activation, reuse_buffers=True)
    for _ in range(2):
        y = layer(x0)
    assert _page_gap(x0, y) >= PLACE_NEAR
    small = x0[:257]
    assert small.nbytes <= TUNE[TUNE_STRIP]
    assert bnfast.forward(small, activation=activation)[0].flags.owndata


DETERMINISM_SCRIPT = textwrap.dedent("""
    import hashlib, sys
    import numba, numpy as np
    import bnfast
    from bnfast import _threading
    _threading.ADAPTIVE = False  # every thread count on the parallel kernels
    shapes = %r
    def digest(arrays):
        h = hashlib.sha256()
        for a in arrays:
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()
    for label, shape, axis in shapes:
        rng = np.random.default_rng(1)
        for dtype in (np.float32, np.float64):
            x = rng.normal(3, 2, shape).astype(dtype)
            dy = rng.normal(size=shape).astype(dtype)
            results = []
            for k in range(1, 9):
                numba.set_num_threads(k)
                y, cache = bnfast.forward(x, axis=axis)
                dx, dg, db = bnfast.backward(dy, cache)
                mean, var = bnfast.moments(x, axis=axis)
                results.append(digest([y, cache.mean, cache.invstd, dx, dg, db, mean, var]))
            _threading._serial_only = True  # the serial twins of the same kernels
            y, cache = bnfast.forward(x, axis=axis)
            dx, dg, db = bnfast.backward(dy, cache)
            mean, var = bnfast.moments(x, axis=axis)
            results.append(digest([y, cache.mean, cache.invstd, dx, dg, db, mean, var]))
            _threading._serial_only = False
            print(label, np.dtype(dtype).name, len(set(results)), numba.threading_layer())
""")


@pytest.mark.parametrize("layer", ["default", "omp"])
def test_bitwise_identical_for_1_to_8_threads(layer, tmp_path):
    """numba.set_num_threads(k) for k = 1..8 and the serial twins give the same bits."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "8", "NUMBA_THREADING_LAYER": layer}
    r = subprocess.run(
        [sys.executable, "-c", DETERMINISM_SCRIPT % (CASES,)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 * len(CASES)
    for line in lines:
        assert line.split()[-2] == "1", f"results differ across thread counts: {line}"


def test_concurrent_calls_from_8_threads_equal_serial_calls():
    shapes = [(c[1], c[2]) for c in CASES] + [((8, 64, 32, 32), 1), ((8, 16, 16, 64), -1)]
    inputs = [(_data(s, np.float32, seed=i), s, a) for i, (s, a) in enumerate(shapes)]
    expected = []
    for (x, dy), _, axis in inputs:
        y, cache = bnfast.forward(x, axis=axis)
        expected.append((y, *bnfast.backward(dy, cache)))
    errors = []

    def work(t):
        try:
            for rep in range(3):
                i = (t + rep) % len(inputs)
                (x, dy), _, axis = inputs[i]
                y, cache = bnfast.forward(x, axis=axis)
                got = (y, *bnfast.backward(dy, cache))
                for g, e in zip(got, expected[i], strict=True):
                    if not np.array_equal(g, e):
                        errors.append(f"thread {t}, input {i}: result differs")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"thread {t}: {exc!r}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


FORK_SCRIPT = textwrap.dedent("""
    import os, numba, numpy as np, bnfast
    x = np.random.default_rng(0).normal(size=(8, 16, 4096)).astype(np.float32)
    y, cache = bnfast.forward(x)              # parallel: the pool is running now
    dx = bnfast.backward(np.ones_like(x), cache)[0]
    layer = numba.threading_layer()
    pid = os.fork()
    if pid == 0:
        y2, cache2 = bnfast.forward(x)
        dx2 = bnfast.backward(np.ones_like(x), cache2)[0]
        os._exit(0 if np.array_equal(y, y2) and np.array_equal(dx, dx2) else 3)
    _, status = os.waitpid(pid, 0)
    print(layer, os.waitstatus_to_exitcode(status))
""")


@pytest.mark.parametrize("layer", ["default", "omp", "workqueue"])
def test_forked_child_can_call_bnfast(layer, tmp_path):
    """A process forked after a parallel call runs bnfast in the child, same results, no hang
    (GNU OpenMP: the child runs the serial twins; TBB and workqueue are fork-safe)."""
    env = {**os.environ, "NUMBA_THREADING_LAYER": layer}
    r = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    used, child_status = r.stdout.split()
    assert child_status == "0", f"child failed under {used}: {r.stderr}"
    if layer != "default":
        assert used == layer


WORKQUEUE_SCRIPT = textwrap.dedent("""
    import threading, numba, numpy as np, bnfast
    from bnfast import _threading
    x = np.random.default_rng(0).normal(size=%r).astype(np.float32)
    dy = np.ones_like(x)
    _threading._serial_only = True
    y0, c0 = bnfast.forward(x)
    want = (y0, *bnfast.backward(dy, c0))
    _threading._serial_only = False
    errors = []
    def work():
        try:
            for _ in range(20):
                y, cache = bnfast.forward(x)
                got = (y, *bnfast.backward(dy, cache))
                if not all(np.array_equal(g, w) for g, w in zip(got, want)):
                    errors.append("results differ")
        except Exception as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(numba.threading_layer(), len(errors), errors[:1])
""")


def test_four_threads_under_the_workqueue_layer(tmp_path):
    """numba's workqueue layer aborts the process when two threads launch parallel kernels at
    once (issue 8 item 11): bnfast lets one thread at a time run in parallel and the others
    run the serial twins; all four threads get the serial results."""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    # 1024 lanes: several fused tiles, so the parallel kernels run (an array below L2 with
    # fewer than 512 lanes is one task, which runs serially: _threading.kernels_for)
    shape = _parallel_size((128, 1024), 1)
    r = subprocess.run(
        [sys.executable, "-c", WORKQUEUE_SCRIPT % (shape,)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    layer, n_errors, first = r.stdout.split(maxsplit=2)
    assert layer == "workqueue" and n_errors == "0", r.stdout


FORK_DURING_COMPILE_SCRIPT = textwrap.dedent("""
    import os, threading, time, numpy as np, bnfast
    from bnfast.kernels import _jit
    from numba.core.compiler_lock import global_compiler_lock
    x = np.random.default_rng(0).normal(size=(64, 8))
    bnfast.forward(x.astype(np.float32))  # float32 compiled; float64 not yet
    held = threading.Event()
    def compiling(lock):  # a thread in the middle of a compilation, holding the lock
        with lock:
            held.set()
            time.sleep(1.0)
    for lock in (_jit._COMPILE, global_compiler_lock):
        held.clear()
        t = threading.Thread(target=compiling, args=(lock,))
        t.start()
        held.wait()
        pid = os.fork()
        if pid == 0:  # the child compiles the float64 kernels: it must not wait forever
            y, _ = bnfast.forward(x)
            os._exit(0 if np.isfinite(y).all() else 3)
        _, status = os.waitpid(pid, 0)
        t.join()
        print(os.waitstatus_to_exitcode(status))
""")


def test_fork_while_another_thread_compiles(tmp_path):
    """A child forked while another thread holds the compile locks (a compilation in
    progress) compiles its own kernels: fork waits for the compilation and the child starts
    with free locks (it used to wait forever on a lock held by a thread it does not have)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "BNFAST_QUIET": "1"}
    r = subprocess.run(
        [sys.executable, "-c", FORK_DURING_COMPILE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "0"], r.stdout + r.stderr


def _drive(runs, cost, calls):
    """Run ``calls`` calls through ``runs`` with the given seconds per way; the ways taken."""
    ways = []
    for _ in range(calls):
        serial = runs.way() if runs.due() else runs.serial  # as _Adaptive.__call__
        ways.append(serial)
        runs.record(serial, cost[serial])
    return ways


def test_runs_choose_the_faster_way_and_probe_the_other_within_a_time_budget():
    """``_threading._Runs``: two calls each way first (the first may have compiled), then the
    faster way; the other tried again (PROBE_CALLS calls in a row: the first may wake sleeping
    workers) once the calls since the last probe took PROBE_BUDGET times a probe's time (so
    probes cost ~1% of the time), and taken at once when it wins."""
    runs = _threading._Runs()
    ways = _drive(runs, {False: 3.0, True: 1.0}, 2000)  # serial faster
    assert ways[:4] == [False, False, True, True]
    probes = [i for i, serial in enumerate(ways) if i >= 4 and not serial]
    pair = _threading.PROBE_CALLS
    starts = probes[::pair]
    assert probes == [i + k for i in starts for k in range(pair)]  # in a row
    budget = int(_threading.PROBE_BUDGET * pair * 3.0 / 1.0)  # serial calls between probes
    assert starts[0] == 4 + budget and len(starts) >= 3
    assert np.diff(starts).tolist() == [budget + pair] * (len(starts) - 1)
    ways = _drive(runs, {False: 0.5, True: 1.0}, 2 * budget)  # now parallel is faster
    switch = ways.index(False)  # the next probe finds it, and it stays
    assert switch <= budget and not any(ways[switch : switch + 300])  # 100 x 2 x 1.0 s apart


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two threads")
def test_adaptive_calls_run_the_faster_twin_with_the_same_bits(monkeypatch):
    """With ``ADAPTIVE`` on, a call runs the serial twin when it has been faster on that kernel
    and shape, the parallel kernel otherwise, and both give the bits of the parallel kernel."""
    x, dy = _data((4096, 64), np.float32)  # 1 MiB: above SERIAL_BELOW on any L2 up to 2 MiB
    assert x.nbytes >= _threading.SERIAL_BELOW
    threads = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        _check_adaptive_runs(x, dy, monkeypatch)
    finally:
        numba.set_num_threads(threads)


def _check_adaptive_runs(x, dy, monkeypatch):
    want_y, cache = bnfast.forward(x)  # ADAPTIVE off (the autouse fixture): parallel
    want = bnfast.backward(dy, cache)
    ran = []
    lanes = _threading._ADAPTIVE["lanes"]
    kernels = {name: getattr(lanes, name) for name in ("forward", "backward")}
    for name, kernel in kernels.items():
        serial = kernel.serial
        monkeypatch.setattr(
            kernel, "serial", lambda *a, _l=serial, _n=name: ran.append((_n, "serial")) or _l(*a)
        )
        parallel = getattr(_threading._PARALLEL["lanes"], name)
        monkeypatch.setattr(
            _threading._PARALLEL["lanes"],
            name,
            lambda *a, _l=parallel, _n=name: ran.append((_n, "parallel")) or _l(*a),
        )
    monkeypatch.setattr(_threading, "_thread_safe_layer", True)  # the plain parallel family
    monkeypatch.setattr(_threading, "_layer", "omp")  # (under TBB: always parallel)
    monkeypatch.setattr(_threading, "ADAPTIVE", True)
    tune = id(_threading.with_threads(2))
    for serial_faster in (True, False):
        for kernel in kernels.values():
            mode = float(
                _core.FORWARD_BATCH if kernel is kernels["forward"] else _core.BACKWARD_TRAIN
            )
            runs = kernel.runs[((4096, 64, 1), tune, mode)] = _threading._Runs()
            runs.twin_ready = True  # compiled (the call above ran the serial kernels)
            _drive(
                runs, {False: 2.0 if serial_faster else 1.0, True: 1.0 if serial_faster else 2.0}, 4
            )
        ran.clear()
        y, cache = bnfast.forward(x)
        got = bnfast.backward(dy, cache)
        way = "serial" if serial_faster else "parallel"
        assert ran == [("forward", way), ("backward", way)]
        np.testing.assert_array_equal(y, want_y)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    for kernel in kernels.values():
        kernel.runs.clear()


def test_a_serial_twin_is_tried_only_once_compiled(monkeypatch):
    """A serial call whose twin is still being compiled (``_ahead.ready`` False: a helper
    process compiles it) runs the parallel kernel, and readiness is asked again only after
    PROBE_MIN_CALLS calls; once ready, the twin is timed."""
    asked = []
    monkeypatch.setattr(_threading._ahead, "ready", lambda d, t: asked.append(d) or False)
    runs = _threading._Runs()
    adaptive = _threading._ADAPTIVE["lanes"].moments
    x = np.ones((4096, 64, 1), np.float32)
    mean, var = np.empty(64), np.empty(64)
    key = (x.shape, id(_threading.with_threads(2)), -1.0)  # moments: no mode
    monkeypatch.setitem(adaptive.runs, key, runs)
    monkeypatch.setattr(_threading, "_thread_safe_layer", True)
    ran = []
    monkeypatch.setattr(_threading._PARALLEL["lanes"], "moments", lambda *a: ran.append("p") or 0)
    twin = SimpleNamespace(dispatcher="twin")
    monkeypatch.setattr(adaptive, "serial", twin)
    args = (x, mean, var, _threading.with_threads(2))
    for _ in range(4 + _threading.PROBE_MIN_CALLS):
        adaptive(*args)
    assert ran == ["p"] * len(ran) and len(asked) == 2  # calls 3 and 4, then none
    assert runs.times[1] == [_threading._NEVER] * _threading.KEEP
    monkeypatch.setattr(_threading._ahead, "ready", lambda d, t: True)
    serial_ran = []
    monkeypatch.setattr(adaptive, "serial", lambda *a: serial_ran.append(a[-1]) or 0)
    adaptive.serial.dispatcher = "twin"
    for _ in range(100_000):  # until the probe: PROBE_BUDGET x the parallel calls' time
        adaptive(*args)
        if serial_ran:
            break
    assert serial_ran and serial_ran[0] is _threading.TUNE  # timed, on one thread
    assert min(runs.times[1]) < _threading._NEVER


IN_CACHE_SCRIPT = textwrap.dedent("""
    import numpy as np
    from bnfast import kernels
    from bnfast.kernels._jit import compile_declared, in_cache
    twin = kernels.FAMILIES["lanes"].moments.serial
    f32 = np.dtype(np.float32)
    before = in_cache(twin, f32)
    compile_declared(twin, f32)  # compiled, and written to the cache
    print(before, in_cache(twin, f32), in_cache(twin, np.dtype(np.float64)))
""")


def test_in_cache_tells_a_load_from_a_compilation(tmp_path):
    """``_jit.in_cache``, which lets an adaptive call load a serial twin itself rather than
    start a helper process: False in an empty cache, True once compiled, per dtype."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "BNFAST_QUIET": "1"}
    command = [sys.executable, "-c", IN_CACHE_SCRIPT]
    r = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "False"]


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two threads")
def test_tbb_runs_the_parallel_kernels(monkeypatch):
    """Under TBB a call above the serial threshold runs the parallel kernels (measured no gain
    from choosing there: ``_threading``), under any other layer the adaptive choice."""
    x3 = np.ones((4096, 64, 1), np.float32)
    threads = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        monkeypatch.setattr(_threading, "ADAPTIVE", True)
        monkeypatch.setattr(_threading, "_thread_safe_layer", True)
        for layer, adaptive in (("tbb", False), ("omp", True), ("workqueue", True)):
            monkeypatch.setattr(_threading, "_layer", layer)
            kernels, tune = _threading.kernels_for(x3, fused=True)
            assert (kernels is _threading._ADAPTIVE["lanes"]) == adaptive, layer
            assert tune[_threading._jit.TUNE_THREADS] == 2
    finally:
        numba.set_num_threads(threads)


def test_held_kernels_follow_the_layer_and_the_thread_count(monkeypatch):
    """``_threading.held``: what a layer's plan may keep across calls above the serial
    threshold. One thread: the serial kernel on any layer; two threads: the parallel kernel
    under TBB (with the 2-thread tuning vector), none under GNU OpenMP or workqueue (their
    choice is made per call), the serial kernel where the shape alone picks it."""
    x3 = np.ones((4096, 256, 1), np.float32)  # 4 MiB: parallel at two threads
    # at the serial threshold, below one core's L2, 64 lanes: one fused tile, serial always
    tall = np.ones((_threading.SERIAL_BELOW // (64 * 4), 64, 1), np.float32)
    assert x3.nbytes >= _threading.SERIAL_BELOW
    assert _threading.SERIAL_BELOW <= tall.nbytes < TUNE[TUNE_L2]
    threads = numba.get_num_threads()
    monkeypatch.setattr(_threading, "_thread_safe_layer", True)
    try:
        for layer in ("tbb", "omp", "workqueue"):
            monkeypatch.setattr(_threading, "_layer", layer)
            numba.set_num_threads(1)
            count, (kernel, tune) = _threading.held(x3, "forward", fused=True)
            assert count == 1
            assert kernel is _threading._SERIAL["lanes"].forward and tune is TUNE
            numba.set_num_threads(2)
            count, launch = _threading.held(x3, "backward", fused=True)
            assert count == 2
            if layer == "tbb":
                assert launch[0] is _threading._PARALLEL["lanes"].backward
                assert launch[1][_threading._jit.TUNE_THREADS] == 2
            else:
                assert launch is None
            kernel, tune = _threading.held(tall, "forward", fused=True)[1]
            assert kernel is _threading._SERIAL["lanes"].forward
    finally:
        numba.set_num_threads(threads)


@pytest.mark.parametrize("layer", ["tbb", "omp"])
def test_planned_layer_calls_follow_thread_count_changes(layer, monkeypatch):
    """A layer's planned calls above the serial threshold keep the kernel for the thread count
    they ran at and take another when ``numba.set_num_threads`` changes it between calls (or
    none where the layer chooses per call): the functional API's bits at every step."""
    monkeypatch.setattr(_threading, "_layer", layer)
    monkeypatch.setattr(_threading, "_thread_safe_layer", True)
    rng = np.random.default_rng(8)
    shape = (2048, 512)  # 4 MiB
    bn = bnfast.BatchNorm(512, activation="relu", reuse_buffers=True)
    threads = numba.get_num_threads()
    try:
        for k in (2, 2, 1, 1, 2, 2, 1):
            numba.set_num_threads(k)
            x = rng.normal(1, 2, shape).astype(np.float32)
            dy = rng.normal(size=shape).astype(np.float32)
            rm, rv = bn.running_mean.copy(), bn.running_var.copy()
            y = bn(x)
            want, cache = bnfast.forward(
                x, bn.gamma, bn.beta, running_mean=rm, running_var=rv, activation="relu"
            )
            np.testing.assert_array_equal(y, want)
            np.testing.assert_array_equal(bn.running_var, rv)
            dx = bn.backward(dy)
            want_dx, dgamma, _ = bnfast.backward(dy, cache)
            np.testing.assert_array_equal(dx, want_dx)
            np.testing.assert_array_equal(bn.dgamma, dgamma)
            p = bn._plan
            for op, held in p.held.items():  # (after the first planned forward)
                assert held[0] == k, op
                assert (held[1] is None) == (layer == "omp" and k > 1), op
        assert set(p.held) == {"forward", "backward"}
    finally:
        numba.set_num_threads(threads)
