"""PyTorch parity in float64: forward (y, saved mean/invstd, running stats), backward (autograd)
and eval mode against torch.nn.functional.batch_norm; state_dict both ways. Skipped, not failed,
when torch is not installed (CI installs torch==2.13.0)."""

from __future__ import annotations

import numpy as np
import pytest

import bnfast

CASES = [
    ((8, 5), 1),
    ((4, 3, 7), 1),
    ((3, 4, 5, 6), 1),
    ((3, 5, 6, 4), -1),
    ((2, 3, 4, 2, 3), 1),
    ((6, 2, 3, 5), 2),
]


def _to_torch(torch, a, axis):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, axis, 1)))


def _from_torch(t, axis):
    return np.moveaxis(t.detach().numpy(), 1, axis)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_matches_torch(torch, shape, axis, training, seed):
    F = torch.nn.functional
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = rng.normal(rng.uniform(-5, 5), rng.uniform(0.1, 10), shape)
    dy = rng.normal(size=shape)
    g, b = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2, c)
    momentum, eps = float(rng.choice([0.1, 0.3])), float(rng.choice([1e-5, 1e-3]))

    rm_b, rv_b = rm.copy(), rv.copy()
    y, cache = bnfast.forward(
        x,
        g,
        b,
        axis=axis,
        training=training,
        running_mean=rm_b,
        running_var=rv_b,
        momentum=momentum,
        eps=eps,
    )
    dx, dg, db = bnfast.backward(dy, cache)

    xt = _to_torch(torch, x, axis).requires_grad_(True)
    gt = torch.from_numpy(g.copy()).requires_grad_(True)
    bt = torch.from_numpy(b.copy()).requires_grad_(True)
    rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    yt = F.batch_norm(xt, rmt, rvt, gt, bt, training, momentum, eps)
    yt.backward(_to_torch(torch, dy, axis))
    np.testing.assert_allclose(y, _from_torch(yt, axis), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rm_b, rmt.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rv_b, rvt.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, _from_torch(xt.grad, axis), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dg, gt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-9, atol=1e-11)
    if training:
        _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            _to_torch(torch, x, axis), gt.detach(), bt.detach(), None, None, True, momentum, eps
        )
        np.testing.assert_allclose(cache.mean, save_mean.numpy(), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(cache.invstd, save_invstd.numpy(), rtol=1e-10)


def test_state_dict_into_torch_and_back(torch):
    rng = np.random.default_rng(7)
    bn = bnfast.BatchNorm(4, dtype=np.float32)
    for _ in range(3):
        bn(rng.normal(2, 3, (8, 4, 5, 5)).astype(np.float32))
    bn.gamma[...] = rng.uniform(0.5, 1.5, 4)
    bn.beta[...] = rng.normal(size=4)
    tbn = torch.nn.BatchNorm2d(4)
    tbn.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in bn.state_dict().items()})
    x = rng.normal(2, 3, (6, 4, 3, 3)).astype(np.float32)
    tbn.eval()
    bn.eval()
    np.testing.assert_allclose(
        bn(x), tbn(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5
    )
    back = bnfast.BatchNorm(4)
    back.load_state_dict(tbn.state_dict())
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v)


def test_layer_training_trajectory_matches_torch(torch):
    """Several training steps, momentum=None included: running stats and counters agree."""
    rng = np.random.default_rng(8)
    for momentum in (0.1, None):
        bn = bnfast.BatchNorm(3, momentum=momentum, dtype=np.float64)
        tbn = torch.nn.BatchNorm1d(3, momentum=momentum, dtype=torch.float64)
        for _ in range(4):
            x = rng.normal(rng.uniform(-3, 3), 2.0, (10, 3, 4))
            np.testing.assert_allclose(
                bn(x), tbn(torch.from_numpy(x)).detach().numpy(), rtol=1e-10, atol=1e-12
            )
        sd, tsd = bn.state_dict(), tbn.state_dict()
        for k in sd:
            np.testing.assert_allclose(sd[k], tsd[k].numpy(), rtol=1e-12)
