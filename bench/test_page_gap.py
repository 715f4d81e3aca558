"""``bench/page_gap.py``: its buffers start where asked, and the script runs. Timings are never
asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import page_gap  # noqa: E402


def test_buffers_start_where_asked():
    x = np.ones((3, 1000), np.float32)
    for gap in (0, 16, 512, 3584, 4080):
        y = page_gap.buffer_at(x.shape, np.float32, x, gap)
        assert (y.ctypes.data - x.ctypes.data) % 4096 == gap
        assert y.shape == x.shape and y.flags.c_contiguous and y.flags.writeable
        y[...] = 2.0  # the whole view lies inside its allocation
        assert not np.shares_memory(x, y)


def test_the_script_runs(monkeypatch, capsys):
    monkeypatch.setattr(
        sys, "argv", ["page_gap.py", "--shapes", "8x1024", "--threads", "1", "--budget", "0.001"]
    )
    page_gap.main()
    out = capsys.readouterr().out
    assert "PLACE_NEAR" in out and out.splitlines()[-1].startswith("8x1024")
