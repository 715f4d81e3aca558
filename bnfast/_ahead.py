"""Compiling ahead in a second process: the first training step's two kernels side by side.

Numba compiles one function at a time in a process (its global compiler lock), and a cold
first training step compiles two large kernels one after the other: ``forward`` (3.5 s here,
Zen 5, float32, its helpers included) and ``backward`` (3.0 s alone). So when a forward kernel
is about to be compiled (not loaded: numba's compile event starts only for a real
compilation), a helper process is started that compiles the same family's and twin's
``backward`` for the same dtype into numba's cache (``python -m bnfast._ahead``), on the other
core, while this process compiles the forward. When this process first needs that backward it
waits for the helper (if still running) and loads the kernel from the cache. The same machine
code either way (one compiler, one CPU), so results are the same bits; only the wall time of a
cold first step changes (5.6-5.8 -> 3.8-3.9 s, Zen 5, 2 cores), not the CPU time.

A helper also compiles a serial twin that ``_threading``'s choice between a parallel kernel
and its serial twin wants to time (``ready``): the twin is tried once the helper has put it in
the cache, so no call waits for it.

Not started when: ``BNFAST_COMPILE_AHEAD=0``; in the helper itself; on a one-core machine;
in a frozen application; where a process cannot be started (the caller then compiles as
before). The helper writes nothing but numba's cache (atomically, file by file: numba writes a
temporary and renames it); its output goes to /dev/null. A helper that fails or takes longer
than ``WAIT_S`` is ignored (killed after that wait): this process then compiles the kernel
itself, as it would have without one. One still running when this process exits (a script
that never ran a backward) is stopped then, so that exiting never waits for it.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys

import numba

from . import kernels
from .kernels._jit import compile_declared, in_cache

WAIT_S = 120.0  # a helper compiles one kernel in seconds; beyond this, something is wrong
_ENV = "BNFAST_COMPILE_AHEAD"
_CHILD = "BNFAST_AHEAD_CHILD"

# The kernel that follows each one in a training step: forward -> backward, for each twin.
_NEXT = {"forward": "backward"}
_TWINS = ("", "serial", "small")


def _spec(dispatcher) -> tuple[str, str, str] | None:
    """``(family, kernel, twin)`` of a locked kernel dispatcher, or None."""
    for family, module in kernels.FAMILIES.items():
        for name in kernels.KERNELS:
            top = getattr(module, name)
            for twin in _TWINS:
                if (getattr(top, twin, None) if twin else top) is dispatcher:
                    return family, name, twin
    return None


def _twin(family: str, name: str, twin: str):
    top = getattr(kernels.FAMILIES[family], name)
    return getattr(top, twin) if twin else top


_pending: dict = {}  # (id(dispatcher), dtype name) -> the helper process compiling it


def enabled() -> bool:
    """Not turned off, not in the helper, more than one core, and a Python to start (in a
    frozen application ``sys.executable`` is the application itself)."""
    return (
        os.environ.get(_ENV, "1") != "0"
        and not os.environ.get(_CHILD)
        and (os.cpu_count() or 1) > 1
        and not getattr(sys, "frozen", False)
        and bool(sys.executable)
    )


def start(dispatcher, dtype) -> None:
    """Called when ``dispatcher`` (a kernel) is about to be compiled for ``dtype``: start a
    helper compiling the kernel that follows it in a training step, unless one is running."""
    spec = _spec(dispatcher)
    if spec is None or spec[1] not in _NEXT or not enabled():
        return
    family, name, twin = spec
    _spawn(family, _NEXT[name], twin, dtype)


def ready(dispatcher, dtype) -> bool:
    """Can ``dispatcher`` run on ``dtype`` without this process compiling it: compiled or
    loaded here, or compiled into the cache by a helper that has finished? If not, a helper
    starts compiling it (once) and this returns False. Where no helper can run: True (the
    call compiles it, as any first call). ``_threading``'s adaptive calls try a serial twin
    only once it is ready, so choosing between the ways never stalls a call on compilation."""
    if not enabled() or any(str(sig[0].dtype) == str(dtype) for sig in dispatcher.overloads):
        return True
    helper = _pending.get((id(dispatcher), str(dtype)))
    if helper is None and in_cache(dispatcher, dtype):  # a load, not a compilation: here
        compile_declared(dispatcher, dtype)  # (a helper process would cost ~1 s of CPU)
        return True
    if helper is None:
        spec = _spec(dispatcher)
        if spec is None or not _spawn(*spec, dtype):
            return True
        return False
    return helper.poll() is not None


def _spawn(family: str, name: str, twin: str, dtype) -> bool:
    """Start a helper compiling that kernel twin for dtype into numba's cache, unless one was
    started; False where no process can be started."""
    key = (id(_twin(family, name, twin)), str(dtype))
    if key in _pending:
        return True
    env = dict(os.environ)
    env[_CHILD] = "1"
    env["BNFAST_QUIET"] = "1"
    if numba.config.CACHE_DIR:  # set in this process, perhaps not in its environment
        env["NUMBA_CACHE_DIR"] = numba.config.CACHE_DIR
    # this process's module path (bnfast may be importable only through a sys.path entry
    # added at run time), so the helper compiles the very same bnfast
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    command = [sys.executable, "-m", "bnfast._ahead", family, name, twin, str(dtype)]
    try:
        _pending[key] = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError:  # no process can be started here: compile in this one, as before
        return False
    return True


def wait(dispatcher, dtype) -> None:
    """Called before ``dispatcher``'s signatures for ``dtype`` are compiled or loaded: if a
    helper is compiling them, wait for it (then numba loads them from the cache)."""
    helper = _pending.pop((id(dispatcher), str(dtype)), None)
    if helper is None:
        return
    try:
        helper.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        helper.kill()
        helper.wait()


@atexit.register
def _stop() -> None:
    """At exit: stop the helpers nobody waited for."""
    while _pending:
        helper = _pending.popitem()[1]
        if helper.poll() is None:
            helper.kill()
        helper.wait()


def _main(argv: list[str]) -> int:
    """The helper: compile one kernel's declared signatures for one dtype into the cache."""
    import numpy as np

    family, name, twin, dtype = argv
    return 0 if compile_declared(_twin(family, name, twin), np.dtype(dtype)) else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
