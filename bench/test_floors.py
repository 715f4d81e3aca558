"""``bench/floors.py``: its bare loops compute what their names say (against NumPy in float64),
and the script runs. Timings are never asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import floors  # noqa: E402

RNG = np.random.default_rng(7)


def _vectors(c):
    return [RNG.uniform(0.5, 1.5, c) for _ in range(5)]


@pytest.mark.parametrize("shape", [(37, 5), (64, 1024), (9, 1100)])
def test_lane_loops_match_numpy(shape):
    """Rows of C lanes (2-D, NHWC): odd row counts leave a tail after the groups of 8 and 4,
    and 1100 float32 lanes take the several-rows-per-pass write and dx."""
    x = (3 + 2 * RNG.standard_normal(shape)).astype(np.float32)
    g = RNG.standard_normal(shape).astype(np.float32)
    c = shape[1]
    m, s, b, c1, c0 = _vectors(c)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    k = x64[0].copy()
    a1, a2 = np.empty(c), np.empty(c)
    floors.lane_moments(x, k, a1, a2)
    np.testing.assert_allclose(a1, (x64 - k).sum(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(a2, ((x64 - k) ** 2).sum(0), rtol=1e-12)
    y = np.empty_like(x)
    floors.lane_write(x, y, m, s, b)
    np.testing.assert_array_equal(y, ((x64 - m) * s + b).astype(np.float32))
    floors.lane_gradient_sums(x, g, m, a1, a2)
    np.testing.assert_allclose(a1, g64.sum(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(a2, (g64 * (x64 - m)).sum(0), rtol=1e-12, atol=1e-9)
    floors.lane_dx(x, g, y, m, s, c1, c0)
    want = (s * g64 - c1 * (x64 - m) + c0).astype(np.float32)
    np.testing.assert_allclose(y, want, rtol=2e-7, atol=1e-6)
    f1, f2 = np.empty(c, np.float32), np.empty(c, np.float32)
    floors.lane_sums32(x, f1, f2)
    np.testing.assert_allclose(f1, x64.sum(0), rtol=1e-4)
    np.testing.assert_allclose(f2, (x64 * x64).sum(0), rtol=1e-4)
    s32, t32 = s.astype(np.float32), b.astype(np.float32)
    floors.lane_write32(x, y, s32, t32)
    np.testing.assert_allclose(y, x64 * s32 + t32, rtol=1e-5, atol=1e-5)


def test_row_loops_match_numpy():
    """NCHW as (N, C, H*W) rows."""
    x = (3 + 2 * RNG.standard_normal((3, 4, 50))).astype(np.float32)
    g = RNG.standard_normal(x.shape).astype(np.float32)
    m, s, b, c1, c0 = _vectors(4)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    k = x64[0, :, 0].copy()
    a1, a2 = np.empty(4), np.empty(4)
    floors.row_moments(x, k, a1, a2)
    d = x64 - k[:, None]
    np.testing.assert_allclose(a1, d.sum((0, 2)), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(a2, (d * d).sum((0, 2)), rtol=1e-12)
    y = np.empty_like(x)
    floors.row_write(x, y, m, s, b)
    want = ((x64 - m[:, None]) * s[:, None] + b[:, None]).astype(np.float32)
    np.testing.assert_array_equal(y, want)
    floors.row_gradient_sums(x, g, m, a1, a2)
    np.testing.assert_allclose(a1, g64.sum((0, 2)), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(a2, (g64 * (x64 - m[:, None])).sum((0, 2)), rtol=1e-12, atol=1e-9)
    floors.row_dx(x, g, y, m, s, c1, c0)
    want = (s[:, None] * g64 - c1[:, None] * (x64 - m[:, None]) + c0[:, None]).astype(np.float32)
    np.testing.assert_allclose(y, want, rtol=2e-7, atol=1e-6)
    f1, f2 = np.empty(4, np.float32), np.empty(4, np.float32)
    floors.row_sums32(x, f1, f2)
    np.testing.assert_allclose(f1, x64.sum((0, 2)), rtol=1e-4)
    np.testing.assert_allclose(f2, (x64 * x64).sum((0, 2)), rtol=1e-4)
    floors.row_gradient_sums32(x, g, f1, f2)
    np.testing.assert_allclose(f1, g64.sum((0, 2)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f2, (g64 * x64).sum((0, 2)), rtol=1e-4, atol=1e-3)
    s32, t32 = s.astype(np.float32), b.astype(np.float32)
    floors.row_write32(x, y, s32, t32)
    np.testing.assert_allclose(y, x64 * s32[:, None] + t32[:, None], rtol=1e-5, atol=1e-5)


def test_floors_script_runs(capsys, monkeypatch):
    import numba

    try:
        import torch
    except ImportError:
        torch = None
    threads = numba.get_num_threads()
    torch_threads = torch.get_num_threads() if torch is not None else None
    monkeypatch.setattr(sys, "argv", ["floors.py", "--match", "2-D 32x64", "--budget", "0.01"])
    try:
        floors.main()
    finally:  # the script runs on one thread: restore the session's counts
        numba.set_num_threads(threads)
        if torch is not None:
            torch.set_num_threads(torch_threads)
    out = capsys.readouterr().out
    assert out.count("2-D 32x64") == 3  # one line per operation
    for op in ("forward", "backward", "inference"):
        assert f"== {op}" in out


@pytest.mark.parametrize("layer", [floors.StepFloor, floors.StepFloor32])
def test_step_floor_layer_runs_its_loops(layer):
    """The MLP step's floor layer computes the lane loops' outputs (float64 reference) into
    buffers it keeps across steps, and its moments land in its sums."""
    z = (2 + RNG.standard_normal((40, 24))).astype(np.float32)
    g = RNG.standard_normal(z.shape).astype(np.float32)
    bn = layer(24)
    z64, g64 = z.astype(np.float64), g.astype(np.float64)
    m, s, b, c1, c0 = bn.v64
    y = bn.forward(z)
    if layer.f32:
        s32, t32, p32, q32 = (v.astype(np.float64) for v in bn.v32)
        np.testing.assert_allclose(y, z64 * s32 + t32, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bn.f[0], z64.sum(0), rtol=1e-4)
    else:
        np.testing.assert_array_equal(y, ((z64 - m) * s + b).astype(np.float32))
        np.testing.assert_allclose(bn.a[0], (z64 - z64[0]).sum(0), rtol=1e-12, atol=1e-9)
    dx = bn.backward(g)
    if layer.f32:
        want = s32 * g64 - p32 * z64 + q32
        np.testing.assert_allclose(dx, want, rtol=1e-5, atol=1e-4)
    else:
        want = (s * g64 - c1 * (z64 - m) + c0).astype(np.float32)
        np.testing.assert_allclose(dx, want, rtol=2e-7, atol=1e-6)
    assert bn.forward(z) is y and bn.backward(g) is dx  # kept, as reuse_buffers keeps them


def test_floors_step_table_runs(capsys, monkeypatch):
    """``--step``: one line per thread count and case, a column per layer."""
    import numba

    from bnfast import _compare

    threads = numba.get_num_threads()
    monkeypatch.setattr(_compare, "STEP_CASES", ((16, 32), (24, 64)))
    monkeypatch.setattr(sys, "argv", ["floors.py", "--step", "--threads", "1", "--rounds", "2"])
    try:
        floors.main()
    finally:
        numba.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    names = ["bnfast", "kernels", "f64", "f32", "numpy"]
    assert lines[1].split() == ["threads", "batch", "H", *names]
    rows = [line.split() for line in lines[2:]]
    assert [r[:3] for r in rows] == [["1", "16", "32"], ["1", "24", "64"]]
    assert all(len(r) == 3 + 2 * len(names) for r in rows)


@pytest.mark.parametrize("shape", [(64, 256), (256, 1024)])  # a small call's entry; the family's
def test_step_kernels_give_the_layers_outputs(shape):
    """The kernels-alone layer of ``--step`` runs the layer's own kernels: a layer's outputs,
    dgamma and dbeta bit for bit, step after step."""
    import bnfast

    z = RNG.standard_normal(shape).astype(np.float32)
    g = RNG.standard_normal(shape).astype(np.float32)
    ref = bnfast.BatchNorm(shape[1], activation="relu")
    bare = floors.StepKernels(shape[1])
    for _ in range(3):
        np.testing.assert_array_equal(bare.forward(z), ref(z))
        np.testing.assert_array_equal(bare.backward(g), ref.backward(g))
        rows = bare.bn._rows
        np.testing.assert_array_equal(rows[4], ref.dgamma)
        np.testing.assert_array_equal(rows[5], ref.dbeta)
