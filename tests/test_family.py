"""Issue 9: the batch-norm family. Fused ReLU, Batch Renormalization, ghost batches, biased
running variance, scale and shift separately, the cache-free backward, folding: each against the
NumPy reference in every layout and both dtypes, forward and backward, plus finite differences,
properties (ghost batches equal the batch split by hand) and PyTorch parity where PyTorch has
the feature."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from _strategies import LAYOUTS, batches, channel_vectors, lay_out
from hypothesis import given
from hypothesis import strategies as st

import bnfast
from bnfast import _compare as cmp
from bnfast import reference as ref
from conftest import (
    assert_channels_close,
    assert_close_to_bound,
    backward_bounds,
    backward_tolerance,
    describe,
    forward_bound,
    numeric_grad,
)

SHAPES = [((16, 3), 1), ((8, 3, 5), -2), ((4, 5, 6, 3), 3), ((6, 3, 4, 5), 1), ((12, 3, 70), 1)]
VARIANTS = [name for name in cmp.VARIANTS if name != "plain"]  # the shared registry


def _inputs(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = rng.normal(0.3, 2.0, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    g = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.normal(0.0, 0.5, c).astype(dtype)
    rm = rng.normal(0.0, 1.0, c)
    rv = rng.uniform(1.0, 6.0, c)
    return x, dy, g, b, rm, rv


def _cases():
    for (shape, axis), layout, dtype, name in itertools.product(
        SHAPES, ("C", "F", "permuted", "strided"), (np.float32, np.float64), VARIANTS
    ):
        if "ghost" in name and (axis % len(shape) == 0 or shape[0] % 4):
            continue
        yield pytest.param(
            shape,
            axis,
            layout,
            dtype,
            name,
            id=f"{name}-{shape}-{axis}-{layout}-{np.dtype(dtype).name}",
        )


@pytest.mark.parametrize("shape,axis,layout,dtype,name", list(_cases()))
def test_feature_matches_reference(shape, axis, layout, dtype, name):
    """forward, running statistics, backward: bnfast against the reference."""
    kwargs = cmp.variant_kwargs(name, shape[0])
    x, dy, g, b, rm, rv = _inputs(shape, axis, dtype)
    x = lay_out(
        x,
        layout,
        axis=(axis + 1) % len(shape),
        perm=tuple(np.random.default_rng(1).permutation(len(shape))),
    )
    what = describe(x, axis, name)
    rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
    y, cache = bnfast.forward(x, g, b, axis=axis, running_mean=rm1, running_var=rv1, **kwargs)
    y_ref, cache_ref = ref.forward(x, g, b, axis=axis, running_mean=rm2, running_var=rv2, **kwargs)
    assert y.dtype == x.dtype
    # virtual batches: each part's rows bounded by its own statistics (conftest.forward_bound)
    bound = 4 * forward_bound(x, axis, cache_ref)  # renorm: r and d enter the scale
    assert_close_to_bound(y, y_ref, bound, axis, f"{what} y")
    np.testing.assert_allclose(rm1, rm2, rtol=1e-12, atol=1e-12, err_msg=f"{what} running mean")
    np.testing.assert_allclose(rv1, rv2, rtol=1e-12, atol=1e-12, err_msg=f"{what} running var")
    got, want = bnfast.backward(dy, cache), ref.backward(dy, cache_ref)
    tols = backward_bounds(x, dy, axis, cache_ref)  # dgamma, dbeta: the parts' bounds summed
    for what_, a, w, t in zip(("dx", "dgamma", "dbeta"), got, want, tols, strict=True):
        assert a.dtype == x.dtype
        assert_close_to_bound(a, w, 4 * t, axis, f"{what} {what_}")


def _frozen_renorm_loss(x, g, b, dy, r, d, eps):
    """sum(dy * y) with Batch Renormalization's r and d held constant (the paper's gradient)."""
    mu = x.mean(axis=0)
    var = ((x - mu) ** 2).mean(axis=0)
    return float(np.sum(dy * (g * ((x - mu) / np.sqrt(var + eps) * r + d) + b)))


def test_renorm_gradient_against_finite_differences():
    """float64, the gradient with r and d frozen, by central differences of the loss."""
    x, dy, g, b, rm, rv = _inputs((7, 3), 1, np.float64, seed=3)
    eps = 1e-3
    _, cache_ref = ref.forward(
        x, g, b, running_mean=rm.copy(), running_var=rv.copy(), eps=eps, renorm=(1.3, 0.4)
    )
    r, d = cache_ref["r"], cache_ref["d"]
    assert np.any(r != 1.0) and np.any(d != 0.0), "the case must exercise the clipping"
    _, cache = bnfast.forward(
        x, g, b, running_mean=rm.copy(), running_var=rv.copy(), eps=eps, renorm=(1.3, 0.4)
    )
    dx, dgamma, dbeta = bnfast.backward(dy, cache)
    xx = x.copy()
    num_dx = numeric_grad(lambda: _frozen_renorm_loss(xx, g, b, dy, r, d, eps), xx)
    gg = g.copy()
    num_dg = numeric_grad(lambda: _frozen_renorm_loss(x, gg, b, dy, r, d, eps), gg)
    np.testing.assert_allclose(dx, num_dx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dgamma, num_dg, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dbeta, dy.sum(axis=0), rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(activation="relu"),
        dict(virtual_batch_size=3),
        dict(virtual_batch_size=2, activation="relu"),
    ],
)
def test_gradients_against_finite_differences(kwargs):
    """float64: the loss sum(dy * y) differentiated numerically, x and gamma."""
    x, dy, g, b, _, _ = _inputs((6, 4, 3), 1, np.float64, seed=4)

    def loss(xx=x, gg=g):
        return float(np.sum(dy * bnfast.forward(xx, gg, b, eps=1e-3, **kwargs)[0]))

    _, cache = bnfast.forward(x, g, b, eps=1e-3, **kwargs)
    dx, dgamma, _ = bnfast.backward(dy, cache)
    xx, gg = x.copy(), g.copy()
    np.testing.assert_allclose(dx, numeric_grad(lambda: loss(xx=xx), xx), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dgamma, numeric_grad(lambda: loss(gg=gg), gg), rtol=1e-5, atol=1e-6)


def test_relu_equals_relu_after_plain_bn():
    """Fused ReLU: forward equals max(plain BN, 0) bit for bit; the gradient equals plain BN's
    with dy zeroed where the output is 0 (at exactly 0 too, as PyTorch's relu), to rounding."""
    rng = np.random.default_rng(5)
    for dtype, (shape, axis) in itertools.product((np.float32, np.float64), SHAPES):
        x = rng.normal(0.2, 1.0, shape).astype(dtype)
        b = np.zeros(shape[axis], dtype)
        x[(0,) * len(shape)] = x.mean(axis=tuple(i for i in range(x.ndim) if i != axis % x.ndim))[0]
        dy = rng.normal(size=shape).astype(dtype)
        y_plain, c_plain = bnfast.forward(x, beta=b, axis=axis)
        y_relu, c_relu = bnfast.forward(x, beta=b, axis=axis, activation="relu")
        np.testing.assert_array_equal(y_relu, np.maximum(y_plain, 0))
        got = bnfast.backward(dy, c_relu)
        masked = np.where(y_plain > 0, dy, 0).astype(dtype)
        want = bnfast.backward(masked, c_plain)
        _, cache_ref = ref.forward(x, beta=b, axis=axis)
        tols = backward_tolerance(x, masked, axis, cache_ref)  # rows summed in another order
        for name, a, w, t in zip(("dx", "dgamma", "dbeta"), got, want, tols, strict=True):
            assert_channels_close(a, w, t, axis, f"{describe(x, axis)} {name}")


def test_ghost_batches_equal_the_batch_split_by_hand():
    """Each virtual batch normalized exactly as a call on its own (bitwise); running averages
    from the mean of the groups' statistics; gradients per group, dgamma/dbeta summed."""
    rng = np.random.default_rng(6)
    for dtype, (shape, axis) in itertools.product(
        (np.float32, np.float64), [((12, 5), 1), ((6, 4, 4, 3), -1), ((8, 3, 40), 1)]
    ):
        x = rng.normal(1.0, 2.0, shape).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        k = 2 if shape[0] <= 6 else 4
        rm, rv = np.zeros(shape[axis]), np.ones(shape[axis])
        y, cache = bnfast.forward(
            x, axis=axis, virtual_batch_size=k, running_mean=rm, running_var=rv, momentum=0.3
        )
        pieces = [bnfast.forward(x[i : i + k], axis=axis) for i in range(0, shape[0], k)]
        np.testing.assert_array_equal(y, np.concatenate([p[0] for p in pieces]))
        m = x.size // shape[axis] // (shape[0] // k)
        means = np.mean([p[1].mean for p in pieces], axis=0)
        var = np.mean([1 / p[1].invstd ** 2 - 1e-5 for p in pieces], axis=0) * m / (m - 1)
        np.testing.assert_allclose(rm, 0.3 * means, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(rv, 0.7 + 0.3 * var, rtol=1e-9)
        dx, dg, db = bnfast.backward(dy, cache)
        by_hand = [
            bnfast.backward(dy[i : i + k], p[1])
            for i, p in zip(range(0, shape[0], k), pieces, strict=True)
        ]
        np.testing.assert_array_equal(dx, np.concatenate([b[0] for b in by_hand]))
        eps32 = 4 * np.finfo(dtype).eps
        np.testing.assert_allclose(
            dg,
            np.sum([b[1] for b in by_hand], axis=0, dtype=np.float64),
            rtol=eps32,
            atol=eps32 * np.abs(dy).sum(),
        )
        np.testing.assert_allclose(
            db,
            np.sum([b[2] for b in by_hand], axis=0, dtype=np.float64),
            rtol=eps32,
            atol=eps32 * np.abs(dy).sum(),
        )


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(virtual_batch_size=5), ValueError, "does not divide the batch of 12"),
        (dict(virtual_batch_size=0), ValueError, "virtual_batch_size must be >= 1"),
        (dict(virtual_batch_size=2.0), TypeError, "virtual_batch_size must be an int"),
        (dict(virtual_batch_size=2, axis=0), ValueError, "batch axis"),
        (dict(virtual_batch_size=1), ValueError, "1 per channel in each of 12 virtual batches"),
        (dict(renorm=(1.5, 0.5), tracking=False), ValueError, "renorm needs running_mean"),
        (dict(renorm=(0.5, 0.5)), ValueError, "rmax must be finite and >= 1"),
        (dict(renorm=(2.0, -1.0)), ValueError, "dmax must be finite and >= 0"),
        (dict(renorm=2.0), TypeError, "renorm must be None or a pair"),
        (dict(activation="gelu"), ValueError, "activation must be None or 'relu'"),
        (dict(unbiased="no"), TypeError, "unbiased must be True or False"),
    ],
)
def test_family_arguments_are_checked_before_any_write(kwargs, exc, words):
    kwargs = dict(kwargs)
    x = np.random.default_rng(7).normal(size=kwargs.pop("x_shape", (12, 3)))
    tracking = kwargs.pop("tracking", True)
    c = x.shape[kwargs.get("axis", 1)]
    rm, rv = np.full(c, 0.5), np.full(c, 2.0)
    extra = dict(running_mean=rm, running_var=rv) if tracking else {}
    with pytest.raises(exc, match=words):
        bnfast.forward(x, **extra, **kwargs)
    assert np.all(rm == 0.5) and np.all(rv == 2.0)


def test_biased_running_variance_and_momentum_from_decay():
    x = np.random.default_rng(8).normal(3.0, 2.0, (10, 4))
    rm, rv = np.zeros(4), np.ones(4)
    momentum = bnfast.momentum_from_decay(0.99)
    assert momentum == 1 - 0.99 and momentum == ref.momentum_from_decay(0.99)
    bnfast.forward(x, running_mean=rm, running_var=rv, momentum=momentum, unbiased=False)
    np.testing.assert_allclose(rv, 0.99 + momentum * x.var(axis=0), rtol=1e-14)
    np.testing.assert_allclose(rm, momentum * x.mean(axis=0), rtol=1e-14)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="decay"):
            bnfast.momentum_from_decay(bad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "shape,axis", SHAPES + [((4096, 40), 1), ((300, 16, 5), 1), ((4, 8, 100), 1)]
)
def test_backward_from_input_equals_backward_of_forward(shape, axis, layout, dtype):
    rng = np.random.default_rng(9)
    x = lay_out((5.0 + rng.normal(size=shape)).astype(dtype), layout, axis=0)
    dy = lay_out(rng.normal(size=shape).astype(dtype), "C")
    g = rng.uniform(0.5, 2.0, shape[axis]).astype(dtype)
    got = bnfast.backward_from_input(dy, x, g, axis=axis, eps=1e-3)
    want = ref.backward_from_input(dy, x, g, axis=axis, eps=1e-3)
    _, cache_ref = ref.forward(x, g, axis=axis, eps=1e-3)
    tols = backward_tolerance(x, dy, axis, cache_ref)
    for name, a, w, t in zip(("dx", "dgamma", "dbeta"), got, want, tols, strict=True):
        assert a.dtype == x.dtype
        assert_channels_close(a, w, t, axis, f"{describe(x, axis)} {name}")


def test_backward_from_input_checks_and_out():
    rng = np.random.default_rng(10)
    x, dy = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    want = bnfast.backward_from_input(dy, x)[0]
    out = dy.copy()
    assert bnfast.backward_from_input(out, x, out=out)[0] is out
    np.testing.assert_array_equal(out, want)
    with pytest.raises(TypeError, match="dy has dtype float32"):
        bnfast.backward_from_input(dy.astype(np.float32), x)
    with pytest.raises(ValueError, match="more than 1 value"):
        bnfast.backward_from_input(dy[:1], x[:1])
    with pytest.raises(ValueError, match="out overlaps x"):
        bnfast.backward_from_input(dy, x, out=x)


def _trained_layer(c, rng, **kwargs):
    bn = bnfast.BatchNorm(c, dtype=np.float64, **kwargs)
    if bn.gamma is not None:
        bn.gamma[...] = rng.uniform(0.5, 2.0, c)
    if bn.beta is not None:
        bn.beta[...] = rng.normal(size=c)
    for _ in range(3):
        bn(rng.normal(2.0, 3.0, (64, c)))
    return bn.eval()


@pytest.mark.parametrize("kwargs", [{}, dict(affine=False), dict(center=False), dict(scale=False)])
def test_folding_equals_the_layer_then_bn_in_eval_mode(kwargs):
    rng = np.random.default_rng(11)
    bn = _trained_layer(4, rng, **kwargs)
    W, b, x = rng.normal(size=(5, 4)), rng.normal(size=4), rng.normal(size=(7, 5))
    for bias in (b, None):
        W2, b2 = bnfast.fold_into_linear(W, bias, bn)
        z = x @ W + (0.0 if bias is None else bias)
        np.testing.assert_allclose(x @ W2 + b2, bn(z), rtol=1e-12, atol=1e-12)
    Wc = rng.normal(size=(4, 2, 3))  # a 1-D convolution: (out, in, kernel)
    xc = rng.normal(size=(2, 2, 9))
    Wc2, bc2 = bnfast.fold_into_conv(Wc, b, bn)

    def conv(w, bias):
        out = np.stack(
            [
                sum(np.convolve(xc[n, i], w[o, i, ::-1], "valid") for i in range(2))
                for n in range(2)
                for o in range(4)
            ]
        )
        return out.reshape(2, 4, 7) + bias[:, None]

    np.testing.assert_allclose(conv(Wc2, bc2), bn(conv(Wc, b)), rtol=1e-12, atol=1e-12)
    assert W2.dtype == W.dtype and Wc2.dtype == Wc.dtype


def test_folding_errors():
    rng = np.random.default_rng(12)
    bn = bnfast.BatchNorm(3, track_running_stats=False)
    with pytest.raises(ValueError, match="does not track running statistics"):
        bnfast.fold_into_linear(np.ones((2, 3)), None, bn)
    bn = _trained_layer(3, rng)
    with pytest.raises(ValueError, match=r"W has shape \(2, 4\)"):
        bnfast.fold_into_linear(np.ones((2, 4)), None, bn)
    with pytest.raises(ValueError, match=r"b has shape \(2,\)"):
        bnfast.fold_into_conv(np.ones((3, 2, 3)), np.ones(2), bn)
    with pytest.raises(TypeError, match="bn must be a bnfast.BatchNorm"):
        bnfast.fold_into_linear(np.ones((2, 3)), None, object())


def test_layer_with_the_family_matches_reference_over_steps():
    """BatchNorm(activation, renorm, virtual batches, biased variance, no shift) against the
    reference, three steps, each forward and backward, and eval."""
    rng = np.random.default_rng(13)
    kwargs = dict(activation="relu", renorm=(1.5, 0.5), virtual_batch_size=4, unbiased=False)
    bn = bnfast.BatchNorm(3, dtype=np.float64, center=False, momentum=0.2, **kwargs)
    rm, rv = np.zeros(3), np.ones(3)
    gamma = np.ones(3)
    for step in range(3):
        x = rng.normal(1.0 + step, 2.0, (8, 3))
        dy = rng.normal(size=(8, 3))
        y = bn(x)
        y_ref, cache_ref = ref.forward(
            x, gamma, None, running_mean=rm, running_var=rv, momentum=0.2, **kwargs
        )
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bn.running_var, rv, rtol=1e-12)
        dx = bn.backward(dy)
        dx_ref, dg_ref, _ = ref.backward(dy, cache_ref)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(bn.dgamma, dg_ref, rtol=1e-10, atol=1e-12)
    assert set(bn.params()) == {"gamma"} and set(bn.state_dict()) == {
        "weight",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    bn.eval()
    x = rng.normal(size=(5, 3))
    want = np.maximum(gamma * (x - rm) / np.sqrt(rv + 1e-5), 0)
    np.testing.assert_allclose(bn(x), want, rtol=1e-12, atol=1e-12)


def test_relu_matches_pytorch(torch):
    """forward and autograd backward of relu(batch_norm(x)) in float32, NCHW and NHWC."""
    rng = np.random.default_rng(14)
    for shape, axis in [((8, 5), 1), ((4, 3, 6, 5), 1), ((4, 6, 5, 3), -1)]:
        x = rng.normal(0.5, 2.0, shape).astype(np.float32)
        dy = rng.normal(size=shape).astype(np.float32)
        c = shape[axis]
        g, b = rng.uniform(0.5, 1.5, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
        xt = torch.from_numpy(np.moveaxis(x, axis, 1).copy()).requires_grad_(True)
        gt = torch.from_numpy(g).requires_grad_(True)
        bt = torch.from_numpy(b).requires_grad_(True)
        yt = torch.relu(torch.nn.functional.batch_norm(xt, None, None, gt, bt, True, 0.1, 1e-5))
        yt.backward(torch.from_numpy(np.moveaxis(dy, axis, 1).copy()))
        y, cache = bnfast.forward(x, g, b, axis=axis, activation="relu")
        dx, dg, db = bnfast.backward(dy, cache)
        np.testing.assert_allclose(y, np.moveaxis(yt.detach().numpy(), 1, axis), atol=2e-5)
        np.testing.assert_allclose(dx, np.moveaxis(xt.grad.numpy(), 1, axis), atol=5e-5)
        np.testing.assert_allclose(dg, gt.grad.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_scale_without_shift_state_round_trips_with_pytorch(torch):
    module = torch.nn.BatchNorm1d(3)
    module.bias = None
    with torch.no_grad():
        module.weight.mul_(3.0)
        module.running_var.add_(1.5)
    bn = bnfast.BatchNorm(3, center=False)
    bn.load_state_dict(module.state_dict())
    assert bn.beta is None
    np.testing.assert_array_equal(bn.gamma, np.full(3, 3.0, np.float32))
    x = np.random.default_rng(15).normal(size=(6, 3)).astype(np.float32)
    bn.eval()
    module.eval()
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(bn(x), want, rtol=1e-6, atol=1e-6)
    back = torch.nn.BatchNorm1d(3)
    back.bias = None
    back.load_state_dict({k: torch.from_numpy(v) for k, v in bn.state_dict().items()})
    np.testing.assert_array_equal(back.weight.detach().numpy(), bn.gamma)


def test_folding_matches_pytorch_fusion(torch):
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    rng = np.random.default_rng(16)
    bn = _trained_layer(4, rng)
    module = torch.nn.BatchNorm1d(4).double().eval()
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in bn.state_dict().items()})
    linear = torch.nn.Linear(5, 4).double().eval()
    fused = fuse_linear_bn_eval(linear, module)
    W2, b2 = bnfast.fold_into_linear(
        linear.weight.detach().numpy().T, linear.bias.detach().numpy(), bn
    )
    np.testing.assert_allclose(W2, fused.weight.detach().numpy().T, rtol=1e-12)
    np.testing.assert_allclose(b2, fused.bias.detach().numpy(), rtol=1e-12, atol=1e-12)
    conv = torch.nn.Conv2d(2, 4, 3).double().eval()
    module2 = torch.nn.BatchNorm2d(4).double().eval()
    module2.load_state_dict(module.state_dict())
    fused_conv = fuse_conv_bn_eval(conv, module2)
    Wc2, bc2 = bnfast.fold_into_conv(conv.weight.detach().numpy(), conv.bias.detach().numpy(), bn)
    np.testing.assert_allclose(Wc2, fused_conv.weight.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(bc2, fused_conv.bias.detach().numpy(), rtol=1e-12, atol=1e-12)


@st.composite
def family_args(draw):
    """A batch in any layout and axis, and a combination of the family's options."""
    x, axis = draw(batches(min_count=2))
    a = axis % x.ndim
    c = x.shape[a]
    kwargs = {}
    if draw(st.booleans()):
        kwargs["activation"] = "relu"
    if draw(st.booleans()):
        kwargs["renorm"] = (
            draw(st.sampled_from([1.0, 1.5, 3.0])),
            draw(st.sampled_from([0.0, 0.5, 5.0])),
        )
    kwargs["unbiased"] = draw(st.booleans())
    divisors = [
        k
        for k in range(1, x.shape[0])
        if x.shape[0] % k == 0 and x.size // c // (x.shape[0] // k) > 1
    ]
    if a != 0 and divisors and draw(st.booleans()):
        kwargs["virtual_batch_size"] = draw(st.sampled_from(divisors))
    gamma = channel_vectors(draw, c, x.dtype, low=0.25, high=2.0)
    beta = channel_vectors(draw, c, x.dtype)
    return x, axis, gamma, beta, kwargs


@given(family_args())
def test_family_property_against_reference(args):
    """Hypothesis: every combination of the family's options, every layout, both dtypes."""
    x, axis, gamma, beta, kwargs = args
    what = describe(x, axis, f"forward {kwargs}")
    c = x.shape[axis]
    rng = np.random.default_rng(0)
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 4.0, c)
    rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
    y, cache = bnfast.forward(
        x, gamma, beta, axis=axis, running_mean=rm1, running_var=rv1, eps=1e-3, **kwargs
    )
    y_ref, cache_ref = ref.forward(
        x, gamma, beta, axis=axis, running_mean=rm2, running_var=rv2, eps=1e-3, **kwargs
    )
    # virtual batches: each part's rows bounded by its own statistics (a constant part has invstd
    # 1/sqrt(eps), and the reference's mean of equal values can be an ulp off, which its y then
    # shows at that scale)
    renorm_scale = kwargs.get("renorm", (1.0, 0.0))[0] * (1 + kwargs.get("renorm", (1, 0))[1])
    bound = 4 * renorm_scale * forward_bound(x, axis, cache_ref)
    assert_close_to_bound(y, y_ref, bound, axis, what + " y")
    np.testing.assert_allclose(rm1, rm2, rtol=1e-10, atol=1e-10, err_msg=what)
    np.testing.assert_allclose(rv1, rv2, rtol=1e-10, atol=1e-10, err_msg=what)
    dy = lay_out(rng.normal(size=x.shape).astype(x.dtype), "C")
    # The activation's mask: where the output is within the forward's rounding bound of 0 (a
    # channel whose spread is below its mean's rounding), the sign is not determined by the math
    # and the two sides may disagree; compare the gradient only where it is.
    if kwargs.get("activation") == "relu":
        near = np.abs(y_ref.astype(np.float64)) <= bound
        dy = np.where(near, 0, dy).astype(x.dtype)
    got, want = bnfast.backward(dy, cache), ref.backward(dy, cache_ref)
    for name, a_, w, t in zip(
        ("dx", "dgamma", "dbeta"),
        got,
        want,
        backward_bounds(x, dy, axis, cache_ref),
        strict=True,
    ):
        assert a_.dtype == x.dtype
        assert_close_to_bound(a_, w, 4 * renorm_scale * t, axis, f"{what} {name}")
