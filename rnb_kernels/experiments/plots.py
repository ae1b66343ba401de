"""Matplotlib (Agg) plots shared by ``rnb demo``, ``rnb bench mixing`` and ``benchmarks/``."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
    curves: Mapping[str, tuple[Sequence[int], Any]],
    path: str | Path,
    title: str = "",
    ylabel: str = "eval loss (nats/token)",
) -> Path:
    """Eval loss against optimizer step, one line per method; with several seeds, the line is
    the mean over seeds and the shaded band spans the lowest to the highest seed.

    Args:
        curves: ``{method: (steps [t], losses)}`` with ``losses`` ``float[t]`` (one run) or
            ``float[s, t]`` (one row per seed).
        path: output ``.png``.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    for name, (steps, losses) in curves.items():
        y = np.atleast_2d(np.asarray(losses, dtype=np.float64))
        x = np.asarray(steps)
        (line,) = ax.plot(x, y.mean(0), marker="o", ms=3, label=f"{name}")
        if y.shape[0] > 1:
            ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.18, lw=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title or "eval loss", 70), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    # The first evaluation (untrained model) is far above the rest: zoom on the training.
    tails = [np.atleast_2d(np.asarray(v, dtype=np.float64))[:, 1:] for _, v in curves.values()]
    tails = [t for t in tails if t.size]
    if tails:
        lo = min(float(t.min()) for t in tails)
        hi = max(float(t[:, 0].max()) for t in tails)
        if hi > lo:
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_weights(
    runs: Mapping[str, tuple[Sequence[int], np.ndarray]],
    path: str | Path,
    names: Mapping[str, Sequence[str]] | None = None,
    top: int = 6,
    target_share: Mapping[str, Sequence[float]] | None = None,
    title: str = "",
) -> Path:
    """The mixture over time, one panel per method: a stacked area per domain.

    The ``top`` domains with the largest mean weight over the run get their own band and
    their name in the legend; the others are stacked into one grey "other" band, so the chart
    stays readable with 60 domains.

    Args:
        runs: ``{method: (steps [u], weights float[u, m])}``.
        names: optional domain names per method (default ``d0, d1, ...``).
        top: domains shown individually.
        target_share: optional ``{method: float[m]}``: the share of each domain's training
            examples that come from the target domains; the expected share of target
            examples in a batch, ``Σ_i w_i share_i``, is drawn as a dashed line.
        path: output ``.png``.
    """
    plt = pyplot()
    n = max(1, len(runs))
    fig, axes = plt.subplots(n, 1, figsize=(9.0, 2.6 * n), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, (method, (steps, w)) in zip(axes[:, 0], runs.items()):
        w = np.asarray(w, dtype=np.float64)
        if w.ndim != 2 or w.shape[0] == 0:
            ax.set_title(f"{method}: no weights recorded")
            continue
        m = w.shape[1]
        labels = list(names.get(method, [])) if names else []
        order = np.argsort(-w.mean(0), kind="stable")
        shown = order[: min(top, m)]
        rest = order[min(top, m) :]
        bands = [w[:, i] for i in shown]
        lab = [labels[i] if i < len(labels) else f"d{i}" for i in shown]
        cols = [colors[j % len(colors)] for j in range(len(shown))]
        if rest.size:
            bands.append(w[:, rest].sum(1))
            lab.append(f"other ({rest.size} domains)")
            cols.append("0.8")
        x = np.asarray(steps)
        ax.stackplot(x, np.stack(bands), labels=lab, colors=cols, alpha=0.9)
        if target_share is not None and method in target_share:
            share = np.asarray(target_share[method], dtype=np.float64)
            ax.plot(x, w @ share, "k--", lw=1.4, label="target share of the mixture")
        ax.set_ylim(0, 1)
        ax.set_xlim(x[0], x[-1])
        ax.set_ylabel("weight")
        ax.set_title(f"{method} (m={m})", fontsize=10)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[-1, 0].set_xlabel("optimizer step")
    if title:
        fig.suptitle(title, fontsize=11)
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
