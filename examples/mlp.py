"""A small, readable NumPy MLP trainer with bnfast's BatchNorm: the example users copy from.

Blocks are ``Linear -> BatchNorm -> ReLU`` (normalize before the activation, as the notes
recommend). A Linear followed by BN has no bias: BN subtracts the batch mean, which cancels any
per-unit constant, and BN's beta takes the bias's role.
"""

from __future__ import annotations

import numpy as np

import bnfast


class Linear:
    def __init__(self, n_in, n_out, rng, *, bias=True, dtype=np.float64):
        self.W = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(dtype)
        self.b = np.zeros(n_out, dtype) if bias else None
        self.dW = np.zeros_like(self.W)
        self.db = None if self.b is None else np.zeros_like(self.b)

    def forward(self, x, train=True):
        self.x = x
        z = x @ self.W
        return z if self.b is None else z + self.b

    def backward(self, dz):
        self.dW[...] = self.x.T @ dz
        if self.b is not None:
            self.db[...] = dz.sum(axis=0)
        return dz @ self.W.T

    def params(self):
        return [(self.W, self.dW)] + ([] if self.b is None else [(self.b, self.db)])


class ReLU:
    def forward(self, x, train=True):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dy):
        return dy * self.mask

    def params(self):
        return []


class BatchNorm:
    """bnfast.BatchNorm as a trainer layer; ``learn_affine=False`` freezes gamma=1, beta=0."""

    def __init__(self, n, *, dtype=np.float64, learn_affine=True, momentum=0.1, comm=None):
        self.bn = bnfast.BatchNorm(n, dtype=dtype, momentum=momentum, comm=comm)
        self.learn_affine = learn_affine

    def forward(self, x, train=True):
        self.bn.train(train)
        return self.bn(x)

    def backward(self, dy):
        return self.bn.backward(dy)

    def params(self):
        if not self.learn_affine:
            return []
        p, g = self.bn.params(), self.bn.grads()
        return [(p["gamma"], g["gamma"]), (p["beta"], g["beta"])]


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -logp[np.arange(n), labels].mean()
    grad = np.exp(logp)
    grad[np.arange(n), labels] -= 1.0
    return loss, grad / n


class MLP:
    """``depth`` hidden blocks of width ``width`` (Linear [-> BN] -> ReLU), then Linear ->
    logits."""

    def __init__(
        self,
        n_in,
        n_out,
        *,
        width=64,
        depth=2,
        bn=True,
        bias_before_bn=False,
        learn_affine=True,
        seed=0,
        dtype=np.float64,
        comm=None,
    ):
        rng = np.random.default_rng(seed)
        self.layers = []
        n = n_in
        for _ in range(depth):
            self.layers.append(Linear(n, width, rng, bias=(not bn) or bias_before_bn, dtype=dtype))
            if bn:
                self.layers.append(
                    BatchNorm(width, dtype=dtype, learn_affine=learn_affine, comm=comm)
                )
            self.layers.append(ReLU())
            n = width
        self.layers.append(Linear(n, n_out, rng, dtype=dtype))

    def forward(self, x, train=True):
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, dlogits):
        for layer in reversed(self.layers):
            dlogits = layer.backward(dlogits)
        return dlogits

    def params(self):
        return [pg for layer in self.layers for pg in layer.params()]

    def loss(self, x, y, train=True):
        return softmax_cross_entropy(self.forward(x, train), y)

    def accuracy(self, x, y):
        return float((self.forward(x, train=False).argmax(axis=1) == y).mean())


class SGD:
    """Minibatch SGD with (heavy-ball) momentum; momentum=0 is plain SGD."""

    def __init__(self, params, lr, momentum=0.9):
        self.params, self.lr, self.momentum = params, lr, momentum
        self.v = [np.zeros_like(p) for p, _ in params]

    def step(self):
        for (p, g), v in zip(self.params, self.v, strict=True):
            v *= self.momentum
            v -= self.lr * g
            p += v


class Adam:
    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, eps, 0
        self.m = [np.zeros_like(p) for p, _ in params]
        self.v = [np.zeros_like(p) for p, _ in params]

    def step(self):
        self.t += 1
        b1, b2 = self.betas
        for (p, g), m, v in zip(self.params, self.m, self.v, strict=True):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= self.lr * (m / (1 - b1**self.t)) / (np.sqrt(v / (1 - b2**self.t)) + self.eps)


def load_digits_split(seed=0):
    """scikit-learn's bundled digits (no download): 60/20/20 train/validation/test, scaled to
    [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.data / 16.0), d.target
    idx = np.random.default_rng(seed).permutation(len(y))
    n_tr, n_va = int(0.6 * len(y)), int(0.2 * len(y))
    tr, va, te = idx[:n_tr], idx[n_tr : n_tr + n_va], idx[n_tr + n_va :]
    return (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])


def train(net, data, *, epochs, lr, optimizer="sgd", batch=32, seed=0, on_epoch=None):
    """Train; returns per-epoch history of train loss and validation accuracy."""
    (xtr, ytr), (xva, yva) = data[0], data[1]
    opt = (SGD if optimizer == "sgd" else Adam)(net.params(), lr)
    rng = np.random.default_rng(seed)
    hist = {"loss": [], "val_acc": [], "train_acc": []}
    for epoch in range(epochs):
        order = rng.permutation(len(ytr))
        losses = []
        for i in range(0, len(order) - batch + 1, batch):  # full batches only (BN needs > 1)
            j = order[i : i + batch]
            loss, dlogits = net.loss(xtr[j], ytr[j])
            if not np.isfinite(loss):
                losses.append(np.inf)
                break
            net.backward(dlogits)
            opt.step()
            losses.append(loss)
        hist["loss"].append(float(np.mean(losses)))
        hist["val_acc"].append(net.accuracy(xva, yva) if np.isfinite(hist["loss"][-1]) else 0.0)
        hist["train_acc"].append(net.accuracy(xtr, ytr) if np.isfinite(hist["loss"][-1]) else 0.0)
        if on_epoch:
            on_epoch(epoch, hist)
        if not np.isfinite(hist["loss"][-1]):
            break
    return hist
