"""Which kernels run a call: the layout family, and parallel or serial. Thread and fork safety.

- Family: ``rows`` when the canonical view's rows are long (``inner >= ROWS_MIN``), else
  ``lanes``; both need every data array C-contiguous in the canonical view, which the API
  guarantees (``_checks.Layout.view3``: a view, or one copy).
- Parallel or serial: the serial twin of a parallel kernel is the same code, so both give
  bitwise identical results; serial is used below ``_machine.SERIAL_BELOW`` bytes of x
  (launching the thread pool costs more than it saves there; there forward and backward run
  their fused-only ``.small`` twins, again the same code, falling back to the serial twin
  where those return -1), with one numba thread, and in a forked child whose parent had
  started numba's GNU OpenMP pool (not fork-safe: numba aborts such a child). Above it, under
  any layer but TBB, each call runs whichever of the two was faster lately (``_Adaptive``).
- Fork during compilation: see ``_before_fork``.
- Threads: numba's TBB and OpenMP layers are thread-safe; its ``workqueue`` layer (a host with
  neither) is not: two Python threads launching parallel kernels at once abort the process. Until
  a parallel call has shown a thread-safe layer, and for good under ``workqueue``, one thread
  at a time runs a parallel kernel and a thread that finds it busy runs the serial twin (same
  bits), so concurrent calls stay safe and none waits.
- TBB: numba's TBB layer is thread- and fork-safe. When the ``tbb`` wheel is installed
  (``pip install bnfast[tbb]``) its ``libtbb.so.12`` lives in the environment's ``lib/``, where
  the dynamic loader does not look; ``bnfast._tbb`` loads it before any kernel is compiled
  (numba starts its pool while compiling a parallel kernel), so that numba's default layer order
  (tbb, omp, workqueue) finds it. ``NUMBA_THREADING_LAYER`` set by the user is respected.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from types import SimpleNamespace

import numba
import numpy as np
from numba.core.compiler_lock import global_compiler_lock

from . import _ahead, kernels
from ._machine import SERIAL_BELOW, TUNE, with_threads
from ._tbb import TBB_LOADED  # noqa: F401  (re-exported for tests and the main job)
from .kernels import _jit
from .kernels._jit import ROWS_MIN, Launcher

_announced = False


def _on_compile(dispatcher, sig) -> None:
    """A kernel is about to be compiled (not loaded from the cache): start compiling the next
    kernel of a training step in a helper process (``bnfast._ahead``), and tell the user once
    per process, on stderr, what is happening (instead of a silent pause; ``BNFAST_QUIET=1``
    silences it)."""
    global _announced
    _ahead.start(dispatcher, sig.args[0].dtype)
    if _announced or os.environ.get("BNFAST_QUIET"):
        return
    _announced = True
    where = numba.config.CACHE_DIR or "__pycache__ beside bnfast.kernels"
    sys.stderr.write(
        f"bnfast: compiling {sig.args[0].dtype} kernels for this CPU on first use "
        f"({dispatcher.py_func.__name__}; a few seconds per new kind of call, once: later "
        f"processes load them from numba's cache in {where}). BNFAST_QUIET=1 hides this.\n"
    )
    sys.stderr.flush()


_jit.on_compile = _on_compile
_jit.before_compile = _ahead.wait


def _family(module, serial: bool) -> SimpleNamespace:
    return SimpleNamespace(
        **{
            name: Launcher(getattr(module, name).serial if serial else getattr(module, name))
            for name in kernels.KERNELS
        }
    )


def _small_family(module) -> SimpleNamespace:
    """The serial kernels, with the fused-only ``.small`` twins for forward and backward (see
    ``kernels._jit.ALL_ROUTES``); a kernel returning -1 is rerun by :func:`fallback`'s."""
    family = _family(module, True)
    family.forward = Launcher(module.forward.small)
    family.backward = Launcher(module.backward.small)
    return family


_PARALLEL = {name: _family(kernels.FAMILIES[name], False) for name in ("rows", "lanes")}
_SERIAL = {name: _family(kernels.FAMILIES[name], True) for name in ("rows", "lanes")}
_SMALL = {name: _small_family(kernels.FAMILIES[name]) for name in ("rows", "lanes")}
rescue = Launcher(kernels.rescue)  # the cold kernels (serial), run when a kernel returns bad > 0
rescue_moments = Launcher(kernels.rescue_moments)

_serial_only = False  # set in a forked child whose parent had started GNU OpenMP
_layer_at_fork = None
_thread_safe_layer = False  # True once a parallel call ran under tbb or omp
_layer = None  # numba's threading layer, once a parallel call has started it
_launch = threading.Lock()  # held while a parallel kernel runs under an unsafe/unknown layer


# Compilation across fork: a thread that is compiling holds bnfast's compile lock and numba's
# global compiler lock; a child forked meanwhile inherits them held by a thread it does not
# have, and its first compilation waits forever. So fork takes both (in the order compilation
# does) and releases them on both sides: it waits for a compilation in progress, and the
# child starts with free locks and no half-built compiler state (tests/test_parallel.py).
_NUMBA_COMPILER_LOCK = global_compiler_lock


def _before_fork() -> None:
    global _layer_at_fork
    try:
        _layer_at_fork = numba.threading_layer()
    except ValueError:  # no parallel region ran yet: the child may start any layer afresh
        _layer_at_fork = None
    _jit._COMPILE.acquire()
    _NUMBA_COMPILER_LOCK.acquire()


def _after_fork_in_parent() -> None:
    _NUMBA_COMPILER_LOCK.release()
    _jit._COMPILE.release()


def _after_fork_in_child() -> None:
    global _serial_only, _launch
    _serial_only = _serial_only or _layer_at_fork == "omp"
    _launch = threading.Lock()  # a lock held by another thread at fork time stays held
    _ahead._pending.clear()  # the parent's helper processes are not this child's to wait for
    _NUMBA_COMPILER_LOCK.release()  # held by this (the forking) thread: see above
    _jit._COMPILE.release()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)


class _Guarded:
    """A family's kernels that run in parallel only while no other thread does (see above)."""

    def __init__(self, name: str) -> None:
        self._parallel = _PARALLEL[name]
        self._serial = _SERIAL[name]

    def __getattr__(self, kernel: str):
        def run(*args):
            if not _launch.acquire(blocking=False):
                return getattr(self._serial, kernel)(*args)
            try:
                result = getattr(self._parallel, kernel)(*args)
            finally:
                _launch.release()
            _layer_started()
            return result

        return run


_GUARDED = {name: _Guarded(name) for name in ("rows", "lanes")}


def _layer_started() -> None:
    """Note the threading layer a parallel call started (it is fixed from then on)."""
    global _thread_safe_layer, _layer
    _layer = numba.threading_layer()
    _thread_safe_layer = _layer in ("tbb", "omp")


def _parallel(name: str):
    """A family's parallel kernels: as they are once a thread-safe layer has shown itself,
    else one thread at a time (``_Guarded``)."""
    return _PARALLEL[name] if _thread_safe_layer else _GUARDED[name]


def kernels_for(x3: np.ndarray, general: bool = False, fused: bool = False):
    """``(kernels, tune)``: the family's kernels for a call on the C-contiguous canonical
    (outer, C, inner) x3, and the tuning vector to pass them. ``general``: a mode the
    fused-only ``.small`` twins lack (a synchronized call's given statistics or sums, the
    frozen backward), so a small call goes straight to the general serial kernels instead of
    dispatching a twin that returns -1 (a dispatch is ~1 us: two of them per synchronized
    forward and backward at 32x256). Small calls are decided first, in one test (the two
    lookups this replaces took 0.25 us of a 5 us layer call).

    ``fused``: a call partitioned by ``lanes.geometry`` (a training forward, any backward,
    ``moments``, ``backward_input``). Below one core's L2, a lanes-family array
    with fewer than ``2 * FUSE_LANES_MIN`` lanes per row is one tile, one task, on any thread
    count (``lanes.geometry``); the parallel kernel then only adds the pool's launch, so the
    serial twin runs it (the same task: the same bits). Float32, 2 threads, Zen 5, medians of
    3000 interleaved pairs, parallel -> serial (us): forward (512, 256) 34.0 -> 31.7, (2048,
    64) 42.2 -> 40.3, (4096, 32) 40.6 -> 38.6; backward (512, 256) 51.7 -> 44.8, (2048, 64)
    64.6 -> 57.6, (1024, 128) 57.8 -> 50.1. Inference and a forward with given statistics
    split such arrays into row blocks (``lanes.blocks``), which two threads share."""
    name = _name(x3.shape)
    nbytes = x3.nbytes
    if nbytes < SERIAL_BELOW:
        return (_SERIAL if general else _SMALL)[name], TUNE
    if (
        fused
        and name == "lanes"
        and nbytes < TUNE[_jit.TUNE_L2]
        and x3.shape[1] * x3.shape[2] < 2 * _jit.FUSE_LANES_MIN
    ):
        return _SERIAL[name], TUNE
    if _serial_only:
        return _SERIAL[name], TUNE
    threads = numba.get_num_threads()
    if threads == 1:  # the same code without the pool's launch
        return _SERIAL[name], TUNE
    if not ADAPTIVE or _layer == "tbb":
        return _parallel(name), with_threads(threads)
    return _ADAPTIVE[name], with_threads(threads)


def held(x3: np.ndarray, op: str, general: bool = False, fused: bool = False) -> tuple:
    """``(threads, launch)`` for a plan to keep while ``numba.get_num_threads()`` stays
    ``threads``: ``launch`` is ``(kernel, tune)`` of ``kernels_for``'s answer for x3 (an array
    at or above ``SERIAL_BELOW``) and ``op``, or None where that answer can change from call to
    call at one thread count (below TBB, with more than one thread: GNU OpenMP's and
    workqueue's measured choice between a parallel kernel and its serial twin, their
    one-call-at-a-time guard before the layer has shown itself thread-safe). At one thread, or
    where the shape alone picks the serial twin, the answer is the serial kernels on any layer.
    A layer's planned calls keep it: inside a NumPy MLP step every object a call touches comes
    from memory after the matmuls (float32, Zen 4, one thread, batch 256 x 1024: a prototype
    calling the kept kernels took BN+ReLU 1.13-1.14x faster than the run path asking
    ``kernels_for`` each call; the layer as built, against the previous one, 1.02-1.07x over
    four runs)."""
    threads = numba.get_num_threads()
    kernels, tune = kernels_for(x3, general, fused)
    if threads > 1 and kernels is not _SERIAL[_name(x3.shape)] and _layer != "tbb":
        return threads, None
    return threads, (getattr(kernels, op), tune)


# --- Parallel or serial, decided by measurement. A parallel call pays for the pool's launch,
# for waking workers that went to sleep, and for sharing the other core with whatever runs
# there (a NumPy matmul's OpenBLAS threads, PyTorch's OpenMP workers keep spinning after they
# return); it gains a second core's compute and bandwidth. Which wins depends on the CPU, the
# shape, the operation and the moment, not on a size alone: float32, Zen 5, 2 threads, back
# to back, parallel / serial (us), in one process: forward (128, 1024) 45.1 / 38.1, (2048,
# 512) 304 / 252, (512, 1024) 130 / 118, inference (512, 1024) 64.8 / 79.1, NHWC (32, 28, 28,
# 64) forward 219 / 375; in another, minutes later, inference (128, 1024) 13.4 / 21.1 (kernel
# times). So above SERIAL_BELOW each kernel, canonical shape, mode and thread count times its
# calls and runs the way with the smaller recent time (the minimum of its last KEEP: noise
# only adds time). The other way is tried again (a probe: PROBE_CALLS calls in a row, as the
# first after a run of serial calls wakes sleeping workers) once the calls since the last probe
# have taken PROBE_BUDGET times the probe's time, and after at least PROBE_MIN_CALLS calls:
# probes cost ~1/PROBE_BUDGET of the time, also where the other way is very slow (a parallel
# call fighting OpenBLAS's threads under OpenMP: probes after 4, 8, ... 200 calls took the MLP
# step at batch 1024 from 27.0 to 53.0 ms). Both ways give the same bits (the serial twin is
# the same code; tests/test_parallel.py), so the choice never changes a result. A serial twin
# not yet compiled is loaded from numba's cache, or compiled by a helper process
# (``_ahead.ready``) while the parallel kernel runs: choosing never stalls a call on
# compilation. ``ADAPTIVE = False``: always the parallel kernels (the tests of the parallel
# code set it).
#
# Only where the threading layer is not TBB (GNU OpenMP: numba's default without the ``tbb``
# extra; workqueue). There the choice is what made a NumPy MLP step on 2 threads 3.8x faster
# (its parallel calls fought OpenBLAS's spinning threads: 28.6 -> 7.5 ms at batch 256). Under
# TBB the same step measured the same either way (7.5-7.6 ms), and on the grid beside
# PyTorch its choices moved cells both ways by 20-50% without a net gain (2-thread medians
# 1.00-1.02x the old time) while PyTorch itself moved as much between runs: not shown
# worth it, so TBB runs the parallel kernels as before.
ADAPTIVE = True
PROBE_BUDGET = 100.0
PROBE_MIN_CALLS = 16
PROBE_CALLS = 2
KEEP = 2 * PROBE_CALLS
_NEVER = float("inf")


class _Runs:
    """One kernel, shape, thread count and mode: each way's last KEEP times, the way chosen,
    the calls and time since the last probe."""

    __slots__ = (
        "times",
        "count",
        "serial",
        "calls",
        "spent",
        "budget",
        "first",
        "probe",
        "twin_ready",
    )

    def __init__(self) -> None:
        self.times = ([_NEVER] * KEEP, [_NEVER] * KEEP)  # parallel, serial: rings
        self.count = [0, 0]  # times recorded per way (the ring's next slot)
        self.serial = False
        self.calls = 0
        self.spent = 0.0
        self.budget = 0.0
        self.first = 4  # two calls each way first (the first of each may have compiled)
        self.probe = 0  # calls left in a probe
        self.twin_ready = False  # the serial twin runs without compiling (``_ahead.ready``)

    def due(self) -> bool:
        """Is the next call not simply one on the chosen way (the first four, or a probe)?"""
        return (
            self.first > 0
            or self.probe > 0
            or (self.spent >= self.budget and self.calls >= PROBE_MIN_CALLS)
        )

    def way(self) -> bool:
        """True: run the next call on the serial twin. A probe is two calls of the other way:
        the first after a run of serial calls wakes the pool's sleeping workers (measured:
        20-47 us against 15 us for the next, float32 (2048, 64) inference, 2 threads)."""
        if self.first:
            return self.first <= 2
        if not self.probe:
            self.probe = PROBE_CALLS
        return not self.serial

    def wait(self) -> None:
        """The serial twin is still being compiled: no probe for PROBE_MIN_CALLS calls."""
        self.calls = self.probe = 0

    def record(self, serial: bool, seconds: float) -> None:
        n = self.count[serial]
        self.times[serial][n % KEEP] = seconds
        self.count[serial] = n + 1
        if self.first:
            self.first -= 1
            if self.first:
                return
        elif serial == self.serial:
            self.calls += 1
            self.spent += seconds
            return
        else:
            self.probe -= 1
            if self.probe > 0:
                return
        best = min(self.times[0]), min(self.times[1])  # after the first four, and a probe
        self.serial = best[1] < best[0]
        other = best[not self.serial]  # (never run: its twin was being compiled)
        self.budget = PROBE_BUDGET * PROBE_CALLS * (other if other < _NEVER else best[self.serial])
        self.calls, self.spent = 0, 0.0


_MODE_AT = {"forward": 5, "backward": 5}  # where the parameter block is (``kernels._jit``)


class _Adaptive:
    """A kernel of a family, run on its parallel kernel or its serial twin (above); ``runs`` per
    (canonical shape, thread count: ``with_threads`` keeps one vector per count, mode).
    Keyed without the mode, inference and training forwards shared one record: probes
    of the serial twin on inference calls beat training times of the parallel kernel, and
    the grid's 2-thread inference ran serial (2-D 2048x256 35 -> 87 us)."""

    __slots__ = ("name", "kernel", "runs", "serial", "mode")

    def __init__(self, name: str, kernel: str) -> None:
        self.name, self.kernel = name, kernel
        self.runs: dict = {}
        self.serial = getattr(_SERIAL[name], kernel)
        self.mode = _MODE_AT.get(kernel)

    def __call__(self, *args):
        # a mode is another operation (a training forward costs twice an inference)
        mode = -1.0 if self.mode is None else args[self.mode][_jit.P_MODE]
        key = (args[0].shape, id(args[-1]), mode)
        runs = self.runs.get(key)
        if runs is None:
            if len(self.runs) >= 1024:
                self.runs.clear()
            runs = self.runs[key] = _Runs()
        serial = runs.serial
        if runs.due():
            serial = runs.way()
            if serial and not runs.twin_ready:
                # a twin still being compiled runs later (a user of the parallel kernels
                # would otherwise wait seconds for it); meanwhile the parallel kernel
                runs.twin_ready = _ahead.ready(self.serial.dispatcher, args[0].dtype)
                if not runs.twin_ready:
                    runs.wait()
                    serial = False
        start = time.perf_counter()
        if serial:
            result = self.serial(*args[:-1], TUNE)
        else:
            result = getattr(_parallel(self.name), self.kernel)(*args)
        seconds = time.perf_counter() - start
        if serial == runs.serial and not runs.first:  # the common case, inline
            n = runs.count[serial]
            runs.times[serial][n % KEEP] = seconds
            runs.count[serial] = n + 1
            runs.calls += 1
            runs.spent += seconds
        else:
            runs.record(serial, seconds)
        return result


_ADAPTIVE = {
    name: SimpleNamespace(**{k: _Adaptive(name, k) for k in kernels.KERNELS})
    for name in ("rows", "lanes")
}


def small_launch(canon: tuple, dtype: np.dtype, op: str, general: bool = False):
    """``(kernel, tune)`` for a plan to keep: the compiled ``op`` kernel (``"forward"``,
    ``"backward"`` or ``"moments"``) of ``kernels_for``'s answer for every C-contiguous x3 of
    shape ``canon`` and ``dtype`` below the serial threshold (it depends on nothing else
    there), as ``Launcher.entry`` gives it: called without numba's type dispatch, so the plan's
    checks must fix every argument's type (see ``bnfast._core.run_forward``). None above the
    threshold (where the thread count and the threading layer's state decide). ``PENDING``
    while that kernel is not compiled or loaded in this process: the call then runs the
    checked way, which compiles it, and the caller does not keep a plan made with this answer.
    (Compiling at plan time instead moved numba's first cache load ahead of the call's own
    work, where importing SciPy's BLAS for numba and OpenBLAS's spinning threads made it 0.07 s
    slower: a warm first step 0.15 -> 0.23 s, Zen 5.) ``general``: a mode the ``.small``
    twins lack (see ``kernels_for``)."""
    key = (canon, dtype, op, general)
    launch = _LAUNCHES.get(key, PENDING)
    if launch is PENDING:
        if canon[0] * canon[1] * canon[2] * dtype.itemsize >= SERIAL_BELOW:
            launch = None
        else:
            kernel = getattr((_SERIAL if general else _SMALL)[_name(canon)], op).entry(dtype)
            if kernel is None:
                return PENDING
            launch = kernel, TUNE
        if len(_LAUNCHES) >= 256:
            _LAUNCHES.clear()
        _LAUNCHES[key] = launch
    return launch


PENDING = ()  # small_launch: the kernel is not compiled here yet (no launch, no plan to keep)
_LAUNCHES: dict = {}  # small_launch's answers (a synchronized backward asks at every call)


def _name(canon: tuple) -> str:
    """The family of a canonical (outer, C, inner) shape: ``rows`` when its rows are long."""
    return "rows" if canon[2] >= ROWS_MIN else "lanes"


def fallback(x3: np.ndarray):
    """The general serial kernels, for a call the ``.small`` twin returned -1 for."""
    return _SERIAL[_name(x3.shape)]
