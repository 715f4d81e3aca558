"""The cost of a small call: bnfast against PyTorch eager, one thread, interleaved rounds.

    python bench/small_calls.py [--threads 1] [--budget 0.5]

Functional forward (training, running statistics updated), backward and inference at the MLP
shapes where per-call overhead dominates, and a ``BatchNorm`` layer step (forward + backward)
in every configuration against ``torch.nn.BatchNorm1d`` with autograd, and layer inference.
Prints microseconds per call (medians of interleaved rounds) and the ratio PyTorch / bnfast;
the design issue's targets: functional forward and backward >= 1.5x, inference >= 1.2x, layer
step >= 4x, layer inference >= 1.5x. Run it alone on the machine.
"""

from __future__ import annotations

import argparse

import numba
import numpy as np

import bnfast
from bnfast import _compare as cmp
from bnfast import _machine

SHAPES = ((32, 64), (128, 512))
LAYERS = {
    "plain": ({}, {}),
    "relu, reuse_buffers": (dict(activation="relu", reuse_buffers=True), dict(relu=True)),
    "renorm": (dict(renorm=(3.0, 5.0)), dict(renorm=True)),
    "scale without shift": (dict(center=False), dict(no_bias=True)),
    "biased running var": (dict(unbiased=False), {}),
}


def functional(shape, torch):
    rng = np.random.default_rng(0)
    n, c = shape
    x = rng.normal(3, 2, shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    g = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.normal(size=c).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    _, cache = bnfast.forward(x, g, b)
    ours = {
        "forward": lambda: bnfast.forward(x, g, b, running_mean=rm, running_var=rv),
        "backward": lambda: bnfast.backward(dy, cache),
        "inference": lambda: bnfast.forward(
            x, g, b, training=False, running_mean=rm, running_var=rv
        ),
    }
    F = torch.nn.functional
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    gt, bt = torch.from_numpy(g), torch.from_numpy(b)
    rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    _, mean, invstd = torch.ops.aten.native_batch_norm(xt, gt, bt, None, None, True, 0.1, 1e-5)

    def t_forward():
        with torch.no_grad():
            return F.batch_norm(xt, rmt, rvt, gt, bt, True, 0.1, 1e-5)

    def t_inference():
        with torch.no_grad():
            return F.batch_norm(xt, rmt, rvt, gt, bt, False, 0.1, 1e-5)

    def t_backward():
        return torch.ops.aten.native_batch_norm_backward(
            dyt, xt, gt, None, None, mean, invstd, True, 1e-5, [True, True, True]
        )

    theirs = {"forward": t_forward, "backward": t_backward, "inference": t_inference}
    return ours, theirs


def layer(shape, kwargs, torch_kwargs, torch):
    rng = np.random.default_rng(1)
    n, c = shape
    x = rng.normal(3, 2, shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    bn = bnfast.BatchNorm(c, **kwargs)
    module = torch.nn.BatchNorm1d(c, bias=not torch_kwargs.get("no_bias", False))
    relu = torch.nn.ReLU() if torch_kwargs.get("relu") else None
    xt = torch.from_numpy(x).requires_grad_(True)
    dyt = torch.from_numpy(dy)

    def step():
        bn.forward(x)
        return bn.backward(dy)

    def t_step():
        xt.grad = None
        module.zero_grad(set_to_none=True)
        y = module(xt)
        if relu is not None:
            y = relu(y)
        y.backward(dyt)

    bn_eval = bnfast.BatchNorm(c, **kwargs).eval()
    module_eval = torch.nn.BatchNorm1d(c).eval()

    def t_infer():
        with torch.no_grad():
            return module_eval(xt)

    return {"step": step, "inference": lambda: bn_eval(x)}, {"step": t_step, "inference": t_infer}


def main() -> None:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=float, default=0.5)
    args = p.parse_args()
    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"{_machine.describe()}; torch {torch.__version__}; {args.threads} thread(s); float32")
    print(f"{'call':<40}{'bnfast us':>10}{'torch us':>10}{'ratio':>8}")
    for shape in SHAPES:
        ours, theirs = functional(shape, torch)
        for op in ours:
            t = cmp.interleaved_ms({"b": ours[op], "t": theirs[op]}, budget_s=args.budget)
            label = f"functional {op} {shape}"
            print(f"{label:<40}{1e3 * t['b']:>10.1f}{1e3 * t['t']:>10.1f}{t['t'] / t['b']:>7.2f}x")
    for shape in SHAPES:
        for name, (kw, tkw) in LAYERS.items():
            ours, theirs = layer(shape, kw, tkw, torch)
            ops = ("step", "inference") if name == "plain" else ("step",)
            for op in ops:
                t = cmp.interleaved_ms({"b": ours[op], "t": theirs[op]}, budget_s=args.budget)
                label = f"layer {op} {name} {shape}"
                print(
                    f"{label:<40}{1e3 * t['b']:>10.1f}{1e3 * t['t']:>10.1f}{t['t'] / t['b']:>7.2f}x"
                )


if __name__ == "__main__":
    main()
