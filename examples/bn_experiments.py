"""Run the batch-norm experiments on scikit-learn's digits with the NumPy MLP in mlp.py.

    python examples/bn_experiments.py            # full run: a few minutes on 2 cores
    python examples/bn_experiments.py --quick    # reduced run, under a minute (CI runs it)

Prints a results table, writes PNG plots and results.md to --out (default examples/results/).
Seeds are fixed: runs are reproducible. What is measured is reported as measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mlp  # noqa: E402

import bnfast  # noqa: E402

TARGET = 0.95


def epochs_to(hist, target=TARGET):
    return next((i + 1 for i, a in enumerate(hist["val_acc"]) if a >= target), None)


def progress(msg):
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def run(quick: bool, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)

    def plot(name, title, series, *, xlabel="epoch", ylabel="val acc", x=None, **axes):
        """One PNG of labelled curves: ``series`` maps label -> y values."""
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, ys in series.items():
            ax.plot(
                x if x is not None else range(1, len(ys) + 1),
                ys,
                "o-" if x else "-",
                label=label,
                ms=3,
            )
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, **axes)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)

    data = mlp.load_digits_split()
    (xtr, ytr), (xva, yva), (xte, yte) = data
    E = 8 if quick else 30
    rows = []

    def net(**kw):
        return mlp.MLP(64, 10, **kw)

    # 1. Faster training
    progress("1 faster training")
    h = {bn: mlp.train(net(bn=bn), data, epochs=E, lr=0.01) for bn in (True, False)}
    rows.append(
        ("1 epochs to 95% val acc (SGD+momentum, lr 0.01)", epochs_to(h[True]), epochs_to(h[False]))
    )
    adam = {
        bn: mlp.train(net(bn=bn), data, epochs=E, lr=1e-3, optimizer="adam") for bn in (True, False)
    }
    rows.append(
        ("1 epochs to 95% val acc (Adam, lr 1e-3)", epochs_to(adam[True]), epochs_to(adam[False]))
    )
    plot(
        "1_loss.png",
        "1. Training loss",
        {
            "BN, SGD": h[True]["loss"],
            "no BN, SGD": h[False]["loss"],
            "BN, Adam": adam[True]["loss"],
            "no BN, Adam": adam[False]["loss"],
        },
        ylabel="train loss",
        yscale="log",
    )

    # 2. Learning-rate range
    progress("2 learning-rate sweep")
    lrs = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
    sweep = {
        bn: [max(mlp.train(net(bn=bn), data, epochs=E, lr=lr)["val_acc"]) for lr in lrs]
        for bn in (True, False)
    }
    rows.append(
        (
            f"2 learning rates (of {len(lrs)}, 1e-3..1) reaching 95%",
            sum(a >= TARGET for a in sweep[True]),
            sum(a >= TARGET for a in sweep[False]),
        )
    )
    plot(
        "2_lr_sweep.png",
        "2. Learning-rate range",
        {"BN": sweep[True], "no BN": sweep[False]},
        x=lrs,
        xlabel="learning rate",
        ylabel="best val acc",
        xscale="log",
    )

    # 3. Deep network
    progress("3 20-layer MLP")
    deep = {bn: net(bn=bn, depth=20, width=32) for bn in (True, False)}
    hd = {bn: mlp.train(deep[bn], data, epochs=E, lr=0.01) for bn in (True, False)}
    rows.append(("3 20-layer MLP final val acc", hd[True]["val_acc"][-1], hd[False]["val_acc"][-1]))
    plot(
        "3_deep.png", "3. 20-layer MLP", {"BN": hd[True]["val_acc"], "no BN": hd[False]["val_acc"]}
    )

    # 4. Bias redundancy
    progress("4 bias before BN")
    nb = net(bias_before_bn=True)
    loss, dl = nb.loss(xtr[:64], ytr[:64])
    nb.backward(dl)
    first = nb.layers[0]
    bias_grad = float(np.linalg.norm(first.db))
    w_grad = float(np.linalg.norm(first.dW))
    hb = mlp.train(net(bias_before_bn=True), data, epochs=E, lr=0.01)
    acc_bias = hb["val_acc"][-1]
    plot(
        "4_bias.png",
        "4. Bias before BN: same training",
        {"with bias": hb["val_acc"], "without bias": h[True]["val_acc"]},
    )
    rows.append(
        (
            "4 norm of grad of the bias before BN (norm of grad W for scale)",
            f"{bias_grad:.1e}",
            f"{w_grad:.1e}",
        )
    )
    rows.append(("4 final val acc: with bias / without", acc_bias, h[True]["val_acc"][-1]))

    # 5. Why gamma and beta
    progress("5 gamma and beta")
    rng = np.random.default_rng(1)
    z = rng.normal(3.0, 2.0, (32, 8))
    mean, var = bnfast.moments(z)
    y, _ = bnfast.forward(z, np.sqrt(var + 1e-5), mean)
    identity_err = float(np.max(np.abs(y - z)))
    frozen = mlp.train(net(learn_affine=False), data, epochs=E, lr=0.01)
    rows.append(
        (
            "5 identity: max abs(y - x) with gamma=sqrt(var+eps), beta=mean",
            f"{identity_err:.1e}",
            "",
        )
    )
    rows.append(
        (
            "5 final val acc: learned gamma/beta / frozen at 1/0",
            h[True]["val_acc"][-1],
            frozen["val_acc"][-1],
        )
    )
    rows.append(("5 final train loss: learned / frozen", h[True]["loss"][-1], frozen["loss"][-1]))
    plot(
        "5_gamma_beta.png",
        "5. Learned vs frozen gamma/beta",
        {"learned": h[True]["loss"], "frozen 1/0": frozen["loss"]},
        ylabel="train loss",
        yscale="log",
    )

    # 6. Inference with running averages
    progress("6 inference statistics")
    trained = net(bn=True)
    mlp.train(trained, data, epochs=E, lr=0.01)
    acc_ema = trained.accuracy(xte, yte)

    def batch_stats_acc(bs):
        """Test accuracy when every BN layer normalizes with the test batch's own statistics."""
        hits = 0
        for i in range(0, len(yte), bs):
            h_ = xte[i : i + bs]
            for layer in trained.layers:
                if not isinstance(layer, mlp.BatchNorm):
                    h_ = layer.forward(h_, train=False)
                elif len(h_) > 1:
                    h_, _ = bnfast.forward(h_, layer.bn.gamma, layer.bn.beta)
                else:  # one value per channel: xhat = 0, so every output is beta
                    h_ = np.broadcast_to(layer.bn.beta, h_.shape).copy()
            hits += int((h_.argmax(axis=1) == yte[i : i + bs]).sum())
        return hits / len(yte)

    acc6 = {
        "EMA (eval)": acc_ema,
        "batch 360": batch_stats_acc(len(yte)),
        "batch 8": batch_stats_acc(8),
        "batch 1": batch_stats_acc(1),
    }
    rows.append(
        (
            "6 test acc: EMA stats (eval) / test-batch stats, batch 360",
            acc6["EMA (eval)"],
            acc6["batch 360"],
        )
    )
    rows.append(
        ("6 test acc: test-batch stats, batch 8 / batch 1", acc6["batch 8"], acc6["batch 1"])
    )
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(list(acc6), list(acc6.values()))
    ax.set(title="6. Test accuracy by normalization statistics", ylabel="test acc")
    fig.tight_layout()
    fig.savefig(out / "6_inference.png", dpi=90)
    plt.close(fig)

    # 7. Covariate shift and regularization
    progress("7 covariate shift")
    probe = xva[:128]
    stats = {}
    for bn in (True, False):
        n7 = net(bn=bn)
        rec = []

        def record(epoch, hist, n7=n7, rec=rec):
            hcur = probe
            for layer in n7.layers[:-1]:
                if isinstance(layer, mlp.ReLU):
                    rec.append((hcur.mean(axis=0)[:3], hcur.std(axis=0)[:3]))
                    break  # first block's pre-activation only
                hcur = layer.forward(hcur, train=False)

        hist = mlp.train(n7, data, epochs=E, lr=0.01, on_epoch=record)
        stats[bn] = (rec, hist)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, bn in zip(axes, (True, False), strict=True):
        rec = stats[bn][0]
        means = np.array([m for m, _ in rec])
        stds = np.array([s for _, s in rec])
        for u in range(3):
            ax.plot(means[:, u], label=f"unit {u} mean")
            ax.plot(stds[:, u], ls="--", label=f"unit {u} std")
        ax.set(title=f"7. pre-activation, {'BN' if bn else 'no BN'}", xlabel="epoch")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "7_covariate_shift.png", dpi=90)
    plt.close(fig)
    drift = {
        bn: float(np.ptp(np.array([m for m, _ in stats[bn][0]]), axis=0).mean())
        for bn in (True, False)
    }
    rows.append(
        ("7 drift of first-layer pre-activation means over training", drift[True], drift[False])
    )
    gap = {bn: stats[bn][1]["train_acc"][-1] - stats[bn][1]["val_acc"][-1] for bn in (True, False)}
    rows.append(("7 train - val accuracy gap", gap[True], gap[False]))
    return rows


def fmt(v):
    if v is None:
        return "not reached"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="reduced run (8 epochs instead of 30)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument(
        "--readme",
        action="store_true",
        help="also rewrite the results section of README.md (between its markers)",
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.quick, args.out)
    table = ["| experiment | with BN | without BN (or second) |", "|---|---|---|"]
    table += [f"| {name} | {fmt(a)} | {fmt(b)} |" for name, a, b in rows]
    took = time.perf_counter() - t0
    text = "\n".join(table) + f"\n\n{'--quick' if args.quick else 'full'} run, {took:.0f} s.\n"
    print(text)
    (args.out / "results.md").write_text(text)
    if args.readme:
        readme = Path(__file__).resolve().parents[1] / "README.md"
        start, end = "<!-- demo-results:start -->", "<!-- demo-results:end -->"
        s = readme.read_text()
        plot = Path(args.out / "1_loss.png").resolve().relative_to(readme.parent)
        block = f"{start}\n{text}\n![training loss with and without BN]({plot.as_posix()})\n{end}"
        readme.write_text(s[: s.index(start)] + block + s[s.index(end) + len(end) :])
    return rows


if __name__ == "__main__":
    main()
