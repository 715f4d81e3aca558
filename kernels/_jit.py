"""The one place where the JIT options of every kernel are chosen.

``parallel_kernel("x", "p", "params", "stats", "out", "tune")`` declares a kernel's signatures
from its parameter kinds: data arrays in float32 and in float64, C-contiguous (the canonical
view; ``bnfast`` copies any other view once). Parameter kinds:

- ``"x"``: a 3-D data array the kernel only reads. Typed read-only: read-only and broadcast
  arrays match it, and numba converts a writeable array to it safely (no new compilation). The
  API passes writeable arrays as they are: a read-only view costs 0.4 us to make and numba's
  dispatch of read-only arguments is slower (8 arrays: 0.84 us against 0.58 us here).
- ``"out"``: a 3-D data array the kernel writes, same dtype as the inputs.
- ``"p"``: a per-channel vector in the data's dtype, read (gamma, beta), C-contiguous
  (``bnfast`` copies a strided one, O(C), and updates strided running arrays from a contiguous
  copy, as it does running arrays of another dtype). ``"p_out"``: one the kernel may write
  (running statistics, dgamma, dbeta). Contiguous rather than any layout, so that LLVM
  vectorizes the per-channel loops (with a runtime stride it left them scalar): float32, one
  thread, Zen 4, interleaved, with ``out=``: (2, 4096) forward 29.2 -> 25.0 us, inference
  18.8 -> 15.8, backward 25.2 -> 21.3; (32, 4096) 1.05-1.09x; (128, 4096) and (128, 1024)
  1.01-1.02x; the cold first training step unchanged (4.24-4.47 s against 4.19-4.32 s).
- ``"stats"``: the float64 rows a cache keeps (``common.KEPT``: MEAN and INVSTD; R and D too
  under renorm; or none, ``(2, 0)``) that a forward kernel writes and a backward kernel reads;
  also the rescue's whole ``(STATS_ROWS, C)`` work block. Writeable in both, so that every
  helper that reads it is compiled once (a read-only type in backward compiled each of them
  twice).
- ``"sums"``: the float64 ``(2, C)`` gradient sums a backward kernel writes or reads.
- ``"vec_out"``: a float64 per-channel vector the kernel writes (``moments``).
- ``"params"``: the float64 parameter block (``P_*`` below): the mode and every scalar option.
- ``"tune"``: the machine's int64 tuning vector (``TUNE_*`` below), built once by ``bnfast``
  from this CPU's cache sizes and passed at run time, so no machine constant is compiled in.

Compile time is part of the design (a cold first training step compiles the kernels it meets):
no exception is raised inside a kernel (numba compiles its message formatting: seconds; a
kernel returns a count, the caller acts on it), no array-slice assignment (it raises a
formatted shape error), no literal constant passed to a helper (numba compiles a second
specialization for ``Literal[int](0)``: ``np.int64(0)`` instead), task bodies inlined
(:func:`step`), options as data (``params``) rather than compile-time switches, helpers and a
parallel loop's pieces compiled only as IR that the kernels link (``_install_linking_hook``:
not optimized and emitted to machine code on their own as well). And the two
kernels of a training step compile side by side: numba compiles one function at a time in a
process, so ``bnfast._ahead`` compiles the backward in a helper process (into the cache) while
this one compiles the forward (hooks: ``on_compile``, ``before_compile``).

Options, and why:

- ``cache=True``: compiled code is written next to the module (or to ``NUMBA_CACHE_DIR``), so
  only the first process on a machine pays for compilation.
- compiled on first use, not at import, and never for an undeclared type: every dispatcher is
  locked (``disable_compile``), so numba matches a call to a declared signature by safe
  conversion (a writeable array to a read-only parameter) instead of compiling a second
  specialization, which it does whenever compilation is allowed. A :class:`Launcher` calls
  the dispatcher and, the first time it meets a dtype, compiles (or, with a warm cache, loads)
  that dtype's declared signatures. So a call costs one dispatch, and the first float32 call
  loads only the float32 signatures it needs. Eager compilation of every declared signature
  made ``import bnfast`` take 0.8-1.0 s with a warm cache (loading 40 compiled kernels) and 64 s
  with a cold one; the first float32 training step needs a handful.
  ``bnfast.kernels.compile_all()`` compiles every declared signature (tests check that they
  all compile; a deployment can warm its cache with it).
- ``nogil=True``: kernels release the GIL, so Python threads can run them side by side.
- every kernel first takes its array arguments through :func:`borrowed`: numba counts
  references to an array's memory with atomic instructions (``lock inc``/``lock dec``), one
  pair per view it makes (row slices, reshapes, a tile's vectors) and per helper that keeps
  one; a small call makes dozens. With a null meminfo those calls return at once. Measured
  (Zen 5, float32, one thread): the atomics were 22% of the samples of a loop of
  lanes-family forward + backward kernel calls at (2, 64) and 6% after, the pair 4.06 ->
  3.41 us; through the API, interleaved in one process, forward (32, 64) 8.4 -> 8.1 us, a
  layer step 8.8 -> 8.4 us, backward (64, 256) 9.4 -> 8.5 us; no change from (128, 512) up,
  same bits, same cold compile. A tile's buffers are one allocation whose views are borrowed
  too (``lanes.tile_buffers``), the allocation itself kept to its last use (:func:`keep`:
  numba frees an array after its last use): a (32, 64) forward kernel 2.07 -> 1.72 us; other
  allocations keep their counts (numba frees them by it).
- ``error_model="numpy"``: a division by zero gives inf/nan as in NumPy instead of a Python
  exception, and costs no branch in the loops.
- ``fastmath={"contract"}`` for kernels: ``a * b + c`` may become one fused multiply-add (one
  rounding instead of two, so never less accurate); no reassociation, no ``nnan``/``ninf``:
  every sum in the order written, NaN and inf as IEEE says. The write pass ``(x - m) * s + b``
  and the sums of squares compile to ``vfmadd`` instructions (seen in the generated code), one
  vector operation fewer per element in loops bound by their float64 arithmetic. The one
  further exception is ``reduction``: the helpers that sum one contiguous row also get
  ``"reassoc"``, which lets LLVM split the sum into vector lanes. Measured on float32
  (32, 64, 3136), serial: 2.5 ms for the shifted moments sums against 5.2 ms with 8
  hand-unrolled accumulator pairs and 6.8 ms with one pair, error unchanged (float64
  accumulation around a shift; the lanes only change which values are added first). The order
  is fixed by the compiled code, so results do not depend on the thread count.
- ``parallel``: the ``rows`` and ``lanes`` families are parallel (``prange`` over a fixed
  partition into blocks, see below); every parallel kernel also has a ``.serial`` twin compiled
  from the same code with ``parallel=False`` (lazily, cached), for small arrays, for callers
  already inside a thread pool, and for a process forked from one whose threading layer is not
  fork-safe. Serial and parallel runs give bitwise identical results: the partition and the order
  in which partials are combined depend on the shape only, never on the thread count.
"""

from __future__ import annotations

import functools
import sys
import threading
import types as types_module
from pathlib import Path

import numba
from llvmlite import binding as llvm_binding
from numba import _dynfunc, types
from numba.core import caching, cgutils, event
from numba.core import codegen as numba_codegen
from numba.core import cpu as numba_cpu
from numba.core.compiler_lock import global_compiler_lock, require_global_compiler_lock
from numba.extending import intrinsic

DATA_DTYPES = (types.float32, types.float64)

_HERE = Path(__file__).resolve().parent


@functools.cache
def _package_stamp() -> tuple:
    """Every module of this package by name, modification time and size, once per process."""
    return tuple(
        (p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(_HERE.glob("*.py"))
    )


def _kernels_locator(base):
    """Numba keys a cached function on its own file's stamp only, and a kernel carries the
    machine code of every helper it calls, from other modules of this package too: edited
    alone, ``common.py`` left the ``lanes`` and ``rows`` kernels loading from the cache with the
    old helpers inside (seen: an edited rescue measured at its old speed until the cache was
    emptied). A kernel's stamp here is its file's and this package's, so any edit of
    ``kernels/`` recompiles them (a pip install rewrites every file anyway)."""

    class Locator(base):
        @classmethod
        def from_function(cls, py_func, py_file):
            if getattr(sys, "frozen", False) or Path(py_file).resolve().parent != _HERE:
                return None  # numba's own locators then (a frozen app has no sources to stat)
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return (super().get_source_stamp(), _package_stamp())

    Locator.__name__ = Locator.__qualname__ = "Kernels" + base.__name__
    return Locator


caching.CacheImpl._locator_classes[:0] = [
    _kernels_locator(caching.UserProvidedCacheLocator),
    _kernels_locator(caching.InTreeCacheLocator),
    _kernels_locator(caching.UserWideCacheLocator),
]

KERNEL_FASTMATH = {"contract"}
JIT_OPTIONS = dict(cache=True, nogil=True, error_model="numpy", fastmath=KERNEL_FASTMATH)

# inner >= ROWS_MIN: the rows family (each (o, c) row contiguous and long), else lanes. 48 puts
# 7x7 maps (inner 49) in the rows family, whose write loops take one float64 mean, scale and
# shift per row where the lanes family loads a float64 vector of each per element. Float32,
# Zen 4, lanes -> rows, 1 / 2 threads: (128, 256, 7, 7) inference 1.74x / 1.58x, backward
# 1.41x / 1.40x, forward 1.06x / 1.04x; (16, 2048, 7, 7) 1.95x / 1.61x, 1.47x / 1.36x, 1.37x /
# 1.32x; (64, 1024, 7, 7) 1.76x / 1.31x, 1.43x / 1.09x, 1.19x / 0.97x. A training forward
# alone can lose where the lanes family's fused route read x once ((128, 256, 7, 7) with
# running statistics, back to back: 0.85-0.94x / 0.73-0.75x), a training step (forward and
# backward) gains: 1.28-1.51x / 1.00-1.36x at four 7x7 shapes. 6x6 maps (inner 36) gained in
# inference but lost in the forward ((64, 256, 6, 6) 0.83x / 0.72x), so stay lanes.
ROWS_MIN = 48
BLOCK_ROWS_MIN = 64  # lanes family: a row block has >= 64 rows, so its partials are <= x/16
FUSE_LANES_MIN = 256  # lanes family: a fused strip is at least 256 lanes wide (see lanes.py)
FUSE_TASKS_PER_THREAD = 2  # lanes family: a parallel fused call aims at 2 tiles per thread
WIDE_LANES = 64  # lanes family: rows narrower than this are viewed k at a time (lanes.replicas)
PAGE_BYTES = 4096  # lanes family: a row segment this long streams well as one of a group
MIN_TASKS = 16  # rows family: split channels into groups when fewer outer blocks than this

# The tuning vector's entries (values: ``bnfast._machine``, derived from this CPU's caches).
TUNE_TILE = 0  # lanes family: lanes per tile (its float64 per-lane buffers stay in L1d)
TUNE_BLOCK = 1  # bytes of x per task of a parallel partition
TUNE_STRIP = 2  # lanes family: a strip of rows this small is reduced, then written from cache
TUNE_THREADS = 3  # threads the call runs on (1 for a serial twin; set per call by _threading.tune)
TUNE_L2 = 4  # bytes of one core's L2 (the rows family's fused route: arrays up to this size)
TUNE_WIDE = 5  # lanes family: lanes per tile of an array of TUNE_STREAM bytes or more
TUNE_STREAM = 6  # bytes of x from which x and its output outgrow the last-level cache
TUNE_SIZE = 7

# The parameter block: every scalar option of a call as one float64 vector with named indices
# (``bnfast._plan`` builds it), read once per call into locals. A new scalar option is one
# index here, one line where it is used and one line in ``bnfast.reference``; a swapped pair of
# positional scalars can no longer compile and pass.
P_MODE = 0  # forward: FORWARD_*; backward: BACKWARD_*
P_EPS = 1
P_MOMENTUM = 2  # weight of the new batch in the running averages
P_UNBIASED = 3  # 1: running variance var * n / (n - 1); 0: biased
P_RMAX = 4  # Batch Renormalization's rmax (0: none) and dmax
P_DMAX = 5
P_RELU = 6  # 1: the fused ReLU
P_THR = 7  # the ReLU's threshold: half the smallest subnormal of the data's dtype
P_SPARE = 8
P_COUNT = 9  # values per channel behind the statistics (a synchronized batch's: all ranks')
P_SIZE = 10

FORWARD_BATCH = 0  # batch statistics (training); running averages updated when given
FORWARD_RUNNING = 1  # running statistics (inference)
FORWARD_GIVEN = 2  # mean and variance given in rows 0 and 1 (a synchronized forward)
BACKWARD_TRAIN = 0  # the training gradient; the two sums also written to ``sums``
BACKWARD_FROZEN = 1  # dx = scale * dy (inference statistics); sums as in TRAIN
BACKWARD_SUMS = 2  # the two sums and dgamma, dbeta from them (a synchronized rank's share)
BACKWARD_GIVEN = 3  # dx from the given ``sums`` over params[P_COUNT] values (and dgamma,
# dbeta from them, unless passed with length 0: a synchronized call keeps its rank's share)

# The parameter kinds of the kernels every family has (kernels/__init__.py describes them).
MOMENTS = ("x", "vec_out", "vec_out", "tune")
FORWARD = ("x", "p", "p", "p_out", "p_out", "params", "stats", "out", "tune")
# -> int (a status, see ``lanes.backward``)
BACKWARD = ("x", "x", "p", "p", "stats", "params", "sums", "p_out", "p_out", "out", "tune")
BACKWARD_INPUT = ("x", "x", "p", "params", "p_out", "p_out", "out", "tune")
RESCUE = ("x", "p", "p", "p_out", "p_out", "params", "stats", "out")
RESCUE_MOMENTS = ("x", "vec_out", "vec_out")


def _param(kind: str, dtype: types.Type) -> types.Type:
    if kind == "x":
        return types.Array(dtype, 3, "C", readonly=True)
    if kind == "out":
        return types.Array(dtype, 3, "C")
    if kind == "p":
        return types.Array(dtype, 1, "C", readonly=True)
    if kind == "p_out":
        return types.Array(dtype, 1, "C")
    if kind in ("stats", "sums"):
        return types.Array(types.float64, 2, "C")
    if kind == "vec_out":
        return types.Array(types.float64, 1, "C")
    if kind == "params":
        return types.Array(types.float64, 1, "C", readonly=True)
    if kind == "tune":
        return types.Array(types.int64, 1, "C", readonly=True)
    raise ValueError(f"unknown kernel parameter kind {kind!r}")


def signatures(*kinds: str, returns: bool = False) -> list:
    """Every declared signature of a kernel whose parameters are of the given kinds: float32
    and float64 data, C-contiguous (bnfast copies any other view once, ``_checks.Layout``)."""
    ret = types.int64 if returns else types.void
    return [ret(*(_param(kind, dtype) for kind in kinds)) for dtype in DATA_DTYPES]


def _declared(dispatcher, sigs: list):
    dispatcher.declared = sigs
    # What ``disable_compile()`` does, which numba refuses while no signature is compiled yet
    # (an assertion, not a technical limit): calls then never compile (see ``Launcher``).
    dispatcher._can_compile = False
    return dispatcher


_COMPILE = threading.Lock()
# Called with (dispatcher, signature) when a declared signature is about to be compiled rather
# than loaded from the cache (``bnfast._threading`` tells the user once and starts compiling
# the next kernel of a training step in a helper process, ``bnfast._ahead``); None: silent.
on_compile = None
# Called with (dispatcher, dtype) before a dispatcher's signatures for dtype are compiled or
# loaded (``bnfast._ahead`` waits there for a helper process compiling them); None: nothing.
before_compile = None


class _Compiling(event.Listener):
    """Numba's ``numba:compile`` event starts only for a real compilation (a cache hit loads
    without it), before the work: the moment to say what is happening."""

    def __init__(self, dispatcher, sig) -> None:
        self.target = (dispatcher, sig)

    def on_start(self, ev) -> None:
        hook = on_compile
        if hook is not None and ev.data.get("dispatcher") is self.target[0]:
            hook(*self.target)

    def on_end(self, ev) -> None:
        pass


def compile_declared(dispatcher, dtype=None) -> int:
    """Compile (or load from the cache) the declared signatures of a locked dispatcher, those
    whose data arrays have ``dtype`` (all when None); returns how many.

    The dispatcher may compile only while numba's compiler lock is held here: a call from
    another thread that finds no exact overload then waits for that lock in numba's compile
    and sees compilation disabled again (``Launcher``'s miss), instead of compiling its own
    argument types in the moment the flag is up (seen: two ranks-as-threads' first
    synchronized calls left the moments kernel with an undeclared signature, its x writeable
    where the declared one reads any)."""
    count = 0
    hook = before_compile
    if hook is not None and dtype is not None:
        hook(dispatcher, dtype)
    with _COMPILE, global_compiler_lock:
        for sig in dispatcher.declared:
            if dtype is None or str(sig.args[0].dtype) == str(dtype):
                dispatcher._can_compile = True
                try:
                    with event.install_listener("numba:compile", _Compiling(dispatcher, sig)):
                        dispatcher.compile(sig)
                finally:
                    dispatcher._can_compile = False
                count += 1
    return count


def in_cache(dispatcher, dtype) -> bool:
    """Are the declared signatures of a locked dispatcher for ``dtype`` in numba's cache, so
    that :func:`compile_declared` would load them rather than compile? Found by loading them
    (tens of ms, once); False on any doubt (the caller then has them compiled elsewhere)."""
    try:
        with _COMPILE, global_compiler_lock:
            return all(
                dispatcher._cache.load_overload(sig, dispatcher.targetctx) is not None
                for sig in dispatcher.declared
                if str(sig.args[0].dtype) == str(dtype)
            )
    except Exception:  # numba's cache internals moved, or an unreadable cache: no
        return False


class Launcher:
    """Calls a locked kernel dispatcher; compiles its declared signatures for the data's dtype
    when a call finds none yet (numba's "No matching definition" ``TypeError``), then calls
    again. A declared type never misses twice, so any second ``TypeError`` is a real one.
    Numba's "compilation disabled" ``RuntimeError`` is the same miss seen by a second thread
    while another compiles the kernel (the dispatcher allows compiling only inside
    ``compile_declared``): it waits for that compile the same way (seen: two threads' first
    synchronized forward calls at once)."""

    __slots__ = ("dispatcher",)

    def __init__(self, dispatcher) -> None:
        self.dispatcher = dispatcher

    def __call__(self, *args):
        try:
            return self.dispatcher(*args)
        except (TypeError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "compilation disabled" not in str(e):
                raise
            if not compile_declared(self.dispatcher, args[0].dtype):
                raise
            return self.dispatcher(*args)

    def entry(self, dtype):
        """The compiled declared signature for data of ``dtype``, as a function that takes
        the arguments with no type dispatch: numba's CPython wrapper of that one overload, which
        unboxes each argument as the signature's type without testing it; None while it is not
        compiled (or loaded) in this process. Only for a caller whose own checks fix every
        argument's type, ndim, layout and writeability (the plans of small calls,
        ``bnfast._threading.small_launch``); a wrong type there is not an error but a misread.
        What it saves is numba's typing of each argument and the overload lookup: float32 (32,
        64), one thread, Zen 5, a backward kernel call (11 arrays) 2.08 -> 1.78 us."""
        for sig, cres in list(self.dispatcher.overloads.items()):  # (another thread may add)
            if str(sig[0].dtype) == str(dtype):
                return cres.entry_point
        return None


def kernel(*kinds: str, returns: bool = False):
    """Decorator: a serial kernel (the cold rescue kernels); declared signatures ``.declared``."""

    def wrap(func):
        return _declared(
            numba.njit(parallel=False, **JIT_OPTIONS)(func), signatures(*kinds, returns=returns)
        )

    return wrap


def _renamed(func, suffix: str, **constants):
    """The same code under another qualified name. Numba's cache keys an entry on the function's
    qualified name, bytecode and signature, not on ``parallel``: compiled from the very same
    function, the serial twin would load the parallel machine code from the cache (seen here: a
    forked child then started GNU OpenMP and was killed). ``constants`` replace module
    constants the code reads (in a copy of its globals, taken when the kernel is defined)."""
    namespace = {**func.__globals__, **constants} if constants else func.__globals__
    twin = types_module.FunctionType(
        func.__code__, namespace, func.__name__ + suffix, func.__defaults__, func.__closure__
    )
    twin.__qualname__ = func.__qualname__ + suffix
    twin.__doc__ = func.__doc__
    return twin


# Kernels guard every route and mode but the fused training route and the inference write
# (the two-pass route of tall arrays, the frozen backward, a synchronized call's modes) with
# ``if ALL_ROUTES:``. Numba prunes a branch on a module constant before typing it, so the
# ``.small`` twin, compiled with ALL_ROUTES = False, holds only what a training step and an
# inference call on an array below the serial threshold take (such an array fits the fused
# route by the tuning rules): all that a new user's first step compiles, 6.3 -> 5.3 s
# cold (Zen 5), with no cost to compiling everything (82 s: the general serial twins now
# compile only where a small call needs them). Where its route does not apply it returns -1
# and the caller runs ``.serial``.
ALL_ROUTES = True


def parallel_kernel(*kinds: str, returns: bool = False, small: bool = False):
    """Decorator: a parallel kernel for C-contiguous data (float32 and float64 declared), with a
    ``.serial`` twin of the same code and, with ``small``, a serial ``.small`` twin without the
    two-pass route (see ``ALL_ROUTES``). ``returns``: the kernel returns an int64 (a count)."""

    def wrap(func):
        sigs = signatures(*kinds, returns=returns)
        dispatcher = _declared(numba.njit(parallel=True, **JIT_OPTIONS)(func), sigs)
        _PARALLEL.add(id(dispatcher))
        dispatcher.serial = _declared(
            numba.njit(parallel=False, **JIT_OPTIONS)(_renamed(func, "_serial")), sigs
        )
        if small:
            twin = _renamed(func, "_small", ALL_ROUTES=False)
            dispatcher.small = _declared(numba.njit(parallel=False, **JIT_OPTIONS)(twin), sigs)
        return dispatcher

    return wrap


def step(func):
    """Decorator for a mid-level helper (a task body: a tile's reduction, epilogue and write;
    one task of a grid) that one or two kernels call: inlined at Numba-IR level, so it is not
    a compile unit of its own. Numba compiles every jitted callee into its own LLVM module and
    optimizes and emits the whole linked subtree again at every level, so a deep call tree
    optimizes its leaf loops once per level: inlining the task bodies (depth 4 -> 2) cut a
    cold first training step from 10.0 to 6.9 s (Zen 5). Small helpers called from many
    places (``expand``, ``geometry``, ``clip``) stay separate: inlined too, the same step took
    13.4 s (numba re-types an inlined body at every call site)."""
    return numba.njit(inline="always", **JIT_OPTIONS)(func)


def exact(func):
    """Decorator for arithmetic that must be bitwise symmetric in its operands (the
    synchronized forward's merge operator, ``common.merge_moments``): no ``contract``, since
    a fused multiply-add rounds ``a*b + c*d`` differently from ``c*d + a*b``. Called from
    Python (by mpi4py's reduction), so it keeps its Python entry point."""
    return numba.njit(parallel=False, cache=True, nogil=True, error_model="numpy")(func)


REDUCTION_FASTMATH = {"reassoc", "contract"}


def reduction(func):
    """Decorator for a helper that sums one contiguous row (see the fastmath note above)."""
    options = {**JIT_OPTIONS, "fastmath": REDUCTION_FASTMATH}
    return numba.njit(parallel=False, **{**options, **_NO_WRAPPERS})(_linked_only(func))


# Helpers only kernels call need no Python entry point: numba otherwise builds and emits a
# CPython wrapper and a C callback for each (a cold first training step 7.1 -> 6.4 s, Zen 5).
# Nor machine code of their own (``_linked_only``, ``_install_linking_hook``).
_NO_WRAPPERS = dict(no_cpython_wrapper=True, no_cfunc_wrapper=True)


def helper(func):
    """Decorator for a jitted function called only from kernels (compiled with their options,
    without a Python entry point, linked into them only: ``_linked_only``)."""
    return numba.njit(parallel=False, **{**JIT_OPTIONS, **_NO_WRAPPERS})(_linked_only(func))


# A helper only kernels call is linked into each caller as LLVM IR, and the caller's module is
# optimized (O3, inlining across the linked helpers) and compiled to machine code as a whole.
# Numba also runs its module-level O3 on the helper's own module and emits that module's
# machine code (the cache stores it): work no call uses, since no Python entry point reaches
# the helper and every caller carries its own copy. ``_install_linking_hook`` skips it for this
# package's helpers (found by module and qualified name: no one else's function is touched):
# their libraries are finalized for linking only (numba's ``finalize`` without the final
# module's optimization and without the execution engine) and cached as LLVM bitcode, which a
# process loads without compiling it to machine code (so a helper the other process of a cold
# first step compiled is loaded, not compiled again). Measured cold on Zen 5, float32, in the
# same hour: the forward's small twin with its helpers 4.5-4.9 -> 3.4-3.75 s, the backward's
# 4.2 -> 3.2-3.3 s, a first training step (``bench/compile_time.py first``) 4.6-5.0 -> 4.1-4.3
# s. The same holds for the pieces numba builds for a parallel kernel's ``prange`` loops: the
# loop body (a "gufunc" compiled from the kernel's IR) and its two wrappers, each optimized and
# emitted on its own, then linked into the kernel and optimized and emitted again with it.
# While one of this package's parallel kernels compiles (``_InParallelKernel``, from numba's
# compile events), they are finalized for linking only too: the parallel forward (lanes,
# float32) 8.4 -> 5.2 s, compiling everything (``bench/compile_time.py everything``) 99 ->
# 61 s. The callers' machine code is what it was (same bits; kernel calls within noise, A/B
# at one and two threads). Where numba's internals differ from what this expects (another
# numba version), the hook is not installed and everything compiles as numba does it.
_LINK_ONLY: set[tuple[str, str]] = set()
_PARALLEL: set[int] = set()  # ids of the parallel kernels' dispatchers
_PARFOR_LIBRARIES = ("parallelgufuncwrapper", "<numba.np.ufunc.wrappers._GufuncWrapper")
_PARFOR_GUFUNC = "__numba_parfor_gufunc_"


class _InParallelKernel(event.Listener):
    """Counts the parallel kernels of this package being compiled (numba's compile event
    brackets a real compilation, inside numba's compiler lock)."""

    depth = 0

    def on_start(self, ev) -> None:
        if id(ev.data.get("dispatcher")) in _PARALLEL:
            _InParallelKernel.depth += 1

    def on_end(self, ev) -> None:
        if id(ev.data.get("dispatcher")) in _PARALLEL:
            _InParallelKernel.depth -= 1


def _linked_only(func):
    _LINK_ONLY.add((func.__module__, func.__qualname__))
    return func


def _finalize_for_linking(library) -> None:
    """``CPUCodeLibrary.finalize`` without ``_optimize_final_module`` and without the
    execution engine (no machine code): enough for ``_get_module_for_linking``. Cached as
    bitcode (what ``_unserialize`` below loads)."""
    require_global_compiler_lock()
    if not library._finalized:
        seen = set()
        for linked in library._linking_libraries:
            if linked not in seen:
                library._reload_init.update(linked._reload_init)
                seen.add(linked)
                library._final_module.link_in(linked._get_module_for_linking(), preserve=True)
        library._final_module.verify()
        library._finalize_dynamic_globals()
        library._verify_declare_only_symbols()
        library._finalized = True
    library.serialize_using_object_code = library.serialize_using_bitcode


def _install_linking_hook() -> bool:
    library_class = numba_codegen.CPUCodeLibrary
    needed = (
        (numba_cpu.CPUContext, "get_executable"),
        (library_class, "_unserialize"),
        (library_class, "serialize_using_bitcode"),
        (library_class, "_get_module_for_linking"),
        (library_class, "_finalize_dynamic_globals"),
        (library_class, "_verify_declare_only_symbols"),
        (numba_codegen.JITCPUCodegen, "set_env"),
    )
    if not all(hasattr(owner, name) for owner, name in needed):
        return False
    numba_get_executable = numba_cpu.CPUContext.get_executable
    numba_unserialize = library_class._unserialize.__func__

    def get_executable(self, library, fndesc, env):
        ours = (fndesc.modname, fndesc.qualname) in _LINK_ONLY or (
            _InParallelKernel.depth > 0 and fndesc.qualname.startswith(_PARFOR_GUFUNC)
        )
        if not ours or not isinstance(library, library_class):
            return numba_get_executable(self, library, fndesc, env)
        _finalize_for_linking(library)
        # what numba makes for a function without a CPython wrapper: an entry of address 0
        # (such a function cannot be called from Python either way)
        name = fndesc.qualname.split(".")[-1]
        return _dynfunc.make_function(fndesc.lookup_module(), name, "", 0, env, (library,))

    def _unserialize(cls, codegen, state):
        name, kind, data = state
        if kind != "bitcode" or all(name != qualname for _, qualname in _LINK_ONLY):
            return numba_unserialize(cls, codegen, state)
        library = codegen.create_library(name)  # a helper's bitcode (numba's CPU cache
        library._final_module = llvm_binding.parse_bitcode(data)  # stores object code)
        _finalize_for_linking(library)
        return library

    numba_set_env = numba_codegen.JITCPUCodegen.set_env

    def set_env(self, env_name, env):
        # a loaded helper's environments are not in the engine (nor used by anything in it):
        # numba would write to address 0
        if self._engine.get_global_value_address(env_name):
            numba_set_env(self, env_name, env)

    numba_finalize = library_class.finalize

    def finalize(self):
        if _InParallelKernel.depth > 0 and self.name.startswith(_PARFOR_LIBRARIES):
            _finalize_for_linking(self)
        else:
            numba_finalize(self)

    event.register("numba:compile", _InParallelKernel())
    library_class.finalize = finalize
    numba_cpu.CPUContext.get_executable = get_executable
    library_class._unserialize = classmethod(_unserialize)
    numba_codegen.JITCPUCodegen.set_env = set_env
    return True


LINKING_HOOK = _install_linking_hook()


def shared(func):
    """Decorator for a per-channel helper that ``bnfast`` also calls from Python on O(C)
    arrays (the running-average update of foreign-dtype arrays and of ghost batches, a
    synchronized backward's dgamma): the one implementation of that math. Kernels link it as
    a :func:`helper`; Python calls its ``.python`` twin (the same code under another name, with
    a Python entry point), compiled only when Python first calls it: a cold first training step
    compiled the Python entry and its machine code for nothing (``update_running`` 0.23 s,
    ``parameter_gradients`` 0.22 s, Zen 5)."""
    dispatcher = helper(func)
    dispatcher.python = numba.njit(parallel=False, **JIT_OPTIONS)(_renamed(func, "_python"))
    return dispatcher


def from_python(func):
    """Decorator for a jitted loop only ``bnfast``'s Python code calls (a synchronized
    forward's message)."""
    return numba.njit(parallel=False, **JIT_OPTIONS)(func)


@intrinsic
def borrowed(typingctx, *arrays):
    """The arrays without their reference counts: each the same data, shape and strides with
    a null meminfo, so no view of it (row slices, reshapes, a tile's vectors) costs an atomic
    reference-count update (numba's ``NRT_incref``/``NRT_decref`` return at once for a null
    meminfo). For a kernel's arguments only, which the caller holds for the whole call."""
    if not all(isinstance(a, types.Array) for a in arrays):
        return None
    result = types.Tuple(arrays)

    def codegen(context, builder, sig, args):
        out = []
        for ty, value in zip(arrays, cgutils.unpack_tuple(builder, args[0]), strict=True):
            src = context.make_array(ty)(context, builder, value=value)
            dst = context.make_array(ty)(context, builder)
            for field in ("parent", "nitems", "itemsize", "data", "shape", "strides"):
                setattr(dst, field, getattr(src, field))
            dst.meminfo = cgutils.get_null_value(dst.meminfo.type)
            out.append(dst._getvalue())
        return context.make_tuple(builder, result, out)

    return result(types.StarArgTuple.from_types(arrays)), codegen


@intrinsic
def keep(typingctx, array):
    """0, having used ``array``: a buffer a kernel allocated lives at least until here (numba
    frees an array after its last use), so the views of its :func:`borrowed` twin may be used
    before this call. A tile's buffers are allocated once, borrowed, and kept to the end of
    the tile's work: their views then cost no atomic reference counts."""

    def codegen(context, builder, sig, args):
        return context.get_constant(types.int64, 0)

    return types.int64(array), codegen
