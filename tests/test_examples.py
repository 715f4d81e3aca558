"""The NumPy trainer in examples/: finite-difference gradient checks and the --quick run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import numeric_grad

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
mlp = pytest.importorskip("mlp")


def test_softmax_cross_entropy_gradient():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(5, 4)), rng.integers(0, 4, 5)
    _, grad = mlp.softmax_cross_entropy(logits, labels)
    num = numeric_grad(lambda: mlp.softmax_cross_entropy(logits, labels)[0], logits)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-9)


def test_linear_gradient():
    rng = np.random.default_rng(1)
    lin = mlp.Linear(4, 3, rng)
    lin.b[...] = rng.normal(size=3)
    x, w = rng.normal(size=(6, 4)), rng.normal(size=(6, 3))
    f = lambda: float(np.sum(w * lin.forward(x)))  # noqa: E731
    f()
    dx = lin.backward(w)
    np.testing.assert_allclose(dx, numeric_grad(f, x), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(lin.dW, numeric_grad(f, lin.W), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(lin.db, numeric_grad(f, lin.b), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bias_before_bn", [False, True])
def test_whole_network_with_bn_gradient(bias_before_bn):
    """Every parameter's gradient (W, gamma, beta, bias) of the full network, float64."""
    rng = np.random.default_rng(2)
    net = mlp.MLP(5, 3, width=4, depth=2, bn=True, bias_before_bn=bias_before_bn, seed=3)
    for layer in net.layers:
        if isinstance(layer, mlp.BatchNorm):  # non-trivial gamma/beta
            layer.bn.gamma[...] = rng.uniform(0.5, 1.5, 4)
            layer.bn.beta[...] = rng.normal(size=4)
    x, y = rng.normal(size=(7, 5)), rng.integers(0, 3, 7)
    f = lambda: net.loss(x, y)[0]  # noqa: E731 (training mode; running stats change, unused)
    _, dl = net.loss(x, y)
    net.backward(dl)
    for p, g in net.params():
        np.testing.assert_allclose(g, numeric_grad(f, p), rtol=1e-5, atol=1e-8)


def test_quick_run_learns(tmp_path):
    """--quick end to end: a working BN network beats 90% on digits (a broken one stays ~10%)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    import bn_experiments

    rows = dict(
        (name, (a, b)) for name, a, b in bn_experiments.main(["--quick", "--out", str(tmp_path)])
    )
    acc_bn = rows["6 test acc: EMA stats (eval) / test-batch stats, batch 360"][0]
    assert acc_bn > 0.9
    assert float(rows["4 norm of grad of the bias before BN (norm of grad W for scale)"][0]) < 1e-10
    assert (tmp_path / "1_loss.png").stat().st_size > 1000
    assert (tmp_path / "results.md").read_text().startswith("| experiment")
