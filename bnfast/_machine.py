"""This machine's facts and the kernels' tuning vector derived from them (read once).

Every size a kernel partitions by comes from here, passed at run time (``kernels._jit.TUNE_*``),
so nothing tuned on one CPU is compiled in. The rules, from this CPU's cache sizes (Linux sysfs,
else ``os.sysconf``, else the defaults named below):

- ``TUNE_TILE``, lanes per tile of the lanes family: a task's per-lane float64 vectors
  (shifts and two sums, or the write pass's mean, scale and shift: 24 bytes per lane) fill
  3/4 of L1d: ``L1d / 32``, rounded down to a power of two (32 KiB: 1024 lanes, one 4 KiB
  page of float32 per row). Measured on float32, one thread, interleaved, write pass: tiles of
  1024 lanes ran 5-25% faster than 512 and 256 at (512, 2048), (2048, 1024), (1024, 4096) and
  (8192, 1024) (a tile narrower than a page leaves the L2 prefetcher half-pages to stream),
  and a whole 2048-lane row (48 KiB of per-lane values) was 35% slower than 1024.
- ``TUNE_BLOCK``, bytes of x per task of a two-pass partition: a quarter of L2 (1 MiB:
  256 KiB), so a task's input and output stay in its core's L2 while the task runs.
- ``TUNE_STRIP``: the lanes family reduces a strip of lanes over every row and writes it from
  cache when the strip (at least 256 lanes) is at most four times L2 (4 MiB: float32 batches up
  to 4096 rows at 256 lanes). Measured, float32, interleaved, 1 and 2 threads: 4 MiB strips
  were fastest or tied at (2048, 1024) (forward 847 against 1189 us at 2 MiB, one thread),
  (8192, 256) and (1024, 4096); 8 MiB strips lost up to 1.8x at two threads (8192, 256).
- ``SERIAL_BELOW`` (bytes of x): smaller calls run the serial twin. A parallel launch costs
  a fixed time while a serial pass grows with the array; the launch pays once the array is
  larger than half of one core's L2 (measured on the old kernels, float32 C = 64, two threads:
  break-even near 2**17 values = 512 KiB = L2/2; see ``_threading``).
- ``TUNE_THREADS``: 1 in ``TUNE``; ``with_threads(n)`` is ``TUNE`` for a parallel call on n
  threads (``_threading.kernels_for``), so ``lanes.geometry`` can give each thread a fused tile
  (calling ``numba.get_num_threads()`` inside a kernel would stop numba caching it).
- ``TUNE_WIDE``, ``TUNE_STREAM``: the lanes family's tiles for an array of at least half the
  last-level cache (x and its output outgrow it: the passes stream from memory): lanes whose
  float64 per-lane vectors (24 bytes a lane) fill at most 1/8 of L2, rounded down to a power of
  two (1 MiB: 4096 lanes, 16 KiB of float32 per row). Longer runs of each row per task stream
  faster from memory (float32, Zen 4, tiles of 1024 -> 4096 lanes, forward, backward and
  inference at (2048, 4096), (8192, 4096), (16384, 4096): 1.05-1.30x on one thread,
  1.04-1.19x on two; at 16 MiB, (1024, 4096), only inference gains, 1.12-1.20x), while in
  cache the L1d-sized tile wins (see ``lanes.blocks``).
- ``TUNE_L2``: one core's L2 in bytes (``lanes.geometry`` splits a fused strip for threads
  only into tiles that fit it; the rows family takes its fused route only for arrays that fit
  it, ``rows.fused``).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np

from .kernels import _jit

# Used where the OS tells nothing (seen on no Linux machine of ours): a common x86 core.
DEFAULT_CACHES = {"L1d": 32 * 1024, "L2": 1024 * 1024, "L3": 32 * 1024 * 1024}
_SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")
_SYSCONF = {
    "L1d": "SC_LEVEL1_DCACHE_SIZE",
    "L2": "SC_LEVEL2_CACHE_SIZE",
    "L3": "SC_LEVEL3_CACHE_SIZE",
}


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip())
    if not m:
        return 0
    return int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]


def cache_sizes() -> dict:
    """Bytes of L1d, L2 and L3 of one core (L3: the whole cache it shares), with the source."""
    sizes: dict = {}
    for index in sorted(_SYSFS.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = _size((index / "size").read_text())
        except OSError:
            continue
        name = "L1d" if level == "1" and kind == "Data" else f"L{level}" if level != "1" else ""
        if name and size:
            sizes[name] = size
    source = "sysfs" if sizes else ""
    for name, key in _SYSCONF.items():
        if name not in sizes:
            try:
                value = os.sysconf(key)
            except (ValueError, OSError, AttributeError):
                value = 0
            if value > 0:
                sizes[name] = value
                source = source or "sysconf"
    for name, value in DEFAULT_CACHES.items():
        if name not in sizes:
            sizes[name] = value
            source = (source + "+defaults") if source else "defaults"
    sizes["source"] = source
    return sizes


def cpu_model() -> str:
    """The CPU's model name, family and model (from /proc/cpuinfo on Linux)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    name = fields.get("model name", "unknown CPU")
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    try:
        flags = Path("/proc/cpuinfo").read_text()
        name += ", AVX-512" if " avx512f" in flags else ", AVX2" if " avx2" in flags else ""
    except OSError:
        pass
    return name


def _power_of_two_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def tuning(caches: dict) -> np.ndarray:
    """The kernels' int64 tuning vector for these cache sizes (rules in the module docstring)."""
    tune = np.zeros(_jit.TUNE_SIZE, np.int64)
    tune[_jit.TUNE_TILE] = max(16, _power_of_two_floor(caches["L1d"] // 32))
    tune[_jit.TUNE_BLOCK] = max(64 * 1024, caches["L2"] // 4)
    tune[_jit.TUNE_STRIP] = max(256 * 1024, 4 * caches["L2"])
    tune[_jit.TUNE_THREADS] = 1
    tune[_jit.TUNE_L2] = caches["L2"]
    tune[_jit.TUNE_WIDE] = max(tune[_jit.TUNE_TILE], _power_of_two_floor(caches["L2"] // 192))
    tune[_jit.TUNE_STREAM] = caches["L3"] // 2
    tune.flags.writeable = False
    return tune


CACHES = cache_sizes()
TUNE = tuning(CACHES)
SERIAL_BELOW = CACHES["L2"] // 2


@functools.cache
def with_threads(threads: int) -> np.ndarray:
    """``TUNE`` for a call that runs on ``threads`` threads (read-only, one per count)."""
    tune = TUNE.copy()
    tune[_jit.TUNE_THREADS] = threads
    tune.flags.writeable = False
    return tune


def describe() -> str:
    """One line naming this machine for benchmark output."""
    c = CACHES
    return (
        f"{cpu_model()}; {os.cpu_count()} cores; L1d {c['L1d'] // 1024} KiB, "
        f"L2 {c['L2'] // 1024} KiB, L3 {c['L3'] // 2**20} MiB per core group "
        f"({c['source']})"
    )
