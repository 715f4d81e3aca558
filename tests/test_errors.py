"""Bad input: a clear ValueError/TypeError naming the problem, raised before anything is written."""

from __future__ import annotations

import numpy as np
import pytest

import bnfast

C = 3


def _state():
    rng = np.random.default_rng(0)
    return dict(
        x=rng.normal(size=(4, C, 5)),
        gamma=np.ones(C),
        beta=np.zeros(C),
        running_mean=np.full(C, 0.25),
        running_var=np.full(C, 2.0),
        out=np.full((4, C, 5), 7.0),
    )


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


# (name, error type, words the message must contain, change to the valid call's arguments)
FORWARD_CASES = [
    ("ndim<2", ValueError, "ndim >= 2", dict(x=np.ones(5))),
    ("axis out of range", ValueError, "axis=3", dict(axis=3)),
    ("axis not int", TypeError, "axis", dict(axis=1.0)),
    ("x int", TypeError, "int64", dict(x=np.ones((4, C), np.int64))),
    ("x complex", TypeError, "complex", dict(x=np.ones((4, C), complex))),
    ("x bool", TypeError, "bool", dict(x=np.ones((4, C), bool))),
    ("x object", TypeError, "object", dict(x=np.ones((4, C), object))),
    ("x float16", TypeError, "float16", dict(x=np.ones((4, C), np.float16))),
    ("gamma int", TypeError, "gamma", dict(gamma=np.ones(C, int))),
    ("beta shape", ValueError, "beta", dict(beta=np.zeros(C + 1))),
    ("gamma 2-D", ValueError, "gamma", dict(gamma=np.ones((1, C)))),
    ("running_mean dtype", TypeError, "running_mean", dict(running_mean=np.zeros(C, int))),
    ("running_var shape", ValueError, "running_var", dict(running_var=np.ones(C + 1))),
    ("running_mean read-only", ValueError, "read-only", dict(running_mean=_readonly(np.zeros(C)))),
    ("running_var list", TypeError, "running_var", dict(running_var=[1.0] * C)),
    ("only running_mean", ValueError, "both", dict(running_var=None)),
    ("one value per channel", ValueError, "more than 1 value", dict(x=np.ones((1, C, 1)))),
    ("eps zero", ValueError, "eps", dict(eps=0.0)),
    ("eps negative", ValueError, "eps", dict(eps=-1e-5)),
    ("eps nan", ValueError, "eps", dict(eps=float("nan"))),
    ("eps inf", ValueError, "eps", dict(eps=float("inf"))),
    ("eps str", TypeError, "eps", dict(eps="1e-5")),
    ("momentum > 1", ValueError, "momentum", dict(momentum=1.5)),
    ("momentum < 0", ValueError, "momentum", dict(momentum=-0.1)),
    ("momentum nan", ValueError, "momentum", dict(momentum=float("nan"))),
    ("momentum None", TypeError, "momentum", dict(momentum=None)),
    ("training not bool", TypeError, "training", dict(training="yes")),
    ("out shape", ValueError, "out", dict(out=np.zeros((4, C, 6)))),
    ("out dtype", TypeError, "out", dict(out=np.zeros((4, C, 5), np.float32))),
    ("out read-only", ValueError, "read-only", dict(out=_readonly(np.zeros((4, C, 5))))),
    ("out list", TypeError, "out", dict(out=[0.0])),
]


@pytest.mark.parametrize("name,exc,words,change", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_bad_input_raises_and_writes_nothing(name, exc, words, change):
    s = _state()
    args = {**s, **change}
    buffers = ("running_mean", "running_var", "out")
    before = {
        k: np.array(args[k], copy=True) for k in buffers if isinstance(args[k], np.ndarray)
    }  # the arrays this call receives
    with pytest.raises(exc, match=words):
        bnfast.forward(**args)
    for k, want in before.items():
        np.testing.assert_array_equal(args[k], want, err_msg=f"{name}: {k} was written")


@pytest.mark.parametrize(
    "change,exc",
    [
        (dict(axis=True), TypeError),
        (dict(training=1), TypeError),
        (dict(unbiased=1), TypeError),
        (dict(momentum=True), TypeError),
        (dict(eps=True), TypeError),
        (dict(renorm=(True, 0.0)), TypeError),
        (dict(renorm=[1.0, -1.0]), ValueError),
    ],
    ids=repr,
)
def test_memoized_checks_do_not_admit_lookalikes(change, exc):
    """forward() memoizes what its scalar checks established per call signature; True == 1 and
    1 == 1.0 as dict keys, so a call that equals a checked one but passes a bool must still
    raise (the valid call runs first, with the same values otherwise)."""
    s = _state()
    valid = dict(axis=1, training=True, unbiased=True, momentum=1.0, eps=1.0, renorm=(1.0, 0.0))
    bnfast.forward(**{**s, **valid, "out": None})
    bnfast.forward(**{**s, **valid, "out": None})
    rm = s["running_mean"].copy()
    with pytest.raises(exc):
        bnfast.forward(**{**s, **valid, "out": None, **change})
    np.testing.assert_array_equal(s["running_mean"], rm)


def test_out_overlapping_x_while_training():
    s = _state()
    rm = s["running_mean"].copy()
    with pytest.raises(ValueError, match="overlaps x"):
        bnfast.forward(s["x"], running_mean=rm, running_var=s["running_var"], out=s["x"])
    np.testing.assert_array_equal(rm, s["running_mean"])
    with pytest.raises(ValueError, match="overlap"):
        bnfast.forward(
            s["x"][:, :, :4],
            training=False,
            running_mean=rm,
            running_var=s["running_var"],
            out=s["x"][:, :, 1:],
        )


def test_inference_needs_running_stats_and_accepts_read_only_ones():
    s = _state()
    with pytest.raises(ValueError, match="running_mean and running_var"):
        bnfast.forward(s["x"], training=False)
    y, _ = bnfast.forward(
        s["x"],
        training=False,
        running_mean=_readonly(s["running_mean"]),
        running_var=_readonly(s["running_var"]),
    )
    assert np.all(np.isfinite(y))


def test_running_arrays_sharing_memory():
    s = _state()
    both = np.zeros(C)
    with pytest.raises(ValueError, match="share memory"):
        bnfast.forward(s["x"], running_mean=both, running_var=both)
    assert np.all(both == 0)


def test_backward_bad_input():
    s = _state()
    _, cache = bnfast.forward(s["x"])
    dy = np.ones_like(s["x"])
    with pytest.raises(TypeError, match="cache"):
        bnfast.backward(dy, {"x": s["x"]})
    with pytest.raises(TypeError, match="dy has dtype float32"):
        bnfast.backward(dy.astype(np.float32), cache)
    with pytest.raises(ValueError, match="dy has shape"):
        bnfast.backward(np.ones((4, C, 6)), cache)
    _, other = bnfast.forward(np.ones((2, C)) + np.arange(2)[:, None])
    with pytest.raises(ValueError, match=r"forward call on shape \(2, 3\)"):
        bnfast.backward(dy, other)  # a cache from another call
    out = np.full_like(dy, 7.0)
    for bad, exc in (
        (np.zeros((4, C, 6)), ValueError),
        (np.zeros((4, C, 5), np.float32), TypeError),
        (_readonly(out), ValueError),
        (s["x"], ValueError),
    ):
        with pytest.raises(exc, match="out"):
            bnfast.backward(dy, cache, out=bad)
    np.testing.assert_array_equal(s["x"], _state()["x"])


def test_moments_bad_input():
    with pytest.raises(ValueError, match="no values per channel"):
        bnfast.moments(np.ones((0, 3)))
    with pytest.raises(TypeError, match="int64"):
        bnfast.moments(np.ones((4, 3), np.int64))
    with pytest.raises(ValueError, match="axis=-3"):
        bnfast.moments(np.ones((4, 3)), axis=-3)


def test_layer_bad_state_dict_loads_nothing():
    bn = bnfast.BatchNorm(C)
    sd = bn.state_dict()
    before = bn.state_dict()
    bad_sets = [
        {k: v for k, v in sd.items() if k != "running_var"},
        {**sd, "extra": np.zeros(1)},
        {**sd, "weight": np.full(C + 1, 5.0)},
        {**sd, "running_mean": np.full(C, 3.0), "bias": np.zeros((C, 1))},
        {**sd, "num_batches_tracked": np.array(-1)},
    ]
    for bad in bad_sets:
        with pytest.raises(ValueError, match="state|bias|weight|num_batches"):
            bn.load_state_dict(bad)
        for k, v in bn.state_dict().items():
            np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_layer_bad_construction_and_forward():
    with pytest.raises(TypeError, match="dtype"):
        bnfast.BatchNorm(3, dtype=np.int32)
    with pytest.raises(ValueError, match="num_features"):
        bnfast.BatchNorm(0)
    with pytest.raises(ValueError, match="momentum"):
        bnfast.BatchNorm(3, momentum=2.0)
    bn = bnfast.BatchNorm(3)
    with pytest.raises(RuntimeError, match="forward"):
        bn.backward(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="gamma has shape"):
        bn(np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(np.ones((1, 3), np.float32))
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, np.zeros(3))


def test_memoized_plans_keep_no_caller_array_alive():
    """The call plans are memoized per call signature (shapes, strides, dtypes, scalars): they
    must not hold the caller's arrays (x, gamma, running arrays, dy), which would keep them
    alive after the caller dropped them."""
    import gc
    import weakref

    s = _state()
    x, rm, dy = s["x"], s["running_mean"], np.ones_like(s["x"])
    refs = [weakref.ref(a) for a in (x, rm, dy, s["gamma"])]
    y, cache = bnfast.forward(x, s["gamma"], running_mean=rm, running_var=s["running_var"])
    bnfast.backward(dy, cache)
    _, cache = bnfast.forward(x, training=False, running_mean=rm, running_var=s["running_var"])
    bnfast.backward(dy, cache)
    del s, x, rm, dy, y, cache
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
