"""Matplotlib (Agg) plots shared by ``rnb demo``, ``rnb bench mixing`` and ``benchmarks/``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["plot_eval_curves", "plot_method_bars", "plot_weights", "pyplot"]


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend."""
    import matplotlib

    # Agg: no display on CI machines or servers; must be chosen before pyplot is imported.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_eval_curves(
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], path: str | Path, title: str = ""
) -> Path:
    """One line per method: eval loss against optimizer step.

    Args:
        curves: ``{method: (steps, eval_losses)}``.
        path: output ``.png``.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (steps, losses) in curves.items():
        ax.plot(steps, losses, marker="o", ms=3, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title(title or "eval loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_weights(
    runs: Mapping[str, tuple[Sequence[int], np.ndarray]],
    path: str | Path,
    names: Mapping[str, Sequence[str]] | None = None,
    top: int = 8,
) -> Path:
    """Mixture weights over time, one panel per method (stacked areas).

    Args:
        runs: ``{method: (steps [u], weights float[u, m])}``.
        names: optional domain names per method (the ``top`` largest final weights are
            labelled; the rest are drawn but unlabelled so the legend stays readable).
        path: output ``.png``.
    """
    plt = pyplot()
    n = max(1, len(runs))
    fig, axes = plt.subplots(n, 1, figsize=(7.0, 2.4 * n), squeeze=False)
    for ax, (method, (steps, w)) in zip(axes[:, 0], runs.items()):
        w = np.asarray(w, dtype=np.float64)
        if w.ndim != 2 or w.shape[0] == 0:
            ax.set_title(f"{method}: no weights recorded")
            continue
        order = np.argsort(-w[-1])
        labels = list(names.get(method, [])) if names else []
        lab = [
            (labels[i] if i < len(labels) else f"d{i}") if r < top else None
            for r, i in enumerate(order)
        ]
        ax.stackplot(np.asarray(steps), w[:, order].T, labels=lab, alpha=0.85)
        ax.set_ylim(0, 1)
        ax.set_ylabel("weight")
        ax.set_title(f"{method} (m={w.shape[1]})")
        handles, hl = ax.get_legend_handles_labels()
        keep = [(h, t) for h, t in zip(handles, hl) if t and not t.startswith("_")]
        if keep:
            ax.legend(*zip(*keep), fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_method_bars(
    rows: Mapping[str, tuple[float, float]], path: str | Path, ylabel: str, title: str = ""
) -> Path:
    """Bar chart with error bars: ``{method: (mean, std)}``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 3.8))
    names = list(rows)
    means = [rows[k][0] for k in names]
    stds = [rows[k][1] for k in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    lo = min(m - s for m, s in zip(means, stds)) if names else 0.0
    hi = max(m + s for m, s in zip(means, stds)) if names else 1.0
    pad = 0.1 * (hi - lo) if hi > lo else 0.1
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
