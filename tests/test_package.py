"""Packaging and documentation: layout of the installed package, doctests, the registry."""

from __future__ import annotations

import doctest
import hashlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bnfast
from bnfast import _compare as cmp


def test_kernels_ship_only_inside_bnfast(tmp_path):
    """``bnfast.kernels`` imports; a top-level ``kernels`` does not (run outside the repo)."""
    code = (
        "import importlib.util, bnfast.kernels;print(importlib.util.find_spec('kernels') is None)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


def test_py_typed_is_shipped():
    assert (Path(bnfast.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize(
    "module", ["bnfast._core", "bnfast._layer", "bnfast._fold", "bnfast.reference"]
)
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_public_surface():
    assert set(bnfast.__all__) == {
        "BatchNorm",
        "BatchNormCache",
        "backward",
        "backward_from_input",
        "fold_into_conv",
        "fold_into_linear",
        "forward",
        "moments",
        "momentum_from_decay",
    }
    assert all(callable(getattr(bnfast, name)) for name in bnfast.__all__)


def test_declared_signatures_compile():
    """Every kernel of every family declares float32 and float64, C-contiguous, and compiles
    for both; the parallel ones carry a serial twin of the same code; the rescue kernels are
    serial."""
    from bnfast import kernels

    for name, family in kernels.FAMILIES.items():
        for k in kernels.KERNELS:
            dispatcher = getattr(family, k)
            for d in (dispatcher, dispatcher.serial, getattr(dispatcher, "small", dispatcher)):
                assert {str(sig.args[0].dtype) for sig in d.declared} == {"float32", "float64"}
                assert {sig.args[0].layout for sig in d.declared} == {"C"}, (name, k)
    for d in kernels.RESCUE:
        assert {str(sig.args[0].dtype) for sig in d.declared} == {"float32", "float64"}
    twins = sum(
        3 if hasattr(getattr(family, k), "small") else 2
        for family in kernels.FAMILIES.values()
        for k in kernels.KERNELS
    )
    assert twins == 2 * (4 * 2 + 2)  # forward and backward have a fused-only small twin
    n = twins * 2 + len(kernels.RESCUE) * 2
    assert kernels.compile_all() == n


def test_kernel_helpers_are_linked_only():
    """With the linking hook on (``kernels._jit``), a helper only kernels call is finalized for
    linking only (kept as IR for the kernels, cached as bitcode: the marker is its library's
    own ``serialize_using_object_code``), while a function with a Python entry (a shared
    helper's ``.python`` twin) compiles as numba does it. Fails when a helper stops being
    recognized (a renamed decorator, a moved module), which would bring back seconds of
    compilation without any test noticing."""
    from bnfast.kernels import _jit, common

    if not _jit.LINKING_HOOK:
        pytest.skip("this numba's internals differ: helpers compile as numba does it")
    common.clip.compile("float64(float64, float64, float64)")
    common.update_running.python.compile(
        "void(float64[::1], float64[::1], float64[::1], float64[::1], float64[::1])"
    )
    for dispatcher, linked in ((common.clip, True), (common.update_running.python, False)):
        for sig, cres in dispatcher.overloads.items():  # (other tests may have compiled more)
            marked = "serialize_using_object_code" in vars(cres.library)
            assert marked is linked, (dispatcher.py_func.__qualname__, sig)


def test_calls_use_the_declared_types():
    """bnfast passes exactly the declared types, so no call compiles an extra specialization
    (which would cost start-up time), whatever the input's layout."""
    from bnfast import kernels

    rng = np.random.default_rng(0)
    for shape, axis in (((64, 8), 1), ((4, 8, 100), 1), ((2, 3, 4, 5), 1), ((6, 4, 3), -1)):
        x = rng.normal(size=shape).astype(np.float32)
        for v in (x, x[::-1], np.asfortranarray(x)):
            y, cache = bnfast.forward(v, axis=axis, activation="relu")
            bnfast.backward(np.ones_like(v), cache)
            c = shape[axis]
            rm, rv = np.zeros(c), np.ones(c)
            rm.flags.writeable = False
            _, eval_cache = bnfast.forward(
                v, axis=axis, training=False, running_mean=rm, running_var=rv
            )
            bnfast.backward(np.ones_like(v), eval_cache)
            bnfast.moments(v, axis=axis)
            bnfast.backward_from_input(np.ones_like(v), v, axis=axis)
    for family in ("rows", "lanes"):
        for k in kernels.KERNELS:
            dispatcher = getattr(kernels.FAMILIES[family], k)
            for d in (dispatcher, dispatcher.serial, getattr(dispatcher, "small", dispatcher)):
                extra = set(d.signatures) - {tuple(s.args) for s in d.declared}
                assert not extra, (family, k, extra)


def test_small_calls_keep_plans_with_the_compiled_kernels():
    """From a trainer's second call on, a small forward, backward and layer step run the
    compiled kernel's entry point (``_threading.small_launch``), the one declared overload for
    the dtype; a first call that compiles it keeps no plan (it runs the checked way). Fails
    when plans stop carrying the entry points (numba's dispatch again, 0.3 us a call)."""
    from bnfast import _core, _threading

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 48)).astype(np.float32)
    rm, rv = np.zeros(48, np.float32), np.ones(48, np.float32)
    small = _threading._SMALL["lanes"]
    canon = (32, 48, 1)
    bn = bnfast.BatchNorm(48)
    for _ in range(2):
        y, cache = bnfast.forward(x, running_mean=rm, running_var=rv)
        bnfast.backward(np.ones_like(x), cache)
        bn.backward(bn(x))
    entries = (small.forward.entry(x.dtype), small.backward.entry(x.dtype))
    assert None not in entries
    assert _threading.small_launch(canon, x.dtype, "forward")[0] is entries[0]
    forward_plans = [p for k, p in _core._FORWARD_PLANS.items() if k[0] == x.shape]
    assert forward_plans and all(p.launch[0] is entries[0] for p in forward_plans)
    backward_plans = [p for k, p in _core._BACKWARD_PLANS.items() if k[0] is cache.layout]
    assert backward_plans and all(p[2][0] is entries[1] for p in backward_plans)
    assert bn._plan is not None and bn._plan.launch[0] is entries[0]


@pytest.mark.parametrize("op", cmp.OPERATIONS)
def test_registry_implementations_agree(op):
    """Every available implementation in the shared registry matches the reference on small
    versions of the bench layouts."""
    for case in (
        cmp.Case("2-D", (16, 8)),
        cmp.Case("NCHW", (4, 3, 5, 6)),
        cmp.Case("NHWC", (4, 5, 6, 3), -1),
    ):
        inp = cmp.make_inputs(case, seed=1)
        want = cmp.IMPLEMENTATIONS["numpy"].prepare(op, inp)()
        for name, impl in cmp.available().items():
            got = impl.prepare(op, inp)()
            assert len(got) == len(want)
            err = cmp.max_error(got, want)
            assert err < (1e-3 if name == "pytorch" else 1e-5), f"{op} {case.label} {name}: {err}"
            assert all(
                np.asarray(g).shape == np.asarray(w).shape for g, w in zip(got, want, strict=True)
            )


def test_readme_quick_start_runs():
    """The README's quick start is real code: run it."""
    import re

    readme = Path(__file__).resolve().parents[1] / "README.md"
    block = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)[0]
    scope: dict = {}
    exec(compile(block, str(readme), "exec"), scope)
    assert scope["y"].shape == (64, 256) and scope["bn"].num_batches_tracked == 1


def test_main_job_measures_checks_and_reports(tmp_path):
    """The main job's pieces on one small case: records, table, JSON, plot."""
    import json

    from bnfast import __main__ as main_job

    case = cmp.Case("2-D 64x8", (64, 8))
    impls = cmp.available()
    records, failures = main_job.measure(("forward",), (case,), [1], impls, 0.01, lambda m: None)
    assert not failures
    assert {r["impl"] for r in records} == set(impls)
    b = next(r for r in records if r["impl"] == "bnfast")
    assert b["ms"] > 0 and b["read_gbs"] > 0 and b["err"] < 1e-5
    assert abs(b["gbs"] - 3 * case.nbytes / b["ms"] / 1e6) < 1e-9 * b["gbs"]
    text = main_job.table(records, "forward", 1, impls)
    assert "2-D 64x8" in text and "bnfast ms" in text
    path = tmp_path / "r.json"
    path.write_text(json.dumps(records))
    assert json.loads(path.read_text())[0]["op"] == "forward"
    pytest.importorskip("matplotlib")
    main_job.plot(records, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_main_job_times_thread_counts_side_by_side(monkeypatch):
    """Every thread count of a case is timed in the same interleaved rounds: each sample runs
    at the thread count its setup set (recorded here through ``numba.get_num_threads``), and
    each (impl, thread count) gets its record, checked against the reference."""
    import numba

    from bnfast import __main__ as main_job

    seen: dict = {}
    real = cmp.interleaved_ms

    def spy(fns, **kw):
        wrapped = {}
        for key, fn in fns.items():

            def run(fn=fn, key=key):
                seen.setdefault(key, set()).add(numba.get_num_threads())
                return fn()

            wrapped[key] = run
        return real(wrapped, **kw)

    monkeypatch.setattr(cmp, "interleaved_ms", spy)
    most = numba.config.NUMBA_NUM_THREADS
    threads = sorted({1, min(2, most)})
    before = numba.get_num_threads()
    numba.set_num_threads(1)  # the caller's count, which the last (2-thread) sample changes
    case = cmp.Case("2-D 64x8", (64, 8))
    impls = cmp.available()
    records, failures = main_job.measure(("inference",), (case,), threads, impls, 0.01, print)
    assert not failures
    timed = [name for name in impls if name != "numpy"]
    assert seen == {(name, n): {n} for name in timed for n in threads}
    assert sorted((r["impl"], r["threads"]) for r in records) == sorted(
        (name, n) for name in impls for n in threads
    )
    restored = numba.get_num_threads()
    numba.set_num_threads(before)
    assert restored == 1  # the caller's count, restored


def test_thread_summary_counts_cells_slower_on_two_threads():
    """The grid's "2 threads never slower than 1" line: slower cells counted, those below
    ``SERIAL_BELOW`` (the same serial code at both counts) named apart."""
    from bnfast import __main__ as main_job
    from bnfast import _machine

    small, big = _machine.SERIAL_BELOW // 2, _machine.SERIAL_BELOW * 4

    def rec(case, n, ms, nbytes):
        return dict(op="forward", case=case, threads=n, impl="bnfast", ms=ms, nbytes=nbytes)

    records = [
        rec("a", 1, 1.0, small),
        rec("a", 2, 1.1, small),  # slower, serial
        rec("b", 1, 2.0, big),
        rec("b", 2, 2.5, big),  # slower, parallel: named
        rec("c", 1, 2.0, big),
        rec("c", 2, 1.0, big),  # faster
    ]
    line = main_job.thread_summary(records)
    assert line.startswith("2 threads slower than 1 on 2/3 cells: 1 below")
    assert "parallel: forward b 0.80x" in line and "forward a" not in line
    assert main_job.thread_summary(records[4:]).startswith("2 threads slower than 1 on 0/1")


def test_every_prange_loop_runs_in_parallel(tmp_path):
    """Each ``prange`` loop of every parallel kernel becomes a parallel region: numba silently
    runs one serially when it does not recognize it (``prange(a if b else c)`` did that). In a
    fresh cache, so that numba compiles (its diagnostics are not cached)."""
    code = """
import inspect, re, numpy as np
from bnfast.kernels import FAMILIES, KERNELS
from bnfast.kernels._jit import compile_declared
for fam in FAMILIES.values():
    for name in KERNELS:
        d = getattr(fam, name)
        compile_declared(d, np.dtype(np.float32))
        loops = len(re.findall(r"in prange\\(", inspect.getsource(d.py_func)))
        found = len(next(iter(d.overloads.values())).metadata["parfor_diagnostics"].initial_parfors)
        print(fam.__name__, name, loops, found)
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "BNFAST_QUIET": "1"}
    env["BNFAST_COMPILE_AHEAD"] = "0"  # a kernel a helper compiled is loaded: no diagnostics
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr
    lines = [line.split() for line in r.stdout.splitlines()]
    assert len(lines) == 8, r.stdout
    for family, name, loops, found in lines:
        assert int(loops) >= 1 and loops == found, (family, name, loops, found)


AHEAD_SCRIPT = """
import hashlib, numpy as np, bnfast
from numba.core import event
from bnfast.kernels import lanes
compiled = []
class Seen(event.Listener):
    def on_start(self, ev):
        compiled.append(ev.data.get("dispatcher"))
    def on_end(self, ev):
        pass
event.register("numba:compile", Seen())
rng = np.random.default_rng(0)
x, dy = rng.normal(size=(2, 64, 256)).astype(np.float32)
bn = bnfast.BatchNorm(256)
y = bn(x)
dx = bn.backward(dy)
digest = hashlib.sha256(y.tobytes() + dx.tobytes() + bn.running_var.tobytes()).hexdigest()
print(any(d is lanes.forward.small for d in compiled),
      any(d is lanes.backward.small for d in compiled), digest)
"""


@pytest.mark.parametrize("ahead", ["1", "0"])
def test_first_step_compiles_backward_in_a_helper_process(ahead, tmp_path):
    """With an empty cache, the first forward compilation starts a helper process that compiles
    the backward kernel (``bnfast._ahead``): this process compiles the forward and loads the
    backward from the cache; the same bits as with ``BNFAST_COMPILE_AHEAD=0``, where it
    compiles both itself."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "BNFAST_QUIET": "1"}
    env["BNFAST_COMPILE_AHEAD"] = ahead
    r = subprocess.run(
        [sys.executable, "-c", AHEAD_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    forward, backward, digest = r.stdout.split()
    assert forward == "True"
    assert backward == ("False" if ahead == "1" else "True")
    x, dy = np.random.default_rng(0).normal(size=(2, 64, 256)).astype(np.float32)
    bn = bnfast.BatchNorm(256)
    y = bn(x)
    dx = bn.backward(dy)
    assert hashlib.sha256(y.tobytes() + dx.tobytes() + bn.running_var.tobytes()).hexdigest() == (
        digest
    )


NOTICE_SCRIPT = """
import numpy as np, bnfast
x = np.random.default_rng(0).normal(size=(16, 8))
for dtype in (np.float32, np.float64):
    y, cache = bnfast.forward(x.astype(dtype))
    bnfast.backward(np.ones_like(y), cache)
"""


@pytest.mark.parametrize("quiet", [False, True])
def test_first_use_says_once_that_it_compiles(quiet, tmp_path):
    """With an empty cache, the first compilation prints one note on stderr (what, where it is
    cached, how to hide it), however many kernels and dtypes follow; BNFAST_QUIET=1 hides it."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    env.pop("BNFAST_QUIET", None)
    if quiet:
        env["BNFAST_QUIET"] = "1"
    r = subprocess.run(
        [sys.executable, "-c", NOTICE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("bnfast: compiling")]
    if quiet:
        assert notes == [], r.stderr
    else:
        assert len(notes) == 1, r.stderr
        assert str(tmp_path) in notes[0] and "BNFAST_QUIET=1" in notes[0]


def test_kernel_cache_stamp_covers_every_kernel_module(tmp_path, monkeypatch):
    """A cached kernel carries its helpers' machine code, from other modules of
    ``bnfast.kernels`` too, while numba stamps a cache entry with the kernel's own file only:
    bnfast's locator adds every module of the package to the stamp, so editing ``common.py``
    alone invalidates the ``lanes`` and ``rows`` kernels."""
    from bnfast.kernels import _jit, common, lanes, rows

    for dispatcher in (lanes.forward, rows.backward, lanes.forward.serial, common.rescue):
        locator = dispatcher._cache._impl.locator
        assert type(locator).__name__.startswith("Kernels")
        files = {name for name, _, _ in locator.get_source_stamp()[1]}
        assert {"common.py", "lanes.py", "rows.py", "_jit.py"} <= files
    # the stamp follows any module's modification time or size
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    monkeypatch.setattr(_jit, "_HERE", tmp_path)
    _jit._package_stamp.cache_clear()
    before = _jit._package_stamp()
    (tmp_path / "b.py").write_text("y = 22\n")
    _jit._package_stamp.cache_clear()
    after = _jit._package_stamp()
    monkeypatch.undo()
    _jit._package_stamp.cache_clear()
    assert before != after and [f for f, _, _ in before] == ["a.py", "b.py"]
